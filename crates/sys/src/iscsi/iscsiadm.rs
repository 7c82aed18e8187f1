//! The real initiator: the host's `iscsiadm`.

use std::time::Duration;

use super::*;

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
