//! Registry logins from root-only files, and the login each pull attempt carries.
//!
//! containerd gives a CRI login to every host a pull reaches (mirrors included) unless
//! `server_address` names one host, in which case only that host gets it (containerd's
//! CRI `ParseAuth`). So a mirror's login is sent with the mirror's host, and the
//! registry's with the registry's: a Harbor robot password never reaches ECR or Docker
//! Hub, and an ECR token never reaches Harbor.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use hybridlet_config::{ImageRef, ImagesSpec, RegistryMirror};
use hybridlet_cri::RegistryAuth;

use crate::ImagesError;

/// A user name and password. `Debug` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// User (`robot$ml+puller`).
    pub username: String,
    /// Password or robot secret.
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Read a login file: JSON `{"username", "password"}` or Harbor's robot export
/// `{"name", "secret"}`. Refused when group or others may read or write it.
pub fn read_login(path: &Path) -> Result<Login, ImagesError> {
    let fail = |message: String| ImagesError::Login {
        file: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {mode:04o} lets others read it; a login file must be root's alone: chmod 600 {}",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    // Never echo the content: serde's message may quote it, so only its position is kept.
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        fail(format!(
            "is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let field = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| value.get(n).and_then(serde_json::Value::as_str))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    match (field(["username", "name"]), field(["password", "secret"])) {
        (Some(username), Some(password)) => Ok(Login { username, password }),
        _ => Err(fail(
            "needs {\"username\": …, \"password\": …} (or a Harbor robot export with name and secret)"
                .into(),
        )),
    }
}

/// How one pull attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The login, if any.
    pub auth: Option<RegistryAuth>,
    /// What it tries, for messages: `mirror harbor.example.com`, `registry …`.
    pub via: String,
}

/// `server_address` for a host: containerd parses it as a URL and compares its host with
/// the host it is about to send the login to (`ParseAuth` in its CRI plugin), so a bare
/// `HOST:PORT` matches nothing (and an IP with a port does not even parse).
pub fn server_address(host: &str) -> String {
    format!("https://{host}")
}

/// The host of a mirror endpoint URL (`https://harbor.example.com/v2/proxy` →
/// `harbor.example.com`).
pub fn endpoint_host(endpoint: &str) -> &str {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// The mirrors containerd uses for `registry` (its own `hosts.toml`, else `_default`).
pub fn mirrors_for<'a>(
    registry: &str,
    mirrors: &'a [RegistryMirror],
) -> Option<&'a RegistryMirror> {
    mirrors
        .iter()
        .find(|m| m.registry.eq_ignore_ascii_case(registry))
        .or_else(|| mirrors.iter().find(|m| m.registry == "_default"))
}

/// The login configured for `host`, read from its file.
pub fn login_for(spec: &ImagesSpec, host: &str) -> Option<Result<Login, ImagesError>> {
    spec.credentials
        .iter()
        .find(|c| c.registry.eq_ignore_ascii_case(host))
        .map(|c| read_login(Path::new(&c.file)))
}

/// The attempts for pulling `image`: first through each mirror that has a login of its
/// own (that login, for that host only), then with the registry's login (`registry_login`
/// if given, such as an ECR token, else the configured one) for the registry only, or with
/// none. containerd still tries the mirrors first on that last attempt, without a login.
pub fn attempts(
    image: &ImageRef,
    spec: &ImagesSpec,
    mirrors: &[RegistryMirror],
    registry_login: Option<RegistryAuth>,
) -> Result<Vec<Attempt>, ImagesError> {
    let mut out = Vec::new();
    if let Some(mirror) = mirrors_for(&image.registry, mirrors) {
        for endpoint in &mirror.endpoints {
            let host = endpoint_host(endpoint);
            if let Some(login) = login_for(spec, host) {
                let login = login?;
                out.push(Attempt {
                    auth: Some(RegistryAuth {
                        username: login.username,
                        password: login.password,
                        server_address: server_address(host),
                        ..RegistryAuth::default()
                    }),
                    via: format!("mirror {host}"),
                });
            }
        }
    }
    let own = match registry_login {
        Some(auth) => Some(auth),
        None => login_for(spec, &image.registry)
            .transpose()?
            .map(|login| RegistryAuth {
                username: login.username,
                password: login.password,
                ..RegistryAuth::default()
            }),
    };
    out.push(Attempt {
        auth: own.map(|mut auth| {
            auth.server_address = server_address(&image.registry);
            auth
        }),
        via: format!("registry {}", image.registry),
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_config::RegistryCredentials;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn login_files_are_read_only_when_private() {
        let dir = tempfile::tempdir().unwrap();
        let robot = write(
            dir.path(),
            "robot.json",
            r#"{"id": 7, "name": "robot$ml+puller", "secret": "Zq8sEcReT", "expires_at": -1}"#,
            0o600,
        );
        let login = read_login(Path::new(&robot)).unwrap();
        assert_eq!(login.username, "robot$ml+puller");
        assert!(!format!("{login:?}").contains("Zq8sEcReT"));
        let open = write(
            dir.path(),
            "open.json",
            r#"{"username":"u","password":"p"}"#,
            0o644,
        );
        let err = read_login(Path::new(&open)).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
        let broken = write(
            dir.path(),
            "broken.json",
            r#"{"username":"u","password":"Zq8sEcReT""#,
            0o600,
        );
        let err = read_login(Path::new(&broken)).unwrap_err().to_string();
        assert!(
            err.contains("not JSON") && !err.contains("Zq8sEcReT"),
            "{err}"
        );
        let empty = write(dir.path(), "empty.json", r#"{"username":"u"}"#, 0o600);
        assert!(
            read_login(Path::new(&empty))
                .unwrap_err()
                .to_string()
                .contains("needs")
        );
    }

    #[test]
    fn a_mirror_login_goes_to_the_mirror_and_the_registry_login_to_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let harbor = write(
            dir.path(),
            "h.json",
            r#"{"username":"robot$p","password":"hp"}"#,
            0o600,
        );
        let spec = ImagesSpec {
            credentials: vec![RegistryCredentials {
                registry: "harbor.example.com:8443".into(),
                file: harbor,
                cache_duration: hybridlet_config::GoDuration(std::time::Duration::from_secs(60)),
            }],
            ..ImagesSpec::default()
        };
        let mirrors = vec![RegistryMirror {
            registry: "602401143452.dkr.ecr.us-west-2.amazonaws.com".into(),
            endpoints: vec!["https://harbor.example.com:8443/v2/ecr-cache".into()],
            ca_file: None,
            skip_verify: false,
            override_path: true,
        }];
        let image =
            ImageRef::parse("602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5").unwrap();
        let token = RegistryAuth {
            auth: "QVdTOnRva2Vu".into(),
            ..RegistryAuth::default()
        };
        let plan = attempts(&image, &spec, &mirrors, Some(token)).unwrap();
        assert_eq!(plan.len(), 2);
        let first = plan[0].auth.as_ref().unwrap();
        assert_eq!(
            (first.username.as_str(), first.server_address.as_str()),
            ("robot$p", "https://harbor.example.com:8443")
        );
        let second = plan[1].auth.as_ref().unwrap();
        assert_eq!(second.auth, "QVdTOnRva2Vu");
        assert_eq!(
            second.server_address,
            "https://602401143452.dkr.ecr.us-west-2.amazonaws.com"
        );
        // No mirror, no login: one anonymous attempt.
        let plain = attempts(&ImageRef::parse("busybox:1").unwrap(), &spec, &[], None).unwrap();
        assert_eq!(
            plain,
            [Attempt {
                auth: None,
                via: "registry docker.io".into()
            }]
        );
    }
}
