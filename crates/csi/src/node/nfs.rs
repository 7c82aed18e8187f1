//! NFS on the node: stage mounts `server:share[/subDir]` at the staging path with the
//! volume's mount options, through `mount(8)` with a deadline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hybridlet_sys::mount::MountRequest;

use crate::node::protocol::Protocol;
use crate::node::work::{Capability, Shared, guarded};
use crate::{CsiError, nfs};

/// NFS volumes.
#[derive(Debug, Default)]
pub(crate) struct Nfs;

fn nfs_volume(
    shared: &Shared,
    context: &std::collections::HashMap<String, String>,
    cap: &Capability,
) -> Result<nfs::NfsVolume, CsiError> {
    if !nfs::is_nfs(context) {
        return Err(CsiError::InvalidArgument(
            "volumeAttributes must describe an NFS volume (server, share) or an iSCSI LUN (targetPortal, iqn, lun)".into(),
        ));
    }
    if !shared.settings.nfs_enabled {
        return Err(CsiError::FailedPrecondition(
            "NFS volumes are disabled on this node (spec.csi.nfs.enabled)".into(),
        ));
    }
    if cap.block {
        return Err(CsiError::InvalidArgument(
            "NFS volumes support the mount access type only, not block".into(),
        ));
    }
    nfs::volume(context, &cap.mount_flags)
}

#[tonic::async_trait]
impl Protocol for Nfs {
    fn handles(&self, context: &HashMap<String, String>) -> bool {
        nfs::is_nfs(context)
    }

    async fn stage(
        &self,
        shared: &Shared,
        volume_id: String,
        staging: PathBuf,
        cap: Capability,
        context: &HashMap<String, String>,
        _secrets: &HashMap<String, String>,
    ) -> Result<(), CsiError> {
        let volume = nfs_volume(shared, context, &cap)?;
        let held = shared.guard.acquire(&volume_id)?;
        let mounter = shared.mounter.clone();
        let timeout = shared.settings.mount_timeout;
        let what = format!("staging volume {volume_id}");
        guarded(held, timeout + Duration::from_secs(5), what, move || {
            if let Some(existing) = mounter.mount_at(&staging)? {
                if existing.source.trim_end_matches('/') == volume.source.trim_end_matches('/') {
                    return Ok(());
                }
                return Err(CsiError::AlreadyExists(format!(
                    "staging path {} already has {} mounted, not {}",
                    staging.display(),
                    existing.source,
                    volume.source
                )));
            }
            std::fs::create_dir_all(&staging).map_err(|e| {
                CsiError::Internal(format!("creating staging path {}: {e}", staging.display()))
            })?;
            mounter.mount(&MountRequest {
                fs_type: "nfs".into(),
                source: volume.source.clone(),
                target: staging.clone(),
                options: volume.options,
                timeout,
            })?;
            Ok(())
        })
        .await?;
        tracing::info!(volume_id = %volume_id, "volume staged");
        Ok(())
    }

    fn detach(&self, _shared: &Shared, _volume_id: &str) -> Result<(), CsiError> {
        Ok(())
    }
}
