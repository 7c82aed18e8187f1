//! statvfs probes that survive a dead NFS server.
//!
//! On a hard NFS mount whose server is gone, statvfs blocks in the kernel until the server
//! returns, possibly forever, and the blocked thread keeps the mount busy (EBUSY on
//! unmount). So each probe runs on its own thread, the caller waits a bounded time, and a
//! path whose probe is still blocked gets no second thread: later calls learn at once that
//! the file system is not answering. At most one thread per path can ever be stuck.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hybridlet_sys::mount::{FsStats, MountError, Mounter};

/// Why a probe gave no statistics.
#[derive(Debug)]
pub(crate) enum ProbeError {
    /// The file system did not answer in time (or an earlier probe is still blocked).
    NoAnswer { path: PathBuf, waited: Duration },
    /// statvfs answered with an error.
    Failed(MountError),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::NoAnswer { path, waited } => write!(
                f,
                "statvfs {}: no answer for {}s (the file system's server is not responding)",
                path.display(),
                waited.as_secs()
            ),
            ProbeError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Paths with a statvfs still blocked, and since when.
#[derive(Clone, Default, Debug)]
pub(crate) struct Probes {
    blocked: Arc<Mutex<HashMap<PathBuf, Instant>>>,
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Instant>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an earlier probe of `path` is still blocked.
    pub(crate) fn is_blocked(&self, path: &Path) -> bool {
        self.lock().contains_key(path)
    }

    /// statvfs `path`, waiting at most `limit`.
    pub(crate) fn statvfs(
        &self,
        mounter: Arc<dyn Mounter>,
        path: &Path,
        limit: Duration,
    ) -> Result<FsStats, ProbeError> {
        if let Some(since) = self.lock().get(path) {
            return Err(ProbeError::NoAnswer {
                path: path.to_path_buf(),
                waited: since.elapsed(),
            });
        }
        self.lock().insert(path.to_path_buf(), Instant::now());
        let (tx, rx) = mpsc::channel();
        let blocked = self.clone();
        let p = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("statvfs-probe".into())
            .spawn(move || {
                let result = mounter.stats(&p);
                blocked.lock().remove(&p);
                let _ = tx.send(result); // the caller may have given up; that is fine
            });
        if let Err(e) = spawned {
            self.lock().remove(path);
            return Err(ProbeError::Failed(MountError::Io {
                what: "starting a statvfs probe thread for",
                path: path.to_path_buf(),
                source: e,
            }));
        }
        match rx.recv_timeout(limit) {
            Ok(result) => result.map_err(ProbeError::Failed),
            Err(_) => Err(ProbeError::NoAnswer {
                path: path.to_path_buf(),
                waited: limit,
            }),
        }
    }

    /// Whether the file system at `path` answers within `limit`.
    pub(crate) fn responds(&self, mounter: Arc<dyn Mounter>, path: &Path, limit: Duration) -> bool {
        !matches!(
            self.statvfs(mounter, path, limit),
            Err(ProbeError::NoAnswer { .. })
        )
    }
}
