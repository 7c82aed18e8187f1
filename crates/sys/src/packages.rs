//! The host's package manager, for the one package hybridlet may install itself: the SSM
//! agent, from a verified file (a mirror's `.deb` or `.rpm`). dpkg and rpm are called
//! with an argument vector and a deadline; nothing is fetched by them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::HostRoot;
use crate::process::run_with_deadline;

/// The package format of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageFormat {
    /// Debian, Ubuntu: dpkg.
    Deb,
    /// RHEL, Rocky, Amazon Linux: rpm.
    Rpm,
}

impl PackageFormat {
    /// `deb` or `rpm` (the file suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            PackageFormat::Deb => "deb",
            PackageFormat::Rpm => "rpm",
        }
    }
}

/// The format of the host under `root`, from the package tool it has.
pub fn host_format(root: &HostRoot) -> Option<PackageFormat> {
    let has = |p: &str| root.resolve(p).is_ok_and(|p| p.is_file());
    if has("/usr/bin/dpkg") {
        Some(PackageFormat::Deb)
    } else if has("/usr/bin/rpm") {
        Some(PackageFormat::Rpm)
    } else {
        None
    }
}

/// Package operation failures.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The tool could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The tool.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It did not finish in time.
    #[error("{command} did not finish within {timeout:?}")]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// It failed.
    #[error("{command} failed: {output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its output.
        output: String,
    },
}

/// Installing and removing packages.
pub trait PackageManager: Send + Sync {
    /// Install (or upgrade to) the package in `file`.
    fn install_file(&self, file: &Path) -> Result<(), PackageError>;
    /// Remove the package `name` (success when it is not installed).
    fn remove(&self, name: &str) -> Result<(), PackageError>;
}

/// The real one: dpkg or rpm.
#[derive(Debug, Clone)]
pub struct SystemPackages {
    format: PackageFormat,
    program: PathBuf,
    timeout: Duration,
}

impl SystemPackages {
    /// dpkg or rpm from `PATH`, each call bounded by `timeout`.
    pub fn new(format: PackageFormat, timeout: Duration) -> Self {
        let program = match format {
            PackageFormat::Deb => "dpkg",
            PackageFormat::Rpm => "rpm",
        };
        Self::with_program(format, program, timeout)
    }

    /// The tool at `program` (tests use a stand-in).
    pub fn with_program(
        format: PackageFormat,
        program: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Self {
        Self {
            format,
            program: program.into(),
            timeout,
        }
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> Result<String, PackageError> {
        let command = format!(
            "{} {}",
            self.program.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = Command::new(&self.program);
        cmd.args(args);
        // Never ask: there is nobody to answer.
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        match run_with_deadline(cmd, self.timeout) {
            Err(source) => Err(PackageError::Spawn {
                program: self.program.display().to_string(),
                source,
            }),
            Ok(None) => Err(PackageError::Timeout {
                command,
                timeout: self.timeout,
            }),
            Ok(Some(out)) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_string();
                if out.status.success() {
                    Ok(text)
                } else {
                    Err(PackageError::Failed {
                        command,
                        output: text,
                    })
                }
            }
        }
    }
}

impl PackageManager for SystemPackages {
    fn install_file(&self, file: &Path) -> Result<(), PackageError> {
        let file = file.as_os_str();
        let args: Vec<&std::ffi::OsStr> = match self.format {
            // Keep the operator's edited conffiles.
            PackageFormat::Deb => vec!["--force-confold".as_ref(), "-i".as_ref(), file],
            PackageFormat::Rpm => vec!["-U".as_ref(), "--replacepkgs".as_ref(), file],
        };
        self.run(&args).map(drop)
    }

    fn remove(&self, name: &str) -> Result<(), PackageError> {
        let query: &[&std::ffi::OsStr] = match self.format {
            PackageFormat::Deb => &["-s".as_ref(), name.as_ref()],
            PackageFormat::Rpm => &["-q".as_ref(), name.as_ref()],
        };
        // Only "not installed" means there is nothing to do; any other failure to ask
        // (a locked or broken database) is an error, not a silent skip.
        let installed = match self.run(query) {
            Ok(out) => match self.format {
                PackageFormat::Deb => out.contains("Status: install ok installed"),
                PackageFormat::Rpm => true,
            },
            Err(PackageError::Failed { output, .. }) if output.contains("is not installed") => {
                false
            }
            Err(e) => return Err(e),
        };
        if !installed {
            return Ok(());
        }
        let flag = match self.format {
            PackageFormat::Deb => "-r",
            PackageFormat::Rpm => "-e",
        };
        self.run(&[flag.as_ref(), name.as_ref()]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A stand-in dpkg: logs its arguments; `-s` answers as for an installed package
    /// once `-i` ran.
    fn fake_dpkg(dir: &Path) -> PathBuf {
        let path = dir.join("dpkg");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$@\" >> {0}/log\ncase \"$1\" in\n  -s) [ -e {0}/installed ] && echo 'Status: install ok installed' && exit 0; echo \"dpkg-query: package '$2' is not installed\" >&2; exit 1;;\n  --force-confold) [ \"$3\" = /bad.deb ] && {{ echo 'dpkg: error: not a Debian archive' >&2; exit 2; }}; touch {0}/installed;;\n  -r) rm -f {0}/installed;;\nesac\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn installs_and_removes_with_dpkg() {
        let dir = tempfile::tempdir().unwrap();
        let pm = SystemPackages::with_program(
            PackageFormat::Deb,
            fake_dpkg(dir.path()),
            Duration::from_secs(10),
        );
        pm.remove("amazon-ssm-agent").unwrap(); // not installed: nothing to do
        pm.install_file(Path::new("/m/amazon-ssm-agent.deb"))
            .unwrap();
        pm.remove("amazon-ssm-agent").unwrap();
        let e = pm.install_file(Path::new("/bad.deb")).unwrap_err();
        assert!(e.to_string().contains("not a Debian archive"), "{e}");
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            [
                "-s amazon-ssm-agent",
                "--force-confold -i /m/amazon-ssm-agent.deb",
                "-s amazon-ssm-agent",
                "-r amazon-ssm-agent",
                "--force-confold -i /bad.deb"
            ]
        );
    }

    /// A package database that cannot be asked is an error, never "not installed".
    #[test]
    fn a_query_that_fails_for_another_reason_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rpm");
        std::fs::write(
            &path,
            "#!/bin/sh\necho 'error: cannot open Packages database in /var/lib/rpm' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pm = SystemPackages::with_program(PackageFormat::Rpm, &path, Duration::from_secs(5));
        let e = pm.remove("amazon-ssm-agent").unwrap_err();
        assert!(
            e.to_string().contains("cannot open Packages database"),
            "{e}"
        );
        std::fs::write(
            &path,
            "#!/bin/sh\necho \"package $2 is not installed\"\nexit 1\n",
        )
        .unwrap();
        pm.remove("amazon-ssm-agent").unwrap();
    }

    #[test]
    fn the_host_format_comes_from_its_tools() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        assert_eq!(host_format(&root), None);
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        std::fs::write(dir.path().join("usr/bin/rpm"), "").unwrap();
        assert_eq!(host_format(&root), Some(PackageFormat::Rpm));
        std::fs::write(dir.path().join("usr/bin/dpkg"), "").unwrap();
        assert_eq!(host_format(&root), Some(PackageFormat::Deb));
    }
}
