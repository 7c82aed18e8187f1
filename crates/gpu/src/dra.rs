//! The GPU DRA driver's devices, in the node's pool:
//!
//! - a GPU with MIG mode off is one device, `gpu-<index>` (NVML's identity, versions as
//!   semantic versions, memory as capacity, its PCIe placement);
//! - a GPU with MIG mode on offers its MIG devices as they exist (static MIG):
//!   `gpu-<index>-mig-<profile>-<start>`, e.g. `gpu-0-mig-1g18gb-0`;
//! - with dynamic MIG, a GPU with MIG mode on offers itself and every placement of every
//!   profile, all consuming its counter set (`gpu-<index>-counter-set`: one counter per
//!   memory slice, the compute slices, the optical flow engines), so the scheduler never
//!   allocates two that overlap; the MIG instance is created at prepare and destroyed at
//!   unprepare.
//!
//! A container gets the device nodes that exist (the MIG instance's capability nodes
//! `/dev/nvidia-caps/nvidia-cap<N>` as the driver lists them under
//! `/proc/driver/nvidia/capabilities`) and `NVIDIA_VISIBLE_DEVICES` (the GPU's or the
//! MIG device's UUID).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hybridlet_dra::{
    Attr, ContainerEdits, CounterSet, CounterUse, DeviceBackend, DeviceError, DriverParts,
    SliceDevice, topology_attributes,
};

use crate::mig::profile_label;
use crate::{Gpu, GpuError, GpuSource, MigCode, MigInstance, MigProfile, Placement};

/// How the driver treats GPUs, beyond the devices found.
#[derive(Clone, Default)]
pub struct GpuOptions {
    /// Create MIG instances at prepare (`spec.dra.gpu.dynamicMig`).
    pub dynamic_mig: bool,
    /// The host's `/proc` (the driver's MIG capability files).
    pub proc_dir: PathBuf,
    /// NVML (or the fake), for MIG instances; none on a host without it.
    pub source: Option<Arc<dyn GpuSource>>,
}

impl std::fmt::Debug for GpuOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuOptions")
            .field("dynamic_mig", &self.dynamic_mig)
            .field("proc_dir", &self.proc_dir)
            .finish_non_exhaustive()
    }
}

/// What one published device is.
#[derive(Debug, Clone)]
enum Kind {
    /// The whole GPU.
    Whole,
    /// A MIG device that existed when the driver started.
    Static(MigInstance),
    /// A placement of a profile, created at prepare (dynamic MIG).
    Placement(MigProfile, Placement),
}

#[derive(Debug, Clone)]
struct Dev {
    /// Index into the backend's GPUs.
    gpu: usize,
    kind: Kind,
}

/// The driver `driver` on `node` over `gpus`, whose device nodes are under `dev_dir`.
pub fn parts(
    driver: &str,
    node: &str,
    gpus: Vec<Gpu>,
    dev_dir: PathBuf,
    options: GpuOptions,
) -> DriverParts {
    let mut devs: BTreeMap<String, Dev> = BTreeMap::new();
    let mut devices = Vec::new();
    let mut counter_sets = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        let mig = g
            .info
            .mig
            .as_ref()
            .filter(|_| g.info.mig_enabled == Some(true));
        if g.info.mig_enabled == Some(true) && mig.is_none() {
            tracing::warn!(gpu = %g.info.uuid, index = g.info.index, "MIG mode is on but its profiles and instances cannot be read: the GPU is not offered (a container would get a GPU without MIG devices)");
            continue;
        }
        let Some(mig) = mig else {
            devices.push(slice_device(g));
            devs.insert(
                device_name(g),
                Dev {
                    gpu: i,
                    kind: Kind::Whole,
                },
            );
            continue;
        };
        if !options.dynamic_mig {
            for inst in &mig.instances {
                let Some(profile) = mig.profile(inst.profile_id) else {
                    tracing::warn!(gpu = %g.info.uuid, mig = %inst.uuid, profile = inst.profile_id, "a MIG device of a profile NVML does not list: not published");
                    continue;
                };
                let mut name = placement_name(g, profile, inst.placement);
                // A GPU instance split into several compute instances: one device each.
                if inst.compute_instance_id > 0 {
                    name.push_str(&format!("-ci{}", inst.compute_instance_id));
                }
                devices.push(mig_device(
                    g,
                    &name,
                    profile,
                    inst.placement,
                    Some(inst),
                    None,
                ));
                devs.insert(
                    name,
                    Dev {
                        gpu: i,
                        kind: Kind::Static(inst.clone()),
                    },
                );
            }
            continue;
        }
        let set = counter_set_name(g);
        let mut all = BTreeMap::new();
        for s in 0..mig.memory_slices {
            all.insert(format!("memory-slice-{s}"), "1".to_string());
        }
        all.insert("compute-slices".into(), mig.compute_slices.to_string());
        let ofa = mig
            .profiles
            .iter()
            .map(|p| p.ofa_engines)
            .max()
            .unwrap_or(0);
        if ofa > 0 {
            all.insert("ofa-engines".into(), ofa.to_string());
        }
        counter_sets.push(CounterSet {
            name: set.clone(),
            counters: all.clone(),
        });
        let mut whole = slice_device(g);
        whole.consumes = vec![CounterUse {
            set: set.clone(),
            counters: all,
        }];
        devices.push(whole);
        devs.insert(
            device_name(g),
            Dev {
                gpu: i,
                kind: Kind::Whole,
            },
        );
        for profile in &mig.profiles {
            for placement in &profile.placements {
                let name = placement_name(g, profile, *placement);
                let mut uses: BTreeMap<String, String> = placement
                    .slices()
                    .map(|s| (format!("memory-slice-{s}"), "1".to_string()))
                    .collect();
                uses.insert("compute-slices".into(), profile.compute_slices.to_string());
                if profile.ofa_engines > 0 && ofa > 0 {
                    uses.insert("ofa-engines".into(), profile.ofa_engines.to_string());
                }
                let consumes = CounterUse {
                    set: set.clone(),
                    counters: uses,
                };
                devices.push(mig_device(
                    g,
                    &name,
                    profile,
                    *placement,
                    None,
                    Some(consumes),
                ));
                devs.insert(
                    name,
                    Dev {
                        gpu: i,
                        kind: Kind::Placement(profile.clone(), *placement),
                    },
                );
            }
        }
    }
    // Every device of a GPU answers to its UUID: an XID on the GPU is its MIG devices'.
    let keys = devs
        .iter()
        .map(|(name, d)| (name.clone(), gpus[d.gpu].info.uuid.clone()))
        .collect();
    DriverParts {
        backend: Arc::new(GpuBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            gpus,
            devs,
            dev_dir,
            options,
            whole: std::sync::Mutex::default(),
        }),
        devices,
        keys,
        counter_sets,
    }
}

/// The GPUs of this node as DRA devices.
#[derive(Debug)]
struct GpuBackend {
    driver: String,
    node: String,
    gpus: Vec<Gpu>,
    devs: BTreeMap<String, Dev>,
    /// Where the host's `/dev` is (under `--root` in tests).
    dev_dir: PathBuf,
    options: GpuOptions,
    /// GPUs (indexes) in MIG mode prepared whole (dynamic MIG): no MIG device of theirs
    /// may be created meanwhile.
    whole: std::sync::Mutex<std::collections::BTreeSet<usize>>,
}

/// `gpu-<index>`: the device's name in the slice.
pub fn device_name(g: &Gpu) -> String {
    format!("gpu-{}", g.info.index)
}

/// `gpu-<index>-mig-<profile>-<start>`: a MIG device's name, from where it sits, so the
/// same placement has the same name whether it exists (static) or not yet (dynamic).
pub fn placement_name(g: &Gpu, profile: &MigProfile, placement: Placement) -> String {
    format!(
        "gpu-{}-mig-{}-{}",
        g.info.index,
        profile_label(&profile.name),
        placement.start
    )
}

/// `gpu-<index>-counter-set`: the GPU's counter set.
pub fn counter_set_name(g: &Gpu) -> String {
    format!("gpu-{}-counter-set", g.info.index)
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

/// The capability minor the driver gives a MIG GPU or compute instance: the
/// `DeviceFileMinor:` line of its `access` file.
fn cap_minor(access: &Path) -> Result<u32, DeviceError> {
    let text = std::fs::read_to_string(access).map_err(|e| {
        DeviceError::Host(format!(
            "reading {}: {e} (the NVIDIA driver lists every MIG instance's capabilities there)",
            access.display()
        ))
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("DeviceFileMinor:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| DeviceError::Host(format!("{}: no DeviceFileMinor line", access.display())))
}

fn mig_error(e: GpuError) -> DeviceError {
    match e {
        GpuError::Mig {
            code: MigCode::NotSupported,
            ..
        } => DeviceError::Host(format!(
            "{e}: this GPU cannot take MIG instances now (MIG mode off, or a GPU without MIG); enable MIG mode (`nvidia-smi -i <gpu> -mig 1`) or ask for the whole GPU"
        )),
        GpuError::Mig {
            code: MigCode::NoPermission,
            ..
        } => DeviceError::Host(format!("{e}: creating MIG instances needs root")),
        other => DeviceError::Host(other.to_string()),
    }
}

impl GpuBackend {
    fn whole(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<usize>> {
        self.whole
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dev(&self, device: &str) -> Result<(&Dev, &Gpu), DeviceError> {
        let d = self
            .devs
            .get(device)
            .ok_or_else(|| DeviceError::Unknown(device.to_string()))?;
        Ok((d, &self.gpus[d.gpu]))
    }

    fn source(&self) -> Result<&Arc<dyn GpuSource>, DeviceError> {
        self.options.source.as_ref().ok_or_else(|| {
            DeviceError::Host("NVML is not available: MIG instances cannot be managed".into())
        })
    }

    /// The MIG instance a dynamic device has now, if any.
    fn current(
        &self,
        g: &Gpu,
        profile: &MigProfile,
        at: Placement,
    ) -> Result<Option<MigInstance>, DeviceError> {
        let instances = self
            .source()?
            .mig_instances(&g.info.uuid)
            .map_err(mig_error)?;
        Ok(instances
            .into_iter()
            .find(|i| i.profile_id == profile.id && i.placement == at))
    }

    /// The GPU's own device nodes: its node and nvidiactl are required, the UVM nodes
    /// added when present (the runtime refuses a CDI device whose node is missing).
    fn gpu_nodes(&self, device: &str, g: &Gpu) -> Result<Vec<String>, DeviceError> {
        let gpu_node = format!("nvidia{}", g.info.minor_number);
        let mut nodes = Vec::new();
        for required in [gpu_node.as_str(), "nvidiactl"] {
            if !self.dev_dir.join(required).exists() {
                return Err(DeviceError::Host(format!(
                    "/dev/{required} does not exist: is the NVIDIA driver loaded? (`nvidia-modprobe -c={}` creates the nodes)",
                    g.info.minor_number
                )));
            }
            nodes.push(format!("/dev/{required}"));
        }
        for optional in ["nvidia-uvm", "nvidia-uvm-tools"] {
            if self.dev_dir.join(optional).exists() {
                nodes.push(format!("/dev/{optional}"));
            } else {
                tracing::warn!(
                    device,
                    "/dev/{optional} does not exist, so the container gets no {optional}; CUDA programs need /dev/nvidia-uvm (`nvidia-modprobe -u -c=0` creates it)"
                );
            }
        }
        Ok(nodes)
    }

    /// A MIG device's edits: the parent's nodes, the instance's capability nodes, its UUID.
    fn mig_edits(
        &self,
        device: &str,
        g: &Gpu,
        inst: &MigInstance,
    ) -> Result<ContainerEdits, DeviceError> {
        let mut nodes = self.gpu_nodes(device, g)?;
        let gi = self.options.proc_dir.join(format!(
            "driver/nvidia/capabilities/gpu{}/mig/gi{}",
            g.info.minor_number, inst.gpu_instance_id
        ));
        for access in [
            gi.join("access"),
            gi.join(format!("ci{}/access", inst.compute_instance_id)),
        ] {
            let cap = format!("nvidia-caps/nvidia-cap{}", cap_minor(&access)?);
            if !self.dev_dir.join(&cap).exists() {
                return Err(DeviceError::Host(format!(
                    "/dev/{cap} does not exist (`nvidia-modprobe -f {}` creates it)",
                    access.display()
                )));
            }
            nodes.push(format!("/dev/{cap}"));
        }
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={}", inst.uuid)],
            device_nodes: nodes,
        })
    }

    /// Whether MIG mode is still on for `g` (NVML answers for its instances).
    fn check_mig(&self, g: &Gpu) -> Result<(), DeviceError> {
        self.source()?
            .mig_instances(&g.info.uuid)
            .map_err(mig_error)?;
        if g.info.mig_enabled != Some(true) {
            return Err(DeviceError::Host(format!(
                "GPU {} ({}) is not in MIG mode: no MIG instance can be created on it",
                g.info.index, g.info.uuid
            )));
        }
        Ok(())
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
    ) -> Result<ContainerEdits, DeviceError> {
        let (d, g) = self.dev(device)?;
        match &d.kind {
            Kind::Whole => Ok(ContainerEdits {
                env: vec![format!("NVIDIA_VISIBLE_DEVICES={}", g.info.uuid)],
                device_nodes: self.gpu_nodes(device, g)?,
            }),
            Kind::Static(inst) => self.mig_edits(device, g, inst),
            Kind::Placement(profile, at) => {
                let inst = self.current(g, profile, *at)?.ok_or_else(|| {
                    DeviceError::Host(format!("MIG device {device} has not been created"))
                })?;
                self.mig_edits(device, g, &inst)
            }
        }
    }

    fn check(&self, device: &str, config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        let (d, g) = self.dev(device)?;
        match &d.kind {
            Kind::Placement(..) => {
                self.check_mig(g)?;
                self.gpu_nodes(device, g).map(|_| ())
            }
            _ => self.edits(device, config).map(|_| ()),
        }
    }

    fn attach(&self, device: &str, _config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        let (d, g) = self.dev(device)?;
        let source = match (&d.kind, self.options.dynamic_mig) {
            (Kind::Placement(..), _) | (Kind::Whole, true) if g.info.mig_enabled == Some(true) => {
                self.source()?
            }
            _ => return Ok(()),
        };
        let instances = source.mig_instances(&g.info.uuid).map_err(mig_error)?;
        let Kind::Placement(profile, at) = &d.kind else {
            // The whole GPU, while no MIG device of it exists (they would share it).
            if let Some(i) = instances.first() {
                return Err(DeviceError::Host(format!(
                    "GPU {} has {} MIG device(s) in use ({} first): the whole GPU can be prepared once they are released",
                    g.info.index,
                    instances.len(),
                    i.uuid
                )));
            }
            self.whole().insert(d.gpu);
            return Ok(());
        };
        if self.whole().contains(&d.gpu) {
            return Err(DeviceError::Host(format!(
                "the whole GPU {} is prepared for another claim: none of its MIG devices can be created",
                g.info.index
            )));
        }
        if let Some(inst) = instances
            .iter()
            .find(|i| i.profile_id == profile.id && i.placement == *at)
        {
            tracing::info!(device, mig = %inst.uuid, gpu_instance = inst.gpu_instance_id, "MIG instance already there: adopted");
            return Ok(());
        }
        let inst = source
            .create_mig(&g.info.uuid, profile.id, at.start)
            .map_err(mig_error)?;
        tracing::info!(device, mig = %inst.uuid, gpu_instance = inst.gpu_instance_id, profile = %profile.name, "MIG instance created");
        Ok(())
    }

    fn release(
        &self,
        device: &str,
        _original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        let (d, g) = self.dev(device)?;
        let Kind::Placement(profile, at) = &d.kind else {
            self.whole().remove(&d.gpu);
            return Ok(());
        };
        let Some(inst) = self.current(g, profile, *at)? else {
            return Ok(());
        };
        self.source()?
            .destroy_mig(&g.info.uuid, inst.gpu_instance_id)
            .map_err(|e| match e {
                GpuError::Mig { code: MigCode::InUse, .. } => DeviceError::Host(format!(
                    "{e}: MIG device {} still runs processes; it is destroyed once they end and the kubelet asks again",
                    inst.uuid
                )),
                other => mig_error(other),
            })?;
        tracing::info!(device, mig = %inst.uuid, gpu_instance = inst.gpu_instance_id, "MIG instance destroyed");
        Ok(())
    }

    fn changes_host(&self) -> bool {
        self.options.dynamic_mig
    }

    fn tidy(&self, prepared: &[&str]) {
        if !self.options.dynamic_mig {
            return;
        }
        for name in prepared {
            if let Some(Dev {
                gpu,
                kind: Kind::Whole,
            }) = self.devs.get(*name)
            {
                self.whole().insert(*gpu);
            }
        }
        let Ok(source) = self.source() else {
            return;
        };
        for g in self
            .gpus
            .iter()
            .filter(|g| g.info.mig_enabled == Some(true))
        {
            let instances = match source.mig_instances(&g.info.uuid) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(gpu = %g.info.uuid, "listing MIG instances at start: {e}");
                    continue;
                }
            };
            for inst in instances {
                let name = g
                    .info
                    .mig
                    .as_ref()
                    .and_then(|m| m.profile(inst.profile_id))
                    .map(|p| placement_name(g, p, inst.placement));
                if name.as_deref().is_some_and(|n| prepared.contains(&n)) {
                    continue;
                }
                match source.destroy_mig(&g.info.uuid, inst.gpu_instance_id) {
                    Ok(()) => {
                        tracing::warn!(gpu = %g.info.uuid, mig = %inst.uuid, gpu_instance = inst.gpu_instance_id, "destroyed a MIG instance no prepared claim holds (dynamic MIG owns this GPU's instances)")
                    }
                    Err(e) => {
                        tracing::error!(gpu = %g.info.uuid, mig = %inst.uuid, "a MIG instance no prepared claim holds could not be destroyed: {e}; placements that overlap it fail until it is gone")
                    }
                }
            }
        }
    }
}

/// The attributes every device of GPU `g` shares: identity, versions, placement.
fn gpu_attributes(g: &Gpu) -> BTreeMap<String, Attr> {
    let mut attributes = BTreeMap::from([
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
            Attr::String(addr.to_string()),
        );
    }
    topology_attributes(&mut attributes, g.topology.as_ref(), g.numa_node);
    attributes
}

/// One GPU as a slice device: its identity, versions, PCI bus ID and placement.
pub fn slice_device(g: &Gpu) -> SliceDevice {
    let mut attributes = gpu_attributes(g);
    attributes.insert("type".into(), Attr::String("gpu".into()));
    attributes.insert("uuid".into(), Attr::String(g.info.uuid.clone()));
    attributes.insert("index".into(), Attr::Int(i64::from(g.info.index)));
    attributes.insert(
        "migEnabled".into(),
        Attr::Bool(g.info.mig_enabled == Some(true)),
    );
    SliceDevice {
        name: device_name(g),
        attributes,
        capacity: BTreeMap::from([("memory".to_string(), g.info.memory_total_bytes.to_string())]),
        ..SliceDevice::default()
    }
}

/// One MIG device (existing, or a placement for dynamic MIG) as a slice device: the
/// parent's identity and placement, the profile and where it sits, its engines as capacity.
fn mig_device(
    g: &Gpu,
    name: &str,
    profile: &MigProfile,
    placement: Placement,
    existing: Option<&MigInstance>,
    consumes: Option<CounterUse>,
) -> SliceDevice {
    let mut attributes = gpu_attributes(g);
    let int = |v: u32| Attr::Int(i64::from(v));
    attributes.extend([
        ("type".to_string(), Attr::String("mig".into())),
        ("parentUUID".to_string(), Attr::String(g.info.uuid.clone())),
        ("parentIndex".to_string(), int(g.info.index)),
        ("profile".to_string(), Attr::String(profile.name.clone())),
        ("profileID".to_string(), int(profile.id)),
        ("placementStart".to_string(), int(placement.start)),
        ("placementSize".to_string(), int(placement.size)),
    ]);
    if let Some(inst) = existing {
        attributes.insert("uuid".into(), Attr::String(inst.uuid.clone()));
        attributes.insert("gpuInstanceID".into(), int(inst.gpu_instance_id));
        attributes.insert("computeInstanceID".into(), int(inst.compute_instance_id));
    }
    let capacity = BTreeMap::from([
        ("memory".to_string(), profile.memory_bytes.to_string()),
        (
            "multiprocessors".to_string(),
            profile.multiprocessors.to_string(),
        ),
        ("copyEngines".to_string(), profile.copy_engines.to_string()),
        ("decoders".to_string(), profile.decoders.to_string()),
        ("encoders".to_string(), profile.encoders.to_string()),
        ("jpegEngines".to_string(), profile.jpeg_engines.to_string()),
        ("ofaEngines".to_string(), profile.ofa_engines.to_string()),
    ]);
    SliceDevice {
        name: name.to_string(),
        attributes,
        capacity,
        consumes: consumes.into_iter().collect(),
        ..SliceDevice::default()
    }
}
