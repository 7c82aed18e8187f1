//! Wiring of the DRA drivers into `hybridlet run`: GPUs from discovery (NVML, or a
//! fixture) and SR-IOV VFs (sysfs) become devices of a ResourceSlice pool named after the
//! node, one driver each (`gpu.hybridlet.io`, `sriov.hybridlet.io`); the kubelet prepares
//! claims through `<kubelet-root>/plugins/<driver>/dra.sock` (v1 and v1beta1), registered
//! as a `DRAPlugin` in `plugins_registry`. CDI specs go to `/var/run/cdi`, the checkpoint
//! to the state directory. A prepared VF is moved to vfio-pci (and back at unprepare), and
//! its container gets `/dev/vfio/vfio` and its IOMMU group's device.
//!
//! Readiness means "sockets serve": publication retries in the background with jittered
//! backoff (the API server may be unreachable when the node boots), then reconciles every
//! minute, which also recreates slices someone deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_dra::{
    Attr, ContainerEdits, DeviceBackend, Driver, HealthBoard, HealthService, KubeClaims,
    SliceDevice, SlicePublisher, V1Health, V1Service, V1alpha1Health, V1beta1Service,
};
use hybridlet_kubelet_plugin::{
    PluginMetrics, PluginSocket, RegistrationService, registration_socket_path, serve,
    service_socket_path,
};
use hybridlet_proto::dra::{v1, v1beta1};
use hybridlet_proto::dra_health;
use hybridlet_proto::pluginregistration::{DRA_PLUGIN, PluginInfo};
use hybridlet_runtime::{Backoff, BoxError, SubsystemContext};
use hybridlet_sys::PciAddress;
use hybridlet_sys::binding::{BindingState, DriverBinding};

use crate::device_metrics::{Holder, Holders};
use crate::devices::{GpuView, Report, VfView};

/// How often slices are reconciled after the first publication.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a disabled driver may spend deleting its slices on the way out.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct GpuBackend {
    driver: String,
    node: String,
    gpus: BTreeMap<String, GpuView>,
    /// Where the host's `/dev` is (under `--root` in tests).
    dev_dir: PathBuf,
}

fn device_name(g: &GpuView) -> String {
    format!("gpu-{}", g.info.index)
}

/// `12.8` → `12.8.0`: DRA version attributes are semantic versions.
fn semver(v: &str) -> String {
    let parts: Vec<&str> = v.split('.').collect();
    match parts.len() {
        1 => format!("{v}.0.0"),
        2 => format!("{v}.0"),
        _ => parts[..3].join("."),
    }
}

impl DeviceBackend for GpuBackend {
    fn driver_name(&self) -> &str {
        &self.driver
    }

    fn pool_name(&self) -> &str {
        &self.node
    }

    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, String> {
        let g = self
            .gpus
            .get(device)
            .ok_or_else(|| format!("no device {device} on this node (was the slice stale?)"))?;
        // The runtime refuses a CDI device whose node is missing, so name only nodes that
        // exist: the GPU's own and nvidiactl are required; the UVM nodes (created when
        // nvidia-uvm loads, or by nvidia-modprobe) are added when present.
        let gpu_node = format!("nvidia{}", g.info.minor_number);
        let mut device_nodes = Vec::new();
        for required in [gpu_node.as_str(), "nvidiactl"] {
            if !self.dev_dir.join(required).exists() {
                return Err(format!(
                    "/dev/{required} does not exist: is the NVIDIA driver loaded? (`nvidia-modprobe -c={}` creates the nodes)",
                    g.info.minor_number
                ));
            }
            device_nodes.push(format!("/dev/{required}"));
        }
        for optional in ["nvidia-uvm", "nvidia-uvm-tools"] {
            if self.dev_dir.join(optional).exists() {
                device_nodes.push(format!("/dev/{optional}"));
            } else {
                tracing::warn!(
                    device,
                    "/dev/{optional} does not exist, so the container gets no {optional}; CUDA programs need /dev/nvidia-uvm (`nvidia-modprobe -u -c=0` creates it)"
                );
            }
        }
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={}", g.info.uuid)],
            device_nodes,
        })
    }
}

/// The placement attributes GPUs and VFs share: the standard pcieRoot, our pcieSwitch
/// (also as `hybridlet.io/pcieSwitch`, the same name from both drivers, so a claim can
/// match a GPU and a VF on one switch: a driver's own attribute names differ by domain
/// and never match), and the NUMA node.
fn topology_attributes(
    attributes: &mut BTreeMap<String, Attr>,
    placement: &crate::devices::Placement,
) {
    if let Some(root) = &placement.pcie_root {
        attributes.insert(
            "resource.kubernetes.io/pcieRoot".into(),
            Attr::String(root.clone()),
        );
    }
    if let Some(switch) = &placement.pcie_switch {
        attributes.insert("pcieSwitch".into(), Attr::String(switch.clone()));
        attributes.insert(
            "hybridlet.io/pcieSwitch".into(),
            Attr::String(switch.clone()),
        );
    }
    if let Some(numa) = placement.numa_node {
        attributes.insert("numaNode".into(), Attr::Int(i64::from(numa)));
    }
}

fn slice_device(g: &GpuView) -> SliceDevice {
    let mut attributes = BTreeMap::from([
        ("type".to_string(), Attr::String("gpu".into())),
        ("uuid".to_string(), Attr::String(g.info.uuid.clone())),
        ("index".to_string(), Attr::Int(i64::from(g.info.index))),
        ("productName".to_string(), Attr::String(g.info.name.clone())),
        ("brand".to_string(), Attr::String(g.info.brand.clone())),
        (
            "architecture".to_string(),
            Attr::String(g.info.architecture.clone()),
        ),
        (
            "driverVersion".to_string(),
            Attr::Version(semver(&g.info.driver_version)),
        ),
        (
            "cudaDriverVersion".to_string(),
            Attr::Version(semver(&g.info.cuda_driver_version)),
        ),
        (
            "cudaComputeCapability".to_string(),
            Attr::Version(format!(
                "{}.{}.0",
                g.info.cuda_compute_capability.major, g.info.cuda_compute_capability.minor
            )),
        ),
    ]);
    if let Some(addr) = &g.pci_address {
        attributes.insert(
            "resource.kubernetes.io/pciBusID".into(),
            Attr::String(addr.clone()),
        );
    }
    topology_attributes(&mut attributes, &g.placement);
    SliceDevice {
        name: device_name(g),
        attributes,
        capacity: BTreeMap::from([("memory".to_string(), g.info.memory_total_bytes.to_string())]),
        taints: Vec::new(),
    }
}

/// The kernel driver a prepared VF is handed to.
const VFIO: &str = "vfio-pci";

/// SR-IOV VFs as DRA devices. Mode `vfio` (the default) moves a VF to vfio-pci; mode
/// `netdev` leaves it on its kernel driver and hands the container its netdev name and,
/// when the VF has one, its RDMA device.
#[derive(Debug)]
struct SriovBackend {
    driver: String,
    node: String,
    vfs: BTreeMap<String, VfInfo>,
    binding: Arc<dyn DriverBinding>,
    /// The host's sysfs and /dev (under `--root` in tests).
    sys_dir: PathBuf,
    dev_dir: PathBuf,
}

#[derive(Debug, Clone)]
struct VfInfo {
    address: PciAddress,
    iommu_group: Option<u32>,
    /// The RDMA device (`mlx5_3`) at discovery, if any.
    rdma_device: Option<String>,
}

/// How a VF is handed to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VfMode {
    Vfio,
    Netdev,
}

/// The mode from the opaque parameters (`{"mode": "vfio" | "netdev"}`, with optional
/// `apiVersion`/`kind`); anything else is refused by name, so a typo fails the claim
/// instead of silently picking the default.
fn vf_mode(driver: &str, config: Option<&serde_json::Value>) -> Result<VfMode, String> {
    let Some(config) = config else {
        return Ok(VfMode::Vfio);
    };
    let Some(object) = config.as_object() else {
        return Err(format!(
            "{driver} config must be an object like {{\"mode\": \"netdev\"}}"
        ));
    };
    for key in object.keys() {
        if !matches!(key.as_str(), "mode" | "apiVersion" | "kind") {
            return Err(format!(
                "{driver} config has an unknown field {key:?} (known: mode, apiVersion, kind)"
            ));
        }
    }
    match object.get("mode").map(|m| m.as_str()) {
        None | Some(Some("vfio")) => Ok(VfMode::Vfio),
        Some(Some("netdev")) => Ok(VfMode::Netdev),
        Some(other) => Err(format!(
            "{driver} config: mode must be \"vfio\" or \"netdev\", not {}",
            other.map_or_else(|| object["mode"].to_string(), |m| format!("{m:?}"))
        )),
    }
}

/// `0000:81:00.2` → `vf-0000-81-00-2` (DRA device names are DNS labels).
fn vf_device_name(address: &str) -> String {
    format!("vf-{}", address.replace([':', '.'], "-"))
}

impl SriovBackend {
    fn vf(&self, device: &str) -> Result<&VfInfo, String> {
        self.vfs
            .get(device)
            .ok_or_else(|| format!("no VF {device} on this node (was the slice stale?)"))
    }

    /// The VF's network interface now (names can change after discovery).
    fn netdev(&self, vf: &VfInfo) -> Result<String, String> {
        let dir = self
            .sys_dir
            .join("bus/pci/devices")
            .join(vf.address.as_str())
            .join("net");
        std::fs::read_dir(&dir)
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| {
                format!(
                    "VF {} has no network interface (is it on vfio-pci, or its driver not loaded?); netdev mode needs it on its kernel driver",
                    vf.address
                )
            })
    }

    /// The device nodes an RDMA device needs in a container: its uverbs node (found
    /// through `/sys/class/infiniband_verbs/*/ibdev`) and `rdma_cm` when present.
    fn rdma_nodes(&self, rdma: &str) -> Result<Vec<String>, String> {
        let verbs = self.sys_dir.join("class/infiniband_verbs");
        let uverbs = std::fs::read_dir(&verbs)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                std::fs::read_to_string(e.path().join("ibdev")).is_ok_and(|d| d.trim() == rdma)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| {
                format!("RDMA device {rdma} has no uverbs device in /sys/class/infiniband_verbs (is ib_uverbs loaded?)")
            })?;
        let mut nodes = vec![format!("/dev/infiniband/{uverbs}")];
        if self.dev_dir.join("infiniband/rdma_cm").exists() {
            nodes.push("/dev/infiniband/rdma_cm".into());
        }
        Ok(nodes)
    }
}

impl DeviceBackend for SriovBackend {
    fn driver_name(&self) -> &str {
        &self.driver
    }

    fn pool_name(&self) -> &str {
        &self.node
    }

    fn edits(
        &self,
        device: &str,
        config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, String> {
        let vf = self.vf(device)?;
        // The name SR-IOV network device plugin users already read.
        let mut env = vec![format!("PCIDEVICE_SRIOV_HYBRIDLET_IO={}", vf.address)];
        if vf_mode(&self.driver, config)? == VfMode::Netdev {
            let netdev = self.netdev(vf)?;
            env.push(format!("SRIOV_HYBRIDLET_IO_NETDEV={netdev}"));
            let mut device_nodes = Vec::new();
            if let Some(rdma) = &vf.rdma_device {
                env.push(format!("SRIOV_HYBRIDLET_IO_RDMA={rdma}"));
                for node in self.rdma_nodes(rdma)? {
                    device_nodes.push(node);
                }
            }
            return Ok(ContainerEdits { env, device_nodes });
        }
        let group = vf.iommu_group.ok_or_else(|| {
            format!("VF {} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on) to hand VFs to containers", vf.address)
        })?;
        Ok(ContainerEdits {
            env,
            device_nodes: vec!["/dev/vfio/vfio".into(), format!("/dev/vfio/{group}")],
        })
    }

    fn attach(&self, device: &str, config: Option<&serde_json::Value>) -> Result<(), String> {
        let vf = self.vf(device)?;
        if vf_mode(&self.driver, config)? == VfMode::Netdev {
            // Nothing moves: the VF must be on its kernel driver with a network interface
            // (the CNI moves that interface into the pod's network namespace).
            self.netdev(vf)?;
            return Ok(());
        }
        if vf.iommu_group.is_none() {
            return Err(format!(
                "VF {} has no IOMMU group: turn the IOMMU on to use vfio-pci",
                vf.address
            ));
        }
        self.binding
            .bind(&vf.address, VFIO)
            .map_err(|e| e.to_string())?;
        tracing::info!(device, pci = %vf.address, "VF bound to vfio-pci");
        Ok(())
    }

    fn changes_host(&self) -> bool {
        true
    }

    fn snapshot(&self, device: &str) -> Result<Option<serde_json::Value>, String> {
        let vf = self.vf(device)?;
        let state = self.binding.state(&vf.address);
        Ok(Some(serde_json::json!({
            "driver": state.driver,
            "driverOverride": state.driver_override,
        })))
    }

    fn release(&self, device: &str, original: Option<&serde_json::Value>) -> Result<(), String> {
        let vf = self.vf(device)?;
        let Some(original) = original else {
            // A prepare recorded before originals were (checkpoint v1): the old rule,
            // give a VF on vfio-pci back to its own driver.
            if self.binding.driver(&vf.address).as_deref() != Some(VFIO) {
                return Ok(()); // never attached, or already given back
            }
            self.binding
                .release(&vf.address)
                .map_err(|e| e.to_string())?;
            tracing::info!(device, pci = %vf.address, driver = ?self.binding.driver(&vf.address), "VF given back to its driver");
            return Ok(());
        };
        let text = |k: &str| original.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let was = BindingState {
            driver: text("driver"),
            driver_override: text("driverOverride"),
        };
        if self.binding.state(&vf.address) == was {
            return Ok(()); // never changed (netdev mode, already on vfio-pci), or back
        }
        self.binding
            .restore(&vf.address, &was)
            .map_err(|e| e.to_string())?;
        tracing::info!(device, pci = %vf.address, driver = ?was.driver, driver_override = ?was.driver_override, "VF given back as it was before the claim");
        Ok(())
    }
}

fn vf_slice_device(pf: &crate::devices::PfView, vf: &VfView) -> SliceDevice {
    let mut attributes = BTreeMap::from([
        ("type".to_string(), Attr::String("vf".into())),
        (
            "pciAddress".to_string(),
            Attr::String(vf.pci_address.clone()),
        ),
        ("vendorId".to_string(), Attr::String(vf.vendor_id.clone())),
        ("deviceId".to_string(), Attr::String(vf.device_id.clone())),
        ("vfIndex".to_string(), Attr::Int(i64::from(vf.index))),
        (
            "pfPciAddress".to_string(),
            Attr::String(pf.pci_address.clone()),
        ),
    ]);
    if let Some(name) = &pf.netdev {
        attributes.insert("pfName".into(), Attr::String(name.clone()));
    }
    // What netdev mode hands over: a class can select VFs with an interface or with RDMA.
    if let Some(name) = &vf.netdev {
        attributes.insert("netdev".into(), Attr::String(name.clone()));
    }
    attributes.insert("rdma".into(), Attr::Bool(vf.rdma_device.is_some()));
    if let Some(rdma) = &vf.rdma_device {
        attributes.insert("rdmaDevice".into(), Attr::String(rdma.clone()));
    }
    if let Some(driver) = &pf.driver {
        attributes.insert("pfDriver".into(), Attr::String(driver.clone()));
    }
    if let Some(speed) = pf.link_speed_mbps {
        attributes.insert("linkSpeedMbps".into(), Attr::Int(i64::from(speed)));
    }
    topology_attributes(&mut attributes, &vf.placement);
    SliceDevice {
        name: vf_device_name(&vf.pci_address),
        attributes,
        capacity: BTreeMap::new(),
        taints: Vec::new(),
    }
}

/// A DRA driver subsystem (GPU or SR-IOV), configured.
#[derive(Debug)]
pub struct DraPlugin {
    label: &'static str,
    driver: String,
    node: String,
    kubeconfig: PathBuf,
    kubelet_root: PathBuf,
    checkpoint: PathBuf,
    cdi_dir: PathBuf,
    boot_id: String,
    backend: Arc<dyn DeviceBackend>,
    devices: Vec<SliceDevice>,
    metrics: PluginMetrics,
    registration_timeout: Duration,
    orphan_grace: Duration,
    /// Where to record who holds each device, and device name → key there.
    holders: Option<(Holders, BTreeMap<String, String>)>,
    /// The devices' health: the health stream and the slice taints read it.
    health: HealthBoard,
    /// This driver's share of the DRA families.
    dra_metrics: Option<hybridlet_dra::DraMetrics>,
    /// Set before stopping the driver for good (a reload disabled it): its slices are
    /// deleted on the way out, so the scheduler stops placing claims on its devices.
    withdraw: Arc<std::sync::atomic::AtomicBool>,
}

/// Where a DRA driver lives on the host (resolved under `--root`).
#[derive(Debug, Clone)]
pub struct DraPaths {
    /// The kubelet's kubeconfig (the driver reads claims as the node).
    pub kubeconfig: PathBuf,
    /// The kubelet's root directory.
    pub kubelet_root: PathBuf,
    /// hybridlet's state directory (checkpoints).
    pub state_dir: PathBuf,
    /// The CDI spec directory.
    pub cdi_dir: PathBuf,
    /// The host's `/dev`.
    pub dev_dir: PathBuf,
    /// The host's `/sys`.
    pub sys_dir: PathBuf,
    /// The kernel boot ID.
    pub boot_id: String,
}

/// Keep `holders` in step with the driver's prepared claims; `keys` maps each device
/// name to its key there (GPU UUID, VF PCI address).
async fn track_holders(
    mut claims: tokio::sync::watch::Receiver<BTreeMap<String, hybridlet_dra::PreparedClaim>>,
    holders: Holders,
    keys: BTreeMap<String, String>,
    shutdown: hybridlet_runtime::CancellationToken,
) {
    let owned: std::collections::BTreeSet<String> = keys.values().cloned().collect();
    let owns = |k: &str| owned.contains(k);
    loop {
        let by_uuid = claims
            .borrow_and_update()
            .values()
            .flat_map(|c| {
                c.devices.iter().filter_map(|d| {
                    let key = keys.get(&d.device)?;
                    Some((
                        key.clone(),
                        Holder {
                            namespace: c.namespace.clone(),
                            claim: c.name.clone(),
                            pod: c.pods.first().cloned().unwrap_or_default(),
                        },
                    ))
                })
            })
            .collect();
        holders.set(&owns, by_uuid);
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = claims.changed() => if changed.is_err() { break },
        }
    }
    // Stopped: the next instance (or none) says who holds what.
    holders.set(&owns, BTreeMap::new());
}

impl DraPlugin {
    fn new(
        label: &'static str,
        driver: &str,
        node: &str,
        paths: DraPaths,
        backend: Arc<dyn DeviceBackend>,
        devices: Vec<SliceDevice>,
        metrics: PluginMetrics,
    ) -> Self {
        let health = HealthBoard::new(devices.iter().map(|d| d.name.clone()));
        Self {
            health,
            dra_metrics: None,
            label,
            checkpoint: paths.state_dir.join(format!("dra-{driver}.json")),
            driver: driver.to_string(),
            node: node.to_string(),
            kubeconfig: paths.kubeconfig,
            kubelet_root: paths.kubelet_root,
            cdi_dir: paths.cdi_dir,
            boot_id: paths.boot_id,
            backend,
            devices,
            metrics,
            registration_timeout: Duration::from_secs(300),
            orphan_grace: Duration::from_secs(300),
            holders: None,
            withdraw: Arc::default(),
        }
    }

    /// Setting this flag before stopping the driver withdraws its slices on the way out.
    pub fn withdraw_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.withdraw.clone()
    }

    /// Raise `kubelet_plugin_registration_overdue` when no kubelet registered the driver
    /// this long after start (`spec.pluginRegistrationTimeout`).
    pub fn registration_timeout(mut self, after: Duration) -> Self {
        self.registration_timeout = after;
        self
    }

    /// Release a prepared claim whose ResourceClaim has been gone this long
    /// (`spec.dra.orphanedClaimGracePeriod`).
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Export this driver's calls, checkpoint writes, prepared state, unhealthy devices
    /// and last publication in `metrics`' families.
    pub fn with_metrics(mut self, metrics: &hybridlet_dra::DraMetrics) -> Self {
        self.dra_metrics = Some(metrics.for_driver(&self.driver));
        self
    }

    /// The health board of this driver's devices, for whoever observes their health.
    pub fn health(&self) -> HealthBoard {
        self.health.clone()
    }

    /// Device names by their host key (GPU UUID, VF PCI address).
    pub fn devices_by_key(&self) -> BTreeMap<String, String> {
        self.holders
            .iter()
            .flat_map(|(_, keys)| keys.iter().map(|(name, key)| (key.clone(), name.clone())))
            .collect()
    }

    /// The GPU driver over the GPUs of `report`.
    pub fn gpu(
        driver: &str,
        node: &str,
        paths: DraPaths,
        report: Report,
        metrics: PluginMetrics,
        holders: Holders,
    ) -> Self {
        let gpus: BTreeMap<String, GpuView> = report
            .gpus
            .into_iter()
            .map(|g| (device_name(&g), g))
            .collect();
        let devices: Vec<SliceDevice> = gpus.values().map(slice_device).collect();
        let uuids: BTreeMap<String, String> = gpus
            .iter()
            .map(|(name, g)| (name.clone(), g.info.uuid.clone()))
            .collect();
        let backend = Arc::new(GpuBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            gpus,
            dev_dir: paths.dev_dir.clone(),
        });
        let mut plugin = Self::new("GPU", driver, node, paths, backend, devices, metrics);
        plugin.holders = Some((holders, uuids));
        plugin
    }

    /// The SR-IOV driver over the VFs of `report`.
    pub fn sriov(
        driver: &str,
        node: &str,
        paths: DraPaths,
        report: &Report,
        binding: Arc<dyn DriverBinding>,
        metrics: PluginMetrics,
        holders: Holders,
    ) -> Self {
        let mut vfs = BTreeMap::new();
        let mut devices = Vec::new();
        for pf in &report.physical_functions {
            for vf in &pf.vfs {
                let Some(address) = PciAddress::parse(&vf.pci_address) else {
                    continue;
                };
                let name = vf_device_name(&vf.pci_address);
                vfs.insert(
                    name,
                    VfInfo {
                        address,
                        iommu_group: vf.iommu_group,
                        rdma_device: vf.rdma_device.clone(),
                    },
                );
                devices.push(vf_slice_device(pf, vf));
            }
        }
        let addresses: BTreeMap<String, String> = vfs
            .iter()
            .map(|(name, vf)| (name.clone(), vf.address.to_string()))
            .collect();
        let backend = Arc::new(SriovBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            vfs,
            binding,
            sys_dir: paths.sys_dir.clone(),
            dev_dir: paths.dev_dir.clone(),
        });
        let mut plugin = Self::new("SR-IOV", driver, node, paths, backend, devices, metrics);
        plugin.holders = Some((holders, addresses));
        plugin
    }

    /// Serve until shutdown.
    pub async fn run(self, ctx: SubsystemContext) -> Result<(), BoxError> {
        let label = self.label;
        let client = hybridlet_kube::client_from_kubeconfig(&self.kubeconfig)
            .await
            .map_err(|e| {
                format!(
                    "the {label} DRA driver talks to the API server with the kubelet's kubeconfig: {e}"
                )
            })?;
        let devices = self.devices;
        let mut driver = Driver::open(
            self.backend,
            Arc::new(KubeClaims::new(client.clone(), &self.node)),
            &self.checkpoint,
            &self.cdi_dir,
            &self.boot_id,
        )?;
        if let Some(m) = &self.dra_metrics {
            driver = driver.with_metrics(m.clone());
        }
        let driver = Arc::new(driver);
        {
            // Claims prepared for ResourceClaims that are gone: at start, then every minute.
            let (driver, grace, shutdown) =
                (driver.clone(), self.orphan_grace, ctx.shutdown.clone());
            tokio::spawn(async move {
                loop {
                    driver.reconcile(grace).await;
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                    }
                }
            });
        }
        if let Some((holders, uuids)) = self.holders {
            tokio::spawn(track_holders(
                driver.subscribe(),
                holders,
                uuids,
                ctx.shutdown.clone(),
            ));
        }
        let dra_path = service_socket_path(&self.kubelet_root, &self.driver, "dra.sock");
        let reg_path = registration_socket_path(&self.kubelet_root, &self.driver);
        let dra_socket = PluginSocket::bind(&dra_path)?.with_metrics(&self.metrics);
        let reg_socket = PluginSocket::bind(&reg_path)?.with_metrics(&self.metrics);
        let registration = RegistrationService::new(
            PluginInfo {
                r#type: DRA_PLUGIN.to_string(),
                name: self.driver.clone(),
                endpoint: dra_path.display().to_string(),
                // The kubelet takes the first DRA service it supports (v1 before v1beta1),
                // and the health stream in the newest version it knows.
                supported_versions: vec![
                    "v1.DRAPlugin".into(),
                    "v1beta1.DRAPlugin".into(),
                    "v1.DRAResourceHealth".into(),
                    "v1alpha1.DRAResourceHealth".into(),
                ],
            },
            self.metrics,
        );
        let overdue = registration.watch_overdue(self.registration_timeout, ctx.shutdown.clone());
        let health_service = HealthService::new(&self.node, self.health.clone());
        let dra_router = tonic::transport::Server::builder()
            .add_service(v1::dra_plugin_server::DraPluginServer::new(V1Service(
                driver.clone(),
            )))
            .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                V1beta1Service(driver),
            ))
            .add_service(
                dra_health::v1::dra_resource_health_server::DraResourceHealthServer::new(V1Health(
                    health_service.clone(),
                )),
            )
            .add_service(
                dra_health::v1alpha1::dra_resource_health_server::DraResourceHealthServer::new(
                    V1alpha1Health(health_service),
                ),
            );
        let reg_router =
            tonic::transport::Server::builder().add_service(registration.into_server());
        tracing::info!(kind = label, driver = %self.driver, node = %self.node, devices = devices.len(), socket = %dra_path.display(), "DRA driver serving");
        ctx.ready.set_ready();

        let publisher = SlicePublisher::new(client, &self.driver, &self.node);
        let withdraw_publisher = publisher.clone();
        // A deleted slice (the kubelet wipes them when it restarts) is republished at once.
        let republish = Arc::new(tokio::sync::Notify::new());
        {
            let (watcher, republish, shutdown) =
                (publisher.clone(), republish.clone(), ctx.shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = watcher.watch_deletions(|| republish.notify_one()) => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
        let shutdown = ctx.shutdown.clone();
        let health = self.health.clone();
        let metrics = self.dra_metrics.clone();
        let publish = async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
            let mut health_changes = health.subscribe();
            loop {
                health_changes.borrow_and_update();
                if let Some(m) = &metrics {
                    m.unhealthy(health.snapshot().values().filter(|h| !h.healthy).count());
                }
                // An unhealthy device is published with its taint; a recovered one without.
                let current: Vec<SliceDevice> = devices
                    .iter()
                    .map(|d| SliceDevice {
                        taints: health.taint(&d.name).into_iter().collect(),
                        ..d.clone()
                    })
                    .collect();
                let wait = match publisher.publish(&current).await {
                    Ok(_) => {
                        if let Some(m) = &metrics {
                            m.published();
                        }
                        backoff.reset();
                        RECONCILE_INTERVAL
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(retry_in = ?wait, "{e}");
                        wait
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                    changed = health_changes.changed() => if changed.is_err() { return },
                    () = republish.notified() => {}
                }
            }
        };
        let (a, b, (), ()) = tokio::join!(
            serve(dra_socket, dra_router, ctx.shutdown.clone()),
            serve(reg_socket, reg_router, ctx.shutdown.clone()),
            publish,
            overdue,
        );
        if self.withdraw.load(std::sync::atomic::Ordering::Relaxed) {
            match tokio::time::timeout(WITHDRAW_TIMEOUT, withdraw_publisher.withdraw()).await {
                Ok(Ok(n)) => {
                    tracing::info!(driver = %self.driver, slices = n, "DRA driver disabled; its ResourceSlices were deleted")
                }
                Ok(Err(e)) => {
                    tracing::warn!(driver = %self.driver, "DRA driver disabled, but its ResourceSlices stay (the kubelet deletes them once it sees the plugin gone): {e}")
                }
                Err(_) => {
                    tracing::warn!(driver = %self.driver, "DRA driver disabled, but deleting its ResourceSlices took longer than {WITHDRAW_TIMEOUT:?}; the kubelet deletes them once it sees the plugin gone")
                }
            }
        }
        a?;
        b?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_dra::{AllocatedClaim, Allocation, FakeClaims};
    use hybridlet_fixtures::kernel::KernelStandIn;
    use hybridlet_sys::{HostRoot, Sysfs};

    const DRIVER: &str = "sriov.hybridlet.io";

    fn claim(name: &str, device: &str) -> AllocatedClaim {
        AllocatedClaim {
            namespace: "ml".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            allocations: vec![Allocation {
                request: "vf".into(),
                driver: DRIVER.into(),
                pool: "node-a".into(),
                device: device.into(),
            }],
            pods: Vec::new(),
            configs: Vec::new(),
        }
    }

    /// Unprepare puts each VF back exactly as it was before its claim, from what the
    /// checkpoint recorded (the daemon restarts in between): a VF an operator bound to
    /// vfio-pci with an override (driverctl) is never touched, one on iavf goes back with
    /// no override, one an operator pinned to iavf with an override gets that override
    /// back. The kernel stand-in applies the kernel's rules to every write.
    #[tokio::test]
    async fn unprepare_puts_each_vf_back_exactly_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::e810_server(dir.path()).unwrap();
        let devices = dir.path().join("sys/bus/pci/devices");
        std::fs::write(devices.join("0000:81:00.3/driver_override"), "iavf\n").unwrap();
        let kernel = KernelStandIn::new(dir.path());
        let sysfs = Sysfs::new(&HostRoot::new(dir.path())).with_writer(Arc::new(kernel.writer()));
        let report = crate::devices::discover(&sysfs, None).unwrap();
        let paths = DraPaths {
            kubeconfig: dir.path().join("kubeconfig"),
            kubelet_root: dir.path().join("kubelet"),
            state_dir: dir.path().join("state"),
            cdi_dir: dir.path().join("cdi"),
            dev_dir: dir.path().join("dev"),
            sys_dir: dir.path().join("sys"),
            boot_id: "boot-1".into(),
        };
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        let plugin = DraPlugin::sriov(
            DRIVER,
            "node-a",
            paths.clone(),
            &report,
            Arc::new(sysfs.clone()),
            PluginMetrics::default(),
            Holders::default(),
        );
        let claims = Arc::new(FakeClaims::default());
        let vfs = [
            ("pinned", "vf-0000-81-08-0", "0000:81:08.0"),
            ("plain", "vf-0000-81-00-2", "0000:81:00.2"),
            ("operator", "vf-0000-81-00-3", "0000:81:00.3"),
        ];
        for (name, device, _) in vfs {
            claims.put(claim(name, device));
        }
        let state = |address: &str| sysfs.state(&PciAddress::parse(address).unwrap());
        let before: Vec<BindingState> = vfs.iter().map(|(_, _, a)| state(a)).collect();
        assert_eq!(before[0].driver_override.as_deref(), Some("vfio-pci"));
        assert_eq!(before[1].driver_override, None);
        assert_eq!(before[2].driver_override.as_deref(), Some("iavf"));
        let open = || {
            Driver::open(
                plugin.backend.clone(),
                claims.clone(),
                &plugin.checkpoint,
                &paths.cdi_dir,
                "boot-1",
            )
            .unwrap()
        };

        let driver = open();
        for (name, _, address) in vfs {
            driver
                .prepare("ml", name, &format!("uid-{name}"))
                .await
                .unwrap();
            assert_eq!(state(address).driver.as_deref(), Some(VFIO), "{address}");
        }
        drop(driver);
        let driver = open();
        for (name, _, _) in vfs {
            driver.unprepare(&format!("uid-{name}")).await.unwrap();
        }
        let after: Vec<BindingState> = vfs.iter().map(|(_, _, a)| state(a)).collect();
        assert_eq!(after, before);
        let touched: Vec<(String, String)> = kernel
            .writes()
            .into_iter()
            .filter(|(path, value)| path.contains("0000:81:08.0") || value.contains("0000:81:08.0"))
            .collect();
        assert!(
            touched.is_empty(),
            "the operator's vfio-pci VF was written to: {touched:?}"
        );
    }
}
