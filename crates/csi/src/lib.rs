//! The CSI node plugin: the Identity and Node services of the Container Storage Interface
//! for statically provisioned NFS volumes and iSCSI LUNs (mount, with format-once, and
//! raw block access; online expansion).
//!
//! Behaviour follows the CSI specification: required fields missing → `INVALID_ARGUMENT`;
//! a second operation on a volume already in flight → `ABORTED`; a target already holding
//! something incompatible → `ALREADY_EXISTS`; publish before stage → `FAILED_PRECONDITION`;
//! every call idempotent. NFS is mounted once per node at the staging path and
//! bind-mounted (read-only when asked) into each pod's target path. "Is it mounted" comes
//! from the mount table, never from `stat` (which hangs on a dead NFS server); mount
//! helpers run with a deadline and are killed with their process group when it passes;
//! `statvfs` for stats runs on a blocking thread with its own deadline.
//!
//! All host effects go through [`hybridlet_sys::mount::Mounter`] and
//! [`hybridlet_sys::iscsi::Initiator`] / [`hybridlet_sys::iscsi::Disks`] (real or fake).
//!
//! What this crate must never do: log secrets or mount options, follow a symlink at a
//! target path, remove anything recursively, or depend on other domain crates.

mod error;
mod guard;
mod identity;
mod iscsi;
mod metrics;
mod nfs;
mod node;
mod plugin;
mod probe;
mod validate;

pub use error::CsiError;
pub use guard::VolumeGuard;
pub use identity::IdentityService;
pub use metrics::CsiMetrics;
pub use node::NodeService;
pub use plugin::CsiPlugin;

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use hybridlet_sys::iscsi::{Disks, Initiator, Iscsiadm, SystemDisks};
use hybridlet_sys::mount::Mounter;

pub use iscsi::{IscsiVolume, Records, StageRecord};

/// Settings of the node plugin.
#[derive(Debug, Clone)]
pub struct CsiSettings {
    /// Driver name (`GetPluginInfo.name`, the CSIDriver object's name).
    pub driver_name: String,
    /// Version reported to the kubelet.
    pub vendor_version: String,
    /// `NodeGetInfo.node_id`: the Kubernetes node name.
    pub node_id: String,
    /// NFS volumes are served.
    pub nfs_enabled: bool,
    /// iSCSI volumes are served.
    pub iscsi_enabled: bool,
    /// Where stage records live (`<stateDir>/csi`).
    pub state_dir: PathBuf,
    /// Topology segments reported by NodeGetInfo (empty: none).
    pub topology: std::collections::HashMap<String, String>,
    /// Deadline for one mount helper run (must stay under the kubelet's 2-minute call
    /// timeout).
    pub mount_timeout: Duration,
    /// Deadline for statvfs in NodeGetVolumeStats.
    pub stats_timeout: Duration,
}

impl CsiSettings {
    /// Defaults for a driver and node.
    pub fn new(driver_name: &str, node_id: &str) -> Self {
        Self {
            driver_name: driver_name.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            node_id: node_id.to_string(),
            nfs_enabled: true,
            iscsi_enabled: false,
            state_dir: PathBuf::from("/var/lib/hybridlet/csi"),
            topology: std::collections::HashMap::new(),
            mount_timeout: Duration::from_secs(100),
            stats_timeout: Duration::from_secs(10),
        }
    }
}

/// The host effects the plugin uses.
#[derive(Debug, Clone)]
pub struct Host {
    /// Mounts.
    pub mounter: Arc<dyn Mounter>,
    /// The iSCSI initiator.
    pub initiator: Arc<dyn Initiator>,
    /// Block devices.
    pub disks: Arc<dyn Disks>,
}

impl Host {
    /// `mounter` with the host's iscsiadm and block device tools.
    pub fn with_mounter(mounter: Arc<dyn Mounter>) -> Self {
        Self {
            mounter,
            initiator: Arc::new(Iscsiadm::default()),
            disks: Arc::new(SystemDisks::default()),
        }
    }
}

/// Both services over one mounter (and the host's iSCSI tools).
pub fn services(
    settings: CsiSettings,
    mounter: Arc<dyn Mounter>,
) -> (IdentityService, NodeService) {
    services_on(settings, Host::with_mounter(mounter), CsiMetrics::default())
}

/// Both services, recording call metrics into `metrics`.
pub fn services_with_metrics(
    settings: CsiSettings,
    mounter: Arc<dyn Mounter>,
    metrics: CsiMetrics,
) -> (IdentityService, NodeService) {
    services_on(settings, Host::with_mounter(mounter), metrics)
}

/// Both services over `host`.
pub fn services_on(
    settings: CsiSettings,
    host: Host,
    metrics: CsiMetrics,
) -> (IdentityService, NodeService) {
    let settings = Arc::new(settings);
    (
        IdentityService::new(settings.clone(), host.clone()),
        NodeService::new(settings, host, metrics),
    )
}
