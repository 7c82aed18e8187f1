use std::process::ExitCode;

use hybridlet_config::ConfigError;

/// EX_USAGE from sysexits.h: the command line was wrong.
pub const EX_USAGE: u8 = 64;
/// EX_CONFIG from sysexits.h: the configuration was wrong.
pub const EX_CONFIG: u8 = 78;
/// EX_TEMPFAIL from sysexits.h: refused for now; the same command works once the node or
/// cluster is ready for it (e.g. drained).
pub const EX_TEMPFAIL: u8 = 75;

/// Why a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad command line (64).
    Usage(String),
    /// Bad configuration (78).
    Config(ConfigError),
    /// A configuration field is fine on its own but cannot be honoured by this build (78).
    Unsupported {
        /// Field path.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// A safety check refused the command, changing nothing (75); the message says what
    /// to do first.
    Refused(String),
    /// Anything else (1).
    Runtime(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<hybridlet_join::Error> for Failure {
    fn from(e: hybridlet_join::Error) -> Self {
        use hybridlet_join::Error as E;
        match e {
            E::Config(e) => Failure::Config(e),
            E::Unsupported { field, message } => Failure::Unsupported { field, message },
            E::Usage(m) => Failure::Usage(m),
            E::Refused(m) => Failure::Refused(m),
            E::Failed(m) => Failure::Runtime(anyhow::anyhow!(m)),
        }
    }
}

impl From<hybridlet_devices::Error> for Failure {
    fn from(e: hybridlet_devices::Error) -> Self {
        Failure::Runtime(e.into())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

impl Failure {
    /// The exit code for this failure.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EX_USAGE,
            Failure::Config(_) | Failure::Unsupported { .. } => EX_CONFIG,
            Failure::Refused(_) => EX_TEMPFAIL,
            Failure::Runtime(_) => 1,
        }
    }

    /// Print the failure on stderr and return its exit code.
    pub fn report(self) -> ExitCode {
        // stderr reaches the journal under systemd, so this is the one place it is said.
        eprintln!("hybridlet: {self}");
        ExitCode::from(self.code())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Refused(m) => f.write_str(m),
            Failure::Config(e) => write!(f, "{e}"),
            Failure::Unsupported { field, message } => {
                write!(f, "invalid configuration:\n  {field}: {message}")
            }
            Failure::Runtime(e) => write!(f, "{e:#}"),
        }
    }
}
