use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version this build writes.
pub const CHECKPOINT_VERSION: u32 = 1;

/// One prepared device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim requests it satisfies.
    #[serde(default)]
    pub request_names: Vec<String>,
    /// Pool (the node).
    pub pool: String,
    /// Device name in the ResourceSlice.
    pub device: String,
    /// CDI device IDs handed to the kubelet.
    #[serde(default)]
    pub cdi_device_ids: Vec<String>,
    /// The driver's opaque parameters for this device (from the DeviceClass or the
    /// claim), kept so a restart rebuilds the same CDI spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// One prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Devices.
    #[serde(default)]
    pub devices: Vec<PreparedDevice>,
    /// Pods the claim was reserved for when it was prepared (metrics labels only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// Prepared claims by UID, with the boot they were prepared in. Unknown fields are
/// ignored, so a newer build's checkpoint still loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Format version.
    #[serde(default)]
    pub version: u32,
    /// Kernel boot ID at the last write.
    #[serde(default)]
    pub boot_id: String,
    /// Claims by UID.
    #[serde(default)]
    pub claims: BTreeMap<String, PreparedClaim>,
    /// Devices whose host state is being changed for a claim that is not prepared yet
    /// (by claim UID): recorded before a VF is moved to vfio-pci, so that a crash in
    /// between is undone at the next start.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attaching: BTreeMap<String, Vec<String>>,
}

/// Problems with the checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Writing failed; the in-memory state was not changed.
    #[error("writing checkpoint: {0}")]
    Write(#[from] hybridlet_sys::AtomicWriteError),
}

/// The outcome of loading.
#[derive(Debug)]
pub struct Loaded {
    /// The checkpoint (empty if there was none or it was corrupt).
    pub checkpoint: Checkpoint,
    /// Where a corrupt file was moved, if it was.
    pub moved_aside: Option<PathBuf>,
    /// The boot ID changed since the last write: node-local state (CDI specs in /run,
    /// driver bindings) is gone and must be rebuilt.
    pub rebooted: bool,
}

impl Checkpoint {
    /// Load `path`. A missing file is an empty checkpoint; a corrupt one is moved aside
    /// (never a crash loop) and reported.
    pub fn load(path: &Path, boot_id: &str) -> Loaded {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(_) => {
                return Loaded {
                    checkpoint: Checkpoint {
                        version: CHECKPOINT_VERSION,
                        boot_id: boot_id.to_string(),
                        ..Checkpoint::default()
                    },
                    moved_aside: None,
                    rebooted: false,
                };
            }
        };
        match serde_json::from_slice::<Checkpoint>(&text) {
            Ok(checkpoint) => Loaded {
                rebooted: !checkpoint.boot_id.is_empty() && checkpoint.boot_id != boot_id,
                checkpoint,
                moved_aside: None,
            },
            Err(e) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = path.with_extension(format!("corrupt-{stamp}"));
                let moved = std::fs::rename(path, &aside).is_ok();
                tracing::error!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "DRA checkpoint is corrupt; moved aside, starting empty (claims will be prepared again when the kubelet asks)"
                );
                Loaded {
                    checkpoint: Checkpoint {
                        version: CHECKPOINT_VERSION,
                        boot_id: boot_id.to_string(),
                        ..Checkpoint::default()
                    },
                    moved_aside: moved.then_some(aside),
                    rebooted: false,
                }
            }
        }
    }

    /// Write atomically (temp file, fsync, rename, fsync dir), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        hybridlet_sys::atomic_write(path, &text, 0o600)?;
        Ok(())
    }
}
