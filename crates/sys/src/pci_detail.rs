//! What sysfs says about one PCI function beyond the walk in `pci`: subsystem IDs, the
//! PCIe link, AER error counters, BAR sizes, the members of its IOMMU group and the
//! device nodes its driver created. Read on demand for the few functions a driver
//! publishes, never during the walk of every function (a DGX has 1,000+ VFs).
//!
//! Like the walk, reads are tolerant: what the kernel does not offer (no AER capability,
//! a link the platform does not report) is `None`, never an error.

use std::fs;
use std::path::{Path, PathBuf};

use crate::pci::{PciAddress, Sysfs, SysfsError};

/// The PCIe link of a function, as the kernel reports it (`current_link_speed` etc.).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PcieLink {
    /// Negotiated speed in GT/s.
    pub current_speed_gts: Option<f64>,
    /// Most the device supports, in GT/s.
    pub max_speed_gts: Option<f64>,
    /// Negotiated lanes.
    pub current_width: Option<u32>,
    /// Most lanes the device supports.
    pub max_width: Option<u32>,
}

impl PcieLink {
    /// Trained below what the device supports (speed or width), e.g. a x16 card at x8
    /// after a bad reseat or a riser fault. `None` when the kernel does not say.
    pub fn degraded(&self) -> Option<bool> {
        let speed = match (self.current_speed_gts, self.max_speed_gts) {
            (Some(c), Some(m)) => Some(c + 0.01 < m),
            _ => None,
        };
        let width = match (self.current_width, self.max_width) {
            (Some(c), Some(m)) => Some(c < m),
            _ => None,
        };
        match (speed, width) {
            (None, None) => None,
            (s, w) => Some(s.unwrap_or(false) || w.unwrap_or(false)),
        }
    }
}

/// AER error totals since boot (`aer_dev_correctable`, `aer_dev_nonfatal`,
/// `aer_dev_fatal`); `None` where the function has no AER capability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AerCounters {
    /// `TOTAL_ERR_COR`.
    pub correctable: Option<u64>,
    /// `TOTAL_ERR_NONFATAL`.
    pub nonfatal: Option<u64>,
    /// `TOTAL_ERR_FATAL`.
    pub fatal: Option<u64>,
}

/// One base address register with a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// BAR number, 0 to 5.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// Memory (not I/O port) space.
    pub memory: bool,
    /// Prefetchable memory (device memory a host maps, e.g. an FPGA's card memory window).
    pub prefetchable: bool,
}

/// A device node a driver created for a function (`/dev/<DEVNAME>` from a child's
/// `uevent`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNode {
    /// The path under `/dev`, e.g. `dfl-fme.0` or `xclmgmt1280`.
    pub dev_name: String,
    /// The sysfs class directory it came from (for messages).
    pub sysfs_path: PathBuf,
}

const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The `TOTAL_*` line of an AER statistics file.
fn aer_total(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (name, value) = l.split_once(' ')?;
        name.starts_with("TOTAL_ERR_")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// `16.0 GT/s PCIe` (newer kernels), `8 GT/s` (older): the number; `Unknown` is `None`.
fn link_speed(path: &Path) -> Option<f64> {
    read_trim(path)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|s: &f64| *s > 0.0)
}

impl Sysfs {
    fn function_dir(&self, address: &PciAddress) -> PathBuf {
        self.dir().join("bus/pci/devices").join(address.as_str())
    }

    /// `subsystem_vendor` and `subsystem_device`, when the function has them.
    pub fn subsystem_ids(&self, address: &PciAddress) -> (Option<u16>, Option<u16>) {
        let dir = self.function_dir(address);
        let id = |name: &str| {
            read_trim(&dir.join(name))
                .and_then(|s| u16::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        };
        (id("subsystem_vendor"), id("subsystem_device"))
    }

    /// The function's PCIe link.
    pub fn pcie_link(&self, address: &PciAddress) -> PcieLink {
        let dir = self.function_dir(address);
        let width = |name: &str| {
            read_trim(&dir.join(name))
                .and_then(|s| s.parse().ok())
                .filter(|w| *w > 0)
        };
        PcieLink {
            current_speed_gts: link_speed(&dir.join("current_link_speed")),
            max_speed_gts: link_speed(&dir.join("max_link_speed")),
            current_width: width("current_link_width"),
            max_width: width("max_link_width"),
        }
    }

    /// The function's AER error totals.
    pub fn aer_counters(&self, address: &PciAddress) -> AerCounters {
        let dir = self.function_dir(address);
        AerCounters {
            correctable: aer_total(&dir.join("aer_dev_correctable")),
            nonfatal: aer_total(&dir.join("aer_dev_nonfatal")),
            fatal: aer_total(&dir.join("aer_dev_fatal")),
        }
    }

    /// The BARs with a size, from `resource` (lines 0–5: start, end, flags in hex).
    pub fn bars(&self, address: &PciAddress) -> Vec<Bar> {
        let Some(text) = fs::read_to_string(self.function_dir(address).join("resource")).ok()
        else {
            return Vec::new();
        };
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        text.lines()
            .take(6)
            .enumerate()
            .filter_map(|(i, line)| {
                let mut f = line.split_whitespace().map(hex);
                let (start, end, flags) = (f.next()??, f.next()??, f.next()??);
                if end == 0 || end < start || flags & (IORESOURCE_MEM | IORESOURCE_IO) == 0 {
                    return None;
                }
                Some(Bar {
                    index: i as u8,
                    size: end - start + 1,
                    memory: flags & IORESOURCE_MEM != 0,
                    prefetchable: flags & IORESOURCE_PREFETCH != 0,
                })
            })
            .collect()
    }

    /// Every function in IOMMU group `group` now (`kernel/iommu_groups/<group>/devices`),
    /// sorted. A group that does not exist is an error: the caller was about to hand it
    /// to a container.
    pub fn iommu_group_members(&self, group: u32) -> Result<Vec<PciAddress>, SysfsError> {
        let dir = self
            .dir()
            .join(format!("kernel/iommu_groups/{group}/devices"));
        let entries = fs::read_dir(&dir).map_err(|source| SysfsError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<PciAddress> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(PciAddress::parse))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Whether the function exists now (hot-unplug and surprise removal take it away).
    pub fn pci_present(&self, address: &PciAddress) -> bool {
        self.function_dir(address).join("vendor").exists()
    }

    /// The device nodes the function's driver created: every `uevent` with a `DEVNAME=`
    /// in the function's directory tree (class devices such as `dfl-fme.0`, `xclmgmt…`,
    /// `accel/accel0`), at most four levels down, not following links out of it.
    pub fn device_nodes(&self, address: &PciAddress) -> Vec<DeviceNode> {
        let Ok(root) = fs::canonicalize(self.function_dir(address)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if dir != root
                && let Some(name) = read_trim(&dir.join("uevent"))
                    .and_then(|u| {
                        u.lines()
                            .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
                    })
                    .filter(|n| !n.is_empty() && !n.contains("..") && !n.starts_with('/'))
            {
                out.push(DeviceNode {
                    dev_name: name,
                    sysfs_path: dir.clone(),
                });
            }
            if depth >= 4 {
                continue;
            }
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                // Real directories only: sysfs links (driver, subsystem, iommu_group, a
                // child function's parent) lead out of the device.
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let name = entry.file_name();
                // A child PCI function is its own device, not one of ours.
                let child_function = name.to_str().and_then(PciAddress::parse).is_some();
                if kind.is_dir() && !child_function {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.dev_name == b.dev_name);
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::HostRoot;

    fn tree() -> (tempfile::TempDir, Sysfs, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir
            .path()
            .join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0");
        fs::create_dir_all(&dev).unwrap();
        let devices = dir.path().join("sys/bus/pci/devices");
        fs::create_dir_all(&devices).unwrap();
        std::os::unix::fs::symlink(&dev, devices.join("0000:01:00.0")).unwrap();
        fs::write(dev.join("vendor"), "0x10ee\n").unwrap();
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
        (dir, sysfs, dev)
    }

    fn addr() -> PciAddress {
        PciAddress::parse("0000:01:00.0").unwrap()
    }

    #[test]
    fn the_link_reads_both_kernel_formats_and_tells_a_down_trained_link() {
        let (_d, sysfs, dev) = tree();
        assert_eq!(sysfs.pcie_link(&addr()).degraded(), None);
        fs::write(dev.join("current_link_speed"), "8.0 GT/s PCIe\n").unwrap();
        fs::write(dev.join("max_link_speed"), "16 GT/s\n").unwrap();
        fs::write(dev.join("current_link_width"), "16\n").unwrap();
        fs::write(dev.join("max_link_width"), "16\n").unwrap();
        let link = sysfs.pcie_link(&addr());
        assert_eq!(link.current_speed_gts, Some(8.0));
        assert_eq!(link.max_speed_gts, Some(16.0));
        assert_eq!(link.degraded(), Some(true));
        fs::write(dev.join("current_link_speed"), "16.0 GT/s PCIe\n").unwrap();
        assert_eq!(sysfs.pcie_link(&addr()).degraded(), Some(false));
        fs::write(dev.join("current_link_width"), "8\n").unwrap();
        assert_eq!(sysfs.pcie_link(&addr()).degraded(), Some(true));
        fs::write(dev.join("current_link_speed"), "Unknown\n").unwrap();
        assert_eq!(sysfs.pcie_link(&addr()).current_speed_gts, None);
    }

    #[test]
    fn aer_totals_come_from_the_total_lines() {
        let (_d, sysfs, dev) = tree();
        assert_eq!(sysfs.aer_counters(&addr()), AerCounters::default());
        fs::write(
            dev.join("aer_dev_fatal"),
            "Undefined 0\nDLP 1\nSDES 0\nTLP 2\nTOTAL_ERR_FATAL 3\n",
        )
        .unwrap();
        fs::write(
            dev.join("aer_dev_nonfatal"),
            "TLP 0\nTOTAL_ERR_NONFATAL 0\n",
        )
        .unwrap();
        fs::write(
            dev.join("aer_dev_correctable"),
            "RxErr 7\nTOTAL_ERR_COR 7\n",
        )
        .unwrap();
        assert_eq!(
            sysfs.aer_counters(&addr()),
            AerCounters {
                correctable: Some(7),
                nonfatal: Some(0),
                fatal: Some(3)
            }
        );
    }

    #[test]
    fn bars_skip_unused_lines_and_the_rom() {
        let (_d, sysfs, dev) = tree();
        fs::write(
            dev.join("resource"),
            "0x00000000fb000000 0x00000000fb7fffff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000038000000000 0x0000038fffffffff 0x000000000014220c\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x000000000000e000 0x000000000000e01f 0x0000000000040101\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x00000000fc000000 0x00000000fc00ffff 0x0000000000046200\n",
        )
        .unwrap();
        let bars = sysfs.bars(&addr());
        assert_eq!(
            bars,
            vec![
                Bar {
                    index: 0,
                    size: 8 << 20,
                    memory: true,
                    prefetchable: false
                },
                Bar {
                    index: 2,
                    size: 64 << 30,
                    memory: true,
                    prefetchable: true
                },
                Bar {
                    index: 4,
                    size: 32,
                    memory: false,
                    prefetchable: false
                },
            ]
        );
    }

    #[test]
    fn device_nodes_come_from_child_uevents_and_stop_at_child_functions() {
        let (_d, sysfs, dev) = tree();
        let fme = dev.join("fpga_region/region0/dfl-fme.0");
        fs::create_dir_all(&fme).unwrap();
        fs::write(
            fme.join("uevent"),
            "DRIVER=dfl-fme\nMAJOR=511\nMINOR=0\nDEVNAME=dfl-fme.0\n",
        )
        .unwrap();
        let child = dev.join("0000:02:00.0/misc/x");
        fs::create_dir_all(&child).unwrap();
        fs::write(child.join("uevent"), "DEVNAME=not-ours\n").unwrap();
        let evil = dev.join("misc/evil");
        fs::create_dir_all(&evil).unwrap();
        fs::write(evil.join("uevent"), "DEVNAME=../../etc/shadow\n").unwrap();
        fs::write(dev.join("uevent"), "DEVNAME=self\n").unwrap();
        let nodes: Vec<String> = sysfs
            .device_nodes(&addr())
            .into_iter()
            .map(|n| n.dev_name)
            .collect();
        assert_eq!(nodes, vec!["dfl-fme.0".to_string()]);
    }

    #[test]
    fn group_members_are_read_from_the_kernel_group() {
        let (dir, sysfs, dev) = tree();
        assert!(sysfs.iommu_group_members(7).is_err());
        let g = dir.path().join("sys/kernel/iommu_groups/7/devices");
        fs::create_dir_all(&g).unwrap();
        std::os::unix::fs::symlink(&dev, g.join("0000:01:00.0")).unwrap();
        std::os::unix::fs::symlink(&dev, g.join("0000:00:01.0")).unwrap();
        assert_eq!(
            sysfs.iommu_group_members(7).unwrap(),
            vec![
                PciAddress::parse("0000:00:01.0").unwrap(),
                PciAddress::parse("0000:01:00.0").unwrap()
            ]
        );
        assert!(sysfs.pci_present(&addr()));
        fs::remove_file(dev.join("vendor")).unwrap();
        assert!(!sysfs.pci_present(&addr()));
    }
}
