//! The service manager, behind a trait: `hybridlet init` reloads systemd, enables and
//! (re)starts containerd and the kubelet through it; tests use [`FakeServiceManager`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::process::run_with_deadline;

/// Failure of a service manager operation, naming the unit.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// systemctl could not be run.
    #[error("running {program} {args}: {source}", program = program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Its arguments.
        args: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// systemctl did not finish in time (killed).
    #[error("systemctl {args}: no answer within {timeout:?}")]
    Timeout {
        /// Its arguments.
        args: String,
        /// The deadline.
        timeout: Duration,
    },
    /// systemctl failed.
    #[error("systemctl {args} failed: {message}")]
    Failed {
        /// Its arguments.
        args: String,
        /// Its error output.
        message: String,
    },
    /// The unit was restarted but did not stay active.
    #[error(
        "{unit} stopped right after starting (not active within {settle:?}); see `journalctl -u {unit}`"
    )]
    DidNotStay {
        /// The unit.
        unit: String,
        /// How long it had to stay active.
        settle: Duration,
    },
}

/// What systemd knows about a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitState {
    /// The unit file exists (LoadState=loaded).
    pub exists: bool,
    /// ActiveState=active.
    pub active: bool,
}

/// The operations `init` needs.
pub trait ServiceManager: Send + Sync {
    /// `systemctl daemon-reload`.
    fn daemon_reload(&self) -> Result<(), ServiceError>;
    /// Load and active state of `unit`.
    fn state(&self, unit: &str) -> Result<UnitState, ServiceError>;
    /// `systemctl enable unit`.
    fn enable(&self, unit: &str) -> Result<(), ServiceError>;
    /// `systemctl restart unit` (starts it when stopped).
    fn restart(&self, unit: &str) -> Result<(), ServiceError>;
    /// `systemctl stop unit`.
    fn stop(&self, unit: &str) -> Result<(), ServiceError>;
    /// `systemctl disable unit`.
    fn disable(&self, unit: &str) -> Result<(), ServiceError>;

    /// Restart `unit` and watch it for `settle`: a simple-type unit "restarts"
    /// successfully even when its process exits a moment later (a kubelet refusing its
    /// configuration does exactly that), so it counts as started only if it stays active.
    fn restart_and_settle(&self, unit: &str, settle: Duration) -> Result<(), ServiceError> {
        self.restart(unit)?;
        let until = std::time::Instant::now() + settle;
        loop {
            if !self.state(unit)?.active {
                return Err(ServiceError::DidNotStay {
                    unit: unit.to_string(),
                    settle,
                });
            }
            if std::time::Instant::now() >= until {
                return Ok(());
            }
            // Commands run this synchronously, outside any async runtime.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(250).min(settle));
        }
    }
}

/// The real one: systemctl(1) with a deadline per call.
#[derive(Debug, Clone)]
pub struct Systemctl {
    program: PathBuf,
    timeout: Duration,
}

impl Default for Systemctl {
    fn default() -> Self {
        Self {
            program: PathBuf::from("systemctl"),
            // Restarting containerd or the kubelet can take a while on a loaded node.
            timeout: Duration::from_secs(120),
        }
    }
}

impl Systemctl {
    /// systemctl at `program`, each call bounded by `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout,
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, ServiceError> {
        let joined = args.join(" ");
        let mut cmd = Command::new(&self.program);
        cmd.args(args);
        match run_with_deadline(cmd, self.timeout) {
            Err(source) => Err(ServiceError::Spawn {
                program: self.program.clone(),
                args: joined,
                source,
            }),
            Ok(None) => Err(ServiceError::Timeout {
                args: joined,
                timeout: self.timeout,
            }),
            Ok(Some(out)) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(Some(out)) => Err(ServiceError::Failed {
                args: joined,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }
}

impl ServiceManager for Systemctl {
    fn daemon_reload(&self) -> Result<(), ServiceError> {
        self.run(&["daemon-reload"]).map(drop)
    }

    fn state(&self, unit: &str) -> Result<UnitState, ServiceError> {
        let out = self.run(&["show", "--property=LoadState,ActiveState", "--", unit])?;
        let mut state = UnitState {
            exists: false,
            active: false,
        };
        for line in out.lines() {
            match line.split_once('=') {
                Some(("LoadState", v)) => state.exists = v == "loaded",
                Some(("ActiveState", v)) => state.active = v == "active",
                _ => {}
            }
        }
        Ok(state)
    }

    fn enable(&self, unit: &str) -> Result<(), ServiceError> {
        self.run(&["enable", "--", unit]).map(drop)
    }

    fn restart(&self, unit: &str) -> Result<(), ServiceError> {
        self.run(&["restart", "--", unit]).map(drop)
    }

    fn stop(&self, unit: &str) -> Result<(), ServiceError> {
        self.run(&["stop", "--", unit]).map(drop)
    }

    fn disable(&self, unit: &str) -> Result<(), ServiceError> {
        self.run(&["disable", "--", unit]).map(drop)
    }
}

/// Units in memory; records calls (`daemon-reload`, `enable X`, `restart X`).
#[derive(Debug, Default)]
pub struct FakeServiceManager {
    state: Mutex<FakeUnits>,
}

#[derive(Debug, Default)]
struct FakeUnits {
    units: BTreeMap<String, UnitState>,
    calls: Vec<String>,
    fail_restart: Option<String>,
    exit_after_start: Option<String>,
}

impl FakeServiceManager {
    /// Units that exist (installed), all stopped.
    pub fn with_units(units: &[&str]) -> Self {
        let fake = Self::default();
        {
            let mut s = fake.lock();
            for u in units {
                s.units.insert(
                    (*u).to_string(),
                    UnitState {
                        exists: true,
                        active: false,
                    },
                );
            }
        }
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeUnits> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls made so far.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Let `unit` start, then exit at once (a simple-type unit refusing its config).
    pub fn exit_after_start(&self, unit: &str) {
        self.lock().exit_after_start = Some(unit.to_string());
    }

    /// Make restarting `unit` fail.
    pub fn fail_restart(&self, unit: &str) {
        self.lock().fail_restart = Some(unit.to_string());
    }
}

impl ServiceManager for FakeServiceManager {
    fn daemon_reload(&self) -> Result<(), ServiceError> {
        self.lock().calls.push("daemon-reload".into());
        Ok(())
    }

    fn state(&self, unit: &str) -> Result<UnitState, ServiceError> {
        Ok(self.lock().units.get(unit).copied().unwrap_or(UnitState {
            exists: false,
            active: false,
        }))
    }

    fn enable(&self, unit: &str) -> Result<(), ServiceError> {
        let mut s = self.lock();
        s.calls.push(format!("enable {unit}"));
        if !s.units.get(unit).is_some_and(|u| u.exists) {
            return Err(ServiceError::Failed {
                args: format!("enable {unit}"),
                message: format!("Unit file {unit} does not exist."),
            });
        }
        Ok(())
    }

    fn restart(&self, unit: &str) -> Result<(), ServiceError> {
        let mut s = self.lock();
        s.calls.push(format!("restart {unit}"));
        if s.fail_restart.as_deref() == Some(unit) {
            return Err(ServiceError::Failed {
                args: format!("restart {unit}"),
                message: format!("Job for {unit} failed."),
            });
        }
        let stays = s.exit_after_start.as_deref() != Some(unit);
        match s.units.get_mut(unit) {
            Some(u) if u.exists => {
                u.active = stays;
                Ok(())
            }
            _ => Err(ServiceError::Failed {
                args: format!("restart {unit}"),
                message: format!("Unit {unit} not found."),
            }),
        }
    }

    fn stop(&self, unit: &str) -> Result<(), ServiceError> {
        let mut s = self.lock();
        s.calls.push(format!("stop {unit}"));
        if let Some(u) = s.units.get_mut(unit) {
            u.active = false;
        }
        Ok(())
    }

    fn disable(&self, unit: &str) -> Result<(), ServiceError> {
        self.lock().calls.push(format!("disable {unit}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The real implementation against a stand-in systemctl script: arguments, output
    /// parsing, failures and the deadline.
    #[test]
    fn systemctl_runs_parses_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$1\" in\n  show) [ \"$4\" = kubelet.service ] && printf 'LoadState=loaded\\nActiveState=active\\n' || printf 'LoadState=not-found\\nActiveState=inactive\\n' ;;\n  restart) echo 'Job for containerd.service failed.' >&2; exit 1 ;;\n  enable) sleep 5 ;;\nesac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let sc = Systemctl::new(&script, Duration::from_millis(500));
        sc.daemon_reload().unwrap();
        assert_eq!(
            sc.state("kubelet.service").unwrap(),
            UnitState {
                exists: true,
                active: true
            }
        );
        assert!(!sc.state("nope.service").unwrap().exists);
        let err = sc.restart("containerd.service").unwrap_err();
        assert!(
            err.to_string()
                .contains("Job for containerd.service failed"),
            "{err}"
        );
        let err = sc.enable("kubelet.service").unwrap_err();
        assert!(matches!(err, ServiceError::Timeout { .. }), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        assert!(
            calls.starts_with(
                "daemon-reload\nshow --property=LoadState,ActiveState -- kubelet.service\n"
            ),
            "{calls}"
        );
    }
}
