//! The iSCSI initiator (open-iscsi's `iscsiadm`) behind a trait, and the block devices it
//! brings (probe, format, check, grow), also behind a trait. Node records are created
//! directly with `node.startup=manual`, so an unclean reboot does not log the host back
//! in to targets nobody staged. CHAP secrets go to iscsiadm as arguments (the only way it
//! takes them) and are scrubbed from every error message; nothing here logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::run_with_deadline;

mod disks;
mod fake;
mod iscsiadm;

pub use disks::SystemDisks;
pub use fake::FakeIscsi;
pub use iscsiadm::Iscsiadm;

/// One target reached through one portal (`ip:port`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IscsiTarget {
    /// `ip:port`, e.g. `127.0.0.1:3260` or `[fd00::1]:3260`.
    pub portal: String,
    /// Target IQN.
    pub iqn: String,
}

impl IscsiTarget {
    /// The udev link of LUN `lun` of this target, e.g.
    /// `/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-iqn.2024-01.io.example:t-lun-0`.
    pub fn by_path(&self, lun: u32) -> PathBuf {
        PathBuf::from(format!(
            "/dev/disk/by-path/ip-{}-iscsi-{}-lun-{lun}",
            self.portal, self.iqn
        ))
    }
}

/// CHAP credentials (never printed: `Debug` hides the passwords).
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// Initiator user name.
    pub username: String,
    /// Initiator password.
    pub password: String,
    /// Mutual CHAP: the target's user name.
    pub username_in: Option<String>,
    /// Mutual CHAP: the target's password.
    pub password_in: Option<String>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("username", &self.username)
            .field("password", &"***")
            .field("mutual", &self.username_in.is_some())
            .finish()
    }
}

impl Chap {
    fn secrets(&self) -> Vec<&str> {
        let mut s = vec![self.password.as_str()];
        if let Some(p) = &self.password_in {
            s.push(p);
        }
        s
    }
}

/// Failure of an initiator or block device operation.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    /// The program could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("{what}: no answer within {timeout:?} (killed)")]
    Timeout {
        /// What was being done.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// It failed. `code` is iscsiadm's exit status (24: authentication failed, 8: timeout
    /// connecting, 21: no such record or session).
    #[error("{what} failed (exit {code}): {message}")]
    Failed {
        /// What was being done.
        what: String,
        /// Exit status.
        code: i32,
        /// Its error output, secrets removed.
        message: String,
    },
    /// The LUN's device did not appear.
    #[error("{} did not appear within {timeout:?} after login", link.display())]
    NoDevice {
        /// The by-path link waited for.
        link: PathBuf,
        /// How long.
        timeout: Duration,
    },
    /// No dm-multipath map came up over the LUN's paths.
    #[error(
        "no dm-multipath device over {paths} appeared within {timeout:?}: is multipathd running (systemctl enable --now multipathd), and are these disks not blacklisted in /etc/multipath.conf?"
    )]
    NoMultipath {
        /// The path devices, comma-separated.
        paths: String,
        /// How long.
        timeout: Duration,
    },
    /// Reading device facts failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl IscsiError {
    /// iscsiadm said the authentication failed (exit 24).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, IscsiError::Failed { code: 24, .. })
    }
}

/// The initiator operations the CSI plugin needs.
pub trait Initiator: Send + Sync + std::fmt::Debug {
    /// `iscsiadm` is installed.
    fn available(&self) -> bool;
    /// SendTargets discovery on `portal` (with discovery CHAP); the targets it offers.
    fn discover(&self, portal: &str, chap: Option<&Chap>) -> Result<Vec<IscsiTarget>, IscsiError>;
    /// Create the node record (startup manual, session CHAP) and log in; logged in already
    /// is success.
    fn login(&self, target: &IscsiTarget, chap: Option<&Chap>) -> Result<(), IscsiError>;
    /// Log out and delete the node record; not logged in is success.
    fn logout(&self, target: &IscsiTarget) -> Result<(), IscsiError>;
    /// The sessions this host has.
    fn sessions(&self) -> Result<Vec<IscsiTarget>, IscsiError>;
    /// Rescan the target's LUNs (after a LUN grew).
    fn rescan(&self, target: &IscsiTarget) -> Result<(), IscsiError>;
}

/// What a block device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskFormat {
    /// Nothing blkid recognises: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// A partition table (never formatted over).
    PartitionTable(String),
}

/// Block device operations for staged LUNs.
pub trait Disks: Send + Sync + std::fmt::Debug {
    /// Wait for `link` to exist and return the device it points to.
    fn wait_for(&self, link: &Path, timeout: Duration) -> Result<PathBuf, IscsiError>;
    /// What the device holds (`blkid -p`).
    fn probe(&self, device: &Path) -> Result<DiskFormat, IscsiError>;
    /// Make a filesystem (`mkfs.ext4 -F -m0`, `mkfs.xfs -f`).
    fn format(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError>;
    /// Check and repair what is safe to repair before a read-write mount (ext4: `fsck -p`).
    fn check(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError>;
    /// Grow the filesystem to the device (ext4: `resize2fs device`; xfs: `xfs_growfs mountpoint`).
    fn grow(&self, device: &Path, fs_type: &str, mount_point: &Path) -> Result<(), IscsiError>;
    /// Size of the device in bytes.
    fn size_bytes(&self, device: &Path) -> Result<u64, IscsiError>;
    /// Remove a SCSI disk the kernel still has (before logging out would take others).
    fn remove_scsi_device(&self, device: &Path) -> Result<(), IscsiError>;
    /// Write the device's buffered blocks out (`blockdev --flushbufs`) before it goes.
    fn flush(&self, device: &Path) -> Result<(), IscsiError>;
    /// The dm-multipath device multipathd assembles over the path devices `paths` (all
    /// of them must be held by the same multipath map), waiting up to `timeout`.
    fn multipath_device(&self, paths: &[PathBuf], timeout: Duration)
    -> Result<PathBuf, IscsiError>;
    /// Remove the multipath map `device` (`multipath -f`; its buffers flushed first by
    /// the caller). A map that is already gone is fine.
    fn remove_multipath(&self, device: &Path) -> Result<(), IscsiError>;
    /// Make the multipath map `device` take the size its paths now have
    /// (`multipathd resize map`), after the paths were rescanned.
    fn resize_multipath(&self, device: &Path) -> Result<(), IscsiError>;
}

pub(super) fn run(
    program: &str,
    args: &[&str],
    what: &str,
    timeout: Duration,
    secrets: &[&str],
) -> Result<(i32, String), IscsiError> {
    let mut cmd = Command::new(locate(program));
    cmd.args(args);
    let scrub = |text: &str| {
        let mut t = text.trim().to_string();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            t = t.replace(s, "***");
        }
        t
    };
    match run_with_deadline(cmd, timeout) {
        Err(source) => Err(IscsiError::Spawn {
            program: program.into(),
            source,
        }),
        Ok(None) => Err(IscsiError::Timeout {
            what: what.into(),
            timeout,
        }),
        Ok(Some(out)) => {
            let code = out.status.code().unwrap_or(-1);
            let stdout = scrub(&String::from_utf8_lossy(&out.stdout));
            if code == 0 {
                Ok((0, stdout))
            } else {
                let stderr = scrub(&String::from_utf8_lossy(&out.stderr));
                Ok((code, if stderr.is_empty() { stdout } else { stderr }))
            }
        }
    }
}

pub(super) fn check_ok(
    what: &str,
    (code, message): (i32, String),
    also_ok: &[i32],
) -> Result<String, IscsiError> {
    if code == 0 || also_ok.contains(&code) {
        Ok(message)
    } else {
        Err(IscsiError::Failed {
            what: what.into(),
            code,
            message,
        })
    }
}

/// Run a block-device tool (blockdev, multipath) and require success.
pub(super) fn run_ok(program: &str, args: &[&str], timeout: Duration) -> Result<(), IscsiError> {
    let what = format!("{program} {}", args.join(" "));
    check_ok(&what, run(program, args, &what, timeout, &[])?, &[]).map(drop)
}

/// `program` as found on PATH, else in the sbin directories (where blkid, mkfs and
/// iscsiadm live; a non-root PATH often lacks them); the bare name when nowhere.
pub(super) fn locate(program: &str) -> std::ffi::OsString {
    if program.contains('/') {
        return program.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .map_or_else(|| program.into(), PathBuf::into_os_string)
}

pub(super) fn which(program: &str) -> bool {
    Path::new(&locate(program)).is_file()
}
