//! The SR-IOV DRA driver's devices: each VF is a device of the node's pool
//! (`vf-<address>`), with its PF, netdev and RDMA device, and its PCIe placement. Mode
//! `vfio` (the default) moves a prepared VF to vfio-pci and, at unprepare, puts it back
//! exactly as it was (driver and `driver_override`, recorded before the prepare); mode
//! `netdev` leaves it on its kernel driver and hands over its interface and RDMA device.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hybridlet_dra::{
    Attr, ContainerEdits, DeviceBackend, DeviceError, DriverParts, SliceDevice, topology_attributes,
};
use hybridlet_sys::PciAddress;
use hybridlet_sys::binding::{BindingState, DriverBinding};

use crate::{Inventory, PhysicalFunction, VirtualFunction};

/// The driver `driver` on `node` over the VFs of `inventory`; `binding` moves them
/// between drivers, `sys_dir` and `dev_dir` are the host's (under `--root` in tests).
pub fn parts(
    driver: &str,
    node: &str,
    inventory: &Inventory,
    binding: Arc<dyn DriverBinding>,
    sys_dir: PathBuf,
    dev_dir: PathBuf,
) -> DriverParts {
    let mut vfs = BTreeMap::new();
    let mut devices = Vec::new();
    for pf in &inventory.pfs {
        for vf in &pf.vfs {
            let d = &vf.device;
            vfs.insert(
                vf_device_name(&d.address.to_string()),
                VfInfo {
                    address: d.address.clone(),
                    iommu_group: d.iommu_group,
                    rdma_device: d.rdma_devices.first().cloned(),
                },
            );
            devices.push(vf_slice_device(pf, vf));
        }
    }
    let keys = vfs
        .iter()
        .map(|(name, vf)| (name.clone(), vf.address.to_string()))
        .collect();
    DriverParts {
        backend: Arc::new(SriovBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            vfs,
            binding,
            sys_dir,
            dev_dir,
        }),
        devices,
        keys,
        counter_sets: Vec::new(),
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

/// The mode from the opaque parameters (`{"mode": "vfio" | "netdev"}`).
fn vf_mode(driver: &str, config: Option<&serde_json::Value>) -> Result<VfMode, DeviceError> {
    Ok(
        match hybridlet_dra::config_mode(driver, config, &["vfio", "netdev"])? {
            "netdev" => VfMode::Netdev,
            _ => VfMode::Vfio,
        },
    )
}

/// `0000:81:00.2` → `vf-0000-81-00-2` (DRA device names are DNS labels).
pub fn vf_device_name(address: &str) -> String {
    format!("vf-{}", address.replace([':', '.'], "-"))
}

impl SriovBackend {
    fn vf(&self, device: &str) -> Result<&VfInfo, DeviceError> {
        self.vfs
            .get(device)
            .ok_or_else(|| DeviceError::Unknown(device.to_string()))
    }

    /// The VF's network interface now (names can change after discovery).
    fn netdev(&self, vf: &VfInfo) -> Result<String, DeviceError> {
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
                DeviceError::Host(format!(
                    "VF {} has no network interface (is it on vfio-pci, or its driver not loaded?); netdev mode needs it on its kernel driver",
                    vf.address
                ))
            })
    }

    /// The device nodes an RDMA device needs in a container: its uverbs node (found
    /// through `/sys/class/infiniband_verbs/*/ibdev`) and `rdma_cm` when present.
    fn rdma_nodes(&self, rdma: &str) -> Result<Vec<String>, DeviceError> {
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
                DeviceError::Host(format!("RDMA device {rdma} has no uverbs device in /sys/class/infiniband_verbs (is ib_uverbs loaded?)"))
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
    ) -> Result<ContainerEdits, DeviceError> {
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
            DeviceError::Host(format!("VF {} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on) to hand VFs to containers", vf.address))
        })?;
        Ok(ContainerEdits {
            env,
            device_nodes: vec!["/dev/vfio/vfio".into(), format!("/dev/vfio/{group}")],
        })
    }

    fn attach(&self, device: &str, config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        let vf = self.vf(device)?;
        if vf_mode(&self.driver, config)? == VfMode::Netdev {
            // Nothing moves: the VF must be on its kernel driver with a network interface
            // (the CNI moves that interface into the pod's network namespace).
            self.netdev(vf)?;
            return Ok(());
        }
        if vf.iommu_group.is_none() {
            return Err(DeviceError::Host(format!(
                "VF {} has no IOMMU group: turn the IOMMU on to use vfio-pci",
                vf.address
            )));
        }
        self.binding
            .bind(&vf.address, VFIO)
            .map_err(|e| DeviceError::Host(e.to_string()))?;
        tracing::info!(device, pci = %vf.address, "VF bound to vfio-pci");
        Ok(())
    }

    fn changes_host(&self) -> bool {
        true
    }

    fn snapshot(&self, device: &str) -> Result<Option<serde_json::Value>, DeviceError> {
        let vf = self.vf(device)?;
        let state = self.binding.state(&vf.address);
        Ok(Some(serde_json::json!({
            "driver": state.driver,
            "driverOverride": state.driver_override,
        })))
    }

    fn release(
        &self,
        device: &str,
        original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        let vf = self.vf(device)?;
        let Some(original) = original else {
            // A prepare recorded before originals were (checkpoint v1): the old rule,
            // give a VF on vfio-pci back to its own driver.
            if self.binding.driver(&vf.address).as_deref() != Some(VFIO) {
                return Ok(()); // never attached, or already given back
            }
            self.binding
                .release(&vf.address)
                .map_err(|e| DeviceError::Host(e.to_string()))?;
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
            .map_err(|e| DeviceError::Host(e.to_string()))?;
        tracing::info!(device, pci = %vf.address, driver = ?was.driver, driver_override = ?was.driver_override, "VF given back as it was before the claim");
        Ok(())
    }
}

/// One VF as a slice device: its identity, its PF, what netdev mode can hand over, and
/// its placement.
pub fn vf_slice_device(pf: &PhysicalFunction, vf: &VirtualFunction) -> SliceDevice {
    let hex = |v: u16| format!("0x{v:04x}");
    let d = &vf.device;
    let mut attributes = BTreeMap::from([
        ("type".to_string(), Attr::String("vf".into())),
        (
            "pciAddress".to_string(),
            Attr::String(d.address.to_string()),
        ),
        ("vendorId".to_string(), Attr::String(hex(d.vendor_id))),
        ("deviceId".to_string(), Attr::String(hex(d.device_id))),
        ("vfIndex".to_string(), Attr::Int(i64::from(vf.index))),
        (
            "pfPciAddress".to_string(),
            Attr::String(pf.device.address.to_string()),
        ),
    ]);
    if let Some(name) = &pf.netdev {
        attributes.insert("pfName".into(), Attr::String(name.clone()));
    }
    // What netdev mode hands over: a class can select VFs with an interface or with RDMA.
    if let Some(name) = d.net_names.first() {
        attributes.insert("netdev".into(), Attr::String(name.clone()));
    }
    let rdma = d.rdma_devices.first();
    attributes.insert("rdma".into(), Attr::Bool(rdma.is_some()));
    if let Some(rdma) = rdma {
        attributes.insert("rdmaDevice".into(), Attr::String(rdma.clone()));
    }
    if let Some(driver) = &pf.device.driver {
        attributes.insert("pfDriver".into(), Attr::String(driver.clone()));
    }
    if let Some(speed) = pf.link_speed_mbps {
        attributes.insert("linkSpeedMbps".into(), Attr::Int(i64::from(speed)));
    }
    topology_attributes(&mut attributes, Some(&d.topology), d.numa_node);
    SliceDevice {
        name: vf_device_name(&d.address.to_string()),
        attributes,
        capacity: BTreeMap::new(),
        taints: Vec::new(),
        consumes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_dra::{AllocatedClaim, Allocation, Driver, FakeClaims};
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
        let (pci, _) = sysfs.pci_devices().unwrap();
        let inventory = crate::discover(&sysfs, &pci);
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let parts = parts(
            DRIVER,
            "node-a",
            &inventory,
            Arc::new(sysfs.clone()),
            dir.path().join("sys"),
            dir.path().join("dev"),
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
                parts.backend.clone(),
                claims.clone(),
                &hybridlet_dra::checkpoint_path(&state_dir, DRIVER),
                &dir.path().join("cdi"),
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
