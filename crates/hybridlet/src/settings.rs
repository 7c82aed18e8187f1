//! The one place where the configuration becomes the domain crates' settings: each
//! subsystem is built from what these return, never from the configuration itself.

use std::path::Path;

use hybridlet_config::Config;
use hybridlet_csi::CsiSettings;

/// The CSI node plugin's subsystem.
pub const CSI: &str = "csi";
/// The GPU DRA driver's subsystem.
pub const DRA_GPU: &str = "dra-gpu";
/// The SR-IOV DRA driver's subsystem.
pub const DRA_SRIOV: &str = "dra-sriov";
/// The PCI DRA driver's subsystem.
pub const DRA_PCI: &str = "dra-pci";

/// The CSI node plugin's settings: `spec.csi`, on `node`, its stage records under the
/// state directory.
pub fn csi(config: &Config, node: &str, state_dir: &Path) -> CsiSettings {
    let csi = &config.agent.csi;
    let mut settings = CsiSettings::new(&csi.driver_name, node);
    settings.nfs_enabled = csi.nfs.enabled;
    settings.iscsi_enabled = csi.iscsi.enabled;
    settings.state_dir = state_dir.join("csi");
    settings.topology = csi.topology.clone().into_iter().collect();
    settings.mount_timeout = csi.mount_timeout.get();
    settings
}

/// Whether the CSI plugin runs at all (NFS or iSCSI enabled).
pub fn csi_enabled(config: &Config) -> bool {
    config.agent.csi.nfs.enabled || config.agent.csi.iscsi.enabled
}

/// The DRA drivers' subsystems, and the kind each reports its capacity under.
pub const DRA_KINDS: [(&str, &str); 3] = [(DRA_GPU, "gpu"), (DRA_SRIOV, "sriov"), (DRA_PCI, "pci")];

/// The DRA driver `which` (`dra-gpu`, `dra-sriov`, `dra-pci`): whether it is enabled, and its name.
pub fn dra_driver(config: &Config, which: &str) -> (bool, String) {
    let dra = &config.agent.dra;
    match which {
        DRA_GPU => (dra.gpu.enabled, dra.gpu.driver_name.clone()),
        DRA_SRIOV => (dra.sriov.enabled, dra.sriov.driver_name.clone()),
        DRA_PCI => (dra.pci.enabled, dra.pci.driver_name.clone()),
        _ => (false, String::new()),
    }
}
