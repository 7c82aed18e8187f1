//! Joining this machine to an EKS cluster and keeping it joined: `install` (the kubelet
//! and the credential tools from the EKS hybrid release manifest), `init` (credentials —
//! SSM registration or IAM Roles Anywhere —, the cluster, the join files as one change,
//! containerd and the kubelet), `check` (configuration, host and network preflight),
//! `upgrade`, `uninstall`, and `token` (the kubelet's EKS credential plugin).
//!
//! Each command takes a [`Context`] (the host root, the loaded configuration, one async
//! runtime) and its options, prints what it does on stdout, and returns a typed [`Error`]
//! whose variant decides the exit code at the top.
//!
//! What this crate must never do: parse the command line, start the daemon's
//! subsystems, or touch the host except through `hybridlet-sys` (files under the
//! [`Context`]'s root, systemd, packages, the SSM agent) and the adapters.

/// Print a line on stdout; a closed pipe (`hybridlet check | head`) truncates the output
/// quietly instead of panicking as `println!` does.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod archive;
mod check;
mod images;
mod init;
mod install;
mod mirrors;
mod preflight;
mod remote_networks;
mod ssm;
mod token;
mod uninstall;
mod upgrade;
mod x509;

use std::time::Duration;

use hybridlet_config::{Config, LoadedConfig};
use hybridlet_sys::HostRoot;

pub use check::check;
pub use images::{credential_provider, import as import_images};
pub use init::init;
pub use install::install;
pub use mirrors::mirror_files;
pub use token::token;
pub use uninstall::uninstall;
pub use upgrade::upgrade;

/// A check's verdict and its detail (for a failure: what is wrong and the fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fine.
    Ok(String),
    /// Works, but worth knowing.
    Warn(String),
    /// Must be fixed.
    Fail(String),
}

/// Why a command failed; the variant decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration (78).
    #[error("{0}")]
    Config(#[from] hybridlet_config::ConfigError),
    /// A configuration field is valid on its own but cannot be used here (78).
    #[error("invalid configuration:\n  {field}: {message}")]
    Unsupported {
        /// Field path.
        field: &'static str,
        /// Why, and the fix.
        message: String,
    },
    /// A wrong combination of options or arguments (64).
    #[error("{0}")]
    Usage(String),
    /// A safety check refused the command, changing nothing (75); the message says what
    /// to do first.
    #[error("{0}")]
    Refused(String),
    /// Anything else (1): what failed, and what to do.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// The exit code: 64 usage, 78 configuration, 75 refused by a safety check, 1 else.
    pub fn code(&self) -> u8 {
        match self {
            Error::Usage(_) => 64,
            Error::Config(_) | Error::Unsupported { .. } => 78,
            Error::Refused(_) => 75,
            Error::Failed(_) => 1,
        }
    }

    /// A failure described by `message`.
    pub fn failed(message: impl Into<String>) -> Self {
        Error::Failed(message.into())
    }

    /// A failure from an error and its sources, after `what` was being done.
    pub fn from_source(what: &str, e: &(dyn std::error::Error + 'static)) -> Self {
        Error::Failed(format!("{what}: {}", hybridlet_runtime::error_chain(e)))
    }
}

/// Any error, with its sources, as a failure.
pub(crate) fn fail<E: std::error::Error + 'static>(e: E) -> Error {
    Error::Failed(hybridlet_runtime::error_chain(&e))
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every command gets: the host root, the loaded configuration, and the one async
/// runtime its network calls run on.
pub struct Context {
    /// Every host path is resolved under it (`--root`).
    pub root: HostRoot,
    /// The configuration, validated.
    pub loaded: LoadedConfig,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("root", &self.root)
            .field("files", &self.loaded.files)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context over `root` and `loaded`, with a single-threaded runtime.
    pub fn new(root: HostRoot, loaded: LoadedConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::from_source("starting the async runtime", &e))?;
        Ok(Self {
            root,
            loaded,
            runtime,
        })
    }

    /// Over `root` with the embedded defaults (tests of one step).
    #[cfg(test)]
    pub(crate) fn for_tests(root: &std::path::Path) -> Self {
        #[allow(clippy::unwrap_used)]
        Self::new(
            HostRoot::new(root),
            LoadedConfig {
                config: Config::default(),
                files: Vec::new(),
                warnings: Vec::new(),
            },
        )
        .unwrap()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.loaded.config
    }

    /// Run `future` to completion on the context's runtime (from synchronous code).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

/// Where the configuration is read from: `config` (then only the drop-ins of `config_dir`
/// if given), else the default file under `root` (optional) and its drop-in directory.
pub fn config_sources(
    root: &HostRoot,
    config: Option<std::path::PathBuf>,
    config_dir: Option<std::path::PathBuf>,
) -> Result<hybridlet_config::ConfigSources, hybridlet_sys::RootError> {
    use hybridlet_config::{ConfigSources, DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_FILE};
    Ok(match config {
        Some(file) => ConfigSources {
            file,
            file_required: true,
            drop_in_dir: config_dir,
        },
        None => ConfigSources {
            file: root.resolve(DEFAULT_CONFIG_FILE)?,
            file_required: false,
            drop_in_dir: Some(match config_dir {
                Some(d) => d,
                None => root.resolve(DEFAULT_CONFIG_DIR)?,
            }),
        },
    })
}

/// The Kubernetes node name, as `init` gave it to the kubelet: IAM Roles Anywhere's
/// `nodeName`; with SSM the managed instance ID (`mi-…`) from the agent's registration
/// under `root`; else (standalone) the host name.
pub fn node_name(config: &Config, root: &HostRoot) -> String {
    let hybrid = config.node.as_ref().and_then(|n| n.spec.hybrid.as_ref());
    if let Some(name) = hybrid
        .and_then(|h| h.iam_roles_anywhere.as_ref())
        .map(|ra| ra.node_name.clone())
    {
        return name;
    }
    if hybrid.is_some_and(|h| h.ssm.is_some())
        && let Some(id) = hybridlet_sys::ssm_agent::registered_instance(root)
    {
        return id;
    }
    hybridlet_sys::host_name().unwrap_or_else(|| "localhost".to_string())
}

/// `init`'s options.
#[derive(Debug, Clone, Default)]
pub struct InitArgs {
    /// Show every file init would write, marked new, changed or unchanged; write nothing.
    pub dry_run: bool,
    /// Write the files but leave systemd and the services alone.
    pub no_start: bool,
    /// After joining, wait this long for the Node to be Ready.
    pub wait: Option<Duration>,
}

/// `install`'s options.
#[derive(Debug, Clone, Default)]
pub struct InstallArgs {
    /// Kubernetes version: 1.34 (its latest patch) or 1.34.2.
    pub kubernetes_version: String,
    /// The release manifest: https://, http:// (a mirror) or file:// (air-gapped).
    pub manifest: String,
    /// Also install the credential tool for this provider (`ssm` or `iam-ra`).
    pub credential_provider: Option<String>,
    /// Print what would be downloaded and where; change nothing.
    pub dry_run: bool,
}

/// `upgrade`'s options.
#[derive(Debug, Clone, Default)]
pub struct UpgradeArgs {
    /// Kubernetes version: 1.34 (its latest patch) or 1.34.2; `None` with `rollback`.
    pub kubernetes_version: Option<String>,
    /// The release manifest.
    pub manifest: String,
    /// Upgrade even if the version skew, the drain check or the API server say no.
    pub force: bool,
    /// Check and print what would be replaced; change nothing.
    pub dry_run: bool,
    /// Put back the binaries the last upgrade replaced.
    pub rollback: bool,
}

/// `uninstall`'s options.
#[derive(Debug, Clone, Default)]
pub struct UninstallArgs {
    /// Also delete this node's Node object (first; if that fails nothing changes).
    pub delete_node: bool,
    /// SSM nodes: do not deregister the managed instance.
    pub no_deregister: bool,
}

/// `check`'s options.
#[derive(Debug, Clone, Default)]
pub struct CheckArgs {
    /// Only validate the configuration.
    pub config_only: bool,
    /// Skip the checks that need the network.
    pub offline: bool,
    /// One JSON object instead of lines.
    pub json: bool,
}

/// `token`'s options.
#[derive(Debug, Clone, Default)]
pub struct TokenArgs {
    /// Cluster name [default: spec.cluster.name].
    pub cluster_id: Option<String>,
    /// AWS region [default: spec.cluster.region].
    pub region: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    #[test]
    fn explicit_config_has_no_drop_ins_by_default() {
        use std::path::PathBuf;
        let root = hybridlet_sys::HostRoot::new("/tmp/r");
        let s = super::config_sources(&root, None, None).unwrap();
        assert_eq!(s.file, PathBuf::from("/tmp/r/etc/hybridlet/config.yaml"));
        assert!(!s.file_required);
        assert_eq!(
            s.drop_in_dir,
            Some(PathBuf::from("/tmp/r/etc/hybridlet/config.d"))
        );
        let s = super::config_sources(&root, Some("x.yaml".into()), None).unwrap();
        assert_eq!(s.file, PathBuf::from("x.yaml"));
        assert!(s.file_required);
        assert_eq!(s.drop_in_dir, None);
    }

    use super::*;

    #[test]
    fn an_ssm_node_is_named_after_its_managed_instance() {
        let dir = tempfile::tempdir().unwrap();
        let root = hybridlet_sys::HostRoot::new(dir.path());
        let config = hybridlet_config::load(&hybridlet_config::ConfigSources {
            file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/config/good/ssm.yaml"),
            file_required: true,
            drop_in_dir: None,
        })
        .unwrap()
        .config;
        assert_eq!(hybridlet_sys::ssm_agent::registered_instance(&root), None);
        let reg = dir.path().join("var/lib/amazon/ssm/registration");
        std::fs::create_dir_all(reg.parent().unwrap()).unwrap();
        std::fs::write(
            &reg,
            r#"{"ManagedInstanceID":"mi-0123456789abcdef0","Region":"us-west-2"}"#,
        )
        .unwrap();
        assert_eq!(node_name(&config, &root), "mi-0123456789abcdef0");
    }
}
