use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version this build writes. Version 2 records, with each device whose host
/// state a prepare changes, what the device was before (`original`), so unprepare puts
/// back exactly that; version 1 files are migrated on load, newer ones refused.
pub const CHECKPOINT_VERSION: u32 = 2;

/// One prepared device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// What the device was before the prepare changed the host (the backend's snapshot:
    /// a VF's driver and driver_override), for unprepare to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<serde_json::Value>,
}

/// A device whose host state is being changed for a claim that is not prepared yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    /// Device name.
    pub device: String,
    /// What to restore (see [`PreparedDevice::original`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<serde_json::Value>,
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
    pub attaching: BTreeMap<String, Vec<Intent>>,
}

/// Problems with the checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Writing failed; the in-memory state was not changed.
    #[error("writing checkpoint: {0}")]
    Write(#[from] hybridlet_sys::AtomicWriteError),
    /// A newer hybridlet wrote it: this one cannot know what its fields mean, so it
    /// neither reads nor overwrites it.
    #[error(
        "{}: written by a newer hybridlet (checkpoint version {found}; this one reads up to {CHECKPOINT_VERSION}). It records the claims prepared on this node and is left as it is: run the newer hybridlet again, or, once no pod on the node uses a DRA claim, move the file aside and restart",
        path.display()
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
}

/// Bring an older checkpoint's JSON to the current version, in place.
fn migrate(value: &mut serde_json::Value) {
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if version < 2 {
        // v1: `attaching` held device names; v2 holds intents with what to restore
        // (unknown for v1: release falls back to the device's own driver).
        if let Some(attaching) = value.get_mut("attaching").and_then(|a| a.as_object_mut()) {
            for devices in attaching.values_mut() {
                if let Some(list) = devices.as_array_mut() {
                    for d in list.iter_mut() {
                        if let Some(name) = d.as_str() {
                            *d = serde_json::json!({ "device": name });
                        }
                    }
                }
            }
        }
    }
    value["version"] = serde_json::json!(CHECKPOINT_VERSION);
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
    /// Load `path`. A missing file is an empty checkpoint; an older version is migrated; a
    /// corrupt one is moved aside (never a crash loop) and reported; one written by a
    /// newer hybridlet is refused and left untouched.
    pub fn load(path: &Path, boot_id: &str) -> Result<Loaded, CheckpointError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(_) => {
                return Ok(Loaded {
                    checkpoint: Checkpoint {
                        version: CHECKPOINT_VERSION,
                        boot_id: boot_id.to_string(),
                        ..Checkpoint::default()
                    },
                    moved_aside: None,
                    rebooted: false,
                });
            }
        };
        let parsed = serde_json::from_slice::<serde_json::Value>(&text).and_then(|mut value| {
            let found = value.get("version").and_then(serde_json::Value::as_u64);
            if let Some(found) = found.filter(|v| *v > u64::from(CHECKPOINT_VERSION)) {
                return Ok(Err(found));
            }
            if found != Some(u64::from(CHECKPOINT_VERSION)) {
                tracing::info!(path = %path.display(), from = ?found, to = CHECKPOINT_VERSION, "migrating the DRA checkpoint");
                migrate(&mut value);
            }
            serde_json::from_value::<Checkpoint>(value).map(Ok)
        });
        Ok(match parsed {
            Ok(Err(found)) => {
                return Err(CheckpointError::TooNew {
                    path: path.to_path_buf(),
                    found,
                });
            }
            Ok(Ok(checkpoint)) => Loaded {
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
        })
    }

    /// Write atomically (temp file, fsync, rename, fsync dir), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        hybridlet_sys::atomic_write(path, &text, 0o600)?;
        Ok(())
    }
}
