use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hybridlet_config::LoadedConfig;
use hybridlet_sys::HostRoot;

use crate::exit::{EX_USAGE, Failure};

/// Node agent for Amazon EKS Hybrid Nodes.
///
/// Reads nodeadm's NodeConfig (node.eks.aws/v1alpha1) unchanged, plus hybridlet's own
/// AgentConfig (hybridlet.io/v1alpha1), from /etc/hybridlet/config.yaml and
/// /etc/hybridlet/config.d/*.yaml.
#[derive(Debug, Parser)]
#[command(
    name = "hybridlet",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Configuration file [default: <root>/etc/hybridlet/config.yaml; a missing default file
    /// means the embedded standalone defaults, a missing named file is an error].
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "HYBRIDLET_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Drop-in directory merged over the configuration file in lexical order [default:
    /// <root>/etc/hybridlet/config.d, or none when --config is given].
    #[arg(long, global = true, env = "HYBRIDLET_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Prefix for every host path (/etc, /var/lib/kubelet, /sys, /run, /proc), so that the
    /// real code runs against a test or demo tree without root.
    #[arg(
        long,
        global = true,
        env = "HYBRIDLET_ROOT",
        value_name = "DIR",
        default_value = "/"
    )]
    pub root: PathBuf,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// "info,hybridlet_runtime=debug" [default: `run`: spec.logLevel; other commands: info].
    /// Given, it wins over spec.logLevel, also at reload.
    #[arg(long, global = true, env = "HYBRIDLET_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format. auto: the journal's native protocol when stderr is connected to the
    /// journal (running under systemd), human-readable otherwise.
    #[arg(
        long,
        global = true,
        env = "HYBRIDLET_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// journald under systemd, human otherwise.
    Auto,
    /// Human-readable lines on stderr.
    Human,
    /// One JSON object per line on stderr.
    Json,
    /// Structured entries sent to the systemd journal.
    Journald,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent daemon (what the systemd unit starts).
    Run(RunArgs),
    /// Validate the configuration and the host; exits 78 on configuration errors.
    Check(CheckArgs),
    /// List the GPUs and SR-IOV devices hybridlet can see, with their PCIe topology.
    Devices(DevicesArgs),
    /// Join this node to the EKS cluster: credentials (SSM registration or IAM Roles
    /// Anywhere), the cluster (configuration or DescribeCluster), every join file as one
    /// change with backups, then containerd and the kubelet. `--dry-run` shows the files.
    Init(InitArgs),
    /// Install kubelet, kubectl, CNI plugins and credential tools for a Kubernetes version.
    Install(InstallArgs),
    /// Upgrade the kubelet and kubectl to another Kubernetes version: checks the version
    /// skew against the control plane and that the node is drained, swaps the binaries
    /// atomically, restarts the kubelet and rolls back if it does not stay up. Exit 75 when
    /// a check refuses (nothing changed).
    Upgrade(UpgradeArgs),
    /// Undo the join: stop and disable the kubelet, restore every file init replaced and
    /// delete the ones it created, remove the kubelet's directory. Refuses, changing
    /// nothing, while any mount point is inside the kubelet's directory.
    Uninstall(UninstallArgs),
    /// Print an EKS token as a kubeconfig exec credential (client.authentication.k8s.io/v1beta1),
    /// signed with this node's AWS credentials; the kubelet's kubeconfig runs this.
    Token(TokenArgs),
    /// Print the version.
    Version(VersionArgs),
    /// Images on the node: `images import ARCHIVE` for sites no registry reaches.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// The kubelet's image credential provider for spec.images.credentials (the kubelet
    /// runs it: a CredentialProviderRequest on stdin, the response on stdout).
    #[command(hide = true)]
    CredentialProvider,
    /// Packaging aid: write the manual pages and shell completions under DIR.
    #[command(hide = true)]
    Assets(AssetsArgs),
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Load an OCI or docker image archive into containerd (CRI namespace) and pin it.
    Import {
        /// The archive (`skopeo copy … oci-archive:FILE`, `docker save`).
        archive: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Testing aid: hold every subsystem in "starting" for this long after it has bound its
    /// resources, to exercise shutdown during start-up (e.g. 30s).
    #[arg(long, hide = true, env = "HYBRIDLET_STARTUP_DELAY", value_parser = parse_duration)]
    pub startup_delay: Option<Duration>,
    /// Describe GPUs from this JSON file instead of NVML (demos and tests; see `devices`).
    #[arg(long, value_name = "FILE")]
    pub nvml_fixture: Option<PathBuf>,
    /// How often device discovery runs for the metrics (e.g. 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub device_sample_interval: Option<Duration>,
    /// Testing aid: the DRA drivers' watch and publish timers run this many times faster.
    #[arg(long, hide = true, default_value_t = 1)]
    pub api_timer_scale: u32,
}

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Describe GPUs from this JSON file instead of NVML ({"gpus": [...]}, as written by
    /// the fixture generator), for demos and tests.
    #[arg(long, value_name = "FILE")]
    pub nvml_fixture: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// How `devices` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Grouped by NUMA node and PCIe switch.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only validate the configuration; skip the host checks (for ExecStartPre=).
    #[arg(long)]
    pub config_only: bool,
    /// Skip the checks that need the network (the API server's DNS, TCP, TLS and clock).
    #[arg(long)]
    pub offline: bool,
    /// Output: `text` (one line per check) or `json` (for automation).
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: CheckOutput,
}

/// How `check` prints its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckOutput {
    /// `ok:`, `warning:` and `FAIL:` lines.
    Text,
    /// One JSON object: `{"ok", "failed", "checks": [{"check", "status", "detail"}]}`.
    Json,
}

#[derive(Debug, Args)]
pub struct VersionArg {
    /// Kubernetes version, e.g. 1.34 or 1.34.2.
    pub kubernetes_version: String,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Also delete this node's Node object from the cluster (first, with the kubelet's
    /// credentials; if that fails nothing is changed).
    #[arg(long)]
    pub delete_node: bool,
    /// SSM nodes: do not deregister the managed instance (deregister it yourself:
    /// `aws ssm deregister-managed-instance`); its local registration is removed all the
    /// same. Without it, uninstall deregisters first and changes nothing if that fails.
    #[arg(long)]
    pub no_deregister: bool,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Kubernetes version: 1.34 (its latest patch) or 1.34.2.
    #[arg(required_unless_present = "rollback")]
    pub kubernetes_version: Option<String>,
    /// The release manifest: https://, http:// (a mirror) or file:// (air-gapped).
    #[arg(long, value_name = "URL", default_value = hybridlet_artifacts::DEFAULT_MANIFEST, env = "HYBRIDLET_MANIFEST")]
    pub manifest: String,
    /// Upgrade even if the version skew, the drain check or the API server say no.
    #[arg(long)]
    pub force: bool,
    /// Check and print what would be replaced; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Put back the binaries the last upgrade replaced.
    #[arg(long, conflicts_with_all = ["kubernetes_version", "dry_run", "force"])]
    pub rollback: bool,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Kubernetes version: 1.34 (its latest patch) or 1.34.2.
    pub kubernetes_version: String,
    /// The release manifest: https://, http:// (a mirror) or file:// (air-gapped).
    #[arg(long, value_name = "URL", default_value = hybridlet_artifacts::DEFAULT_MANIFEST, env = "HYBRIDLET_MANIFEST")]
    pub manifest: String,
    /// Also install the credential tool for this provider [default: from spec.hybrid].
    #[arg(long, value_name = "ssm|iam-ra", value_parser = ["ssm", "iam-ra"])]
    pub credential_provider: Option<String>,
    /// Print what would be downloaded and where; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Resolve the cluster (from the configuration, else EKS DescribeCluster) and print
    /// every file init would write, marked new, changed or unchanged; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the files but do not reload systemd or (re)start containerd and the kubelet
    /// (implied with --root other than /: another root's services are not ours to run).
    #[arg(long, conflicts_with = "dry_run")]
    pub no_start: bool,
    /// After joining, wait until the Node is Ready, reporting each change (default limit
    /// 5m; exit 1 if it is not Ready by then).
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        default_missing_value = "5m",
        value_parser = parse_duration,
        conflicts_with_all = ["dry_run", "no_start"]
    )]
    pub wait: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Cluster name [default: spec.cluster.name from the configuration].
    #[arg(long, short = 'i', value_name = "NAME")]
    pub cluster_id: Option<String>,
    /// AWS region [default: spec.cluster.region from the configuration].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
}

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AssetsArgs {
    /// Output directory (man/ and completions/ are created in it).
    #[arg(value_name = "DIR")]
    pub out: PathBuf,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    hybridlet_config::GoDuration::parse(text).map(|d| d.get())
}

/// Parse the command line. Help and version go to stdout with exit 0; usage errors to
/// stderr with exit 64 (clap's own default, 2, is not a sysexits code).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, ExitCode> {
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

impl Cli {
    /// The host root.
    pub fn host_root(&self) -> HostRoot {
        HostRoot::new(self.root.clone())
    }

    /// Load and validate the configuration, logging warnings.
    pub fn load_config(&self) -> Result<LoadedConfig, Failure> {
        let sources = hybridlet_join::config_sources(
            &self.host_root(),
            self.config.clone(),
            self.config_dir.clone(),
        )
        .map_err(|e| Failure::Usage(format!("--root: {e}")))?;
        let loaded = hybridlet_config::load(&sources)?;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
