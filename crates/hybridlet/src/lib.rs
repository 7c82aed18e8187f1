//! The top of hybridlet: the command line, process set-up (logging, TLS provider, tokio
//! runtime) and the wiring of subsystems for `hybridlet run`.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 usage error (EX_USAGE), 75 refused by a
//! safety check that a retry can pass (EX_TEMPFAIL: an undrained node), 78 configuration
//! error (EX_CONFIG). The systemd unit lists 64 and 78 in `RestartPreventExitStatus=` so
//! that a bad configuration does not crash-loop.
//!
//! What this crate must never do: contain domain logic. It parses, loads, wires and maps
//! errors; the work happens in the crates below it.

/// Print a line on stdout; a closed pipe (`hybridlet devices | head`) truncates the output
/// quietly instead of panicking as `println!` does.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod assets;
mod cli;
mod daemon;
mod devices;
mod exit;
mod logging;
mod reload;
mod run;
mod settings;
pub mod tls;

use std::ffi::OsString;
use std::process::ExitCode;

pub use exit::Failure;

/// The version, the git commit and the build date (embedded by build.rs).
pub fn build_info() -> hybridlet_metrics::BuildInfo {
    hybridlet_metrics::BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: env!("HYBRIDLET_GIT_COMMIT").to_string(),
        date: env!("HYBRIDLET_BUILD_DATE").to_string(),
    }
}

/// Run the command line and return the process exit code.
pub fn main_entry(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    tls::install_default_provider();
    let cli = match cli::parse(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let level = cli
        .log_level
        .as_deref()
        .unwrap_or(hybridlet_config::DEFAULT_LOG_LEVEL);
    if let Err(why) = logging::init(cli.log_format, level) {
        eprintln!("hybridlet: --log-level: {why}");
        return ExitCode::from(exit::EX_USAGE);
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Run the chosen command. The join commands get one context: the host root, the
/// configuration (loaded and validated once), one async runtime.
fn dispatch(args: cli::Cli) -> Result<(), Failure> {
    use cli::Command;
    let context = || -> Result<hybridlet_join::Context, Failure> {
        Ok(hybridlet_join::Context::new(
            args.host_root(),
            args.load_config()?,
        )?)
    };
    match &args.command {
        Command::Run(a) => run::run(&args, a),
        Command::Version(a) => {
            print_version(a.json);
            Ok(())
        }
        Command::Assets(a) => assets::write(&a.out),
        Command::Devices(a) => devices::devices(&args, a),
        Command::Images(cli::ImagesCommand::Import { archive }) => {
            Ok(hybridlet_join::import_images(&context()?, archive)?)
        }
        Command::CredentialProvider => Ok(hybridlet_join::credential_provider(&context()?)?),
        Command::Check(a) => Ok(hybridlet_join::check(
            &context()?,
            &hybridlet_join::CheckArgs {
                config_only: a.config_only,
                offline: a.offline,
                json: a.output == cli::CheckOutput::Json,
            },
        )?),
        Command::Token(a) => Ok(hybridlet_join::token(
            &context()?,
            &hybridlet_join::TokenArgs {
                cluster_id: a.cluster_id.clone(),
                region: a.region.clone(),
            },
        )?),
        Command::Init(a) => Ok(hybridlet_join::init(
            &context()?,
            &hybridlet_join::InitArgs {
                dry_run: a.dry_run,
                no_start: a.no_start,
                wait: a.wait,
            },
        )?),
        Command::Install(a) => Ok(hybridlet_join::install(
            &context()?,
            &hybridlet_join::InstallArgs {
                kubernetes_version: a.kubernetes_version.clone(),
                manifest: a.manifest.clone(),
                credential_provider: a.credential_provider.clone(),
                dry_run: a.dry_run,
            },
        )?),
        Command::Upgrade(a) => Ok(hybridlet_join::upgrade(
            &context()?,
            &hybridlet_join::UpgradeArgs {
                kubernetes_version: a.kubernetes_version.clone(),
                manifest: a.manifest.clone(),
                force: a.force,
                dry_run: a.dry_run,
                rollback: a.rollback,
            },
        )?),
        Command::Uninstall(a) => Ok(hybridlet_join::uninstall(
            &context()?,
            &hybridlet_join::UninstallArgs {
                delete_node: a.delete_node,
                no_deregister: a.no_deregister,
            },
        )?),
    }
}

fn print_version(json: bool) {
    let info = build_info();
    if json {
        outln!(
            "{}",
            serde_json::json!({"version": info.version, "commit": info.commit, "buildDate": info.date})
        );
    } else {
        outln!(
            "hybridlet {} (commit {}, built {})",
            info.version,
            info.commit,
            info.date
        );
    }
}
