//! SR-IOV inventory: every network physical function with SR-IOV, its link and its
//! virtual functions (bound driver, netdev, RDMA device, IOMMU group, topology), from
//! one sysfs walk done by hybridlet-sys.
//!
//! What this crate must never do: depend on other domain crates (GPU, CSI), or write to
//! sysfs itself (VF provisioning goes through `hybridlet_sys::Sysfs::set_num_vfs`).

pub mod dra;
mod health;
mod provision;

use std::collections::HashMap;

use hybridlet_sys::{PciAddress, PciDevice, Sysfs};

pub use health::VfHealth;
pub use provision::{PfSelector, ProvisionError, Provisioned, provision};

/// A virtual function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualFunction {
    /// Its index under the PF (the N of `virtfnN`).
    pub index: u32,
    /// Everything sysfs says about it.
    pub device: PciDevice,
}

impl VirtualFunction {
    /// Bound to vfio-pci (for DPDK or VMs), so it has no kernel netdev.
    pub fn is_vfio(&self) -> bool {
        self.device.driver.as_deref() == Some("vfio-pci")
    }
}

/// A physical function with SR-IOV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalFunction {
    /// Everything sysfs says about it.
    pub device: PciDevice,
    /// Its (first) network interface.
    pub netdev: Option<String>,
    /// Link speed in Mb/s, when the link is up and the driver says.
    pub link_speed_mbps: Option<u32>,
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// `sriov_numvfs`.
    pub num_vfs: u32,
    /// Its VFs by index.
    pub vfs: Vec<VirtualFunction>,
}

/// The SR-IOV view of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Physical functions by PCI address.
    pub pfs: Vec<PhysicalFunction>,
    /// Inconsistencies worth an operator's attention.
    pub warnings: Vec<String>,
}

impl Inventory {
    /// Total VFs across PFs.
    pub fn vf_count(&self) -> usize {
        self.pfs.iter().map(|p| p.vfs.len()).sum()
    }
}

/// Build the inventory from the devices of one sysfs walk.
pub fn discover(sysfs: &Sysfs, devices: &[PciDevice]) -> Inventory {
    let by_address: HashMap<&PciAddress, &PciDevice> =
        devices.iter().map(|d| (&d.address, d)).collect();
    let mut inventory = Inventory::default();
    for pf in devices
        .iter()
        .filter(|d| d.is_network() && d.physfn.is_none())
    {
        let Some(caps) = pf.sriov else { continue };
        for link in &pf.dangling_links {
            inventory.warnings.push(format!(
                "{}: VF link without a device (VF being removed?); skipped",
                link.display()
            ));
        }
        let mut vfs = Vec::with_capacity(pf.virtfns.len());
        for (index, address) in &pf.virtfns {
            match by_address.get(address) {
                Some(vf) if vf.physfn.as_ref() == Some(&pf.address) => vfs.push(VirtualFunction {
                    index: *index,
                    device: (*vf).clone(),
                }),
                Some(_) => inventory.warnings.push(format!(
                    "{}: virtfn{index} points to {address}, whose physfn is not this PF; skipped",
                    pf.address
                )),
                None => inventory.warnings.push(format!(
                    "{}: virtfn{index} points to {address}, which could not be read; skipped",
                    pf.address
                )),
            }
        }
        if vfs.len() as u32 != caps.num_vfs {
            inventory.warnings.push(format!(
                "{}: sriov_numvfs is {} but {} VFs were found",
                pf.address,
                caps.num_vfs,
                vfs.len()
            ));
        }
        let netdev = pf.net_names.first().cloned();
        inventory.pfs.push(PhysicalFunction {
            link_speed_mbps: netdev.as_deref().and_then(|n| sysfs.link_speed_mbps(n)),
            netdev,
            total_vfs: caps.total_vfs,
            num_vfs: caps.num_vfs,
            device: pf.clone(),
            vfs,
        });
    }
    inventory
}
