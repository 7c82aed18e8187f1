//! The process's one tracing subscriber: journald fields under systemd, else lines on
//! stderr (human or JSON). Its filter can be replaced while running (`spec.logLevel` at
//! start and at each reload).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use crate::cli::LogFormat;

/// The installed subscriber's filter, for [`set_filter`].
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// A filter from the operator's directives. The AWS SDK logs each credentials lookup at
/// info ("loaded base credentials ...") and each provider that fails at warn, with the
/// error's debug dump: noise in a command's output, whose own message names the failure.
/// Its errors stay, and a filter naming it wins.
fn filter(directives: &str) -> Result<EnvFilter, String> {
    let full = if directives.contains("aws") {
        directives.to_string()
    } else {
        format!("{directives},aws_config=error,aws_smithy_runtime=warn,aws_runtime=warn")
    };
    EnvFilter::try_new(&full).map_err(|e| e.to_string())
}

/// Install the global subscriber. A second call (tests running several commands in one
/// process) keeps the first subscriber.
pub fn init(format: LogFormat, directives: &str) -> Result<(), String> {
    let (filter_layer, handle) = reload::Layer::new(filter(directives)?);
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => journal_stream_is_stderr(),
        LogFormat::Human | LogFormat::Json => false,
    };
    let installed = 'installed: {
        if journald {
            match tracing_journald::layer() {
                Ok(layer) => {
                    // Fields keep their own names (CLAIM_UID, VOLUME_ID) so `journalctl
                    // CLAIM_UID=...` works without a prefix.
                    let layer = layer
                        .with_field_prefix(None)
                        .with_syslog_identifier("hybridlet".to_string());
                    break 'installed tracing_subscriber::registry()
                        .with(filter_layer)
                        .with(layer)
                        .try_init();
                }
                Err(e) if format == LogFormat::Journald => {
                    return Err(format!("cannot reach the systemd journal: {e}"));
                }
                // Auto: stderr looked like the journal but its socket is gone; plain
                // lines on stderr still reach it.
                Err(_) => {}
            }
        }
        let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let lines = if format == LogFormat::Json {
            lines.json().flatten_event(true).boxed()
        } else {
            lines
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .boxed()
        };
        tracing_subscriber::registry()
            .with(filter_layer)
            .with(lines)
            .try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
    Ok(())
}

/// Replace the running filter (the daemon's `spec.logLevel`, at start and at reload).
pub fn set_filter(directives: &str) -> Result<(), String> {
    let new = filter(directives)?;
    match FILTER.get() {
        Some(handle) => handle.reload(new).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Whether `directives` make a filter ([`set_filter`] would accept them).
pub fn check_filter(directives: &str) -> Result<(), String> {
    filter(directives).map(|_| ())
}

/// systemd.exec(5): `JOURNAL_STREAM` holds the device and inode of the stream stdout and
/// stderr are connected to; presence alone is not enough (a child may inherit the variable
/// with stderr redirected elsewhere), so compare it with stderr itself.
fn journal_stream_is_stderr() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}
