//! The real block devices: blkid, mkfs, fsck, resize tools, multipath, sysfs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

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
