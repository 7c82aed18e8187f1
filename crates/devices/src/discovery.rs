//! Discovery: GPUs (NVML or a fixture) and SR-IOV NICs (sysfs) from one sysfs walk, in
//! the domain crates' types ([`Discovery`]) and in the form `hybridlet devices` prints
//! and the metrics read ([`Report`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hybridlet_gpu::{FakeSource, Gpu, GpuSource, NvmlSource};
use hybridlet_sriov::{Inventory, PhysicalFunction, VirtualFunction};
use hybridlet_sys::{PciDevice, Sysfs, Topology};
use serde::Serialize;

use crate::Error;

/// Everything discovery found, in the form `-o json|yaml` prints.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `nvml`, `fake` or `none`.
    pub gpu_source: String,
    /// GPUs.
    pub gpus: Vec<GpuView>,
    /// SR-IOV physical functions with their VFs.
    pub physical_functions: Vec<PfView>,
    /// Devices that could not be read, and why.
    pub skipped: Vec<SkippedView>,
    /// Inconsistencies.
    pub warnings: Vec<String>,
}

/// Topology attributes shared by every device kind.
#[derive(Debug, Serialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// `resource.kubernetes.io/pcieRoot`.
    pub pcie_root: Option<String>,
    /// Upstream port of the nearest PCIe switch.
    pub pcie_switch: Option<String>,
    /// NUMA node.
    pub numa_node: Option<u32>,
}

impl Placement {
    fn new(topology: Option<&Topology>, numa_node: Option<u32>) -> Self {
        Self {
            pcie_root: topology.map(|t| t.pcie_root.clone()),
            pcie_switch: topology.and_then(|t| t.pcie_switch.as_ref().map(|s| s.to_string())),
            numa_node,
        }
    }
}

/// One GPU.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuView {
    #[serde(flatten)]
    pub(crate) info: hybridlet_gpu::GpuInfo,
    pub(crate) pci_address: Option<String>,
    #[serde(flatten)]
    pub(crate) placement: Placement,
}

/// One physical function.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PfView {
    pub(crate) pci_address: String,
    pub(crate) vendor_id: String,
    pub(crate) device_id: String,
    pub(crate) driver: Option<String>,
    pub(crate) netdev: Option<String>,
    pub(crate) link_speed_mbps: Option<u32>,
    pub(crate) total_vfs: u32,
    pub(crate) num_vfs: u32,
    pub(crate) rdma_device: Option<String>,
    pub(crate) iommu_group: Option<u32>,
    #[serde(flatten)]
    pub(crate) placement: Placement,
    pub(crate) vfs: Vec<VfView>,
}

/// One virtual function.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VfView {
    pub(crate) index: u32,
    pub(crate) pci_address: String,
    pub(crate) vendor_id: String,
    pub(crate) device_id: String,
    pub(crate) driver: Option<String>,
    pub(crate) netdev: Option<String>,
    pub(crate) rdma_device: Option<String>,
    pub(crate) iommu_group: Option<u32>,
    #[serde(flatten)]
    pub(crate) placement: Placement,
}

/// A device that was skipped.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedView {
    path: String,
    reason: String,
}

fn hex16(v: u16) -> String {
    format!("0x{v:04x}")
}

fn pf_view(pf: &PhysicalFunction) -> PfView {
    let d = &pf.device;
    PfView {
        pci_address: d.address.to_string(),
        vendor_id: hex16(d.vendor_id),
        device_id: hex16(d.device_id),
        driver: d.driver.clone(),
        netdev: pf.netdev.clone(),
        link_speed_mbps: pf.link_speed_mbps,
        total_vfs: pf.total_vfs,
        num_vfs: pf.num_vfs,
        rdma_device: d.rdma_devices.first().cloned(),
        iommu_group: d.iommu_group,
        placement: Placement::new(Some(&d.topology), d.numa_node),
        vfs: pf.vfs.iter().map(vf_view).collect(),
    }
}

fn vf_view(vf: &VirtualFunction) -> VfView {
    let d: &PciDevice = &vf.device;
    VfView {
        index: vf.index,
        pci_address: d.address.to_string(),
        vendor_id: hex16(d.vendor_id),
        device_id: hex16(d.device_id),
        driver: d.driver.clone(),
        netdev: d.net_names.first().cloned(),
        rdma_device: d.rdma_devices.first().cloned(),
        iommu_group: d.iommu_group,
        placement: Placement::new(Some(&d.topology), d.numa_node),
    }
}

fn gpu_view(g: &Gpu) -> GpuView {
    GpuView {
        placement: Placement::new(g.topology.as_ref(), g.numa_node),
        pci_address: g.pci_address.as_ref().map(|a| a.to_string()),
        info: g.info.clone(),
    }
}

/// What one discovery found, in the domain crates' types (the DRA drivers and the health
/// policies take these), plus what could not be read.
#[derive(Debug, Default)]
pub struct Discovery {
    /// `nvml`, `fake` or `none`.
    pub gpu_source: String,
    /// GPUs, placed in the PCIe topology.
    pub gpus: Vec<Gpu>,
    /// SR-IOV PFs and their VFs.
    pub inventory: Inventory,
    /// Every PCI function the walk read (the PCI driver picks its own from these).
    pub pci: Vec<hybridlet_sys::PciDevice>,
    /// Devices that could not be read, and why.
    pub skipped: Vec<SkippedView>,
    /// Inconsistencies (the inventory's included).
    pub warnings: Vec<String>,
}

impl Discovery {
    /// The form `devices -o json|yaml` prints and the metrics read.
    pub fn report(&self) -> Report {
        Report {
            gpu_source: self.gpu_source.clone(),
            gpus: self.gpus.iter().map(gpu_view).collect(),
            physical_functions: self.inventory.pfs.iter().map(pf_view).collect(),
            skipped: self.skipped.clone(),
            warnings: self.warnings.clone(),
        }
    }
}

/// Run discovery once: one sysfs walk shared by the GPU and SR-IOV views.
pub fn discover(sysfs: &Sysfs, gpu_source: Option<&dyn GpuSource>) -> Result<Discovery, Error> {
    let (pci, skipped) = sysfs.pci_devices().map_err(|e| Error::Pci(e.to_string()))?;
    let mut warnings = Vec::new();
    let skipped: Vec<SkippedView> = skipped
        .into_iter()
        .map(|s| {
            tracing::warn!(path = %s.path.display(), "skipping PCI device: {}", s.error);
            SkippedView {
                path: s.path.display().to_string(),
                reason: s.error.to_string(),
            }
        })
        .collect();
    let (gpus, kind) = match gpu_source {
        Some(source) => {
            let (gpus, w) = hybridlet_gpu::discover(source, &pci)?;
            warnings.extend(w);
            (gpus, source.kind())
        }
        None => (Vec::new(), "none"),
    };
    let inventory = hybridlet_sriov::discover(sysfs, &pci);
    warnings.extend(inventory.warnings.iter().cloned());
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(Discovery {
        gpu_source: kind.to_string(),
        gpus,
        inventory,
        pci,
        skipped,
        warnings,
    })
}

/// The GPU source: a fixture when given, else NVML when the library loads, else none.
pub fn gpu_source(fixture: Option<&std::path::Path>) -> Result<Option<Box<dyn GpuSource>>, Error> {
    if let Some(path) = fixture {
        return Ok(Some(Box::new(FakeSource::from_file(path)?)));
    }
    match NvmlSource::open()? {
        Some(nvml) => Ok(Some(Box::new(nvml))),
        None => {
            tracing::info!("NVML is not available (libnvidia-ml.so.1 not loadable): no GPUs");
            Ok(None)
        }
    }
}

/// Group key: NUMA node, then root complex and switch.
type Group = (Option<u32>, Option<String>, Option<String>);

/// `MIG: 1g.18gb@0 1g.18gb@1 3g.71gb@4` (profile and first memory slice of each MIG
/// device), `MIG: no instances`, or nothing when MIG mode is off.
fn mig_summary(info: &hybridlet_gpu::GpuInfo) -> String {
    if info.mig_enabled != Some(true) {
        return String::new();
    }
    let Some(mig) = &info.mig else {
        return "MIG (profiles unreadable)".into();
    };
    if mig.instances.is_empty() {
        return "MIG: no instances".into();
    }
    let parts: Vec<String> = mig
        .instances
        .iter()
        .map(|i| {
            let name = mig
                .profile(i.profile_id)
                .map_or_else(|| format!("profile {}", i.profile_id), |p| p.name.clone());
            format!("{name}@{}", i.placement.start)
        })
        .collect();
    format!("MIG: {}", parts.join(" "))
}

/// The `devices` table: grouped by NUMA node, then root complex and PCIe switch, so an
/// operator sees which GPU shares a switch with which NIC.
pub fn table(r: &Report) -> String {
    let mut groups: BTreeMap<Group, Vec<String>> = BTreeMap::new();
    let key = |p: &Placement| (p.numa_node, p.pcie_root.clone(), p.pcie_switch.clone());
    for g in &r.gpus {
        groups.entry(key(&g.placement)).or_default().push(
            format!(
                "GPU {:<2} {:<13} {} {} {} GiB  {}",
                g.info.index,
                g.pci_address.as_deref().unwrap_or("?"),
                g.info.name,
                g.info.uuid,
                g.info.memory_total_bytes >> 30,
                mig_summary(&g.info),
            )
            .trim_end()
            .to_string(),
        );
    }
    for pf in &r.physical_functions {
        let speed = pf
            .link_speed_mbps
            .map(|s| format!("{} Gb/s", s / 1000))
            .unwrap_or_else(|| "link down".to_string());
        let vfio = pf
            .vfs
            .iter()
            .filter(|v| v.driver.as_deref() == Some("vfio-pci"))
            .count();
        let mut line = format!(
            "NIC    {:<13} {}:{} {} {} {}  VFs {}/{}",
            pf.pci_address,
            &pf.vendor_id[2..],
            &pf.device_id[2..],
            pf.driver.as_deref().unwrap_or("-"),
            pf.netdev.as_deref().unwrap_or("-"),
            speed,
            pf.num_vfs,
            pf.total_vfs,
        );
        if vfio > 0 {
            let _ = write!(line, " ({vfio} on vfio-pci)");
        }
        if let (Some(first), Some(last)) = (pf.vfs.first(), pf.vfs.last()) {
            let _ = write!(line, "  {}..{}", first.pci_address, last.pci_address);
        }
        groups.entry(key(&pf.placement)).or_default().push(line);
    }
    let mut out = String::new();
    let mut numa_seen = None;
    for ((numa, root, switch), lines) in &groups {
        if numa_seen != Some(*numa) {
            numa_seen = Some(*numa);
            let _ = writeln!(
                out,
                "NUMA node {}",
                numa.map_or("-".to_string(), |n| n.to_string())
            );
        }
        let _ = writeln!(
            out,
            "  {} {}",
            root.as_deref().unwrap_or("(unknown root)"),
            switch
                .as_deref()
                .map_or("(no PCIe switch)".to_string(), |s| format!("switch {s}"))
        );
        for line in lines {
            let _ = writeln!(out, "    {line}");
        }
    }
    let vfs: usize = r.physical_functions.iter().map(|p| p.vfs.len()).sum();
    let _ = writeln!(
        out,
        "{} GPUs ({}), {} SR-IOV PFs, {} VFs",
        r.gpus.len(),
        r.gpu_source,
        r.physical_functions.len(),
        vfs
    );
    for s in &r.skipped {
        let _ = writeln!(out, "skipped: {}", s.reason);
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
