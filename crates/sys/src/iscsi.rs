//! The iSCSI initiator (open-iscsi's `iscsiadm`) behind a trait, and the block devices it
//! brings (probe, format, check, grow), also behind a trait. Node records are created
//! directly with `node.startup=manual`, so an unclean reboot does not log the host back
//! in to targets nobody staged. CHAP secrets go to iscsiadm as arguments (the only way it
//! takes them) and are scrubbed from every error message; nothing here logs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::run_with_deadline;

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

fn run(
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

fn check_ok(
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
fn run_ok(program: &str, args: &[&str], timeout: Duration) -> Result<(), IscsiError> {
    let what = format!("{program} {}", args.join(" "));
    check_ok(&what, run(program, args, &what, timeout, &[])?, &[]).map(drop)
}

/// iscsiadm exit statuses (open-iscsi's iscsi_err.h).
const ERR_NO_OBJS_FOUND: i32 = 21;
const ERR_SESS_EXISTS: i32 = 15;

/// The real initiator: the host's `iscsiadm` (one iscsid per host; never a containerised
/// one), each call bounded by a deadline.
#[derive(Debug, Clone)]
pub struct Iscsiadm {
    program: String,
    timeout: Duration,
}

impl Default for Iscsiadm {
    fn default() -> Self {
        // Login retries a dead portal for up to node.session.initial_login_retry_max x
        // login_timeout; keep the whole call well under the kubelet's 2-minute deadline.
        Self::new("iscsiadm", Duration::from_secs(30))
    }
}

impl Iscsiadm {
    /// `program` with `timeout` per call.
    pub fn new(program: &str, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout,
        }
    }

    fn node(
        &self,
        t: &IscsiTarget,
        extra: &[&str],
        what: &str,
        secrets: &[&str],
    ) -> Result<(i32, String), IscsiError> {
        let mut args = vec!["-m", "node", "-T", t.iqn.as_str(), "-p", t.portal.as_str()];
        args.extend_from_slice(extra);
        run(&self.program, &args, what, self.timeout, secrets)
    }

    fn update(
        &self,
        t: &IscsiTarget,
        name: &str,
        value: &str,
        secret: bool,
    ) -> Result<(), IscsiError> {
        let secrets: &[&str] = if secret { &[value] } else { &[] };
        let what = format!("setting {name} for {} on {}", t.iqn, t.portal);
        check_ok(
            &what,
            self.node(
                t,
                &["-o", "update", "-n", name, "-v", value],
                &what,
                secrets,
            )?,
            &[],
        )
        .map(drop)
    }
}

fn parse_sessions(text: &str) -> Vec<IscsiTarget> {
    // "tcp: [1] 127.0.0.1:3260,1 iqn.2024-01.io.example:t (non-flash)"
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let _transport = words.next()?;
            let _sid = words.next()?;
            let portal = words.next()?.split(',').next()?.to_string();
            let iqn = words.next()?.to_string();
            Some(IscsiTarget { portal, iqn })
        })
        .collect()
}

impl Initiator for Iscsiadm {
    fn available(&self) -> bool {
        which(&self.program)
    }

    fn discover(&self, portal: &str, chap: Option<&Chap>) -> Result<Vec<IscsiTarget>, IscsiError> {
        let what = format!("SendTargets discovery on {portal}");
        let base = ["-m", "discoverydb", "-t", "sendtargets", "-p", portal];
        let secrets = chap.map(Chap::secrets).unwrap_or_default();
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            run(&self.program, &args, &what, self.timeout, &secrets)
        };
        check_ok(&what, with(&["-o", "new"])?, &[ERR_SESS_EXISTS])?;
        if let Some(c) = chap {
            for (name, value) in [
                ("discovery.sendtargets.auth.authmethod", "CHAP"),
                ("discovery.sendtargets.auth.username", c.username.as_str()),
                ("discovery.sendtargets.auth.password", c.password.as_str()),
            ] {
                check_ok(
                    &what,
                    with(&["-o", "update", "-n", name, "-v", value])?,
                    &[],
                )?;
            }
        }
        let out = check_ok(&what, with(&["--discover"])?, &[])?;
        // "127.0.0.1:3260,1 iqn.2024-01.io.example:t"
        Ok(out
            .lines()
            .filter_map(|l| {
                let (p, iqn) = l.split_once(' ')?;
                Some(IscsiTarget {
                    portal: p.split(',').next()?.to_string(),
                    iqn: iqn.trim().to_string(),
                })
            })
            .collect())
    }

    fn login(&self, t: &IscsiTarget, chap: Option<&Chap>) -> Result<(), IscsiError> {
        let what = format!("creating the node record for {} on {}", t.iqn, t.portal);
        check_ok(
            &what,
            self.node(t, &["-o", "new"], &what, &[])?,
            &[ERR_SESS_EXISTS],
        )?;
        self.update(t, "node.startup", "manual", false)?;
        match chap {
            Some(c) => {
                self.update(t, "node.session.auth.authmethod", "CHAP", false)?;
                self.update(t, "node.session.auth.username", &c.username, false)?;
                self.update(t, "node.session.auth.password", &c.password, true)?;
                if let (Some(u), Some(p)) = (&c.username_in, &c.password_in) {
                    self.update(t, "node.session.auth.username_in", u, false)?;
                    self.update(t, "node.session.auth.password_in", p, true)?;
                }
            }
            None => self.update(t, "node.session.auth.authmethod", "None", false)?,
        }
        let what = format!("logging in to {} on {}", t.iqn, t.portal);
        check_ok(
            &what,
            self.node(t, &["--login"], &what, &[])?,
            &[ERR_SESS_EXISTS],
        )
        .map(drop)
    }

    fn logout(&self, t: &IscsiTarget) -> Result<(), IscsiError> {
        let what = format!("logging out of {} on {}", t.iqn, t.portal);
        check_ok(
            &what,
            self.node(t, &["--logout"], &what, &[])?,
            &[ERR_NO_OBJS_FOUND],
        )?;
        let what = format!("deleting the node record for {} on {}", t.iqn, t.portal);
        check_ok(
            &what,
            self.node(t, &["-o", "delete"], &what, &[])?,
            &[ERR_NO_OBJS_FOUND],
        )
        .map(drop)
    }

    fn sessions(&self) -> Result<Vec<IscsiTarget>, IscsiError> {
        let what = "listing iSCSI sessions";
        let out = check_ok(
            what,
            run(&self.program, &["-m", "session"], what, self.timeout, &[])?,
            &[ERR_NO_OBJS_FOUND],
        )?;
        Ok(parse_sessions(&out))
    }

    fn rescan(&self, t: &IscsiTarget) -> Result<(), IscsiError> {
        let what = format!("rescanning {} on {}", t.iqn, t.portal);
        check_ok(&what, self.node(t, &["-R"], &what, &[])?, &[]).map(drop)
    }
}

/// `program` as found on PATH, else in the sbin directories (where blkid, mkfs and
/// iscsiadm live; a non-root PATH often lacks them); the bare name when nowhere.
fn locate(program: &str) -> std::ffi::OsString {
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

fn which(program: &str) -> bool {
    Path::new(&locate(program)).is_file()
}

/// The real block device operations (blkid, mkfs, fsck, resize2fs, xfs_growfs,
/// multipath, sysfs).
#[derive(Debug, Clone)]
pub struct SystemDisks {
    /// Deadline for mkfs and resize (large LUNs take a while).
    pub format_timeout: Duration,
    /// Where sysfs is (`/sys`; tests point it at a tree).
    pub sysfs: PathBuf,
    /// Where device nodes are (`/dev`).
    pub dev: PathBuf,
    /// The directory of `multipath` and `multipathd`; `None`: from `PATH` (tests use
    /// stand-ins).
    pub multipath_tools: Option<PathBuf>,
}

impl Default for SystemDisks {
    fn default() -> Self {
        Self {
            format_timeout: Duration::from_secs(100),
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            multipath_tools: None,
        }
    }
}

impl SystemDisks {
    fn multipath_tool(&self, name: &str) -> String {
        match &self.multipath_tools {
            Some(dir) => dir.join(name).display().to_string(),
            None => name.to_string(),
        }
    }

    /// The multipath map (`dm-N`) holding the block device `name`, if exactly one does.
    fn multipath_holder(&self, name: &str) -> Option<String> {
        let holders =
            std::fs::read_dir(self.sysfs.join("block").join(name).join("holders")).ok()?;
        let maps: Vec<String> = holders
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|h| {
                // A multipath map, not LVM or crypt over a single path.
                std::fs::read_to_string(self.sysfs.join("block").join(h).join("dm/uuid"))
                    .is_ok_and(|u| u.trim().starts_with("mpath-"))
            })
            .collect();
        match maps.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }

    /// The name of device-mapper device `dm` (`dm-N`): `mpatha`, a WWID, ...
    fn map_name(&self, dm: &str) -> Option<String> {
        std::fs::read_to_string(self.sysfs.join("block").join(dm).join("dm/name"))
            .ok()
            .map(|n| n.trim().to_string())
    }

    /// `dm-N` of a device given as `/dev/dm-N` or `/dev/mapper/<name>`.
    fn dm_name(&self, device: &Path) -> Option<String> {
        let canonical = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
        let file = canonical.file_name()?.to_string_lossy().into_owned();
        if file.starts_with("dm-") {
            return Some(file);
        }
        // /dev/mapper/<name> without udev's symlink: search the maps by name.
        let wanted = device.file_name()?.to_string_lossy().into_owned();
        std::fs::read_dir(self.sysfs.join("block"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("dm-"))
            .find(|n| self.map_name(n).is_some_and(|name| name == wanted))
    }
}

impl Disks for SystemDisks {
    fn wait_for(&self, link: &Path, timeout: Duration) -> Result<PathBuf, IscsiError> {
        let started = Instant::now();
        loop {
            if let Ok(device) = std::fs::canonicalize(link) {
                return Ok(device);
            }
            if started.elapsed() >= timeout {
                return Err(IscsiError::NoDevice {
                    link: link.to_path_buf(),
                    timeout,
                });
            }
            #[allow(clippy::disallowed_methods)] // on a blocking thread, waiting for udev
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn probe(&self, device: &Path) -> Result<DiskFormat, IscsiError> {
        let dev = device.to_string_lossy();
        let what = format!("blkid {dev}");
        let (code, out) = run(
            "blkid",
            &[
                "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", "--", &dev,
            ],
            &what,
            Duration::from_secs(30),
            &[],
        )?;
        match code {
            // blkid: 2 = nothing found.
            2 => Ok(DiskFormat::Blank),
            0 => {
                let field = |key: &str| {
                    out.lines()
                        .find_map(|l| l.strip_prefix(key).map(str::to_string))
                };
                if let Some(pt) = field("PTTYPE=") {
                    Ok(DiskFormat::PartitionTable(pt))
                } else if let Some(fs) = field("TYPE=") {
                    Ok(DiskFormat::Filesystem(fs))
                } else {
                    Ok(DiskFormat::Blank)
                }
            }
            _ => Err(IscsiError::Failed {
                what,
                code,
                message: out,
            }),
        }
    }

    fn format(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError> {
        let dev = device.to_string_lossy();
        let (program, args): (&str, Vec<&str>) = match fs_type {
            "xfs" => ("mkfs.xfs", vec!["-f", "--", &dev]),
            _ => ("mkfs.ext4", vec!["-F", "-m0", "-q", "--", &dev]),
        };
        let what = format!("{program} {dev}");
        check_ok(
            &what,
            run(program, &args, &what, self.format_timeout, &[])?,
            &[],
        )
        .map(drop)
    }

    fn check(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError> {
        if fs_type != "ext4" {
            return Ok(()); // xfs repairs itself at mount (log replay); xfs_repair is manual
        }
        let dev = device.to_string_lossy();
        let what = format!("e2fsck -p {dev}");
        // e2fsck: 0 clean, 1 errors corrected, 2 corrected (reboot advised); 4+ not fixed.
        check_ok(
            &what,
            run(
                "e2fsck",
                &["-p", "--", &dev],
                &what,
                self.format_timeout,
                &[],
            )?,
            &[1, 2],
        )
        .map(drop)
    }

    fn grow(&self, device: &Path, fs_type: &str, mount_point: &Path) -> Result<(), IscsiError> {
        let dev = device.to_string_lossy();
        let mp = mount_point.to_string_lossy();
        let (program, args): (&str, Vec<&str>) = match fs_type {
            "xfs" => ("xfs_growfs", vec![&mp]),
            _ => ("resize2fs", vec![&dev]),
        };
        let what = format!("{program} {}", args.join(" "));
        check_ok(
            &what,
            run(program, &args, &what, self.format_timeout, &[])?,
            &[],
        )
        .map(drop)
    }

    fn size_bytes(&self, device: &Path) -> Result<u64, IscsiError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| IscsiError::Io { what, path, source }
        };
        let meta = std::fs::metadata(device).map_err(io("inspecting", device))?;
        if meta.is_file() {
            return Ok(meta.len()); // an image file (tests)
        }
        // /dev/mapper/mpatha is a link to /dev/dm-N: sysfs knows the kernel's name.
        let real = std::fs::canonicalize(device).map_err(io("resolving", device))?;
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sysfs = self.sysfs.join(format!("class/block/{name}/size"));
        let sectors = std::fs::read_to_string(&sysfs).map_err(io("reading", &sysfs))?;
        sectors
            .trim()
            .parse::<u64>()
            .map(|s| s * 512)
            .map_err(|e| IscsiError::Io {
                what: "parsing",
                path: sysfs,
                source: std::io::Error::other(e),
            })
    }

    fn flush(&self, device: &Path) -> Result<(), IscsiError> {
        run_ok(
            "blockdev",
            &["--flushbufs", &device.to_string_lossy()],
            Duration::from_secs(60),
        )
    }

    fn remove_scsi_device(&self, device: &Path) -> Result<(), IscsiError> {
        let name = device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let delete = self.sysfs.join(format!("block/{name}/device/delete"));
        std::fs::write(&delete, "1").map_err(|source| IscsiError::Io {
            what: "writing",
            path: delete,
            source,
        })
    }

    fn multipath_device(
        &self,
        paths: &[PathBuf],
        timeout: Duration,
    ) -> Result<PathBuf, IscsiError> {
        let names: Vec<String> = paths
            .iter()
            .filter_map(|p| {
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect();
        let started = Instant::now();
        loop {
            let holders: Vec<Option<String>> =
                names.iter().map(|n| self.multipath_holder(n)).collect();
            if let Some(Some(first)) = holders.first()
                && !names.is_empty()
                && holders.iter().all(|h| h.as_ref() == Some(first))
            {
                let map_name = self.map_name(first).unwrap_or_default();
                // The stable name (`/dev/mapper/<name>`, which the record keeps) appears
                // when udev has processed the map, a moment after sysfs shows it.
                let mapper = self.dev.join("mapper").join(&map_name);
                let named_by = Instant::now() + Duration::from_secs(5).min(timeout);
                while !map_name.is_empty() && !mapper.exists() && Instant::now() < named_by {
                    #[allow(clippy::disallowed_methods)] // on a blocking thread, waiting for udev
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(if !map_name.is_empty() && mapper.exists() {
                    mapper
                } else {
                    self.dev.join(first)
                });
            }
            if started.elapsed() >= timeout {
                return Err(IscsiError::NoMultipath {
                    paths: names.join(", "),
                    timeout,
                });
            }
            #[allow(clippy::disallowed_methods)] // on a blocking thread, waiting for multipathd
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn remove_multipath(&self, device: &Path) -> Result<(), IscsiError> {
        let Some(dm) = self.dm_name(device) else {
            return Ok(()); // gone already
        };
        if !self.sysfs.join("block").join(&dm).exists() {
            return Ok(());
        }
        let name = self.map_name(&dm).unwrap_or(dm);
        run_ok(
            &self.multipath_tool("multipath"),
            &["-f", &name],
            Duration::from_secs(60),
        )
    }

    fn resize_multipath(&self, device: &Path) -> Result<(), IscsiError> {
        let dm = self.dm_name(device).unwrap_or_default();
        let name = self.map_name(&dm).ok_or_else(|| IscsiError::Io {
            what: "reading the multipath map of",
            path: device.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let what = format!("multipathd resize map {name}");
        let (code, out) = run(
            &self.multipath_tool("multipathd"),
            &["resize", "map", &name],
            &what,
            Duration::from_secs(60),
            &[],
        )?;
        // multipathd answers "ok" or "fail" with exit status 0 either way.
        if code != 0 || out.trim() == "fail" {
            return Err(IscsiError::Failed {
                what,
                code,
                message: out,
            });
        }
        Ok(())
    }
}

/// An initiator and disks in memory: targets with LUNs, sessions, formats; records calls
/// (secrets never appear in them).
#[derive(Debug, Default)]
pub struct FakeIscsi {
    state: Mutex<FakeIscsiState>,
}

#[derive(Debug, Default)]
struct FakeIscsiState {
    /// LUNs offered: (target, lun) -> device path.
    luns: BTreeMap<(IscsiTarget, u32), PathBuf>,
    /// Required session CHAP per target.
    chap: BTreeMap<String, (String, String)>,
    sessions: BTreeSet<IscsiTarget>,
    formats: BTreeMap<PathBuf, DiskFormat>,
    sizes: BTreeMap<PathBuf, u64>,
    /// Multipath maps: the map device and its path devices.
    maps: BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    calls: Vec<String>,
    missing: bool,
}

impl FakeIscsi {
    /// No targets yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeIscsiState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Offer LUN `lun` of `target` as `device` (blank, `size` bytes).
    pub fn add_lun(&self, target: &IscsiTarget, lun: u32, device: &Path, size: u64) {
        let mut s = self.lock();
        s.luns.insert((target.clone(), lun), device.to_path_buf());
        s.formats.insert(device.to_path_buf(), DiskFormat::Blank);
        s.sizes.insert(device.to_path_buf(), size);
    }

    /// Require session CHAP with these credentials on `iqn`.
    pub fn require_chap(&self, iqn: &str, username: &str, password: &str) {
        self.lock()
            .chap
            .insert(iqn.into(), (username.into(), password.into()));
    }

    /// Set what a device holds.
    pub fn set_format(&self, device: &Path, format: DiskFormat) {
        self.lock().formats.insert(device.to_path_buf(), format);
    }

    /// Grow a LUN.
    pub fn set_size(&self, device: &Path, size: u64) {
        self.lock().sizes.insert(device.to_path_buf(), size);
    }

    /// multipathd assembles `map` (blank, `size` bytes) over the path devices `paths`.
    pub fn add_multipath(&self, map: &Path, paths: &[&Path], size: u64) {
        let mut s = self.lock();
        s.maps.insert(
            map.to_path_buf(),
            paths.iter().map(|p| p.to_path_buf()).collect(),
        );
        s.formats.insert(map.to_path_buf(), DiskFormat::Blank);
        s.sizes.insert(map.to_path_buf(), size);
    }

    /// Pretend iscsiadm is not installed.
    pub fn remove_iscsiadm(&self) {
        self.lock().missing = true;
    }

    /// Calls so far (`login <iqn> <portal>`, `format /dev/x ext4`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Current sessions.
    pub fn current_sessions(&self) -> Vec<IscsiTarget> {
        self.lock().sessions.iter().cloned().collect()
    }
}

impl Initiator for FakeIscsi {
    fn available(&self) -> bool {
        !self.lock().missing
    }

    fn discover(&self, portal: &str, _chap: Option<&Chap>) -> Result<Vec<IscsiTarget>, IscsiError> {
        let mut s = self.lock();
        s.calls.push(format!("discover {portal}"));
        let targets: BTreeSet<IscsiTarget> = s
            .luns
            .keys()
            .filter(|(t, _)| t.portal == portal)
            .map(|(t, _)| t.clone())
            .collect();
        Ok(targets.into_iter().collect())
    }

    fn login(&self, target: &IscsiTarget, chap: Option<&Chap>) -> Result<(), IscsiError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "login {} {}{}",
            target.iqn,
            target.portal,
            if chap.is_some() { " chap" } else { "" }
        ));
        if !s.luns.keys().any(|(t, _)| t == target) {
            return Err(IscsiError::Failed {
                what: format!("logging in to {} on {}", target.iqn, target.portal),
                code: 8,
                message: "connection timed out".into(),
            });
        }
        if let Some((u, p)) = s.chap.get(&target.iqn)
            && chap.is_none_or(|c| &c.username != u || &c.password != p)
        {
            return Err(IscsiError::Failed {
                what: format!("logging in to {} on {}", target.iqn, target.portal),
                code: 24,
                message: "iSCSI login failed due to authorization failure".into(),
            });
        }
        s.sessions.insert(target.clone());
        Ok(())
    }

    fn logout(&self, target: &IscsiTarget) -> Result<(), IscsiError> {
        let mut s = self.lock();
        s.calls
            .push(format!("logout {} {}", target.iqn, target.portal));
        s.sessions.remove(target);
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<IscsiTarget>, IscsiError> {
        Ok(self.lock().sessions.iter().cloned().collect())
    }

    fn rescan(&self, target: &IscsiTarget) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("rescan {} {}", target.iqn, target.portal));
        Ok(())
    }
}

impl Disks for FakeIscsi {
    fn wait_for(&self, link: &Path, timeout: Duration) -> Result<PathBuf, IscsiError> {
        let s = self.lock();
        s.luns
            .iter()
            .find(|((t, lun), _)| s.sessions.contains(t) && t.by_path(*lun) == link)
            .map(|(_, dev)| dev.clone())
            .ok_or_else(|| IscsiError::NoDevice {
                link: link.to_path_buf(),
                timeout,
            })
    }

    fn probe(&self, device: &Path) -> Result<DiskFormat, IscsiError> {
        Ok(self
            .lock()
            .formats
            .get(device)
            .cloned()
            .unwrap_or(DiskFormat::Blank))
    }

    fn format(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError> {
        let mut s = self.lock();
        s.calls
            .push(format!("format {} {fs_type}", device.display()));
        s.formats
            .insert(device.to_path_buf(), DiskFormat::Filesystem(fs_type.into()));
        Ok(())
    }

    fn check(&self, device: &Path, fs_type: &str) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("check {} {fs_type}", device.display()));
        Ok(())
    }

    fn grow(&self, device: &Path, fs_type: &str, mount_point: &Path) -> Result<(), IscsiError> {
        self.lock().calls.push(format!(
            "grow {} {fs_type} {}",
            device.display(),
            mount_point.display()
        ));
        Ok(())
    }

    fn size_bytes(&self, device: &Path) -> Result<u64, IscsiError> {
        Ok(self.lock().sizes.get(device).copied().unwrap_or(0))
    }

    fn remove_scsi_device(&self, device: &Path) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("remove-device {}", device.display()));
        Ok(())
    }

    fn flush(&self, device: &Path) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("flush {}", device.display()));
        Ok(())
    }

    fn multipath_device(
        &self,
        paths: &[PathBuf],
        timeout: Duration,
    ) -> Result<PathBuf, IscsiError> {
        let s = self.lock();
        let wanted: BTreeSet<PathBuf> = paths.iter().cloned().collect();
        s.maps
            .iter()
            .find(|(_, p)| !wanted.is_empty() && wanted.is_subset(p))
            .map(|(m, _)| m.clone())
            .ok_or_else(|| IscsiError::NoMultipath {
                paths: paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                timeout,
            })
    }

    fn remove_multipath(&self, device: &Path) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("multipath -f {}", device.display()));
        Ok(())
    }

    fn resize_multipath(&self, device: &Path) -> Result<(), IscsiError> {
        self.lock()
            .calls
            .push(format!("multipathd resize {}", device.display()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn stand_in(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("iscsiadm");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$*\" >> {}/log\n{body}\n", dir.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn target() -> IscsiTarget {
        IscsiTarget {
            portal: "127.0.0.1:3260".into(),
            iqn: "iqn.2024-01.io.example:t".into(),
        }
    }

    #[test]
    fn login_sets_manual_startup_and_chap_and_hides_the_password() {
        let dir = tempfile::tempdir().unwrap();
        // Fails when asked to set the password, echoing it like a careless tool might.
        let program = stand_in(
            dir.path(),
            "case \"$*\" in *auth.password*) echo \"cannot set $*\" >&2; exit 7;; esac; exit 0",
        );
        let adm = Iscsiadm::new(program.to_str().unwrap(), Duration::from_secs(5));
        let chap = Chap {
            username: "user1".into(),
            password: "s3cret-pass".into(),
            username_in: None,
            password_in: None,
        };
        let err = adm.login(&target(), Some(&chap)).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("s3cret-pass"), "{text}");
        assert!(text.contains("***"), "{text}");
        assert!(!format!("{chap:?}").contains("s3cret-pass"));
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(log.starts_with(
            "-m node -T iqn.2024-01.io.example:t -p 127.0.0.1:3260 -o new\n-m node -T iqn.2024-01.io.example:t -p 127.0.0.1:3260 -o update -n node.startup -v manual\n"
        ), "{log}");
    }

    /// SendTargets discovery with CHAP: the discoverydb record is created, its CHAP set,
    /// then `--discover`; the targets offered are parsed; a refusal names the portal and
    /// never the password.
    #[test]
    fn discovery_with_chap_sets_the_record_then_discovers() {
        let dir = tempfile::tempdir().unwrap();
        let program = stand_in(
            dir.path(),
            "case \"$*\" in *--discover*) echo '127.0.0.1:3260,1 iqn.2024-01.io.example:a'; echo '[fd00::1]:3260,1 iqn.2024-01.io.example:b';; esac; exit 0",
        );
        let adm = Iscsiadm::new(program.to_str().unwrap(), Duration::from_secs(5));
        let chap = Chap {
            username: "disc".into(),
            password: "disc-pass-1".into(),
            username_in: None,
            password_in: None,
        };
        let found = adm.discover("127.0.0.1:3260", Some(&chap)).unwrap();
        assert_eq!(
            found,
            [
                IscsiTarget {
                    portal: "127.0.0.1:3260".into(),
                    iqn: "iqn.2024-01.io.example:a".into()
                },
                IscsiTarget {
                    portal: "[fd00::1]:3260".into(),
                    iqn: "iqn.2024-01.io.example:b".into()
                },
            ]
        );
        let base = "-m discoverydb -t sendtargets -p 127.0.0.1:3260";
        assert_eq!(
            std::fs::read_to_string(dir.path().join("log")).unwrap(),
            format!(
                "{base} -o new\n{base} -o update -n discovery.sendtargets.auth.authmethod -v CHAP\n{base} -o update -n discovery.sendtargets.auth.username -v disc\n{base} -o update -n discovery.sendtargets.auth.password -v disc-pass-1\n{base} --discover\n"
            )
        );
        // Refused (iscsiadm exits 24, authorization failure), echoing its arguments.
        let program = stand_in(
            dir.path(),
            "case \"$*\" in *--discover*) echo \"iscsiadm: Login failed to authorize with target: $*\" >&2; exit 24;; esac; echo \"$*\" >&2; exit 0",
        );
        let adm = Iscsiadm::new(program.to_str().unwrap(), Duration::from_secs(5));
        let e = adm.discover("127.0.0.1:3260", Some(&chap)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("SendTargets discovery on 127.0.0.1:3260"),
            "{text}"
        );
        assert!(!text.contains("disc-pass-1"), "{text}");
        // Without CHAP: no auth settings at all.
        std::fs::remove_file(dir.path().join("log")).unwrap();
        let program = stand_in(dir.path(), "exit 0");
        Iscsiadm::new(program.to_str().unwrap(), Duration::from_secs(5))
            .discover("10.0.0.9:3260", None)
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(!log.contains("auth"), "{log}");
    }

    #[test]
    fn exit_statuses_that_mean_already_done_are_success() {
        let dir = tempfile::tempdir().unwrap();
        let program = stand_in(
            dir.path(),
            "case \"$*\" in *--login*) exit 15;; *--logout*|*delete*) exit 21;; -m\\ session) exit 21;; esac; exit 0",
        );
        let adm = Iscsiadm::new(program.to_str().unwrap(), Duration::from_secs(5));
        adm.login(&target(), None).unwrap();
        adm.logout(&target()).unwrap();
        assert!(adm.sessions().unwrap().is_empty());
        assert!(adm.available());
        assert!(!Iscsiadm::new("/nonexistent/iscsiadm", Duration::from_secs(1)).available());
    }

    #[test]
    fn sessions_and_discovery_output_parse() {
        let text = "tcp: [1] 127.0.0.1:3260,1 iqn.2024-01.io.example:a (non-flash)\ntcp: [2] [fd00::1]:3260,1 iqn.2024-01.io.example:b (non-flash)\n";
        assert_eq!(
            parse_sessions(text),
            vec![
                IscsiTarget {
                    portal: "127.0.0.1:3260".into(),
                    iqn: "iqn.2024-01.io.example:a".into()
                },
                IscsiTarget {
                    portal: "[fd00::1]:3260".into(),
                    iqn: "iqn.2024-01.io.example:b".into()
                },
            ]
        );
        assert_eq!(
            target().by_path(3),
            PathBuf::from(
                "/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-iqn.2024-01.io.example:t-lun-3"
            )
        );
    }

    /// The real disk operations on an image file: blank, format once, recognised, grown.
    #[test]
    fn disks_probe_format_check_and_grow_an_image_file() {
        if !which("mkfs.ext4") || !which("blkid") || !which("resize2fs") {
            panic!("e2fsprogs and blkid are needed (apt-get install e2fsprogs util-linux)");
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("lun.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let disks = SystemDisks::default();
        assert_eq!(disks.probe(&image).unwrap(), DiskFormat::Blank);
        disks.format(&image, "ext4").unwrap();
        assert_eq!(
            disks.probe(&image).unwrap(),
            DiskFormat::Filesystem("ext4".into())
        );
        disks.check(&image, "ext4").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        assert_eq!(disks.size_bytes(&image).unwrap(), 64 << 20);
        disks.grow(&image, "ext4", dir.path()).unwrap();
        let link = dir.path().join("by-path-link");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        assert_eq!(
            disks.wait_for(&link, Duration::from_millis(10)).unwrap(),
            image
        );
        assert!(matches!(
            disks.wait_for(&dir.path().join("missing"), Duration::from_millis(50)),
            Err(IscsiError::NoDevice { .. })
        ));
    }
}

#[cfg(test)]
mod multipath_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A sysfs tree: sdb and sdc held by dm-3 (a multipath map named `mpatha`), sdd held
    /// by an LVM volume dm-4.
    fn tree(dir: &Path) -> SystemDisks {
        let sys = dir.join("sys");
        let mk = |p: &str| std::fs::create_dir_all(sys.join(p)).unwrap();
        let put = |p: &str, text: &str| std::fs::write(sys.join(p), text).unwrap();
        for d in [
            "block/sdb/holders/dm-3",
            "block/sdc/holders/dm-3",
            "block/sdd/holders/dm-4",
            "block/dm-3/dm",
            "block/dm-4/dm",
        ] {
            mk(d);
        }
        put("block/dm-3/dm/uuid", "mpath-36001405abcdef\n");
        put("block/dm-3/dm/name", "mpatha\n");
        put("block/dm-4/dm/uuid", "LVM-xyz\n");
        put("block/dm-4/dm/name", "vg-lv\n");
        SystemDisks {
            format_timeout: Duration::from_secs(5),
            sysfs: sys,
            dev: dir.join("dev"),
            multipath_tools: Some(dir.join("bin")),
        }
    }

    /// The size of a multipath map is read under the kernel's name (dm-N), not the map's
    /// (a real kernel has no /sys/class/block/mpatha: found in the VM).
    #[test]
    fn sizes_are_read_under_the_kernel_name_of_a_linked_device() {
        let dir = tempfile::tempdir().unwrap();
        let disks = tree(dir.path());
        // /dev/null stands in for /dev/dm-3: any device node that is not a regular file.
        std::fs::create_dir_all(disks.sysfs.join("class/block/null")).unwrap();
        std::fs::write(disks.sysfs.join("class/block/null/size"), "4194304\n").unwrap();
        std::fs::create_dir_all(dir.path().join("dev/mapper")).unwrap();
        let map = dir.path().join("dev/mapper/mpatha");
        std::os::unix::fs::symlink("/dev/null", &map).unwrap();
        assert_eq!(disks.size_bytes(&map).unwrap(), 4_194_304 * 512);
    }

    /// A stand-in tool in `<dir>/bin` that logs its arguments and runs `body`.
    fn tool(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let path = bin.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> {}/log\n{body}\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// multipathd answers "ok" or "fail" with exit status 0 either way: only "ok" is
    /// success. The map is named by its dm name, not the device path.
    #[test]
    fn resizing_a_map_asks_multipathd_by_name_and_reads_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let disks = tree(dir.path());
        tool(dir.path(), "multipathd", "echo ok");
        disks.resize_multipath(Path::new("/dev/dm-3")).unwrap();
        tool(dir.path(), "multipathd", "echo fail");
        let e = disks.resize_multipath(Path::new("/dev/dm-3")).unwrap_err();
        assert!(matches!(e, IscsiError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("resize map mpatha"), "{e}");
        tool(
            dir.path(),
            "multipathd",
            "echo 'timeout receiving packet' >&2; exit 1",
        );
        assert!(disks.resize_multipath(Path::new("/dev/dm-3")).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("log")).unwrap(),
            "multipathd resize map mpatha\n".repeat(3)
        );
        // Not a map: nothing to ask.
        assert!(disks.resize_multipath(Path::new("/dev/sde")).is_err());
        tool(dir.path(), "multipath", "exit 0");
        std::fs::create_dir_all(dir.path().join("sys/block/dm-3")).unwrap();
        disks.remove_multipath(Path::new("/dev/dm-3")).unwrap();
        assert!(
            std::fs::read_to_string(dir.path().join("log"))
                .unwrap()
                .ends_with("multipath -f mpatha\n")
        );
    }

    #[test]
    fn finds_the_map_over_all_paths() {
        let dir = tempfile::tempdir().unwrap();
        let disks = tree(dir.path());
        let paths = [PathBuf::from("/dev/sdb"), PathBuf::from("/dev/sdc")];
        // No /dev/mapper node in the tree: the dm node.
        assert_eq!(
            disks
                .multipath_device(&paths, Duration::from_millis(10))
                .unwrap(),
            dir.path().join("dev/dm-3")
        );
        std::fs::create_dir_all(dir.path().join("dev/mapper")).unwrap();
        std::fs::write(dir.path().join("dev/mapper/mpatha"), "").unwrap();
        assert_eq!(
            disks
                .multipath_device(&paths, Duration::from_millis(10))
                .unwrap(),
            dir.path().join("dev/mapper/mpatha")
        );
        assert_eq!(
            disks.dm_name(Path::new("/dev/mapper/mpatha")).as_deref(),
            Some("dm-3")
        );
    }

    #[test]
    fn no_common_multipath_map_is_an_error_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let disks = tree(dir.path());
        // sdd is held by LVM, not multipath; sde by nothing.
        for paths in [
            vec![PathBuf::from("/dev/sdb"), PathBuf::from("/dev/sdd")],
            vec![PathBuf::from("/dev/sde")],
        ] {
            let e = disks
                .multipath_device(&paths, Duration::from_millis(200))
                .unwrap_err();
            assert!(matches!(e, IscsiError::NoMultipath { .. }), "{e}");
            assert!(e.to_string().contains("multipathd"), "{e}");
        }
        // A map that is gone is removed already.
        disks
            .remove_multipath(Path::new("/dev/mapper/nothing"))
            .unwrap();
    }
}
