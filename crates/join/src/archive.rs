//! Image archives into containerd: `ctr images import` into the CRI plugin's namespace,
//! then each image pinned. Used by `hybridlet images import` and by `install` for the
//! archives a release mirror carries.

use std::path::Path;
use std::time::Duration;

use hybridlet_cri::{Containerd, ImageRuntime};
use hybridlet_sys::HostRoot;

use crate::Error;

/// Bound on one import (and each pin).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(600);

/// Import an OCI or docker archive into containerd's CRI namespace through `ctr` and pin
/// each image; a line per image.
pub(crate) async fn import_archive(
    root: &HostRoot,
    socket: &Path,
    archive: &Path,
) -> Result<Vec<String>, Error> {
    let ctr = hybridlet_sys::containerd::find(root, "ctr").ok_or_else(|| {
        Error::Failed("ctr (containerd's client) is not installed; install your distribution's containerd package".into())
    })?;
    let names = hybridlet_sys::containerd::import(&ctr, socket, archive, IMPORT_TIMEOUT)
        .map_err(Error::Failed)?;
    if names.is_empty() {
        return Err(Error::Failed(format!(
            "{}: ctr imported no image",
            archive.display()
        )));
    }
    let runtime = Containerd::new(socket, IMPORT_TIMEOUT);
    let mut lines = Vec::new();
    for name in &names {
        lines.push(match runtime.pin(name).await {
            Ok(hybridlet_cri::Pinned::Yes) => format!("imported {name}, pinned"),
            Ok(hybridlet_cri::Pinned::LabelOnly) => {
                format!("imported {name} (labelled pinned; this containerd does not honour pins)")
            }
            Err(e) => format!("imported {name}; pinning failed: {e}"),
        });
    }
    Ok(lines)
}
