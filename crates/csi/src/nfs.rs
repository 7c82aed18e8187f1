//! NFS volume attributes (`volumeAttributes` of the PV), compatible with
//! csi-driver-nfs: `server`, `share`, optional `subDir` and `mountOptions`, plus our
//! `nfsvers`. Keys match case-insensitively.

use std::collections::HashMap;

use crate::CsiError;
use crate::validate;

/// A validated NFS volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsVolume {
    /// `server:/share[/subDir]`.
    pub source: String,
    /// Mount options (validated; never logged).
    pub options: Vec<String>,
}

fn get<'a>(context: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    context
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// Whether the attributes describe an NFS volume.
pub fn is_nfs(context: &HashMap<String, String>) -> bool {
    get(context, "server").is_some() || get(context, "share").is_some()
}

/// Build the mount from the attributes and the capability's mount flags.
pub fn volume(
    context: &HashMap<String, String>,
    mount_flags: &[String],
) -> Result<NfsVolume, CsiError> {
    let server = get(context, "server").ok_or_else(|| {
        CsiError::InvalidArgument("volumeAttributes.server is required for NFS volumes".into())
    })?;
    let share = get(context, "share").ok_or_else(|| {
        CsiError::InvalidArgument("volumeAttributes.share is required for NFS volumes".into())
    })?;
    let server = validate::nfs_server(server)?;
    let share = validate::export_path("share", share, true)?;
    let mut source = format!("{server}:{}", share.trim_end_matches('/'));
    if source.ends_with(':') {
        source.push('/');
    }
    if let Some(sub) = get(context, "subDir").filter(|s| !s.is_empty()) {
        let sub = validate::export_path("subDir", sub.trim_start_matches('/'), false)?;
        if !source.ends_with('/') {
            source.push('/');
        }
        source.push_str(sub.trim_end_matches('/'));
    }
    let mut options = Vec::new();
    for flag in mount_flags {
        options.push(validate::mount_option(flag)?);
    }
    if let Some(extra) = get(context, "mountOptions") {
        for opt in extra.split(',').filter(|o| !o.trim().is_empty()) {
            options.push(validate::mount_option(opt)?);
        }
    }
    if let Some(vers) = get(context, "nfsvers") {
        if !matches!(vers, "3" | "4" | "4.0" | "4.1" | "4.2") {
            return Err(CsiError::InvalidArgument(format!(
                "volumeAttributes.nfsvers {vers:?} must be one of 3, 4, 4.0, 4.1, 4.2"
            )));
        }
        options.retain(|o| !o.starts_with("nfsvers=") && !o.starts_with("vers="));
        options.push(format!("nfsvers={vers}"));
    }
    Ok(NfsVolume { source, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builds_source_and_options() {
        let v = volume(
            &ctx(&[
                ("server", "10.0.0.5"),
                ("share", "/export/"),
                ("subdir", "/team-a/vol1/"),
                ("mountOptions", "hard,timeo=600"),
                ("nfsvers", "4.1"),
            ]),
            &["noatime".to_string(), "vers=3".to_string()],
        )
        .unwrap();
        assert_eq!(v.source, "10.0.0.5:/export/team-a/vol1");
        assert_eq!(v.options, ["noatime", "hard", "timeo=600", "nfsvers=4.1"]);
        let root = volume(&ctx(&[("server", "fd00::5"), ("share", "/")]), &[]).unwrap();
        assert_eq!(root.source, "[fd00::5]:/");
    }

    #[test]
    fn names_the_bad_attribute() {
        let err = volume(
            &ctx(&[("server", "nfs"), ("share", "/x"), ("subDir", "../../etc")]),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("volumeAttributes.subDir"), "{err}");
        let err = volume(&ctx(&[("share", "/x")]), &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("volumeAttributes.server is required"),
            "{err}"
        );
        let err = volume(
            &ctx(&[
                ("server", "nfs"),
                ("share", "/x"),
                ("mountOptions", "rw,remount -o x"),
            ]),
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, CsiError::InvalidArgument(_)));
        let err = volume(
            &ctx(&[("server", "nfs"), ("share", "/x"), ("nfsvers", "5")]),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("nfsvers"), "{err}");
    }
}
