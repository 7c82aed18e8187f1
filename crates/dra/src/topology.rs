//! Placement attributes every device kind publishes the same way, so one claim can ask for
//! devices that sit together whatever their driver.

use std::collections::BTreeMap;

use hybridlet_sys::Topology;

use crate::Attr;

/// The standard `resource.kubernetes.io/pcieRoot`, our `pcieSwitch` (also as
/// `hybridlet.io/pcieSwitch`: the same qualified name from every driver, so a claim can
/// match a GPU and a VF on one switch — a driver's own attribute names are qualified by
/// its domain and never match across drivers), and the NUMA node.
pub fn topology_attributes(
    attributes: &mut BTreeMap<String, Attr>,
    topology: Option<&Topology>,
    numa_node: Option<u32>,
) {
    if let Some(t) = topology {
        attributes.insert(
            "resource.kubernetes.io/pcieRoot".into(),
            Attr::String(t.pcie_root.clone()),
        );
        if let Some(switch) = &t.pcie_switch {
            attributes.insert("pcieSwitch".into(), Attr::String(switch.to_string()));
            attributes.insert(
                "hybridlet.io/pcieSwitch".into(),
                Attr::String(switch.to_string()),
            );
        }
    }
    if let Some(numa) = numa_node {
        attributes.insert("numaNode".into(), Attr::Int(i64::from(numa)));
    }
}
