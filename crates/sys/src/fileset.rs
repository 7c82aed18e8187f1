//! Writing a set of files as one change: every file is written atomically, the previous
//! contents are kept in a backup directory (with a manifest) before anything is touched,
//! and a failure part-way puts back what was already written. A crash part-way leaves the
//! manifest, so `rollback` can still restore the host by hand.
//!
//! Unchanged files (same bytes and mode) are not rewritten, so applying the same set twice
//! changes nothing the second time and reports that.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil::{AtomicWriteError, atomic_write};

/// One file the set should contain.
#[derive(Debug, Clone)]
pub struct DesiredFile {
    /// Where to write it (already resolved under the host root).
    pub path: PathBuf,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub contents: Vec<u8>,
}

/// How a file compares with what is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Not there yet.
    New,
    /// There with other contents or another mode.
    Changed,
    /// Already exactly as wanted.
    Unchanged,
}

impl FileState {
    /// `new`, `changed` or `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::New => "new",
            FileState::Changed => "changed",
            FileState::Unchanged => "unchanged",
        }
    }
}

/// Failure of [`plan`], [`apply`] or [`rollback`], naming the file.
#[derive(Debug, thiserror::Error)]
pub enum FileSetError {
    /// Reading the current file failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Saving the backup failed; nothing was changed.
    #[error("backing up {} before changing it: {source}; nothing was changed", path.display())]
    Backup {
        /// The file or the backup directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing a file failed; the files already written were restored.
    #[error("writing {}: {source}; the {restored} file(s) already written were restored", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: AtomicWriteError,
        /// How many files were put back.
        restored: usize,
    },
    /// Writing failed and putting a file back failed too; the backup is left for `rollback`.
    #[error("writing {}: {write}; restoring {} also failed: {restore}; the backup in {} has every original", path.display(), restore_path.display(), backup.display())]
    RestoreFailed {
        /// The file whose write failed.
        path: PathBuf,
        /// Why.
        write: Box<AtomicWriteError>,
        /// The file that could not be put back.
        restore_path: PathBuf,
        /// Why.
        restore: String,
        /// The backup directory.
        backup: PathBuf,
    },
    /// The backup manifest is missing or malformed.
    #[error("backup manifest {}: {message}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The outcome of [`apply`].
#[derive(Debug)]
pub struct Applied {
    /// One state per desired file, in order (as it was before the write).
    pub states: Vec<FileState>,
    /// The backup directory, when anything was written.
    pub backup: Option<PathBuf>,
    /// Files removed ([`apply_and_remove`]).
    pub removed: Vec<PathBuf>,
}

/// Compare each desired file with the disk.
pub fn plan(files: &[DesiredFile]) -> Result<Vec<FileState>, FileSetError> {
    files.iter().map(state_of).collect()
}

fn state_of(f: &DesiredFile) -> Result<FileState, FileSetError> {
    let read_err = |source| FileSetError::Read {
        path: f.path.clone(),
        source,
    };
    let meta = match fs::metadata(&f.path) {
        Ok(m) => m,
        // ENOTDIR: a parent is a file, so this file cannot exist (writing it will fail).
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
            return Ok(FileState::New);
        }
        Err(e) => return Err(read_err(e)),
    };
    let same_mode = meta.permissions().mode() & 0o7777 == f.mode;
    let same_bytes = fs::read(&f.path).map_err(read_err)? == f.contents;
    Ok(if same_mode && same_bytes {
        FileState::Unchanged
    } else {
        FileState::Changed
    })
}

const MANIFEST: &str = "manifest";
const MANIFEST_HEADER: &str = "hybridlet-backup v1";

/// One manifest line: what to do with `path` on rollback.
struct Entry {
    path: PathBuf,
    /// `Some((backup file, mode))` when the file existed; `None` when it was new.
    original: Option<(PathBuf, u32)>,
}

/// Write every new or changed file, keeping the old ones in a fresh directory under
/// `backup_root` first. Parent directories are created with mode 0755.
pub fn apply(files: &[DesiredFile], backup_root: &Path) -> Result<Applied, FileSetError> {
    apply_and_remove(files, &[], backup_root)
}

/// [`apply`], and remove the files in `remove` that exist (kept in the backup too, so a
/// rollback puts them back). `Applied::removed` lists those removed.
pub fn apply_and_remove(
    files: &[DesiredFile],
    remove: &[PathBuf],
    backup_root: &Path,
) -> Result<Applied, FileSetError> {
    let states = plan(files)?;
    let doomed: Vec<&PathBuf> = remove.iter().filter(|p| p.is_file()).collect();
    if states.iter().all(|s| *s == FileState::Unchanged) && doomed.is_empty() {
        return Ok(Applied {
            states,
            backup: None,
            removed: Vec::new(),
        });
    }
    let backup = backup_dir(backup_root)?;
    let save = |i: usize, path: &Path| -> Result<Entry, FileSetError> {
        let saved = backup.join(format!("{i}.orig"));
        let backup_err = |source| FileSetError::Backup {
            path: path.to_path_buf(),
            source,
        };
        let mode = fs::metadata(path).map_err(backup_err)?.permissions().mode() & 0o7777;
        let bytes = fs::read(path).map_err(backup_err)?;
        atomic_write(&saved, &bytes, 0o600).map_err(|e| FileSetError::Backup {
            path: saved.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Entry {
            path: path.to_path_buf(),
            original: Some((saved, mode)),
        })
    };
    let mut entries = Vec::new();
    let paths = files.iter().map(|f| &f.path).chain(doomed.iter().copied());
    for path in paths {
        if path.to_string_lossy().contains(['\n', '\t']) {
            return Err(FileSetError::Backup {
                path: path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path contains a tab or newline",
                ),
            });
        }
    }
    for (i, (f, state)) in files.iter().zip(&states).enumerate() {
        match state {
            FileState::Unchanged => {}
            FileState::New => entries.push(Entry {
                path: f.path.clone(),
                original: None,
            }),
            FileState::Changed => entries.push(save(i, &f.path)?),
        }
    }
    let writes = entries.len();
    for (i, path) in doomed.iter().enumerate() {
        entries.push(save(files.len() + i, path)?);
    }
    write_manifest(&backup, &entries)?;

    let mut done: Vec<&Entry> = Vec::new();
    let changed = files
        .iter()
        .zip(&states)
        .filter(|(_, s)| **s != FileState::Unchanged);
    for ((f, _), entry) in changed.zip(&entries[..writes]) {
        let result = match f.path.parent() {
            Some(parent) => fs::create_dir_all(parent).map_err(|source| AtomicWriteError::Io {
                step: "create parent directories of",
                path: f.path.clone(),
                source,
            }),
            None => Ok(()),
        }
        .and_then(|()| atomic_write(&f.path, &f.contents, f.mode));
        if let Err(write) = result {
            return Err(undo(&done, &f.path, write, &backup));
        }
        done.push(entry);
    }
    for entry in &entries[writes..] {
        if let Err(source) = fs::remove_file(&entry.path) {
            let write = AtomicWriteError::Io {
                step: "remove",
                path: entry.path.clone(),
                source,
            };
            return Err(undo(&done, &entry.path, write, &backup));
        }
        done.push(entry);
    }
    Ok(Applied {
        states,
        backup: Some(backup),
        removed: doomed.into_iter().cloned().collect(),
    })
}

/// Put back what was already done after `write` failed on `path`.
fn undo(done: &[&Entry], path: &Path, write: AtomicWriteError, backup: &Path) -> FileSetError {
    let mut restored = 0;
    for entry in done.iter().rev() {
        if let Err(restore) = restore(entry) {
            return FileSetError::RestoreFailed {
                path: path.to_path_buf(),
                write: Box::new(write),
                restore_path: entry.path.clone(),
                restore,
                backup: backup.to_path_buf(),
            };
        }
        restored += 1;
    }
    FileSetError::Write {
        path: path.to_path_buf(),
        source: write,
        restored,
    }
}

fn backup_dir(root: &Path) -> Result<PathBuf, FileSetError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FileSetError::Backup { path, source }
    };
    fs::create_dir_all(root).map_err(err(root))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for n in 0..1000 {
        let dir = root.join(format!("{stamp}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(err(&dir))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&dir)(e)),
        }
    }
    Err(FileSetError::Backup {
        path: root.to_path_buf(),
        source: io::Error::other("no free backup directory name"),
    })
}

fn write_manifest(backup: &Path, entries: &[Entry]) -> Result<(), FileSetError> {
    let mut text = format!("{MANIFEST_HEADER}\n");
    for e in entries {
        match &e.original {
            Some((saved, mode)) => text.push_str(&format!(
                "changed\t{mode:o}\t{}\t{}\n",
                saved
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                e.path.display()
            )),
            None => text.push_str(&format!("new\t-\t-\t{}\n", e.path.display())),
        }
    }
    let path = backup.join(MANIFEST);
    atomic_write(&path, text.as_bytes(), 0o600).map_err(|e| FileSetError::Backup {
        path,
        source: io::Error::other(e.to_string()),
    })
}

fn restore(entry: &Entry) -> Result<(), String> {
    match &entry.original {
        Some((saved, mode)) => {
            let bytes = fs::read(saved).map_err(|e| format!("reading {}: {e}", saved.display()))?;
            atomic_write(&entry.path, &bytes, *mode).map_err(|e| e.to_string())
        }
        None => match fs::remove_file(&entry.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", entry.path.display())),
        },
    }
}

/// Put back every file recorded in the backup directory `backup` (from [`apply`]): changed
/// files get their old contents and mode, new files are removed. Returns how many files
/// were restored.
pub fn rollback(backup: &Path) -> Result<usize, FileSetError> {
    let path = backup.join(MANIFEST);
    let bad = |message: String| FileSetError::Manifest {
        path: path.clone(),
        message,
    };
    let text = fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(bad(format!("does not start with {MANIFEST_HEADER:?}")));
    }
    let mut entries = Vec::new();
    for (n, line) in lines.enumerate() {
        let fields: Vec<&str> = line.splitn(4, '\t').collect();
        let entry = match fields.as_slice() {
            ["changed", mode, saved, target] => Entry {
                path: PathBuf::from(target),
                original: Some((
                    backup.join(saved),
                    u32::from_str_radix(mode, 8)
                        .map_err(|_| bad(format!("line {}: bad mode", n + 2)))?,
                )),
            },
            ["new", _, _, target] => Entry {
                path: PathBuf::from(target),
                original: None,
            },
            _ => return Err(bad(format!("line {} is malformed", n + 2))),
        };
        entries.push(entry);
    }
    for entry in entries.iter().rev() {
        restore(entry).map_err(|message| FileSetError::Manifest {
            path: entry.path.clone(),
            message,
        })?;
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(dir: &Path, name: &str, contents: &str, mode: u32) -> DesiredFile {
        DesiredFile {
            path: dir.join(name),
            mode,
            contents: contents.as_bytes().to_vec(),
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn applies_once_then_reports_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        fs::write(dir.path().join("old"), "before").unwrap();
        let files = vec![
            file(dir.path(), "etc/new.conf", "a", 0o644),
            file(dir.path(), "old", "after", 0o600),
        ];
        let first = apply(&files, &backups).unwrap();
        assert_eq!(first.states, vec![FileState::New, FileState::Changed]);
        assert_eq!(fs::read_to_string(dir.path().join("old")).unwrap(), "after");
        assert_eq!(mode_of(&dir.path().join("old")), 0o600);
        assert_eq!(mode_of(&dir.path().join("etc/new.conf")), 0o644);

        let second = apply(&files, &backups).unwrap();
        assert_eq!(second.states, vec![FileState::Unchanged; 2]);
        assert!(second.backup.is_none(), "nothing written, no backup");

        // A mode change alone is a change.
        fs::set_permissions(dir.path().join("old"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(plan(&files).unwrap()[1], FileState::Changed);

        // The first backup restores the host as it was.
        assert_eq!(rollback(&first.backup.unwrap()).unwrap(), 2);
        assert_eq!(
            fs::read_to_string(dir.path().join("old")).unwrap(),
            "before"
        );
        assert!(!dir.path().join("etc/new.conf").exists());
    }

    #[test]
    fn a_failed_write_restores_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "original a").unwrap();
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(
            dir.path().join("blocker"),
            "a file where a directory is needed",
        )
        .unwrap();
        let files = vec![
            file(dir.path(), "a", "new a", 0o644),
            file(dir.path(), "b", "new b", 0o644),
            file(dir.path(), "blocker/c", "cannot be written", 0o644),
        ];
        let err = apply(&files, &dir.path().join("backups")).unwrap_err();
        match &err {
            FileSetError::Write { path, restored, .. } => {
                assert_eq!(path, &dir.path().join("blocker/c"));
                assert_eq!(*restored, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("blocker/c"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("a")).unwrap(),
            "original a"
        );
        assert_eq!(mode_of(&dir.path().join("a")), 0o640);
        assert!(!dir.path().join("b").exists());
    }

    #[test]
    fn removed_files_are_backed_up_and_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        fs::write(dir.path().join("gone"), "was here").unwrap();
        fs::set_permissions(dir.path().join("gone"), fs::Permissions::from_mode(0o640)).unwrap();
        let files = vec![file(dir.path(), "kept", "k", 0o644)];
        let remove = vec![dir.path().join("gone"), dir.path().join("never-was")];
        let applied = apply_and_remove(&files, &remove, &backups).unwrap();
        assert_eq!(applied.removed, vec![dir.path().join("gone")]);
        assert!(!dir.path().join("gone").exists());
        assert_eq!(fs::read_to_string(dir.path().join("kept")).unwrap(), "k");
        // Nothing left to do: no new backup.
        let again = apply_and_remove(&files, &remove, &backups).unwrap();
        assert!(again.backup.is_none() && again.removed.is_empty());

        assert_eq!(rollback(&applied.backup.unwrap()).unwrap(), 2);
        assert_eq!(
            fs::read_to_string(dir.path().join("gone")).unwrap(),
            "was here"
        );
        assert_eq!(mode_of(&dir.path().join("gone")), 0o640);
        assert!(!dir.path().join("kept").exists());
    }

    #[test]
    fn rollback_refuses_a_bad_manifest() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MANIFEST), "something else\n").unwrap();
        let err = rollback(dir.path()).unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
        assert!(rollback(&dir.path().join("missing")).is_err());
    }
}
