//! One storage protocol behind the node service: how it stages a volume, how the volume
//! leaves the node after unstage's unmount, and what it adds to publish (raw block),
//! stats and expansion. The node service does the rest the same way for every protocol.

use std::collections::HashMap;
use std::path::PathBuf;

use hybridlet_proto::csi::v1::NodeGetVolumeStatsResponse;

use crate::CsiError;
use crate::node::work::{Capability, Shared};

/// A node-side storage protocol (NFS, iSCSI).
#[tonic::async_trait]
pub(crate) trait Protocol: Send + Sync + std::fmt::Debug {
    /// Whether `context` (the volume's attributes) describes one of its volumes.
    fn handles(&self, context: &HashMap<String, String>) -> bool;

    /// NodeStageVolume for one of its volumes.
    async fn stage(
        &self,
        shared: &Shared,
        volume_id: String,
        staging: PathBuf,
        cap: Capability,
        context: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> Result<(), CsiError>;

    /// After unstage unmounted the staging path (on the blocking thread, under the
    /// volume's guard): let go of what the volume holds on the node. Not its volume: Ok.
    fn detach(&self, shared: &Shared, volume_id: &str) -> Result<(), CsiError>;

    /// NodePublishVolume with block access: `None` when the volume is not its own.
    async fn publish_block(
        &self,
        shared: &Shared,
        volume_id: &str,
        target: PathBuf,
        read_only: bool,
    ) -> Option<Result<(), CsiError>> {
        let _ = (shared, volume_id, target, read_only);
        None
    }

    /// NodeGetVolumeStats for a volume it answers itself (a raw block device); `None`:
    /// the mounted filesystem's statistics answer.
    async fn block_stats(
        &self,
        shared: &Shared,
        volume_id: &str,
    ) -> Result<Option<NodeGetVolumeStatsResponse>, CsiError> {
        let _ = (shared, volume_id);
        Ok(None)
    }

    /// NodeExpandVolume: `None` when the volume is not its own (an NFS export grows on
    /// the server: nothing to do on the node).
    async fn expand(
        &self,
        shared: &Shared,
        volume_id: &str,
        path: PathBuf,
    ) -> Option<Result<i64, CsiError>> {
        let _ = (shared, volume_id, path);
        None
    }
}
