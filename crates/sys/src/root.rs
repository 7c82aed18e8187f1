use std::path::{Component, Path, PathBuf};

/// Error for a host path that cannot be placed under the root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The path given was not absolute.
    #[error("{path:?} is not an absolute path")]
    NotAbsolute {
        /// The offending path.
        path: PathBuf,
    },
    /// The path tries to climb above the root with `..`.
    #[error("{path:?} contains '..', which could escape the host root")]
    ParentComponent {
        /// The offending path.
        path: PathBuf,
    },
}

/// The root under which every host path (`/etc`, `/var/lib/kubelet`, `/sys`, `/run`) is
/// resolved.
///
/// On a real host the root is `/`. Tests and demos pass `--root DIR` and the same code then
/// reads and writes under `DIR` without needing root privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    fn default() -> Self {
        Self::system()
    }
}

impl HostRoot {
    /// The real host: paths resolve to themselves.
    pub fn system() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }

    /// A root at `dir`; `dir` is used as given (relative roots resolve against the working
    /// directory at each access).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { root: dir.into() }
    }

    /// The root directory itself.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Whether this is the real host root.
    pub fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Resolve an absolute host path under the root.
    ///
    /// `..` components are refused so that a path from configuration cannot climb out of
    /// a test root (and so that logs show the path that is really used).
    pub fn resolve(&self, host_path: impl AsRef<Path>) -> Result<PathBuf, RootError> {
        let host_path = host_path.as_ref();
        if !host_path.is_absolute() {
            return Err(RootError::NotAbsolute {
                path: host_path.to_path_buf(),
            });
        }
        let mut out = self.root.clone();
        for component in host_path.components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => out.push(part),
                Component::ParentDir => {
                    return Err(RootError::ParentComponent {
                        path: host_path.to_path_buf(),
                    });
                }
                Component::Prefix(_) => {
                    return Err(RootError::NotAbsolute {
                        path: host_path.to_path_buf(),
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_root_is_identity() {
        let root = HostRoot::system();
        assert!(root.is_system());
        assert_eq!(
            root.resolve("/etc/hybridlet/config.yaml").unwrap(),
            PathBuf::from("/etc/hybridlet/config.yaml")
        );
    }

    #[test]
    fn prefixes_paths() {
        let root = HostRoot::new("/tmp/t1");
        assert!(!root.is_system());
        assert_eq!(
            root.resolve("/var/lib/kubelet/plugins").unwrap(),
            PathBuf::from("/tmp/t1/var/lib/kubelet/plugins")
        );
        assert_eq!(
            root.resolve("/sys/./bus//pci").unwrap(),
            PathBuf::from("/tmp/t1/sys/bus/pci")
        );
    }

    #[test]
    fn refuses_relative_and_parent() {
        let root = HostRoot::new("/tmp/t1");
        assert!(matches!(
            root.resolve("etc/x"),
            Err(RootError::NotAbsolute { .. })
        ));
        assert!(matches!(
            root.resolve("/etc/../../x"),
            Err(RootError::ParentComponent { .. })
        ));
    }
}
