//! Checks on everything that comes from outside (the kubelet and the PV's attributes)
//! before it reaches a mount call.

use std::path::{Component, Path, PathBuf};

use crate::CsiError;

/// Volume IDs: required, at most 128 bytes (the CSI size limit), no control characters.
pub fn volume_id(id: &str) -> Result<&str, CsiError> {
    if id.is_empty() {
        return Err(CsiError::InvalidArgument("volume_id is required".into()));
    }
    if id.len() > 128 || id.chars().any(char::is_control) {
        return Err(CsiError::InvalidArgument(format!(
            "volume_id must be at most 128 bytes without control characters (got {} bytes)",
            id.len()
        )));
    }
    Ok(id)
}

/// Paths from the kubelet: required, absolute, no `..`, no control characters, at most
/// 4096 bytes.
pub fn host_path(field: &str, value: &str) -> Result<PathBuf, CsiError> {
    if value.is_empty() {
        return Err(CsiError::InvalidArgument(format!("{field} is required")));
    }
    let path = Path::new(value);
    if !path.is_absolute()
        || value.len() > 4096
        || value.chars().any(char::is_control)
        || path.components().any(|c| c == Component::ParentDir)
    {
        return Err(CsiError::InvalidArgument(format!(
            "{field} {value:?} must be an absolute path without '..' or control characters"
        )));
    }
    Ok(path.to_path_buf())
}

/// `volume_path` of NodeGetVolumeStats and NodeExpandVolume. Empty is INVALID_ARGUMENT
/// (the field is required); a path at which none of our volumes can be (relative, with
/// `..` or control characters) is NOT_FOUND, as the spec's "volume does not exist on the
/// specified path" and csi-driver-nfs answer, and is never looked at.
pub fn volume_path(volume_id: &str, value: &str) -> Result<PathBuf, CsiError> {
    if value.is_empty() {
        return Err(CsiError::InvalidArgument("volume_path is required".into()));
    }
    host_path("volume_path", value)
        .map_err(|_| CsiError::NotFound(format!("volume {volume_id} is not mounted at {value:?}")))
}

/// One mount option (from the PV's mountOptions or the mountOptions attribute): no commas
/// (which would smuggle in more options), spaces, control characters or leading '-'.
pub fn mount_option(option: &str) -> Result<String, CsiError> {
    let option = option.trim();
    let ok = !option.is_empty()
        && option.len() <= 256
        && !option.starts_with('-')
        && option
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.=:/@+-".contains(c));
    if !ok {
        // Options can hold secrets: say which rule failed, not the value.
        return Err(CsiError::InvalidArgument(format!(
            "a mount option of {} bytes contains characters other than letters, digits and _.=:/@+- or starts with '-'",
            option.len()
        )));
    }
    Ok(option.to_string())
}

/// An NFS server: a DNS name, an IPv4 address, or an IPv6 address (bare or in brackets).
/// Returns the form `mount.nfs` expects (IPv6 in brackets).
pub fn nfs_server(server: &str) -> Result<String, CsiError> {
    let bare = server.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    let dns_ok = !server.is_empty()
        && server.len() <= 253
        && server.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !dns_ok {
        return Err(CsiError::InvalidArgument(format!(
            "volumeAttributes.server {server:?} is not a host name or IP address"
        )));
    }
    Ok(server.to_ascii_lowercase())
}

/// An export path or sub-directory: no `..`, commas, whitespace or control characters.
pub fn export_path(field: &str, value: &str, absolute: bool) -> Result<String, CsiError> {
    let bad = value.is_empty()
        || value.len() > 1024
        || (absolute && !value.starts_with('/'))
        || value.split('/').any(|seg| seg == "..")
        || value
            .chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(CsiError::InvalidArgument(format!(
            "volumeAttributes.{field} {value:?} must be {}a path without '..', commas or spaces",
            if absolute { "an absolute " } else { "" }
        )));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_injection_and_traversal() {
        assert!(mount_option("nfsvers=4.1").is_ok());
        assert!(mount_option("hard").is_ok());
        for bad in ["a,b", "-o", "x y", "", "rw\0", "sec=krb5;rm"] {
            assert!(mount_option(bad).is_err(), "{bad:?}");
        }
        assert_eq!(nfs_server("NFS.Example.com").unwrap(), "nfs.example.com");
        assert_eq!(nfs_server("fd00::1").unwrap(), "[fd00::1]");
        assert_eq!(nfs_server("[fd00::1]").unwrap(), "[fd00::1]");
        for bad in ["", "a b", "srv:/x", "-o", "a..b"] {
            assert!(nfs_server(bad).is_err(), "{bad:?}");
        }
        assert!(export_path("share", "/export/vol1", true).is_ok());
        for bad in ["export", "/a/../b", "/a,b", "/a b"] {
            assert!(export_path("share", bad, true).is_err(), "{bad:?}");
        }
        assert!(host_path("target_path", "relative/x").is_err());
        assert!(host_path("target_path", "/var/lib/kubelet/../../etc").is_err());
        assert!(volume_id(&"x".repeat(129)).is_err());
    }
}
