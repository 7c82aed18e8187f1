use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;

/// Install the global subscriber. A second call (tests running several commands in one
/// process) keeps the first subscriber.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    // The AWS SDK logs each credentials lookup at info ("loaded base credentials ..."):
    // noise in a command's output. Its warnings stay, and a filter naming it wins.
    let filter = if filter.contains("aws") {
        filter.to_string()
    } else {
        format!("{filter},aws_config=warn,aws_smithy_runtime=warn,aws_runtime=warn")
    };
    let make_filter = || EnvFilter::try_new(&filter).map_err(|e| e.to_string());
    make_filter()?;
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => journal_stream_is_stderr(),
        LogFormat::Human | LogFormat::Json => false,
    };
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Fields keep their own names (CLAIM_UID, VOLUME_ID) so `journalctl
                // CLAIM_UID=...` works without a prefix.
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("hybridlet".to_string());
                let _ = tracing_subscriber::registry()
                    .with(make_filter()?)
                    .with(layer)
                    .try_init();
                return Ok(());
            }
            Err(e) if format == LogFormat::Journald => {
                return Err(format!("cannot reach the systemd journal: {e}"));
            }
            // Auto: stderr looked like the journal but its socket is gone; plain lines on
            // stderr still reach it.
            Err(_) => {}
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(make_filter()?)
        .with_writer(std::io::stderr);
    let _ = if format == LogFormat::Json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init()
    };
    Ok(())
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
