//! What the node service's operations share: the capability check, host work on a
//! blocking thread under the volume's guard, symlink-safe unmounts, publish targets.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_proto::csi::v1::VolumeCapability;
use hybridlet_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};
use hybridlet_sys::mount::{MountEntry, MountError, Mounter};

use crate::guard::VolumeGuard;
use crate::probe::Probes;
use crate::{CsiError, CsiMetrics, CsiSettings, Host};

/// What every protocol's operations use: the settings, the host, the per-volume guard,
/// the metrics and the statvfs probes.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) settings: Arc<CsiSettings>,
    pub(crate) mounter: Arc<dyn Mounter>,
    pub(crate) host: Host,
    pub(crate) guard: VolumeGuard,
    pub(crate) metrics: CsiMetrics,
    pub(crate) probes: Probes,
}

/// What a capability asks for, once validated.
pub(crate) struct Capability {
    pub(crate) block: bool,
    pub(crate) mount_flags: Vec<String>,
    pub(crate) fs_type: String,
    pub(crate) reader_only: bool,
}

pub(crate) fn capability(cap: Option<&VolumeCapability>) -> Result<Capability, CsiError> {
    let cap =
        cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| {
            CsiError::InvalidArgument("volume_capability.access_mode is required".into())
        })?;
    let (block, mount_flags, fs_type) = match &cap.access_type {
        Some(AccessType::Block(_)) => (true, Vec::new(), String::new()),
        Some(AccessType::Mount(m)) => (false, m.mount_flags.clone(), m.fs_type.clone()),
        None => {
            return Err(CsiError::InvalidArgument(
                "volume_capability.access_type (block or mount) is required".into(),
            ));
        }
    };
    Ok(Capability {
        block,
        mount_flags,
        fs_type,
        reader_only: matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly),
    })
}

/// Run blocking host work off the async executor, bounded by `limit`.
pub(crate) async fn blocking<T: Send + 'static>(
    limit: Duration,
    what: String,
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(CsiError::Internal(format!("{what}: worker failed: {join}"))),
        Err(_) => Err(CsiError::Timeout(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// Host work for a volume whose guard is `held`: the guard goes with the work and is
/// released when the work really ends — also when the caller stops waiting at `limit` —
/// so a retry answers ABORTED while a helper that outlived its deadline still runs,
/// instead of running beside it.
pub(crate) async fn guarded<T: Send + 'static>(
    held: crate::guard::Held,
    limit: Duration,
    what: String,
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    blocking(limit, what, move || {
        let _held = held;
        f()
    })
    .await
}

fn is_stale(e: &MountError) -> bool {
    // ESTALE 116, ENOTCONN 107, EIO 5, EHOSTDOWN 112: the server is gone; only a lazy
    // unmount can detach such a mount.
    match e {
        MountError::UnmountFailed { source, .. } | MountError::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(116 | 107 | 5 | 112))
        }
        _ => false,
    }
}

fn is_busy(e: &MountError) -> bool {
    matches!(e, MountError::UnmountFailed { source, .. } if source.raw_os_error() == Some(16))
}

/// How long an unmount that got EBUSY waits for the file system to answer before it
/// concludes the server is gone.
const BUSY_PROBE: Duration = Duration::from_secs(2);

/// Unmount without following symlinks; detach lazily when the mount is stale, or when it
/// is busy because its server does not answer (processes blocked in the dead file system,
/// our own statvfs included, keep it busy until the server returns, possibly never). A
/// busy mount whose file system answers is a real error and is reported.
pub(crate) fn unmount(
    mounter: &Arc<dyn Mounter>,
    target: &Path,
    probes: &Probes,
) -> Result<(), CsiError> {
    match mounter.unmount(target, false) {
        Ok(()) => Ok(()),
        Err(e) if is_stale(&e) => {
            tracing::warn!(target = %target.display(), error = %e, "stale mount; detaching lazily");
            mounter.unmount(target, true).map_err(CsiError::from)
        }
        Err(e)
            if is_busy(&e)
                && (probes.is_blocked(target)
                    || !probes.responds(mounter.clone(), target, BUSY_PROBE)) =>
        {
            tracing::warn!(target = %target.display(), "busy mount whose server does not answer; detaching lazily");
            mounter.unmount(target, true).map_err(CsiError::from)
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn same_volume(a: &MountEntry, b: &MountEntry) -> bool {
    a.device == b.device && a.root == b.root
}

/// What a publish target is: a directory (mount access) or a file (a raw block device is
/// bound onto a file).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Directory,
    File,
}

/// Make sure the publish target can take a bind mount, without following a symlink:
/// create it when missing (`Ok(true)`: the caller removes it if the bind fails), accept
/// an existing one of the right kind (`Ok(false)`).
pub(crate) fn prepare_target(target: &Path, kind: TargetKind) -> Result<bool, CsiError> {
    let what = match kind {
        TargetKind::Directory => "a directory",
        TargetKind::File => "a file (block volumes are published on a file)",
    };
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => Err(CsiError::InvalidArgument(format!(
            "target path {} is a symlink; refusing to mount through it",
            target.display()
        ))),
        Ok(meta)
            if match kind {
                TargetKind::Directory => meta.is_dir(),
                TargetKind::File => meta.is_file(),
            } =>
        {
            Ok(false)
        }
        Ok(_) => Err(CsiError::AlreadyExists(format!(
            "target path {} exists and is not {what}",
            target.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let made = match kind {
                TargetKind::Directory => std::fs::create_dir(target),
                TargetKind::File => std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map(drop),
            };
            made.map_err(|e| {
                CsiError::Internal(format!("creating target path {}: {e}", target.display()))
            })?;
            Ok(true)
        }
        Err(e) => Err(CsiError::Internal(format!(
            "inspecting {}: {e}",
            target.display()
        ))),
    }
}

pub(crate) fn not_staged(volume_id: &str, staging: &Path) -> CsiError {
    CsiError::FailedPrecondition(format!(
        "volume {volume_id} is not staged at {}; NodeStageVolume must succeed first",
        staging.display()
    ))
}
