//! PCI devices and their topology from sysfs (`<root>/sys/bus/pci/devices`).
//!
//! Reads are tolerant: a missing optional file is `None`, and a device whose mandatory
//! files are missing or garbled is skipped by [`Sysfs::pci_devices`] with a warning that
//! names the path, never a panic. Devices can vanish mid-walk (VFs being destroyed); that
//! is the same case.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::HostRoot;

/// A PCI address in sysfs form: `DDDD:BB:DD.F` in lower-case hex (domains wider than four
/// digits, as behind Intel VMD, are kept as they are).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress(String);

impl PciAddress {
    /// Parse and normalise an address. Accepts NVML's form with an 8-digit domain
    /// (`00000000:17:00.0`) and upper case, and returns the sysfs form.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().to_ascii_lowercase();
        let (domain, rest) = text.rsplit_once(':').and_then(|(head, devfn)| {
            let (domain, bus) = head.split_once(':')?;
            Some((domain.to_string(), format!("{bus}:{devfn}")))
        })?;
        let (bus, devfn) = rest.split_once(':')?;
        let (dev, func) = devfn.split_once('.')?;
        let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
        let valid = !domain.is_empty()
            && domain.len() <= 8
            && domain.chars().all(|c| c.is_ascii_hexdigit())
            && hex(bus, 2)
            && hex(dev, 2)
            && func.len() == 1
            && matches!(func.as_bytes()[0], b'0'..=b'7');
        if !valid {
            return None;
        }
        // NVML pads the domain to 8 digits; sysfs uses 4 unless the domain needs more.
        let trimmed = domain.trim_start_matches('0');
        let domain = if trimmed.len() <= 4 {
            format!("{:0>4}", trimmed)
        } else {
            trimmed.to_string()
        };
        Some(Self(format!("{domain}:{bus}:{dev}.{func}")))
    }

    /// The address text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Below this many devices per thread, walking in parallel is not worth a thread.
const PARALLEL_MIN_DEVICES: usize = 128;

/// PCI class code of a PCI-to-PCI bridge (switch ports and root ports), upper 16 bits.
const CLASS_BRIDGE_PCI: u32 = 0x0604;

/// Where a device sits in the PCIe hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The host bridge / root complex, `pci<domain>:<bus>` — the value of Kubernetes'
    /// standard `resource.kubernetes.io/pcieRoot` device attribute.
    pub pcie_root: String,
    /// The upstream port of the nearest PCIe switch above the device, when there is one.
    /// Two devices with the same value share a switch (nvidia-smi `PIX`), which is what
    /// GPUDirect RDMA wants.
    pub pcie_switch: Option<PciAddress>,
    /// Every PCI function from the root port down to the device itself.
    pub path: Vec<PciAddress>,
}

/// SR-IOV capability of a physical function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovCapability {
    /// `sriov_totalvfs`: the most VFs the PF supports.
    pub total_vfs: u32,
    /// `sriov_numvfs`: how many VFs exist now.
    pub num_vfs: u32,
}

/// One PCI function as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address.
    pub address: PciAddress,
    /// `vendor`.
    pub vendor_id: u16,
    /// `device`.
    pub device_id: u16,
    /// `class` (24 bits: class, subclass, programming interface).
    pub class: u32,
    /// The bound driver (`driver` link), if any.
    pub driver: Option<String>,
    /// `numa_node`; `None` when the platform reports -1 or nothing.
    pub numa_node: Option<u32>,
    /// The IOMMU group (`iommu_group` link), if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// SR-IOV capability, for physical functions that have it.
    pub sriov: Option<SriovCapability>,
    /// For a virtual function: its physical function (`physfn` link).
    pub physfn: Option<PciAddress>,
    /// For a physical function: its VFs by index (`virtfnN` links), sorted by index.
    pub virtfns: Vec<(u32, PciAddress)>,
    /// Network interfaces (`net/`), sorted.
    pub net_names: Vec<String>,
    /// RDMA devices (`infiniband/`), sorted.
    pub rdma_devices: Vec<String>,
    /// Position in the PCIe hierarchy.
    pub topology: Topology,
    /// `virtfnN` links whose VF is gone (being destroyed, or a damaged tree); those VFs
    /// are left out of `virtfns`.
    pub dangling_links: Vec<PathBuf>,
}

impl PciDevice {
    /// Class code without the programming interface (e.g. `0x0200` Ethernet, `0x0302` 3D
    /// controller).
    pub fn class_code(&self) -> u16 {
        (self.class >> 8) as u16
    }

    /// A network controller (class `0x02xx`, which includes InfiniBand `0x0207`).
    pub fn is_network(&self) -> bool {
        self.class >> 16 == 0x02
    }
}

/// Why a device could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// A file or link could not be read (including a device that vanished).
    #[error("{}: {source}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file held something unexpected.
    #[error("{}: {value:?} is not {expected}", path.display())]
    Parse {
        /// The path.
        path: PathBuf,
        /// What it held (trimmed).
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A link pointed somewhere that makes no sense.
    #[error("{}: link target {target:?} is not {expected}", path.display())]
    BadLink {
        /// The link.
        path: PathBuf,
        /// Its target.
        target: PathBuf,
        /// What was expected.
        expected: &'static str,
    },
    /// Writing `sriov_numvfs` was refused or did not take.
    #[error("{}: {message}", path.display())]
    Provision {
        /// The file.
        path: PathBuf,
        /// What happened and what to do.
        message: String,
    },
}

/// A device that was skipped during a walk, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The device directory or link.
    pub path: PathBuf,
    /// Why it was skipped.
    pub error: SysfsError,
}

/// Interface counters from sysfs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetdevCounters {
    /// Bytes received.
    pub rx_bytes: Option<u64>,
    /// Bytes sent.
    pub tx_bytes: Option<u64>,
    /// Received packets dropped.
    pub rx_dropped: Option<u64>,
    /// Packets dropped on send.
    pub tx_dropped: Option<u64>,
}

/// Writes to sysfs attribute files. The kernel acts on each write (creating VFs, binding
/// drivers) and refuses some (`EBUSY`), so the values and their order are behaviour: the
/// real writer is `fs::write`; tests put a kernel stand-in here that records every write
/// and applies the kernel's rules to the generated tree. Any `Fn(&Path, &str)` is one.
pub trait AttributeWriter: Send + Sync {
    /// Write `value` to the attribute at `path`.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

impl<F: Fn(&Path, &str) -> io::Result<()> + Send + Sync> AttributeWriter for F {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self(path, value)
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

/// sysfs under a host root.
#[derive(Clone)]
pub struct Sysfs {
    sys: PathBuf,
    writer: std::sync::Arc<dyn AttributeWriter>,
}

impl std::fmt::Debug for Sysfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sysfs")
            .field("sys", &self.sys)
            .finish_non_exhaustive()
    }
}

impl Sysfs {
    /// sysfs of `root` (`<root>/sys`).
    pub fn new(root: &HostRoot) -> Self {
        Self {
            sys: root.dir().join("sys"),
            writer: std::sync::Arc::new(write_file),
        }
    }

    /// The same sysfs with attribute writes going to `writer` (a kernel stand-in in tests).
    pub fn with_writer(mut self, writer: std::sync::Arc<dyn AttributeWriter>) -> Self {
        self.writer = writer;
        self
    }

    /// Write an attribute through this sysfs's writer.
    pub(crate) fn write_attribute(&self, path: &Path, value: &str) -> io::Result<()> {
        self.writer.write(path, value)
    }

    /// The `sys` directory.
    pub fn dir(&self) -> &Path {
        &self.sys
    }

    fn devices_dir(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    /// Addresses of all PCI functions, sorted. A missing `bus/pci` means no PCI bus
    /// (containers, some VMs): an empty list.
    pub fn pci_addresses(&self) -> Result<Vec<PciAddress>, SysfsError> {
        let dir = self.devices_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SysfsError::Read { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(addr) = entry.file_name().to_str().and_then(PciAddress::parse) {
                out.push(addr);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Read every PCI function; devices that cannot be read are returned separately.
    ///
    /// Large trees (a DGX with 1,000+ VFs) are read by several threads: the cost is one
    /// system call per attribute, and those run in parallel. The result is in address
    /// order either way.
    pub fn pci_devices(&self) -> Result<(Vec<PciDevice>, Vec<Skipped>), SysfsError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.pci_devices_with_threads(cpus)
    }

    /// As [`Sysfs::pci_devices`], with at most `max_threads` reader threads.
    pub fn pci_devices_with_threads(
        &self,
        max_threads: usize,
    ) -> Result<(Vec<PciDevice>, Vec<Skipped>), SysfsError> {
        let addresses = self.pci_addresses()?;
        let threads = max_threads
            .min(addresses.len() / PARALLEL_MIN_DEVICES)
            .max(1);
        let results: Vec<Result<PciDevice, Skipped>> = if threads == 1 {
            addresses.iter().map(|a| self.read_or_skip(a)).collect()
        } else {
            let chunk = addresses.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = addresses
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|a| self.read_or_skip(a))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    // A reader thread only panics on a bug; surface it rather than hide devices.
                    .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            })
        };
        let mut devices = Vec::with_capacity(results.len());
        let mut skipped = Vec::new();
        for r in results {
            match r {
                Ok(d) => devices.push(d),
                Err(s) => skipped.push(s),
            }
        }
        Ok((devices, skipped))
    }

    fn read_or_skip(&self, addr: &PciAddress) -> Result<PciDevice, Skipped> {
        self.pci_device(addr).map_err(|error| Skipped {
            path: self.devices_dir().join(addr.as_str()),
            error,
        })
    }

    /// Read one PCI function.
    pub fn pci_device(&self, address: &PciAddress) -> Result<PciDevice, SysfsError> {
        let link = self.devices_dir().join(address.as_str());
        let dir = self.resolve_link(&link)?;
        let topology = self.topology(&link, &dir, address)?;
        let vendor_id = parse_hex(&dir.join("vendor"), "a 16-bit hex vendor ID")? as u16;
        let device_id = parse_hex(&dir.join("device"), "a 16-bit hex device ID")? as u16;
        let class = parse_hex(&dir.join("class"), "a hex class code")?;
        let driver = link_name(&dir.join("driver"));
        let numa_node = match read_opt(&dir.join("numa_node"))? {
            None => None,
            Some(v) => {
                let n: i64 = v.parse().map_err(|_| SysfsError::Parse {
                    path: dir.join("numa_node"),
                    value: v.clone(),
                    expected: "a NUMA node number",
                })?;
                u32::try_from(n).ok()
            }
        };
        let iommu_group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
        // One directory listing tells which optional attributes exist, so absent ones
        // cost no failed open (a VF-heavy tree has thousands of devices).
        let mut virtfns = Vec::new();
        let mut net_names = Vec::new();
        let mut rdma_devices = Vec::new();
        let mut dangling_links = Vec::new();
        let (mut has_sriov, mut has_physfn) = (false, false);
        let entries = fs::read_dir(&dir).map_err(|source| SysfsError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(index) = name.strip_prefix("virtfn").and_then(|i| i.parse().ok()) {
                let link = entry.path();
                if link.is_dir() {
                    virtfns.push((index, self.linked_address(&link)?));
                } else {
                    dangling_links.push(link);
                }
            } else {
                match name {
                    "net" => net_names = list_names(&entry.path()),
                    "infiniband" => rdma_devices = list_names(&entry.path()),
                    "sriov_totalvfs" => has_sriov = true,
                    "physfn" => has_physfn = true,
                    _ => {}
                }
            }
        }
        let sriov = match has_sriov
            .then(|| read_opt(&dir.join("sriov_totalvfs")))
            .transpose()?
            .flatten()
        {
            None => None,
            Some(total) => {
                let total_vfs = parse_dec(&dir.join("sriov_totalvfs"), &total)?;
                let num_vfs = match read_opt(&dir.join("sriov_numvfs"))? {
                    Some(n) => parse_dec(&dir.join("sriov_numvfs"), &n)?,
                    None => 0,
                };
                (total_vfs > 0).then_some(SriovCapability { total_vfs, num_vfs })
            }
        };
        let physfn = match has_physfn {
            true => Some(self.linked_address(&dir.join("physfn"))?),
            false => None,
        };
        virtfns.sort();
        dangling_links.sort();
        Ok(PciDevice {
            address: address.clone(),
            vendor_id,
            device_id,
            class,
            driver,
            numa_node,
            iommu_group,
            sriov,
            physfn,
            virtfns,
            net_names,
            rdma_devices,
            topology,
            dangling_links,
        })
    }

    /// Link speed of a network interface in Mb/s (`/sys/class/net/<if>/speed`); `None` when
    /// the link is down or the driver does not say.
    pub fn link_speed_mbps(&self, ifname: &str) -> Option<u32> {
        let path = self.sys.join("class/net").join(ifname).join("speed");
        let text = fs::read_to_string(path).ok()?;
        text.trim()
            .parse::<i64>()
            .ok()
            .and_then(|v| u32::try_from(v).ok())
    }

    /// Byte and drop counters of a network interface
    /// (`/sys/class/net/<if>/statistics`); a counter the driver does not expose is `None`.
    pub fn netdev_counters(&self, ifname: &str) -> NetdevCounters {
        let dir = self.sys.join("class/net").join(ifname).join("statistics");
        let read = |file: &str| -> Option<u64> {
            fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
        };
        NetdevCounters {
            rx_bytes: read("rx_bytes"),
            tx_bytes: read("tx_bytes"),
            rx_dropped: read("rx_dropped"),
            tx_dropped: read("tx_dropped"),
        }
    }

    /// Operational state of a network interface (`up`, `down`, ...).
    pub fn oper_state(&self, ifname: &str) -> Option<String> {
        let path = self.sys.join("class/net").join(ifname).join("operstate");
        fs::read_to_string(path).ok().map(|s| s.trim().to_string())
    }

    /// The PCI function behind a network interface (`/sys/class/net/<if>`).
    pub fn pci_address_of_interface(&self, ifname: &str) -> Result<PciAddress, SysfsError> {
        let link = self.sys.join("class/net").join(ifname);
        let dir = self.resolve_link(&link)?;
        // <device dir>/net/<ifname>
        dir.parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(PciAddress::parse)
            .ok_or(SysfsError::BadLink {
                path: link,
                target: dir,
                expected: "the net/ directory of a PCI device",
            })
    }

    /// Set a PF's VF count. Changing a non-zero count goes through 0 first, as the kernel
    /// requires; the new count must not exceed `sriov_totalvfs`.
    pub fn set_num_vfs(&self, pf: &PciAddress, count: u32) -> Result<(), SysfsError> {
        let dir = self.resolve_link(&self.devices_dir().join(pf.as_str()))?;
        let total_path = dir.join("sriov_totalvfs");
        let numvfs_path = dir.join("sriov_numvfs");
        let total = match read_opt(&total_path)? {
            Some(t) => parse_dec(&total_path, &t)?,
            None => {
                return Err(SysfsError::Provision {
                    path: total_path,
                    message: format!("{pf} does not support SR-IOV"),
                });
            }
        };
        if count > total {
            return Err(SysfsError::Provision {
                path: numvfs_path,
                message: format!(
                    "{pf} supports at most {total} VFs (sriov_totalvfs), {count} requested"
                ),
            });
        }
        let current = match read_opt(&numvfs_path)? {
            Some(n) => parse_dec(&numvfs_path, &n)?,
            None => 0,
        };
        if current == count {
            return Ok(());
        }
        let write = |n: u32| {
            self.write_attribute(&numvfs_path, &format!("{n}\n"))
                .map_err(|source| SysfsError::Provision {
                    path: numvfs_path.clone(),
                    message: format!("writing {n}: {source}"),
                })
        };
        if current != 0 {
            write(0)?;
        }
        if count != 0 {
            write(count)?;
        }
        Ok(())
    }

    /// Resolve a sysfs symlink to the device directory it names, without leaving the root.
    fn resolve_link(&self, link: &Path) -> Result<PathBuf, SysfsError> {
        let target = fs::read_link(link).map_err(|source| SysfsError::Read {
            path: link.to_path_buf(),
            source,
        })?;
        let base = if target.is_absolute() {
            // Absolute targets are host paths; keep them under our root.
            self.sys.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            link.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let resolved = normalize(&base.join(target.strip_prefix("/").unwrap_or(&target)));
        if !resolved.starts_with(&self.sys) {
            return Err(SysfsError::BadLink {
                path: link.to_path_buf(),
                target,
                expected: "inside sysfs",
            });
        }
        if !resolved.is_dir() {
            return Err(SysfsError::Read {
                path: resolved,
                source: io::Error::new(io::ErrorKind::NotFound, "dangling link"),
            });
        }
        Ok(resolved)
    }

    fn linked_address(&self, link: &Path) -> Result<PciAddress, SysfsError> {
        let target = fs::read_link(link).map_err(|source| SysfsError::Read {
            path: link.to_path_buf(),
            source,
        })?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(PciAddress::parse)
            .ok_or(SysfsError::BadLink {
                path: link.to_path_buf(),
                target,
                expected: "a PCI device",
            })
    }

    fn topology(
        &self,
        link: &Path,
        dir: &Path,
        address: &PciAddress,
    ) -> Result<Topology, SysfsError> {
        let bad = |expected| SysfsError::BadLink {
            path: link.to_path_buf(),
            target: dir.to_path_buf(),
            expected,
        };
        let rel = dir
            .strip_prefix(self.sys.join("devices"))
            .map_err(|_| bad("under /sys/devices"))?;
        let mut parts = rel.components().filter_map(|c| match c {
            Component::Normal(p) => p.to_str(),
            _ => None,
        });
        let pcie_root = parts
            .next()
            .filter(|r| r.starts_with("pci"))
            .ok_or_else(|| bad("under a pciDDDD:BB host bridge"))?
            .to_string();
        let path: Vec<PciAddress> = parts.filter_map(PciAddress::parse).collect();
        if path.last() != Some(address) {
            return Err(bad("the device's own directory"));
        }
        // root port, ..., switch upstream port, switch downstream port, device
        let pcie_switch = (path.len() >= 4)
            .then(|| path[path.len() - 3].clone())
            .filter(|usp| {
                // The upstream port is the device's grandparent directory; when its class is
                // readable it must be a PCI bridge.
                let _ = usp;
                dir.ancestors()
                    .nth(2)
                    .map(|d| d.join("class"))
                    .and_then(|p| fs::read_to_string(p).ok())
                    .and_then(|c| parse_hex_text(&c))
                    .is_none_or(|class| class >> 8 == CLASS_BRIDGE_PCI)
            });
        Ok(Topology {
            pcie_root,
            pcie_switch,
            path,
        })
    }
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn read_opt(path: &Path) -> Result<Option<String>, SysfsError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysfsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_hex_text(text: &str) -> Option<u32> {
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

fn parse_hex(path: &Path, expected: &'static str) -> Result<u32, SysfsError> {
    let text = fs::read_to_string(path).map_err(|source| SysfsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_hex_text(&text).ok_or_else(|| SysfsError::Parse {
        path: path.to_path_buf(),
        value: text.trim().to_string(),
        expected,
    })
}

fn parse_dec(path: &Path, text: &str) -> Result<u32, SysfsError> {
    text.parse().map_err(|_| SysfsError::Parse {
        path: path.to_path_buf(),
        value: text.to_string(),
        expected: "a count",
    })
}

fn link_name(link: &Path) -> Option<String> {
    fs::read_link(link)
        .ok()
        .and_then(|t| t.file_name().and_then(|n| n.to_str()).map(str::to_string))
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise() {
        assert_eq!(
            PciAddress::parse("0000:17:00.0").unwrap().as_str(),
            "0000:17:00.0"
        );
        assert_eq!(
            PciAddress::parse("00000000:1B:00.1").unwrap().as_str(),
            "0000:1b:00.1"
        );
        assert_eq!(
            PciAddress::parse("10000:01:00.0").unwrap().as_str(),
            "10000:01:00.0"
        );
        for bad in [
            "",
            "0000:17:00",
            "0000:17:00.8",
            "zzzz:17:00.0",
            "0000:170:00.0",
            "pci0000:00",
        ] {
            assert!(PciAddress::parse(bad).is_none(), "{bad}");
        }
    }
}
