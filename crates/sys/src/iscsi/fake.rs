//! An initiator and disks in memory, for tests of what uses them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::{Chap, DiskFormat, Disks, Initiator, IscsiError, IscsiTarget};

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
