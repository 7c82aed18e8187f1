//! Unpacking a verified `.tgz` of programs into one directory (the CNI plugins into
//! `/opt/cni/bin`), fail-closed: only regular files at the archive's top level are taken;
//! a path with a directory, `..`, or an absolute name stops the unpacking before anything
//! is placed, and links, devices and FIFOs are refused the same way (an archive from a
//! mirror must not be able to write anywhere else). Each file is written beside its
//! destination, fsynced and renamed into place; files that already have the bytes are
//! left alone.

use std::io::Read;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::ArtifactError;

/// Largest single member accepted (the CNI plugins are a few MiB each).
const MAX_MEMBER: u64 = 256 << 20;

/// One unpacked file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Its path.
    pub path: PathBuf,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Whether it was written (false: it already had these bytes and mode).
    pub written: bool,
}

fn bad(archive: &Path, message: String) -> ArtifactError {
    ArtifactError::Archive {
        path: archive.to_path_buf(),
        message,
    }
}

/// The member's file name, if it is a plain top-level name.
fn top_level_name(raw: &Path) -> Option<String> {
    let text = raw.to_str()?;
    let name = text.trim_start_matches("./");
    (!name.is_empty()
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.starts_with(".hybridlet"))
    .then(|| name.to_string())
}

struct Member {
    name: String,
    mode: u32,
    bytes: Vec<u8>,
}

fn read_members(archive: &Path) -> Result<Vec<Member>, ArtifactError> {
    let file = std::fs::File::open(archive).map_err(|e| bad(archive, e.to_string()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut members = Vec::new();
    let entries = tar.entries().map_err(|e| bad(archive, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(archive, e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| bad(archive, e.to_string()))?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() && matches!(raw.to_str(), Some("." | "./")) {
            continue;
        }
        let Some(name) = top_level_name(&raw) else {
            return Err(bad(
                archive,
                format!(
                    "member {:?} is not a plain top-level file name; refusing the archive",
                    raw.display()
                ),
            ));
        };
        if !kind.is_file() {
            return Err(bad(
                archive,
                format!("member {name:?} is not a regular file ({kind:?}); refusing the archive"),
            ));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| bad(archive, e.to_string()))?;
        if size > MAX_MEMBER {
            return Err(bad(
                archive,
                format!("member {name:?} is {size} bytes; too large"),
            ));
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| bad(archive, e.to_string()))?;
        let mut bytes = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(archive, e.to_string()))?;
        members.push(Member { name, mode, bytes });
    }
    Ok(members)
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unpack the top-level files of the gzip'd tar `archive` into `dest` (created if
/// missing), programs 0755 and other files 0644. Every member is checked before the
/// first file is placed.
pub fn unpack_flat(archive: &Path, dest: &Path) -> Result<Vec<Unpacked>, ArtifactError> {
    let members = read_members(archive)?;
    std::fs::create_dir_all(dest).map_err(|e| bad(archive, format!("{}: {e}", dest.display())))?;
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let path = dest.join(&m.name);
        let sum = sha256(&m.bytes);
        let mode = if m.mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let same = crate::sha256_file(&path).ok().as_deref() == Some(sum.as_str())
            && std::fs::symlink_metadata(&path)
                .is_ok_and(|md| md.is_file() && md.permissions().mode() & 0o7777 == mode);
        if !same {
            // A temporary file beside it, renamed over it: rename(2) replaces a symlink
            // itself, never what it points to.
            hybridlet_sys::atomic_write(&path, &m.bytes, mode)
                .map_err(|e| bad(archive, format!("placing {}: {e}", path.display())))?;
        }
        out.push(Unpacked {
            path,
            sha256: sum,
            written: !same,
        });
    }
    if let Ok(d) = std::fs::File::open(dest) {
        let _ = d.sync_all();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A .tgz with `members` (path, bytes, mode, kind).
    fn tgz(dir: &Path, members: &[(&str, &[u8], u32, tar::EntryType)]) -> PathBuf {
        let path = dir.join("a.tgz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, bytes, mode, kind) in members {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(bytes.len() as u64);
            h.set_mode(*mode);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // Write the name raw: set_path refuses `..`, which is what is under test.
            let field = &mut h.as_old_mut().name;
            field[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *bytes).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    use tar::EntryType::{Directory, Regular, Symlink};

    #[test]
    fn unpacks_top_level_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = tgz(
            dir.path(),
            &[
                ("./", b"", 0o755, Directory),
                ("./bridge", b"#!bridge", 0o755, Regular),
                ("./host-local", b"#!host-local", 0o775, Regular),
                ("LICENSE", b"Apache-2.0", 0o644, Regular),
            ],
        );
        let dest = dir.path().join("opt/cni/bin");
        let got = unpack_flat(&a, &dest).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|u| u.written));
        assert_eq!(std::fs::read(dest.join("bridge")).unwrap(), b"#!bridge");
        let mode = |n: &str| {
            std::fs::metadata(dest.join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            (mode("bridge"), mode("host-local"), mode("LICENSE")),
            (0o755, 0o755, 0o644)
        );
        assert_eq!(got[0].sha256, sha256(b"#!bridge"));
        // Again: nothing written.
        assert!(unpack_flat(&a, &dest).unwrap().iter().all(|u| !u.written));
        // A changed file is put back.
        std::fs::write(dest.join("bridge"), "tampered").unwrap();
        let again = unpack_flat(&a, &dest).unwrap();
        assert_eq!(again.iter().filter(|u| u.written).count(), 1);
        assert!(!std::fs::read_dir(&dest).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with("hybridlet-part")
        }));
    }

    #[test]
    fn refuses_paths_out_of_the_directory_and_links_before_placing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("bin");
        for (bad_name, kind) in [
            ("../escape", Regular),
            ("/etc/cron.d/x", Regular),
            ("sub/dir", Regular),
            ("link", Symlink),
        ] {
            let a = tgz(
                dir.path(),
                &[
                    ("./ok", b"ok", 0o755, Regular),
                    (bad_name, b"x", 0o755, kind),
                ],
            );
            let e = unpack_flat(&a, &dest).unwrap_err().to_string();
            assert!(e.contains("refusing the archive"), "{bad_name}: {e}");
            assert!(
                !dest.join("ok").exists(),
                "{bad_name}: placed a file before refusing"
            );
        }
        assert!(!dir.path().join("escape").exists());
        // Not an archive at all.
        let junk = dir.path().join("junk.tgz");
        std::fs::write(&junk, "not gzip").unwrap();
        assert!(unpack_flat(&junk, &dest).is_err());
    }
}
