//! The PCI DRA driver's domain: which PCI functions an operator allowed (FPGAs such as
//! Alveo or Intel DFL cards, other accelerators), what sysfs says about them (IDs,
//! driver, IOMMU group, placement, link, BARs, FPGA shell and bitstream identifiers),
//! handing a function's whole IOMMU group to vfio-pci and back (`dra`), and their health
//! (`health`: gone, AER errors, a down-trained link).
//!
//! What this crate must never do: publish or touch a function no allow rule matches, a
//! PCI bridge, a GPU (the GPU driver's) or an SR-IOV VF or PF with VFs (the SR-IOV
//! driver's); depend on other domain crates; write to sysfs itself (driver binding goes
//! through `hybridlet_sys::binding`).

pub mod dra;
mod health;

use std::collections::BTreeMap;

use hybridlet_config::{PciAllowRule, parse_pci_class, parse_pci_id};
use hybridlet_sys::pci_detail::Bar;
use hybridlet_sys::{PciAddress, PciDevice, Sysfs};

pub use health::{PciHealth, PciMetrics};

/// The `deviceClass` attribute of a rule that names none.
pub const DEFAULT_DEVICE_CLASS: &str = "accelerator";

/// The rules of `spec.dra.pci.allow`, parsed.
pub fn rules(spec: &hybridlet_config::PciDriverSpec) -> Vec<Rule> {
    spec.allow.iter().map(Rule::from_config).collect()
}

/// One allow rule, parsed (`spec.dra.pci.allow[]`; validation already refused bad ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Vendor ID.
    pub vendor: Option<u16>,
    /// Device ID.
    pub device: Option<u16>,
    /// Subsystem vendor ID.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem device ID.
    pub subsystem_device: Option<u16>,
    /// Class prefix: (value, bits), e.g. (0x12, 8) or (0x1200, 16).
    pub class: Option<(u32, u32)>,
    /// The kernel driver bound at discovery.
    pub driver: Option<String>,
    /// The `deviceClass` attribute.
    pub device_class: String,
}

impl Rule {
    /// From the configuration; `None` for a field that does not parse (validation names
    /// it before this runs).
    pub fn from_config(rule: &PciAllowRule) -> Self {
        let id = |v: &Option<String>| v.as_deref().and_then(parse_pci_id);
        Self {
            vendor: id(&rule.vendor),
            device: id(&rule.device),
            subsystem_vendor: id(&rule.subsystem_vendor),
            subsystem_device: id(&rule.subsystem_device),
            class: rule.class.as_deref().and_then(parse_pci_class),
            driver: rule.driver.clone(),
            device_class: rule
                .device_class
                .clone()
                .unwrap_or_else(|| DEFAULT_DEVICE_CLASS.to_string()),
        }
    }

    /// Whether `d` (with its subsystem IDs) matches every field this rule gives. A rule
    /// that gives nothing to match matches nothing.
    pub fn matches(&self, d: &PciDevice, subsystem: (Option<u16>, Option<u16>)) -> bool {
        let id = |want: Option<u16>, have: Option<u16>| want.is_none() || want == have;
        self.matches_walk(d)
            && id(self.subsystem_vendor, subsystem.0)
            && id(self.subsystem_device, subsystem.1)
    }

    /// Whether `d` matches every field the walk read (all but the subsystem IDs, which
    /// are read only for functions that pass this).
    fn matches_walk(&self, d: &PciDevice) -> bool {
        if self.vendor.is_none() && self.class.is_none() && self.driver.is_none() {
            return false;
        }
        let id = |want: Option<u16>, have: u16| want.is_none_or(|w| w == have);
        id(self.vendor, d.vendor_id)
            && id(self.device, d.device_id)
            && self
                .class
                .is_none_or(|(value, bits)| d.class >> (24 - bits) == value)
            && self
                .driver
                .as_ref()
                .is_none_or(|w| d.driver.as_deref() == Some(w.as_str()))
    }
}

/// An allowlisted PCI function.
#[derive(Debug, Clone, PartialEq)]
pub struct PciFunction {
    /// What the walk read.
    pub device: PciDevice,
    /// `subsystem_vendor`, `subsystem_device`.
    pub subsystem: (Option<u16>, Option<u16>),
    /// The matching rule's `deviceClass`.
    pub device_class: String,
    /// BARs with a size.
    pub bars: Vec<Bar>,
    /// FPGA facts the kernel or the vendor driver exposes (attribute name → value).
    pub fpga: BTreeMap<String, String>,
}

/// The allowlisted functions of a host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Functions by address.
    pub functions: Vec<PciFunction>,
    /// Functions a rule matched that the driver leaves alone, and why.
    pub warnings: Vec<String>,
}

/// A PCI-to-PCI bridge (switch and root ports; also semi-transparent ones): left on
/// pcieport when its IOMMU group moves. Other bridge classes (host, ISA, "other" such as
/// NVSwitch) are ordinary group members: a group holding one is refused.
pub(crate) fn is_pci_bridge(d: &PciDevice) -> bool {
    matches!(d.class >> 8, 0x0604 | 0x0609)
}

/// Why a function is never this driver's, whatever the rules say.
fn owned_elsewhere(d: &PciDevice) -> Option<&'static str> {
    if d.class >> 16 == 0x06 {
        return Some("it is a bridge");
    }
    if d.vendor_id == 0x10de && d.class >> 16 == 0x03 {
        return Some("NVIDIA GPUs belong to the GPU driver");
    }
    if d.physfn.is_some() {
        return Some("SR-IOV virtual functions belong to the SR-IOV driver");
    }
    if d.sriov.is_some_and(|s| s.num_vfs > 0) {
        return Some("it has SR-IOV virtual functions enabled (moving it would destroy them)");
    }
    None
}

/// sysfs files with FPGA facts, by file name, and the attribute each becomes: the DFL
/// FME's bitstream (Documentation/ABI/testing/sysfs-platform-dfl-fme), an FPGA region's
/// compatible ID (sysfs-class-fpga-region), and XRT's shell name and UUIDs (xclmgmt).
const FPGA_FILES: [(&str, &str); 6] = [
    ("bitstream_id", "dflBitstreamId"),
    ("bitstream_metadata", "dflBitstreamMetadata"),
    ("compat_id", "fpgaCompatId"),
    ("VBNV", "xrtShell"),
    ("logic_uuids", "xrtLogicUuid"),
    ("interface_uuids", "xrtInterfaceUuid"),
];

/// DRA string attributes hold at most 64 characters.
const MAX_ATTRIBUTE: usize = 64;

/// FPGA facts under a function's sysfs directory (at most seven levels down: a DFL region sits six deep; links not
/// followed, child PCI functions skipped). The first file of each name wins, in path
/// order, so region 0 comes before region 1.
fn fpga_facts(sysfs: &Sysfs, address: &PciAddress) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(root) =
        std::fs::canonicalize(sysfs.dir().join("bus/pci/devices").join(address.as_str()))
    else {
        return out;
    };
    let mut files = Vec::new();
    let mut stack = vec![(root, 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() && depth < 7 && PciAddress::parse(&name).is_none() {
                stack.push((entry.path(), depth + 1));
            } else if kind.is_file() && FPGA_FILES.iter().any(|(f, _)| *f == name) {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some((_, attr)) = FPGA_FILES.iter().find(|(f, _)| Some(*f) == name.as_deref()) else {
            continue;
        };
        if out.contains_key(*attr) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let value = text.lines().next().unwrap_or("").trim().to_string();
        if value.is_empty() {
            continue;
        }
        if value.len() > MAX_ATTRIBUTE || !value.chars().all(|c| c.is_ascii_graphic()) {
            tracing::warn!(file = %path.display(), "FPGA fact not published: more than {MAX_ATTRIBUTE} characters or not printable");
            continue;
        }
        out.insert(attr.to_string(), value);
    }
    out
}

/// The functions of one sysfs walk that `rules` allow, with what the driver publishes
/// about them. A matched function another driver owns is left out with a warning.
pub fn discover(sysfs: &Sysfs, devices: &[PciDevice], rules: &[Rule]) -> Inventory {
    let mut inventory = Inventory::default();
    for d in devices {
        if !rules.iter().any(|r| r.matches_walk(d)) {
            continue;
        }
        let subsystem = sysfs.subsystem_ids(&d.address);
        let Some(rule) = rules.iter().find(|r| r.matches(d, subsystem)) else {
            continue;
        };
        if let Some(why) = owned_elsewhere(d) {
            inventory.warnings.push(format!(
                "{} ({:04x}:{:04x}) matches spec.dra.pci.allow but is left alone: {why}",
                d.address, d.vendor_id, d.device_id
            ));
            continue;
        }
        inventory.functions.push(PciFunction {
            device: d.clone(),
            subsystem,
            device_class: rule.device_class.clone(),
            bars: sysfs.bars(&d.address),
            fpga: fpga_facts(sysfs, &d.address),
        });
    }
    inventory
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_sys::HostRoot;

    pub(crate) fn rules() -> Vec<Rule> {
        [
            r#"{vendor: "0x10ee", deviceClass: fpga}"#,
            r#"{vendor: "0x8086", device: "0x0b30", subsystemVendor: "0x8086", subsystemDevice: "0x12ac", deviceClass: fpga}"#,
            r#"{class: "0x1200"}"#,
            r#"{vendor: "0x10de"}"#,
            r#"{driver: iavf}"#,
        ]
        .iter()
        .map(|y| Rule::from_config(&serde_yaml_ng_like(y)))
        .collect()
    }

    /// The rules as the configuration loader builds them (YAML flow maps).
    fn serde_yaml_ng_like(flow: &str) -> PciAllowRule {
        let text = format!(
            "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  dra:\n    pci:\n      allow: [{flow}]\n"
        );
        let config = hybridlet_config::parse_str(&text, std::path::Path::new("t.yaml")).unwrap();
        config.config.agent.dra.pci.allow[0].clone()
    }

    #[test]
    fn only_allowlisted_functions_no_other_driver_owns_are_found() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::fpga_server(dir.path()).unwrap();
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
        let (devices, skipped) = sysfs.pci_devices().unwrap();
        assert!(skipped.is_empty());
        let inv = discover(&sysfs, &devices, &rules());
        let found: Vec<(&str, &str)> = inv
            .functions
            .iter()
            .map(|f| (f.device.address.as_str(), f.device_class.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("0000:03:00.0", "fpga"),
                ("0000:03:00.1", "fpga"),
                ("0000:04:00.0", "fpga"),
                ("0000:05:00.0", "accelerator"),
            ]
        );
        let warnings = inv.warnings.join("\n");
        assert!(
            warnings.contains("0000:07:00.0") && warnings.contains("GPU driver"),
            "{warnings}"
        );
        assert!(
            warnings.contains("0000:06:00.2") && warnings.contains("SR-IOV driver"),
            "{warnings}"
        );
        // The igb function in the mixed group and the switch ports are never candidates.
        assert!(
            !warnings.contains("0000:05:00.1") && !warnings.contains("0000:02:00.0"),
            "{warnings}"
        );
        let alveo = &inv.functions[0];
        assert_eq!(alveo.subsystem, (Some(0x10ee), Some(0x000e)));
        assert_eq!(alveo.fpga["xrtShell"], "xilinx_u55c_gen3x16_xdma_base_3");
        assert_eq!(alveo.bars.len(), 2);
        let dfl = &inv.functions[2];
        assert_eq!(dfl.fpga["dflBitstreamId"], "0x23000410010309");
        assert_eq!(dfl.fpga["fpgaCompatId"], "f3c9941350814aadbced07eb84a6d0bb");
    }

    #[test]
    fn every_given_field_must_match() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::fpga_server(dir.path()).unwrap();
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
        let (devices, _) = sysfs.pci_devices().unwrap();
        let only = |flow: &str| {
            discover(
                &sysfs,
                &devices,
                &[Rule::from_config(&serde_yaml_ng_like(flow))],
            )
            .functions
            .into_iter()
            .map(|f| f.device.address.to_string())
            .collect::<Vec<_>>()
        };
        assert_eq!(
            only(
                r#"{vendor: "0x8086", device: "0x0b30", subsystemVendor: "0x8086", subsystemDevice: "0x12ad"}"#
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            only(r#"{vendor: "0x10ee", driver: xocl}"#),
            ["0000:03:00.1"]
        );
        assert_eq!(only(r#"{class: "0x12"}"#).len(), 4);
        assert_eq!(only(r#"{class: "0x120001"}"#), Vec::<String>::new());
        assert_eq!(only(r#"{class: "0x0200"}"#), ["0000:05:00.1"]);
    }
}
