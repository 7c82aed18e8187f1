//! The PCI DRA driver's devices: each allowlisted function is a device of the node's pool
//! (`pci-<address>`). Mode `vfio` (the default) moves every endpoint of the function's
//! IOMMU group to vfio-pci (the group is what vfio hands out: a group with one endpoint
//! left on another driver is "not viable" to QEMU and DPDK), PCI bridges excepted, and puts
//! each back exactly as it was at unprepare. A group holding a function no rule allows,
//! or one another claim holds, refuses the claim by name. Mode `driver` leaves the
//! function on its vendor driver and hands the container that driver's device nodes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hybridlet_dra::{
    Attr, ContainerEdits, DeviceBackend, DeviceError, DriverParts, SliceDevice, topology_attributes,
};
use hybridlet_sys::binding::{BindingState, DriverBinding};
use hybridlet_sys::{PciAddress, Sysfs};

use crate::{Inventory, PciFunction};

/// The kernel driver a prepared group is handed to.
const VFIO: &str = "vfio-pci";

/// `0000:03:00.1` → `pci-0000-03-00-1` (DRA device names are DNS labels).
pub fn device_name(address: &str) -> String {
    format!("pci-{}", address.replace([':', '.'], "-"))
}

/// The driver `driver` on `node` over the functions of `inventory`; `binding` moves
/// them between drivers, `sysfs` reads groups and device nodes now, `dev_dir` is the
/// host's /dev (under `--root` in tests).
pub fn parts(
    driver: &str,
    node: &str,
    inventory: &Inventory,
    binding: Arc<dyn DriverBinding>,
    sysfs: Sysfs,
    dev_dir: PathBuf,
) -> DriverParts {
    let functions: BTreeMap<String, FunctionInfo> = inventory
        .functions
        .iter()
        .map(|f| {
            (
                device_name(f.device.address.as_str()),
                FunctionInfo {
                    address: f.device.address.clone(),
                    iommu_group: f.device.iommu_group,
                },
            )
        })
        .collect();
    let keys = functions
        .iter()
        .map(|(name, f)| (name.clone(), f.address.to_string()))
        .collect();
    DriverParts {
        devices: inventory.functions.iter().map(slice_device).collect(),
        backend: Arc::new(PciBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            functions,
            binding,
            sysfs,
            dev_dir,
        }),
        keys,
        counter_sets: Vec::new(),
    }
}

#[derive(Debug, Clone)]
struct FunctionInfo {
    address: PciAddress,
    iommu_group: Option<u32>,
}

/// Allowlisted PCI functions as DRA devices.
#[derive(Debug)]
struct PciBackend {
    driver: String,
    node: String,
    /// Device name → function.
    functions: BTreeMap<String, FunctionInfo>,
    binding: Arc<dyn DriverBinding>,
    sysfs: Sysfs,
    dev_dir: PathBuf,
}

/// How a function is handed to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole IOMMU group on vfio-pci: `/dev/vfio/<group>`.
    Vfio,
    /// Left on its vendor driver: that driver's device nodes.
    Driver,
}

/// The mode from the opaque parameters (`{"mode": "vfio" | "driver"}`).
fn mode(driver: &str, config: Option<&serde_json::Value>) -> Result<Mode, DeviceError> {
    Ok(
        match hybridlet_dra::config_mode(driver, config, &["vfio", "driver"])? {
            "driver" => Mode::Driver,
            _ => Mode::Vfio,
        },
    )
}

/// What release puts back: each endpoint of the group and how it was bound.
fn snapshot_json(states: &[(PciAddress, BindingState)]) -> serde_json::Value {
    serde_json::Value::Object(
        states
            .iter()
            .map(|(address, s)| {
                (
                    address.to_string(),
                    serde_json::json!({
                        "driver": s.driver,
                        "driverOverride": s.driver_override,
                    }),
                )
            })
            .collect(),
    )
}

fn snapshot_from_json(value: &serde_json::Value) -> Vec<(PciAddress, BindingState)> {
    let Some(object) = value.as_object() else {
        return Vec::new();
    };
    object
        .iter()
        .filter_map(|(address, s)| {
            let text = |k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_string);
            Some((
                PciAddress::parse(address)?,
                BindingState {
                    driver: text("driver"),
                    driver_override: text("driverOverride"),
                },
            ))
        })
        .collect()
}

impl PciBackend {
    fn function(&self, device: &str) -> Result<&FunctionInfo, DeviceError> {
        self.functions
            .get(device)
            .ok_or_else(|| DeviceError::Unknown(device.to_string()))
    }

    fn group(&self, f: &FunctionInfo) -> Result<u32, DeviceError> {
        f.iommu_group.ok_or_else(|| {
            DeviceError::Host(format!(
                "{} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on) to hand it to a container through vfio",
                f.address
            ))
        })
    }

    /// The group's endpoints now (bridges stay on pcieport), refusing a group that holds
    /// a function no rule allows: moving it would take a device from the host that the
    /// operator never gave to this driver.
    fn endpoints(&self, f: &FunctionInfo) -> Result<Vec<PciAddress>, DeviceError> {
        let group = self.group(f)?;
        let members = self.sysfs.iommu_group_members(group).map_err(|e| {
            DeviceError::Host(format!("reading IOMMU group {group} of {}: {e}", f.address))
        })?;
        let mut endpoints = Vec::new();
        for address in members {
            let device = self.sysfs.pci_device(&address).map_err(|e| {
                DeviceError::Host(format!("reading {address} in IOMMU group {group}: {e}"))
            })?;
            if crate::is_pci_bridge(&device) {
                continue; // vfio accepts PCI bridges on pcieport (it manages DMA itself)
            }
            if !self.functions.values().any(|g| g.address == address) {
                return Err(DeviceError::Host(format!(
                    "IOMMU group {group} of {} also holds {address} ({:04x}:{:04x}, driver {}), which spec.dra.pci.allow does not allow: vfio takes whole groups, so the claim is refused (allow it too, or move the card to a slot with its own group)",
                    f.address,
                    device.vendor_id,
                    device.device_id,
                    device.driver.as_deref().unwrap_or("none")
                )));
            }
            endpoints.push(address);
        }
        Ok(endpoints)
    }

    /// The device nodes a function's driver created, which exist under /dev.
    fn driver_nodes(&self, f: &FunctionInfo) -> Result<Vec<String>, DeviceError> {
        let nodes: Vec<String> = self
            .sysfs
            .device_nodes(&f.address)
            .into_iter()
            .map(|n| format!("/dev/{}", n.dev_name))
            .collect();
        if nodes.is_empty() {
            return Err(DeviceError::Host(format!(
                "{} (driver {}) has no device nodes in sysfs: mode \"driver\" needs a driver that creates them (load the vendor driver, or use mode \"vfio\")",
                f.address,
                self.binding.driver(&f.address).as_deref().unwrap_or("none")
            )));
        }
        for node in &nodes {
            let path = self.dev_dir.join(node.trim_start_matches("/dev/"));
            if !path.exists() {
                return Err(DeviceError::Host(format!(
                    "{node} of {} does not exist (is udev running?)",
                    f.address
                )));
            }
        }
        Ok(nodes)
    }
}

impl DeviceBackend for PciBackend {
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
        let f = self.function(device)?;
        let var = env_name(&self.driver);
        if mode(&self.driver, config)? == Mode::Driver {
            return Ok(ContainerEdits {
                env: vec![format!("{var}={}", f.address)],
                device_nodes: self.driver_nodes(f)?,
            });
        }
        let group = self.group(f)?;
        let mut device_nodes = vec!["/dev/vfio/vfio".to_string(), format!("/dev/vfio/{group}")];
        // IOMMUFD (Linux 6.2+): the per-device cdev and /dev/iommu, when the kernel has
        // them; a bound function's vfio-dev/vfioN names its node.
        if self.dev_dir.join("iommu").exists() {
            device_nodes.push("/dev/iommu".into());
        }
        for node in self.sysfs.device_nodes(&f.address) {
            if node.dev_name.starts_with("vfio/devices/") {
                device_nodes.push(format!("/dev/{}", node.dev_name));
            }
        }
        let endpoints = self
            .sysfs
            .iommu_group_members(group)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| self.functions.values().any(|g| &g.address == a))
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        Ok(ContainerEdits {
            env: vec![
                format!("{var}={}", f.address),
                format!("{var}_GROUP={endpoints}"),
            ],
            device_nodes,
        })
    }

    fn companions(&self, device: &str) -> Vec<String> {
        let Ok(f) = self.function(device) else {
            return Vec::new();
        };
        self.functions
            .iter()
            .filter(|(name, g)| {
                name.as_str() != device && g.iommu_group.is_some() && g.iommu_group == f.iommu_group
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn snapshot(&self, device: &str) -> Result<Option<serde_json::Value>, DeviceError> {
        let f = self.function(device)?;
        let endpoints = match f.iommu_group {
            Some(_) => self.endpoints(f)?,
            None => vec![f.address.clone()],
        };
        let states: Vec<(PciAddress, BindingState)> = endpoints
            .into_iter()
            .map(|a| {
                let s = self.binding.state(&a);
                (a, s)
            })
            .collect();
        Ok(Some(snapshot_json(&states)))
    }

    fn attach(&self, device: &str, config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        let f = self.function(device)?;
        if mode(&self.driver, config)? == Mode::Driver {
            self.driver_nodes(f)?;
            return Ok(());
        }
        let endpoints = self.endpoints(f)?;
        let mut moved: Vec<(PciAddress, BindingState)> = Vec::new();
        for address in &endpoints {
            let was = self.binding.state(address);
            if let Err(e) = self.binding.bind(address, VFIO) {
                // All or nothing for the group: what moved goes back, last first, and so
                // does this one (a write that failed midway may have unbound it).
                moved.push((address.clone(), was));
                for (done, state) in moved.iter().rev() {
                    if let Err(undo) = self.binding.restore(done, state) {
                        tracing::error!(pci = %done, "giving back after a failed group bind: {undo}");
                    }
                }
                return Err(DeviceError::Host(e.to_string()));
            }
            moved.push((address.clone(), was));
        }
        tracing::info!(device, pci = %f.address, group = ?f.iommu_group, endpoints = endpoints.len(), "IOMMU group bound to vfio-pci");
        Ok(())
    }

    fn changes_host(&self) -> bool {
        true
    }

    fn release(
        &self,
        device: &str,
        original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        let f = self.function(device)?;
        let Some(original) = original else {
            return Ok(()); // every prepare of this driver records originals
        };
        let mut first_error = None;
        for (address, was) in snapshot_from_json(original) {
            if self.binding.state(&address) == was {
                continue;
            }
            // Every endpoint is tried, so one that refuses does not keep the others.
            match self.binding.restore(&address, &was) {
                Ok(()) => {
                    tracing::info!(device, pci = %address, driver = ?was.driver, "function given back as it was before the claim")
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(DeviceError::Host(format!(
                "giving back IOMMU group {:?} of {}: {e}",
                f.iommu_group, f.address
            ))),
        }
    }
}

/// `pci.hybridlet.io` → `PCI_RESOURCE_PCI_HYBRIDLET_IO` (the environment variable with
/// the function's address; `_GROUP` adds every allowlisted function of its group).
pub fn env_name(driver: &str) -> String {
    let upper: String = driver
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PCI_RESOURCE_{upper}")
}

/// One function as a slice device: identity, driver, group, placement, FPGA facts
/// as attributes (a DeviceClass selects "any Alveo U55C with shell X" with CEL), and BAR
/// sizes as capacity.
pub fn slice_device(f: &PciFunction) -> SliceDevice {
    let hex = |v: u16| format!("0x{v:04x}");
    let d = &f.device;
    let mut attributes = BTreeMap::from([
        (
            "deviceClass".to_string(),
            Attr::String(f.device_class.clone()),
        ),
        ("vendor".to_string(), Attr::String(hex(d.vendor_id))),
        ("device".to_string(), Attr::String(hex(d.device_id))),
        (
            "class".to_string(),
            Attr::String(format!("0x{:06x}", d.class)),
        ),
        (
            "resource.kubernetes.io/pciBusID".to_string(),
            Attr::String(d.address.to_string()),
        ),
    ]);
    if let Some(v) = f.subsystem.0 {
        attributes.insert("subsystemVendor".into(), Attr::String(hex(v)));
    }
    if let Some(v) = f.subsystem.1 {
        attributes.insert("subsystemDevice".into(), Attr::String(hex(v)));
    }
    if let Some(drv) = &d.driver {
        attributes.insert("driver".into(), Attr::String(drv.clone()));
    }
    if let Some(group) = d.iommu_group {
        attributes.insert("iommuGroup".into(), Attr::Int(i64::from(group)));
    }
    for (name, value) in &f.fpga {
        attributes.insert(name.clone(), Attr::String(value.clone()));
    }
    topology_attributes(&mut attributes, Some(&d.topology), d.numa_node);
    let capacity = f
        .bars
        .iter()
        .filter(|b| b.memory)
        .map(|b| (format!("bar{}", b.index), b.size.to_string()))
        .collect();
    SliceDevice {
        name: device_name(d.address.as_str()),
        attributes,
        capacity,
        taints: Vec::new(),
        consumes: Vec::new(),
    }
}
