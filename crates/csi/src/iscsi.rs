//! iSCSI volume attributes (`volumeAttributes` of the PV, compatible with the in-tree and
//! csi-driver-iscsi names) and the per-volume stage records.
//!
//! Attributes: `targetPortal` (an IP, optionally `:port`, default 3260), `iqn`, `lun`,
//! `fsType` (`ext4` default, `xfs`), `discoveryCHAPAuth` / `sessionCHAPAuth` (`"true"`).
//! CHAP credentials come only from the node-stage secrets (`node.session.auth.username`,
//! `node.session.auth.password`, optional `..._in` for mutual CHAP, and
//! `discovery.sendtargets.auth.username` / `...password`), never from the PV, and are never
//! logged or written to disk.
//!
//! Multipath: `portals` lists more portals of the same target (a JSON array as
//! csi-driver-iscsi takes it, `["10.0.1.5:3260", "10.0.2.5"]`, or a comma-separated
//! list; at most 8). Stage logs in through every portal, waits for the path disks, and
//! uses the dm-multipath map multipathd assembles over them; unstage removes the map
//! first, then the paths.
//!
//! A record per staged volume (`<stateDir>/iscsi/<volume>.conf`, written atomically, no
//! secrets) keeps the target, portal and LUN from stage time, so unstage logs out of the
//! right target even when the device is already gone, and only when no other staged
//! volume uses the same target.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hybridlet_sys::iscsi::{Chap, IscsiTarget};

use crate::CsiError;

/// A validated iSCSI volume.
#[derive(Debug, Clone)]
pub struct IscsiVolume {
    /// Target and portal (`targetPortal`).
    pub target: IscsiTarget,
    /// More portals of the same target (`portals`): more than none means multipath.
    pub extra_paths: Vec<IscsiTarget>,
    /// LUN number.
    pub lun: u32,
    /// Filesystem for mount access (`ext4` or `xfs`).
    pub fs_type: String,
    /// Session CHAP (from the node-stage secrets).
    pub session_chap: Option<Chap>,
    /// Run SendTargets discovery with CHAP before logging in.
    pub discovery_chap: Option<Chap>,
}

fn get<'a>(map: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// Whether the attributes describe an iSCSI volume.
pub fn is_iscsi(context: &HashMap<String, String>) -> bool {
    get(context, "targetPortal").is_some() || get(context, "iqn").is_some()
}

/// `ip`, `ip:port`, `[v6]` or `[v6]:port` → `ip:port` as udev names it in by-path links.
pub fn portal(value: &str) -> Result<String, CsiError> {
    let bad = || {
        CsiError::InvalidArgument(format!(
            "volumeAttributes.targetPortal {value:?} must be an IP address with an optional :port (by-path device links name the IP, so host names are not accepted)"
        ))
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => "3260",
            p => p.strip_prefix(':').ok_or_else(bad)?,
        };
        (h, port)
    } else if value.matches(':').count() > 1 {
        (value, "3260") // bare IPv6
    } else {
        value.split_once(':').unwrap_or((value, "3260"))
    };
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    Ok(match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    })
}

/// The `portals` attribute: a JSON array of strings or a comma-separated list.
fn portal_list(value: &str) -> Result<Vec<String>, CsiError> {
    let value = value.trim();
    let items: Vec<String> = if value.starts_with('[') {
        serde_json::from_str::<Vec<String>>(value).map_err(|e| {
            CsiError::InvalidArgument(format!(
                "volumeAttributes.portals {value:?} is not a JSON list of portals: {e}"
            ))
        })?
    } else {
        value
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    };
    if items.len() > 8 {
        return Err(CsiError::InvalidArgument(format!(
            "volumeAttributes.portals lists {} portals; at most 8 paths are supported",
            items.len()
        )));
    }
    items
        .iter()
        .map(|p| {
            portal(p).map_err(|_| {
                CsiError::InvalidArgument(format!(
                    "volumeAttributes.portals entry {p:?} must be an IP address with an optional :port"
                ))
            })
        })
        .collect()
}

/// An iSCSI qualified name (`iqn.YYYY-MM.reversed.domain[:suffix]`, `eui.` + 16 hex
/// digits, or `naa.` + 16 or 32 hex digits), at most 223 bytes, lower case.
pub fn iqn(value: &str) -> Result<String, CsiError> {
    let bad =
        |why: &str| CsiError::InvalidArgument(format!("volumeAttributes.iqn {value:?} {why}"));
    if value.is_empty() || value.len() > 223 {
        return Err(bad("must be 1 to 223 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':'))
    {
        return Err(bad(
            "may contain only lower-case letters, digits, '.', '-' and ':'",
        ));
    }
    let ok = if let Some(rest) = value.strip_prefix("iqn.") {
        let date = rest.get(..7).unwrap_or("");
        date.len() == 7
            && date[..4].chars().all(|c| c.is_ascii_digit())
            && &date[4..5] == "-"
            && date[5..].chars().all(|c| c.is_ascii_digit())
            && rest.get(7..8) == Some(".")
            && rest.len() > 8
    } else if let Some(hex) = value.strip_prefix("eui.") {
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit())
    } else if let Some(hex) = value.strip_prefix("naa.") {
        matches!(hex.len(), 16 | 32) && hex.chars().all(|c| c.is_ascii_hexdigit())
    } else {
        false
    };
    if ok {
        Ok(value.to_string())
    } else {
        Err(bad(
            "is not an iqn.YYYY-MM.domain[:name], eui. or naa. name",
        ))
    }
}

fn chap_from(
    secrets: &HashMap<String, String>,
    user_key: &str,
    pass_key: &str,
    mutual: Option<(&str, &str)>,
    because: &str,
) -> Result<Chap, CsiError> {
    let need = |key: &str| {
        let v = get(secrets, key).filter(|v| !v.is_empty()).ok_or_else(|| {
            CsiError::InvalidArgument(format!(
                "{because} is \"true\" but the node-stage secret has no {key} (set nodeStageSecretRef on the PV)"
            ))
        })?;
        if v.len() > 255 || v.contains(['\n', '\r', '\0']) {
            return Err(CsiError::InvalidArgument(format!(
                "node-stage secret {key} must be one line of at most 255 bytes"
            )));
        }
        Ok(v.to_string())
    };
    let mut chap = Chap {
        username: need(user_key)?,
        password: need(pass_key)?,
        username_in: None,
        password_in: None,
    };
    if let Some((u, p)) = mutual
        && (get(secrets, u).is_some() || get(secrets, p).is_some())
    {
        chap.username_in = Some(need(u)?);
        chap.password_in = Some(need(p)?);
    }
    Ok(chap)
}

fn flag(context: &HashMap<String, String>, key: &str) -> Result<bool, CsiError> {
    match get(context, key) {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(CsiError::InvalidArgument(format!(
            "volumeAttributes.{key} {other:?} must be \"true\" or \"false\""
        ))),
    }
}

/// Build the volume from the attributes, the node-stage secrets and the capability's
/// `fs_type` (which wins over the `fsType` attribute).
pub fn volume(
    context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
    cap_fs_type: &str,
) -> Result<IscsiVolume, CsiError> {
    let required = |key: &str| {
        get(context, key).filter(|v| !v.is_empty()).ok_or_else(|| {
            CsiError::InvalidArgument(format!(
                "volumeAttributes.{key} is required for iSCSI volumes"
            ))
        })
    };
    let target = IscsiTarget {
        portal: portal(required("targetPortal")?)?,
        iqn: iqn(required("iqn")?)?,
    };
    let mut extra_paths: Vec<IscsiTarget> = Vec::new();
    for p in portal_list(get(context, "portals").unwrap_or(""))? {
        let t = IscsiTarget {
            portal: p,
            iqn: target.iqn.clone(),
        };
        if t != target && !extra_paths.contains(&t) {
            extra_paths.push(t);
        }
    }
    let lun_text = required("lun")?;
    let lun = lun_text
        .parse::<u32>()
        .ok()
        .filter(|l| *l <= 16383)
        .ok_or_else(|| {
            CsiError::InvalidArgument(format!(
                "volumeAttributes.lun {lun_text:?} must be a number from 0 to 16383"
            ))
        })?;
    let fs_type = match (cap_fs_type, get(context, "fsType")) {
        ("", None | Some("")) => "ext4",
        ("", Some(f)) => f,
        (f, _) => f,
    };
    if !matches!(fs_type, "ext4" | "xfs") {
        return Err(CsiError::InvalidArgument(format!(
            "fsType {fs_type:?} is not supported for iSCSI volumes: use ext4 or xfs"
        )));
    }
    let session_chap = if flag(context, "sessionCHAPAuth")? {
        Some(chap_from(
            secrets,
            "node.session.auth.username",
            "node.session.auth.password",
            Some((
                "node.session.auth.username_in",
                "node.session.auth.password_in",
            )),
            "volumeAttributes.sessionCHAPAuth",
        )?)
    } else {
        None
    };
    let discovery_chap = if flag(context, "discoveryCHAPAuth")? {
        Some(chap_from(
            secrets,
            "discovery.sendtargets.auth.username",
            "discovery.sendtargets.auth.password",
            None,
            "volumeAttributes.discoveryCHAPAuth",
        )?)
    } else {
        None
    };
    Ok(IscsiVolume {
        target,
        extra_paths,
        lun,
        fs_type: fs_type.to_string(),
        session_chap,
        discovery_chap,
    })
}

/// What stage recorded about a volume (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRecord {
    /// The CSI volume ID.
    pub volume_id: String,
    /// Target and portal.
    pub target: IscsiTarget,
    /// LUN.
    pub lun: u32,
    /// Filesystem (mount access).
    pub fs_type: String,
    /// Raw block access.
    pub block: bool,
    /// The device at stage time (e.g. `/dev/sdb`, or the multipath map
    /// `/dev/mapper/mpatha`); may be empty before the device appeared.
    pub device: PathBuf,
    /// Multipath: every path (the first is `target`) and its disk once it appeared.
    pub paths: Vec<(IscsiTarget, PathBuf)>,
}

impl StageRecord {
    /// Whether the volume is used through a dm-multipath map.
    pub fn multipath(&self) -> bool {
        self.paths.len() > 1
    }

    /// Every target (portal) the volume is logged in through.
    pub fn targets(&self) -> Vec<IscsiTarget> {
        if self.paths.is_empty() {
            vec![self.target.clone()]
        } else {
            self.paths.iter().map(|(t, _)| t.clone()).collect()
        }
    }
}

/// The records of staged iSCSI volumes, one file each.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

fn file_name(volume_id: &str) -> String {
    // Volume IDs may hold '/', '#', ':' ...; keep [A-Za-z0-9._-] and escape the rest.
    let mut name = String::with_capacity(volume_id.len() + 5);
    for b in volume_id.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b'-') && !(name.is_empty() && b == b'.')
        {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name.push_str(".conf");
    name
}

impl Records {
    /// Records under `dir` (created on first write, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(file_name(volume_id))
    }

    /// Save (atomically) the record of a volume.
    pub fn save(&self, r: &StageRecord) -> Result<(), CsiError> {
        hybridlet_sys::ensure_dir(&self.dir, 0o700)
            .map_err(|e| CsiError::Internal(format!("creating {}: {e}", self.dir.display())))?;
        let mut text = format!(
            "version=1\nvolumeId={}\nportal={}\niqn={}\nlun={}\nfsType={}\nblock={}\ndevice={}\n",
            r.volume_id,
            r.target.portal,
            r.target.iqn,
            r.lun,
            r.fs_type,
            r.block,
            r.device.display()
        );
        if !r.paths.is_empty() {
            // `portal|device;...`: neither a portal nor a device path holds '|' or ';'.
            let paths: Vec<String> = r
                .paths
                .iter()
                .map(|(t, d)| format!("{}|{}", t.portal, d.display()))
                .collect();
            text.push_str(&format!("paths={}\n", paths.join(";")));
        }
        hybridlet_sys::atomic_write(&self.path(&r.volume_id), text.as_bytes(), 0o600)
            .map_err(|e| CsiError::Internal(format!("saving the stage record: {e}")))
    }

    /// The record of a volume, if it is staged.
    pub fn load(&self, volume_id: &str) -> Result<Option<StageRecord>, CsiError> {
        let path = self.path(volume_id);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).map(Some).ok_or_else(|| {
                CsiError::Internal(format!(
                    "stage record {} is malformed; move it aside to retry",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CsiError::Internal(format!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }

    /// Forget a volume.
    pub fn remove(&self, volume_id: &str) -> Result<(), CsiError> {
        match std::fs::remove_file(self.path(volume_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CsiError::Internal(format!(
                "removing the stage record: {e}"
            ))),
        }
    }

    /// Every record (unreadable ones are skipped: they name no target we could match).
    pub fn all(&self) -> Vec<StageRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "conf"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| parse(&t))
            .collect()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn parse(text: &str) -> Option<StageRecord> {
    let fields: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    Some(StageRecord {
        volume_id: fields.get("volumeId")?.to_string(),
        target: IscsiTarget {
            portal: fields.get("portal")?.to_string(),
            iqn: fields.get("iqn")?.to_string(),
        },
        lun: fields.get("lun")?.parse().ok()?,
        fs_type: fields.get("fsType").unwrap_or(&"ext4").to_string(),
        block: fields.get("block") == Some(&"true"),
        device: PathBuf::from(fields.get("device").unwrap_or(&"")),
        paths: match fields.get("paths") {
            None => Vec::new(),
            Some(list) => list
                .split(';')
                .map(|p| {
                    let (portal, device) = p.split_once('|')?;
                    Some((
                        IscsiTarget {
                            portal: portal.to_string(),
                            iqn: fields.get("iqn")?.to_string(),
                        },
                        PathBuf::from(device),
                    ))
                })
                .collect::<Option<Vec<_>>>()?,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn portals_iqns_and_luns_are_validated() {
        assert_eq!(portal("10.0.0.5").unwrap(), "10.0.0.5:3260");
        assert_eq!(portal("10.0.0.5:3261").unwrap(), "10.0.0.5:3261");
        assert_eq!(portal("fd00::5").unwrap(), "[fd00::5]:3260");
        assert_eq!(portal("[fd00::5]:3262").unwrap(), "[fd00::5]:3262");
        for bad in [
            "san.example.com",
            "10.0.0.5:0",
            "10.0.0.5:x",
            "10.0.0.5 -o",
            "[fd00::5",
            "",
        ] {
            assert!(portal(bad).is_err(), "{bad}");
        }
        assert!(iqn("iqn.2024-01.io.example:lun-test").is_ok());
        assert!(iqn("eui.02004567a425678d").is_ok());
        for bad in [
            "iqn.2024-1.io.x",
            "IQN.2024-01.io.x",
            "iqn.2024-01.io.x;rm",
            "iqn.2024-01.",
            "x",
            "iqn.2024-01.a b",
        ] {
            assert!(iqn(bad).is_err(), "{bad}");
        }
        let ctx = map(&[
            ("targetPortal", "127.0.0.1"),
            ("iqn", "iqn.2024-01.io.example:t"),
            ("lun", "99999"),
        ]);
        assert!(
            volume(&ctx, &HashMap::new(), "")
                .unwrap_err()
                .to_string()
                .contains("lun")
        );
    }

    #[test]
    fn chap_comes_from_secrets_and_is_never_shown() {
        let ctx = map(&[
            ("targetPortal", "127.0.0.1:3260"),
            ("iqn", "iqn.2024-01.io.example:t"),
            ("lun", "0"),
            ("sessionCHAPAuth", "true"),
        ]);
        let err = volume(&ctx, &map(&[("node.session.auth.username", "u")]), "").unwrap_err();
        assert!(
            err.to_string().contains("node.session.auth.password"),
            "{err}"
        );
        let v = volume(
            &ctx,
            &map(&[
                ("node.session.auth.username", "u"),
                ("node.session.auth.password", "hunter22"),
            ]),
            "xfs",
        )
        .unwrap();
        assert_eq!(v.fs_type, "xfs");
        assert!(!format!("{v:?}").contains("hunter22"));
        let mut multi = ctx.clone();
        multi.insert("sessionCHAPAuth".into(), "false".into());
        multi.insert(
            "portals".into(),
            "[\"10.0.0.6:3260\", \"127.0.0.1\", \"[fd00::6]\"]".into(),
        );
        let v = volume(&multi, &HashMap::new(), "").unwrap();
        // targetPortal itself is not a second path.
        let extra: Vec<&str> = v.extra_paths.iter().map(|t| t.portal.as_str()).collect();
        assert_eq!(extra, ["10.0.0.6:3260", "[fd00::6]:3260"]);
        assert!(v.extra_paths.iter().all(|t| t.iqn == v.target.iqn));
        multi.insert("portals".into(), "10.0.0.6, 10.0.0.7:3261".into());
        assert_eq!(
            volume(&multi, &HashMap::new(), "")
                .unwrap()
                .extra_paths
                .len(),
            2
        );
        for bad in [
            "[\"san.example.com\"]",
            "10.0.0.6;rm",
            "[1, 2]",
            "[\"10.0.0.6\"",
        ] {
            multi.insert("portals".into(), bad.into());
            assert_eq!(
                volume(&multi, &HashMap::new(), "").unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
        let many: Vec<String> = (1..=9).map(|i| format!("\"10.0.0.{i}\"")).collect();
        multi.insert("portals".into(), format!("[{}]", many.join(",")));
        assert!(
            volume(&multi, &HashMap::new(), "")
                .unwrap_err()
                .to_string()
                .contains("at most 8")
        );
        let mut bad_fs = ctx.clone();
        bad_fs.insert("sessionCHAPAuth".into(), "false".into());
        assert!(volume(&bad_fs, &HashMap::new(), "btrfs").is_err());
    }

    #[test]
    fn records_round_trip_and_escape_volume_ids() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path().join("iscsi"));
        let r = StageRecord {
            volume_id: "../etc/passwd#x".into(),
            target: IscsiTarget {
                portal: "127.0.0.1:3260".into(),
                iqn: "iqn.2024-01.io.example:t".into(),
            },
            lun: 2,
            fs_type: "ext4".into(),
            block: true,
            device: "/dev/sdb".into(),
            paths: Vec::new(),
        };
        records.save(&r).unwrap();
        assert_eq!(records.load(&r.volume_id).unwrap(), Some(r.clone()));
        let names: Vec<_> = std::fs::read_dir(records.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(!names[0].to_string_lossy().contains('/'));
        assert_eq!(records.all(), vec![r.clone()]);
        records.remove(&r.volume_id).unwrap();
        records.remove(&r.volume_id).unwrap();
        assert_eq!(records.load(&r.volume_id).unwrap(), None);

        // Multipath: the paths and their disks survive, IPv6 portals included.
        let mut m = r.clone();
        m.device = "/dev/mapper/mpatha".into();
        m.paths = vec![
            (m.target.clone(), "/dev/sdb".into()),
            (
                IscsiTarget {
                    portal: "[fd00::6]:3260".into(),
                    iqn: m.target.iqn.clone(),
                },
                PathBuf::new(),
            ),
        ];
        records.save(&m).unwrap();
        let back = records.load(&m.volume_id).unwrap().unwrap();
        assert_eq!(back, m);
        assert!(back.multipath());
        assert_eq!(back.targets().len(), 2);
        assert_eq!(r.targets(), vec![r.target.clone()]);
    }
}
