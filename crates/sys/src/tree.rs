//! Removing a directory tree without ever leaving its file system.
//!
//! nodeadm once deleted `/var/lib/kubelet` while a pod had the host's root bind-mounted
//! under it, and so wiped the host's `/etc` (aws/eks-hybrid #664). Here a tree is first
//! walked without following symlinks; if any entry in it is a mount point (a bind mount
//! of the same file system included: the kernel's `STATX_ATTR_MOUNT_ROOT`, the mount
//! table, and a device change all count) nothing at all is deleted and the mount points
//! are reported. Only then is it removed bottom-up, re-checking every directory before
//! entering it, so a mount appearing in between is skipped, not emptied. Symlinks are
//! removed as links; their targets are never touched.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a tree was not (fully) removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveTreeError {
    /// Mount points inside the tree; nothing was deleted.
    #[error("{} has {} mount point(s) inside ({}); nothing was deleted. Unmount them (drain the node first) and retry", root.display(), mounts.len(), list(mounts))]
    MountPoints {
        /// The tree.
        root: PathBuf,
        /// The mount points found.
        mounts: Vec<PathBuf>,
    },
    /// An IO step failed part-way.
    #[error("removing {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let mut shown: Vec<String> = paths
        .iter()
        .take(5)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > 5 {
        shown.push(format!("and {} more", paths.len() - 5));
    }
    shown.join(", ")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RemoveTreeError + '_ {
    move |source| RemoveTreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What decides whether a path is a mount point.
struct Mounts {
    dev: u64,
    table: std::collections::HashSet<PathBuf>,
}

impl Mounts {
    fn new(dev: u64) -> Self {
        let table = fs::read_to_string("/proc/self/mountinfo")
            .map(|t| {
                crate::mount::parse_mountinfo(&t)
                    .into_iter()
                    .map(|m| m.mount_point)
                    .collect()
            })
            .unwrap_or_default();
        Self { dev, table }
    }

    fn is_mount(&self, path: &Path, meta: &fs::Metadata) -> bool {
        if meta.file_type().is_symlink() {
            return false; // a link is removed as a link, whatever it points to
        }
        meta.dev() != self.dev || self.table.contains(path) || mount_root(path)
    }
}

/// The kernel's own answer (Linux 5.8+), which also sees bind mounts of the same file
/// system; false where the kernel cannot say.
fn mount_root(path: &Path) -> bool {
    crate::mount::kernel_mount_root(path).unwrap_or(false)
}

/// Mount points in `dir` (not following symlinks).
fn find_mounts(dir: &Path, mounts: &Mounts, out: &mut Vec<PathBuf>) -> Result<(), RemoveTreeError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if mounts.is_mount(&path, &meta) {
            out.push(path); // a directory or a file bind mount (raw block volumes)
        } else if meta.is_dir() {
            find_mounts(&path, mounts, out)?;
        }
    }
    Ok(())
}

/// The mount points inside `root` (not following symlinks).
pub fn mount_points_under(root: &Path) -> Result<Vec<PathBuf>, RemoveTreeError> {
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut mounts = Vec::new();
    if meta.is_dir() {
        find_mounts(root, &Mounts::new(meta.dev()), &mut mounts)?;
    }
    Ok(mounts)
}

fn remove_contents(
    dir: &Path,
    mounts: &Mounts,
    removed: &mut usize,
) -> Result<(), RemoveTreeError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if mounts.is_mount(&path, &meta) || (meta.is_dir() && mount_root(&path)) {
            // Mounted since the check: leave it (and so its parents) alone.
            continue;
        }
        if meta.is_dir() {
            remove_contents(&path, mounts, removed)?;
            match fs::remove_dir(&path) {
                Ok(()) => *removed += 1,
                // Not empty: something under it was skipped as a mount.
                Err(e) if e.raw_os_error() == Some(39) => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
            *removed += 1;
        }
    }
    Ok(())
}

/// Remove `root` and everything in it, refusing (and deleting nothing) when a mount point
/// lies inside. A missing `root` is success. Returns how many entries were removed.
pub fn remove_tree_on_one_fs(root: &Path) -> Result<usize, RemoveTreeError> {
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(root)(e)),
    };
    if !meta.is_dir() {
        fs::remove_file(root).map_err(io_err(root))?;
        return Ok(1);
    }
    let known = Mounts::new(meta.dev());
    let mut mounts = Vec::new();
    find_mounts(root, &known, &mut mounts)?;
    if !mounts.is_empty() {
        return Err(RemoveTreeError::MountPoints {
            root: root.to_path_buf(),
            mounts,
        });
    }
    let mut removed = 0;
    remove_contents(root, &known, &mut removed)?;
    match fs::remove_dir(root) {
        Ok(()) => removed += 1,
        Err(e) if e.raw_os_error() == Some(39) => {}
        Err(e) => return Err(io_err(root)(e)),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn removes_a_tree_but_only_the_links_to_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();
        let tree = dir.path().join("kubelet");
        fs::create_dir_all(tree.join("pods/p1/volumes")).unwrap();
        fs::write(tree.join("pods/p1/etc-hosts"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("pods/p1/volumes/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("precious"), tree.join("file-link")).unwrap();
        assert!(mount_points_under(&tree).unwrap().is_empty());
        let removed = remove_tree_on_one_fs(&tree).unwrap();
        assert_eq!(removed, 7);
        assert!(!tree.exists());
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );
        assert_eq!(
            remove_tree_on_one_fs(&tree).unwrap(),
            0,
            "missing is success"
        );
    }
}
