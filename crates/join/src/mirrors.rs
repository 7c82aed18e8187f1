//! The registry mirror files a running daemon writes again at a reload
//! (`spec.registryMirrors` changed on a joined node): each registry's `hosts.toml`, and
//! those hybridlet wrote earlier for registries no longer mirrored (marked by its header;
//! anyone else's file is left alone).

use std::path::PathBuf;

use hybridlet_config::Config;
use hybridlet_sys::HostRoot;
use hybridlet_sys::fileset::DesiredFile;

/// The `hosts.toml` files `config` wants, and the ones hybridlet wrote that it no longer
/// wants; an error names `spec.registryMirrors`.
pub fn mirror_files(
    config: &Config,
    root: &HostRoot,
) -> Result<(Vec<DesiredFile>, Vec<PathBuf>), String> {
    let files = hybridlet_bootstrap::desired_files(
        &hybridlet_bootstrap::registry_mirror_files(config),
        root,
    )
    .map_err(|e| format!("spec.registryMirrors: {e}"))?;
    let certs = root
        .resolve("/etc/containerd/certs.d")
        .map_err(|e| format!("spec.registryMirrors: {e}"))?;
    let mut remove = Vec::new();
    for dir in std::fs::read_dir(certs).into_iter().flatten().flatten() {
        let path = dir.path().join("hosts.toml");
        let ours = std::fs::read_to_string(&path)
            .is_ok_and(|t| t.starts_with(hybridlet_bootstrap::MIRROR_MARKER));
        if ours && !files.iter().any(|f| f.path == path) {
            remove.push(path);
        }
    }
    Ok((files, remove))
}
