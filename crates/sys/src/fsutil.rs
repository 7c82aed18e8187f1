use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Failure of [`atomic_write`], naming the step and the file.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// The target has no parent directory or no file name.
    #[error("{path:?} is not a file path")]
    NotAFilePath {
        /// The target path.
        path: PathBuf,
    },
    /// One of the IO steps failed.
    #[error("{step} {path:?}: {source}")]
    Io {
        /// What was being done ("create", "write", "fsync", "rename", ...).
        step: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AtomicWriteError {
    move |source| AtomicWriteError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Replace `path` with `contents` so that a crash at any point leaves either the old or
/// the new file, never a torn one: write a temporary file beside it, fsync it, rename it
/// over the target, then fsync the directory so the rename itself survives power loss.
///
/// The file gets permission bits `mode` (e.g. `0o600` for state holding secrets).
pub fn atomic_write(path: &Path, contents: &[u8], mode: u32) -> Result<(), AtomicWriteError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(AtomicWriteError::NotAFilePath {
            path: path.to_path_buf(),
        });
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // The mode passed to open is filtered by the umask; set it explicitly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err("rename", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))
    })();
    if result.is_err() {
        // Best effort: do not leave temporary files behind; the original error matters more.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Create `path` (and missing parents) if needed and give it permission bits `mode`.
/// An existing non-directory at `path` is an error.
pub fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(path)?,
        Err(e) => return Err(e),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Read the kernel's boot ID (a UUID that changes on every boot) from
/// `<root>/proc/sys/kernel/random/boot_id`. State that does not survive a reboot (VF
/// bindings, `/run`) is keyed on it.
pub fn read_boot_id(proc_root: &Path) -> io::Result<String> {
    let raw = fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))?;
    let id = raw.trim();
    if id.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty boot_id"));
    }
    Ok(id.to_string())
}

/// This machine's host name, lower-cased (the kernel's, from `/proc`: the name the
/// kubelet registers when nothing else names the node).
pub fn host_name() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        atomic_write(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        atomic_write(&path, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "temporary file left behind: {leftovers:?}"
        );
    }

    #[test]
    fn missing_directory_is_reported_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope/state.json");
        let err = atomic_write(&path, b"x", 0o600).unwrap_err();
        assert!(err.to_string().starts_with("create "), "{err}");
    }

    #[test]
    fn ensure_dir_creates_and_fixes_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b");
        ensure_dir(&path, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&path, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::write(dir.path().join("f"), "").unwrap();
        assert!(ensure_dir(&dir.path().join("f"), 0o700).is_err());
    }

    #[test]
    fn boot_id_read_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sys/kernel/random")).unwrap();
        fs::write(dir.path().join("sys/kernel/random/boot_id"), "abc-123\n").unwrap();
        assert_eq!(read_boot_id(dir.path()).unwrap(), "abc-123");
        fs::write(dir.path().join("sys/kernel/random/boot_id"), "\n").unwrap();
        assert!(read_boot_id(dir.path()).is_err());
    }
}
