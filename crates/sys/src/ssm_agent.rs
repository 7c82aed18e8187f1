//! The AWS Systems Manager agent on the host: where it is installed (package or snap),
//! and registering it with a hybrid activation (`amazon-ssm-agent -register`), which
//! turns the host into a managed instance `mi-…` and records that in
//! [`REGISTRATION_FILE`]. From then on the agent writes short-lived credentials for the
//! activation's role to root's shared credentials file.
//!
//! The activation code is a secret: it goes to the agent as an argument (the agent takes
//! it no other way) and is masked in every error this module returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::HostRoot;
use crate::process::run_with_deadline;

/// Where a registered agent records its managed instance ID and region (JSON:
/// `{"ManagedInstanceID": "mi-…", "Region": "…"}`).
pub const REGISTRATION_FILE: &str = "/var/lib/amazon/ssm/registration";
/// The agent's key store and state for this registration.
pub const AGENT_STATE_DIR: &str = "/var/lib/amazon/ssm";
/// Where the agent keeps root's credentials fresh.
pub const CREDENTIALS_FILE: &str = "/root/.aws/credentials";

/// The installs the agent comes in: the AWS package (deb/rpm) and the Ubuntu snap.
const INSTALLS: [(&str, &str); 2] = [
    ("/usr/bin/amazon-ssm-agent", "amazon-ssm-agent.service"),
    (
        "/snap/amazon-ssm-agent/current/amazon-ssm-agent",
        "snap.amazon-ssm-agent.amazon-ssm-agent.service",
    ),
];

/// An installed agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInstall {
    /// The program, as a host path (`/usr/bin/amazon-ssm-agent`).
    pub program: String,
    /// Its systemd unit.
    pub unit: String,
}

/// The agent installed under `root`, if any.
pub fn find_agent(root: &HostRoot) -> Option<AgentInstall> {
    INSTALLS.iter().find_map(|(program, unit)| {
        let path = root.resolve(program).ok()?;
        path.is_file().then(|| AgentInstall {
            program: (*program).to_string(),
            unit: (*unit).to_string(),
        })
    })
}

/// The unit for `program` (the packaged name when unknown).
pub fn unit_for(program: &str) -> &'static str {
    INSTALLS
        .iter()
        .find(|(p, _)| *p == program)
        .map(|(_, u)| *u)
        .unwrap_or(INSTALLS[0].1)
}

/// A hybrid activation.
#[derive(Clone, PartialEq, Eq)]
pub struct Activation {
    /// Region of the activation.
    pub region: String,
    /// The activation ID (a UUID).
    pub id: String,
    /// The activation code (secret).
    pub code: String,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("region", &self.region)
            .field("id", &self.id)
            .field("code", &"<redacted>")
            .finish()
    }
}

/// Why registration failed, as far as the agent's output tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The activation has expired: a new one is needed.
    Expired,
    /// The code/ID pair is wrong, or the activation's registration limit is used up.
    Invalid,
    /// Anything else (network, proxy, SSM trouble): worth retrying.
    Other,
}

/// Registration failures.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The agent could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It did not finish in time (its process group was killed).
    #[error("{program} -register did not finish within {timeout:?}")]
    Timeout {
        /// The program.
        program: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// It exited with an error.
    #[error("{program} -register failed: {output}")]
    Refused {
        /// The program.
        program: PathBuf,
        /// What kind of failure the output shows.
        kind: RefusalKind,
        /// Its output (the activation code masked).
        output: String,
    },
}

impl RegisterError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            RegisterError::Spawn { .. } => false,
            RegisterError::Timeout { .. } => true,
            RegisterError::Refused { kind, .. } => *kind == RefusalKind::Other,
        }
    }
}

/// Registering the agent.
pub trait SsmRegistrar: Send + Sync {
    /// Register with `activation`; `env` (proxy settings) is added to the agent's
    /// environment, since registration itself calls SSM.
    fn register(
        &self,
        activation: &Activation,
        env: &[(String, String)],
    ) -> Result<(), RegisterError>;
}

/// The real one: the agent's own `-register` mode.
#[derive(Debug, Clone)]
pub struct AgentCli {
    program: PathBuf,
    timeout: Duration,
}

impl AgentCli {
    /// The agent at `program` (a path on this machine), each run bounded by `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout,
        }
    }
}

/// The kind of failure the agent's output describes.
pub fn classify(output: &str) -> RefusalKind {
    let lower = output.to_ascii_lowercase();
    if lower.contains("activationexpired") || lower.contains("activation expired") {
        RefusalKind::Expired
    } else if lower.contains("invalidactivation")
        || lower.contains("activationlimitexceeded")
        || lower.contains("registration limit")
    {
        RefusalKind::Invalid
    } else {
        RefusalKind::Other
    }
}

fn masked(text: &str, secret: &str) -> String {
    let text = text.trim();
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "<activation code>")
    }
}

impl SsmRegistrar for AgentCli {
    fn register(
        &self,
        activation: &Activation,
        env: &[(String, String)],
    ) -> Result<(), RegisterError> {
        let mut cmd = Command::new(&self.program);
        // -y: replace a registration the agent may still hold (the caller only registers
        // when the registration file is absent, so there is nothing of ours to lose).
        cmd.args(["-register", "-y", "-region", &activation.region])
            .args(["-code", &activation.code, "-id", &activation.id]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        match run_with_deadline(cmd, self.timeout) {
            Err(source) => Err(RegisterError::Spawn {
                program: self.program.clone(),
                source,
            }),
            Ok(None) => Err(RegisterError::Timeout {
                program: self.program.clone(),
                timeout: self.timeout,
            }),
            Ok(Some(out)) if out.status.success() => Ok(()),
            Ok(Some(out)) => {
                let text = format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let output = masked(&text, &activation.code);
                Err(RegisterError::Refused {
                    program: self.program.clone(),
                    kind: classify(&output),
                    output: if output.is_empty() {
                        format!("exit status {}", out.status)
                    } else {
                        output
                    },
                })
            }
        }
    }
}

/// The managed instance ID from the registration file under `root`, if registered.
pub fn registered_instance(root: &HostRoot) -> Option<String> {
    let path = root.resolve(REGISTRATION_FILE).ok()?;
    instance_in(&path)
}

fn instance_in(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    // The file is small JSON; pick the one field without a JSON dependency here.
    let key = "\"ManagedInstanceID\"";
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let id = &rest[..rest.find('"')?];
    (id.starts_with("mi-") && id.len() > 3 && id[3..].bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_string())
}

/// One registration call: the activation and the extra environment.
pub type RegisterCall = (Activation, Vec<(String, String)>);

/// A registrar that writes the registration file itself (tests of the callers).
#[derive(Debug)]
pub struct FakeRegistrar {
    root: PathBuf,
    instance: String,
    failures: std::sync::Mutex<Vec<RefusalKind>>,
    calls: std::sync::Mutex<Vec<RegisterCall>>,
}

impl FakeRegistrar {
    /// Registers as `instance` by writing the registration file under `root` (and the
    /// credentials file, as the agent would once started).
    pub fn new(root: impl Into<PathBuf>, instance: &str) -> Self {
        Self {
            root: root.into(),
            instance: instance.to_string(),
            failures: Default::default(),
            calls: Default::default(),
        }
    }

    /// Fail the next calls with these kinds, in order.
    pub fn fail_next(&self, kinds: &[RefusalKind]) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(kinds);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<RegisterCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SsmRegistrar for FakeRegistrar {
    fn register(
        &self,
        activation: &Activation,
        env: &[(String, String)],
    ) -> Result<(), RegisterError> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((activation.clone(), env.to_vec()));
        let failure = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            (!f.is_empty()).then(|| f.remove(0))
        };
        if let Some(kind) = failure {
            return Err(RegisterError::Refused {
                program: "fake".into(),
                kind,
                output: format!("injected {kind:?}"),
            });
        }
        let write = |rel: &str, text: String| -> std::io::Result<()> {
            let path = self.root.join(rel.trim_start_matches('/'));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, text)
        };
        write(
            REGISTRATION_FILE,
            format!(
                "{{\"ManagedInstanceID\":\"{}\",\"Region\":\"{}\"}}",
                self.instance, activation.region
            ),
        )
        .and_then(|()| {
            write(
                CREDENTIALS_FILE,
                "[default]\naws_access_key_id = AKIDFAKE\naws_secret_access_key = fake\n".into(),
            )
        })
        .map_err(|source| RegisterError::Spawn {
            program: "fake".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn activation() -> Activation {
        Activation {
            region: "eu-west-1".into(),
            id: "6fe9f7ef-2c2a-4c58-a1c5-7f6b3a2d0c11".into(),
            code: "SECRETcode12345678901".into(),
        }
    }

    /// A stand-in agent: records its arguments and environment, then behaves as told.
    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("amazon-ssm-agent");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$@\" > \"{0}/args\"\necho \"HTTPS_PROXY=$HTTPS_PROXY\" > \"{0}/env\"\n{body}\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn registers_with_an_argument_vector_and_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentCli::new(script(dir.path(), "exit 0"), Duration::from_secs(10));
        agent
            .register(
                &activation(),
                &[("HTTPS_PROXY".into(), "http://proxy.local:3128".into())],
            )
            .unwrap();
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(
            args.trim(),
            "-register -y -region eu-west-1 -code SECRETcode12345678901 -id 6fe9f7ef-2c2a-4c58-a1c5-7f6b3a2d0c11"
        );
        let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
        assert_eq!(env.trim(), "HTTPS_PROXY=http://proxy.local:3128");
    }

    #[test]
    fn failures_are_classified_and_never_show_the_code() {
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentCli::new(
            script(
                dir.path(),
                "echo \"Registration failed due to error registering the instance with AWS SSM. ActivationExpired: code $6 expired\" >&2; exit 1",
            ),
            Duration::from_secs(10),
        );
        let e = agent.register(&activation(), &[]).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("SECRETcode"), "{text}");
        assert!(text.contains("<activation code>"), "{text}");
        assert!(matches!(
            e,
            RegisterError::Refused {
                kind: RefusalKind::Expired,
                ..
            }
        ));
        assert!(!e.is_transient());
        assert_eq!(
            classify("InvalidActivation: wrong id"),
            RefusalKind::Invalid
        );
        assert_eq!(classify("dial tcp: i/o timeout"), RefusalKind::Other);

        let hung = AgentCli::new(script(dir.path(), "sleep 30"), Duration::from_millis(300));
        let e = hung.register(&activation(), &[]).unwrap_err();
        assert!(
            matches!(e, RegisterError::Timeout { .. }) && e.is_transient(),
            "{e}"
        );
        let missing = AgentCli::new(dir.path().join("nope"), Duration::from_secs(1));
        assert!(matches!(
            missing.register(&activation(), &[]).unwrap_err(),
            RegisterError::Spawn { .. }
        ));
    }

    #[test]
    fn finds_the_agent_and_reads_the_registration() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        assert_eq!(find_agent(&root), None);
        let snap = dir.path().join("snap/amazon-ssm-agent/current");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("amazon-ssm-agent"), "").unwrap();
        assert_eq!(
            find_agent(&root).unwrap().unit,
            "snap.amazon-ssm-agent.amazon-ssm-agent.service"
        );
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        std::fs::write(dir.path().join("usr/bin/amazon-ssm-agent"), "").unwrap();
        assert_eq!(find_agent(&root).unwrap().unit, "amazon-ssm-agent.service");

        assert_eq!(registered_instance(&root), None);
        let fake = FakeRegistrar::new(dir.path(), "mi-0123456789abcdef0");
        fake.register(&activation(), &[]).unwrap();
        assert_eq!(
            registered_instance(&root).as_deref(),
            Some("mi-0123456789abcdef0")
        );
        let reg = dir.path().join("var/lib/amazon/ssm/registration");
        std::fs::write(&reg, r#"{"ManagedInstanceID": "i-0abc", "Region": "x"}"#).unwrap();
        assert_eq!(
            registered_instance(&root),
            None,
            "not a managed instance ID"
        );
        std::fs::write(
            &reg,
            r#"{"ManagedInstanceID" : "mi-0abc\"; rm", "Region": "x"}"#,
        )
        .unwrap();
        assert_eq!(registered_instance(&root), None);
    }
}
