//! The CSI node plugin: the Identity and Node services of the Container Storage Interface
//! for statically provisioned NFS volumes (iSCSI is planned and refused clearly until then).
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
//! All host effects go through [`hybridlet_sys::mount::Mounter`] (real or fake).
//!
//! What this crate must never do: log secrets or mount options, follow a symlink at a
//! target path, remove anything recursively, or depend on other domain crates.

mod error;
mod guard;
mod identity;
mod metrics;
mod nfs;
mod node;
mod probe;
mod validate;

pub use error::CsiError;
pub use identity::IdentityService;
pub use metrics::CsiMetrics;
pub use node::NodeService;

use std::sync::Arc;
use std::time::Duration;

use hybridlet_sys::mount::Mounter;

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
            mount_timeout: Duration::from_secs(100),
            stats_timeout: Duration::from_secs(10),
        }
    }
}

/// Both services over one mounter.
pub fn services(
    settings: CsiSettings,
    mounter: Arc<dyn Mounter>,
) -> (IdentityService, NodeService) {
    services_with_metrics(settings, mounter, CsiMetrics::default())
}

/// Both services, recording call metrics into `metrics`.
pub fn services_with_metrics(
    settings: CsiSettings,
    mounter: Arc<dyn Mounter>,
    metrics: CsiMetrics,
) -> (IdentityService, NodeService) {
    let settings = Arc::new(settings);
    (
        IdentityService::new(settings.clone(), mounter.clone()),
        NodeService::new(settings, mounter, metrics),
    )
}
