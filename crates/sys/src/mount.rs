//! Mounting, behind the [`Mounter`] trait.
//!
//! [`SystemMounter`] is the real implementation: bind mounts and unmounts are system
//! calls (unmount never follows a symlink planted at the target), filesystem mounts go
//! through `mount(8)` so that helpers such as `mount.nfs` run — in their own process group,
//! killed whole when the deadline passes, so a hung server cannot leave a stuck helper
//! behind. "Is it mounted" is answered from `/proc/self/mountinfo`, never by `stat`, which
//! hangs on a dead NFS server.
//!
//! [`FakeMounter`] keeps a mount table in memory and records every call, for tests of
//! callers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// What went wrong with a mount operation.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `mount(8)` or a system call failed.
    #[error("mounting {source_spec} on {}: {message}", target.display())]
    MountFailed {
        /// What was mounted (never includes options, which may hold secrets).
        source_spec: String,
        /// Where.
        target: PathBuf,
        /// The helper's or the kernel's message.
        message: String,
    },
    /// The mount helper did not finish in time and was killed.
    #[error("mounting {source_spec} on {}: no answer within {timeout:?} (server unreachable?); the mount helper was killed", target.display())]
    Timeout {
        /// What was mounted.
        source_spec: String,
        /// Where.
        target: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// Unmounting failed.
    #[error("unmounting {}: {source}", target.display())]
    UnmountFailed {
        /// The mount point.
        target: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading the mount table or statistics failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// One line of `/proc/self/mountinfo`, the fields callers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub device: String,
    /// Root of the mount within its filesystem (a bind of a subdirectory shows it).
    pub root: String,
    /// Mount point.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: Vec<String>,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source (`server:/export` for NFS).
    pub source: String,
}

impl MountEntry {
    /// Mounted read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Filesystem usage from statvfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    /// Total bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Total inodes.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Used inodes.
    pub used_inodes: u64,
}

/// A filesystem mount request for `mount(8)`.
#[derive(Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// `-t`.
    pub fs_type: String,
    /// The source, e.g. `nfs.example.com:/export/vol1`.
    pub source: String,
    /// The mount point.
    pub target: PathBuf,
    /// `-o`, one option per element (never logged: may hold secrets).
    pub options: Vec<String>,
    /// Deadline for the helper.
    pub timeout: Duration,
}

impl std::fmt::Debug for MountRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountRequest")
            .field("fs_type", &self.fs_type)
            .field("source", &self.source)
            .field("target", &self.target)
            .field("options", &format_args!("<{} options>", self.options.len()))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Mount operations.
pub trait Mounter: Send + Sync + std::fmt::Debug + 'static {
    /// Mount a filesystem through `mount(8)` (which runs helpers such as `mount.nfs`).
    fn mount(&self, request: &MountRequest) -> Result<(), MountError>;
    /// Bind-mount `source` on `target`, then make it read-only when asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Unmount `target` without following symlinks; `lazy` detaches a busy or stale mount.
    fn unmount(&self, target: &Path, lazy: bool) -> Result<(), MountError>;
    /// The whole mount table, in mount order (one read of `/proc/self/mountinfo`).
    fn mount_table(&self) -> Result<Vec<MountEntry>, MountError>;
    /// The mount whose mount point is exactly `target`, if any (the topmost one).
    fn mount_at(&self, target: &Path) -> Result<Option<MountEntry>, MountError> {
        Ok(topmost(&self.mount_table()?, target).cloned())
    }
    /// Whether `path` is a mount point, when this can be told without reading the mount
    /// table (`None`: ask [`Mounter::mount_at`]).
    fn is_mount_point(&self, path: &Path) -> Option<bool> {
        let _ = path;
        None
    }
    /// Usage of the filesystem at `path`.
    fn stats(&self, path: &Path) -> Result<FsStats, MountError>;
    /// Whether `mount(8)` can mount `fs_type` (its helper, e.g. `mount.nfs`, is installed).
    fn can_mount(&self, fs_type: &str) -> bool;
}

/// Whether `path` (not followed if a symlink) is the root of a mount, as the kernel says
/// through `statx(2)`'s `STATX_ATTR_MOUNT_ROOT` (Linux 5.8+); `None` where it cannot say
/// (an older kernel, or `path` cannot be examined).
pub fn kernel_mount_root(path: &Path) -> Option<bool> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags, statx};
    let st = statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::empty()).ok()?;
    st.stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        .then(|| st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// The real host.
#[derive(Debug, Clone, Default)]
pub struct SystemMounter {
    mountinfo: Option<PathBuf>,
}

impl SystemMounter {
    /// Mounts on this host, reading `/proc/self/mountinfo`.
    pub fn new() -> Self {
        Self::default()
    }

    fn mountinfo_path(&self) -> PathBuf {
        self.mountinfo
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/mountinfo"))
    }
}

impl Mounter for SystemMounter {
    fn is_mount_point(&self, path: &Path) -> Option<bool> {
        // One statx(2) instead of parsing the whole mount table: the kernel (5.8+) marks
        // the root of every mount, bind mounts of the same file system included.
        kernel_mount_root(path)
    }

    fn mount(&self, request: &MountRequest) -> Result<(), MountError> {
        let mut cmd = Command::new("mount");
        cmd.arg("-t").arg(&request.fs_type);
        if !request.options.is_empty() {
            cmd.arg("-o").arg(request.options.join(","));
        }
        // `--` so that a source or target starting with '-' is never read as an option.
        cmd.arg("--").arg(&request.source).arg(&request.target);
        let failed = |message: String| MountError::MountFailed {
            source_spec: request.source.clone(),
            target: request.target.clone(),
            message,
        };
        match crate::process::run_with_deadline(cmd, request.timeout) {
            Err(e) => Err(failed(format!("running mount(8): {e}"))),
            Ok(None) => Err(MountError::Timeout {
                source_spec: request.source.clone(),
                target: request.target.clone(),
                timeout: request.timeout,
            }),
            Ok(Some(out)) if out.status.success() => Ok(()),
            Ok(Some(out)) => Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )),
        }
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let failed = |e: io::Error| MountError::MountFailed {
            source_spec: source.display().to_string(),
            target: target.to_path_buf(),
            message: e.to_string(),
        };
        rustix::mount::mount_bind(source, target).map_err(|e| failed(e.into()))?;
        if read_only {
            let flags = rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY;
            if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
                // Never leave a writable bind where a read-only one was asked for.
                let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::NOFOLLOW);
                return Err(failed(e.into()));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path, lazy: bool) -> Result<(), MountError> {
        let mut flags = rustix::mount::UnmountFlags::NOFOLLOW;
        if lazy {
            flags |= rustix::mount::UnmountFlags::DETACH;
        }
        rustix::mount::unmount(target, flags).map_err(|e| MountError::UnmountFailed {
            target: target.to_path_buf(),
            source: e.into(),
        })
    }

    fn mount_table(&self) -> Result<Vec<MountEntry>, MountError> {
        let path = self.mountinfo_path();
        let text = std::fs::read_to_string(&path).map_err(|source| MountError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        Ok(parse_mountinfo(&text))
    }

    fn stats(&self, path: &Path) -> Result<FsStats, MountError> {
        let s = rustix::fs::statvfs(path).map_err(|e| MountError::Io {
            what: "statvfs",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        let frsize = if s.f_frsize > 0 {
            s.f_frsize
        } else {
            s.f_bsize
        };
        Ok(FsStats {
            total_bytes: s.f_blocks.saturating_mul(frsize),
            available_bytes: s.f_bavail.saturating_mul(frsize),
            used_bytes: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(frsize),
            total_inodes: s.f_files,
            free_inodes: s.f_ffree,
            used_inodes: s.f_files.saturating_sub(s.f_ffree),
        })
    }

    fn can_mount(&self, fs_type: &str) -> bool {
        let helper = format!("mount.{fs_type}");
        let in_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(&helper).is_file()))
            .unwrap_or(false);
        in_path
            || ["/sbin", "/usr/sbin", "/bin", "/usr/bin"]
                .iter()
                .any(|d| Path::new(d).join(&helper).is_file())
    }
}

/// The topmost mount at exactly `target` in a table (later mounts stack over earlier ones).
pub fn topmost<'a>(table: &'a [MountEntry], target: &Path) -> Option<&'a MountEntry> {
    table.iter().rfind(|m| m.mount_point == target)
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/<pid>/mountinfo` (proc(5)). Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            device: l[2].to_string(),
            root: unescape(l[3]),
            mount_point: PathBuf::from(unescape(l[4])),
            options: l[5].split(',').map(str::to_string).collect(),
            fs_type: r[0].to_string(),
            source: unescape(r[1]),
        });
    }
    out
}

/// A mount table in memory, recording calls. `fail_next` makes the next mount fail.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Mutex<FakeState>,
    /// Wakes mounts held by [`FakeMounter::hold_mounts_at`], and whoever waits for them.
    gate: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct FakeState {
    table: BTreeMap<PathBuf, MountEntry>,
    calls: Vec<String>,
    fail_next: Option<String>,
    stats: BTreeMap<PathBuf, Result<FsStats, String>>,
    missing_helpers: Vec<String>,
    next_device: u32,
    held_targets: std::collections::BTreeSet<PathBuf>,
    parked: usize,
    hung_stats: std::collections::BTreeSet<PathBuf>,
    busy: std::collections::BTreeSet<PathBuf>,
    stats_calls: usize,
}

impl FakeMounter {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls made so far, e.g. `mount nfs srv:/x /t`, `bind /s /t ro`, `unmount /t`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Make the next `mount` fail with this message.
    pub fn fail_next_mount(&self, message: &str) {
        self.lock().fail_next = Some(message.to_string());
    }

    /// Statistics (or an error, e.g. a stale handle) to report for a path.
    pub fn set_stats(&self, path: &Path, stats: Result<FsStats, String>) {
        self.lock().stats.insert(path.to_path_buf(), stats);
    }

    /// Make mounts onto `target` block, like a helper waiting on its server, until
    /// [`FakeMounter::release_mounts`]; [`FakeMounter::wait_parked`] tells when one is.
    pub fn hold_mounts_at(&self, target: &Path) {
        self.lock().held_targets.insert(target.to_path_buf());
    }

    /// Wait up to `timeout` until `n` mounts are blocked by `hold_mounts_at`.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .gate
            .wait_timeout_while(s, timeout, |s| s.parked < n)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.parked >= n
    }

    /// Let every held mount go on.
    pub fn release_mounts(&self) {
        self.lock().held_targets.clear();
        self.gate.notify_all();
    }

    /// Make `stats` of this path block until [`FakeMounter::release_stats`], like statvfs
    /// on a hard NFS mount whose server is gone.
    pub fn hang_stats(&self, path: &Path) {
        self.lock().hung_stats.insert(path.to_path_buf());
    }

    /// How many `stats` calls were made.
    pub fn stats_calls(&self) -> usize {
        self.lock().stats_calls
    }

    /// Let blocked `stats` calls return (the server came back).
    pub fn release_stats(&self) {
        self.lock().hung_stats.clear();
    }

    /// Make a non-lazy unmount of this path fail with EBUSY (a lazy one still detaches).
    pub fn set_busy(&self, path: &Path) {
        self.lock().busy.insert(path.to_path_buf());
    }

    /// Pretend `mount.<fs_type>` is not installed.
    pub fn remove_helper(&self, fs_type: &str) {
        self.lock().missing_helpers.push(fs_type.to_string());
    }

    /// The current table.
    pub fn table(&self) -> Vec<MountEntry> {
        self.lock().table.values().cloned().collect()
    }
}

impl Mounter for FakeMounter {
    fn mount(&self, request: &MountRequest) -> Result<(), MountError> {
        let mut s = self.lock();
        if s.held_targets.contains(&request.target) {
            s.parked += 1;
            self.gate.notify_all();
            // The fake stands in for a blocking helper: it blocks its (blocking) thread.
            s = self
                .gate
                .wait_while(s, |s| s.held_targets.contains(&request.target))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.parked -= 1;
        }
        s.calls.push(format!(
            "mount {} {} {}",
            request.fs_type,
            request.source,
            request.target.display()
        ));
        if let Some(message) = s.fail_next.take() {
            return Err(MountError::MountFailed {
                source_spec: request.source.clone(),
                target: request.target.clone(),
                message,
            });
        }
        s.next_device += 1;
        let entry = MountEntry {
            device: format!("0:{}", 100 + s.next_device),
            root: "/".into(),
            mount_point: request.target.clone(),
            options: vec![
                if request.options.iter().any(|o| o == "ro") {
                    "ro"
                } else {
                    "rw"
                }
                .into(),
            ],
            fs_type: request.fs_type.clone(),
            source: request.source.clone(),
        };
        s.table.insert(request.target.clone(), entry);
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "bind {} {}{}",
            source.display(),
            target.display(),
            if read_only { " ro" } else { "" }
        ));
        let base = match s.table.get(source).cloned() {
            Some(base) => base,
            // A device node (raw block publish): the kernel shows the devtmpfs mount with
            // the node's name as the root.
            None if source.starts_with("/dev/") => MountEntry {
                device: "0:5".into(),
                root: format!(
                    "/{}",
                    source
                        .file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                ),
                mount_point: target.to_path_buf(),
                options: Vec::new(),
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
            },
            None => {
                return Err(MountError::MountFailed {
                    source_spec: source.display().to_string(),
                    target: target.to_path_buf(),
                    message: "source is not mounted (fake)".into(),
                });
            }
        };
        let entry = MountEntry {
            mount_point: target.to_path_buf(),
            options: vec![if read_only { "ro" } else { "rw" }.into()],
            ..base
        };
        s.table.insert(target.to_path_buf(), entry);
        Ok(())
    }

    fn unmount(&self, target: &Path, lazy: bool) -> Result<(), MountError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "unmount {}{}",
            target.display(),
            if lazy { " lazy" } else { "" }
        ));
        if !lazy && s.busy.contains(target) {
            return Err(MountError::UnmountFailed {
                target: target.to_path_buf(),
                source: io::Error::from_raw_os_error(16),
            });
        }
        match s.table.remove(target) {
            Some(_) => Ok(()),
            None => Err(MountError::UnmountFailed {
                target: target.to_path_buf(),
                source: io::Error::from_raw_os_error(22),
            }),
        }
    }

    fn mount_table(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(self.lock().table.values().cloned().collect())
    }

    fn stats(&self, path: &Path) -> Result<FsStats, MountError> {
        self.lock().stats_calls += 1;
        while self.lock().hung_stats.contains(path) {
            #[allow(clippy::disallowed_methods)] // the fake stands in for a blocking syscall
            std::thread::sleep(Duration::from_millis(10));
        }
        match self.lock().stats.get(path).cloned() {
            Some(Ok(s)) => Ok(s),
            Some(Err(message)) => Err(MountError::Io {
                what: "statvfs",
                path: path.to_path_buf(),
                source: io::Error::other(message),
            }),
            None => Ok(FsStats {
                total_bytes: 1 << 30,
                available_bytes: 1 << 29,
                used_bytes: 1 << 29,
                total_inodes: 1000,
                free_inodes: 600,
                used_inodes: 400,
            }),
        }
    }

    fn can_mount(&self, fs_type: &str) -> bool {
        !self.lock().missing_helpers.iter().any(|h| h == fs_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_escapes_and_optional_fields() {
        let text = "42 27 0:39 / /tmp/mt/a rw,relatime shared:12 - tmpfs tmpfs rw\n\
                    43 27 0:40 /sub /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pv\\0401/mount ro,relatime - nfs4 srv:/export/vol1 rw,vers=4.1\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/tmp/mt/a"));
        assert!(!m[0].read_only());
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pv 1/mount")
        );
        assert_eq!(m[1].root, "/sub");
        assert_eq!(m[1].fs_type, "nfs4");
        assert_eq!(m[1].source, "srv:/export/vol1");
        assert!(m[1].read_only());
    }

    /// Whether `pid` is alive: present in /proc and not a zombie (a killed process whose
    /// new parent has not reaped it yet is dead).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
            })
            .is_some_and(|state| state != "Z" && state != "X")
    }

    #[test]
    fn helper_timeout_kills_the_process_group() {
        // The helper starts a background child (as mount(8) starts mount.nfs) and records
        // its PID; both must be dead once the deadline passes, not only the direct child.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "sleep 30 & echo $! > {}; sleep 30",
            pidfile.display()
        ));
        let out = crate::process::run_with_deadline(cmd, Duration::from_millis(300)).unwrap();
        assert!(out.is_none(), "the deadline passed");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL is delivered at once; allow the scheduler a moment to act on it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(pid) && std::time::Instant::now() < deadline {
            #[allow(clippy::disallowed_methods)] // a plain test thread, no runtime
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "the helper's background child {pid} survived");
    }
}
