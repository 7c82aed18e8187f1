use std::io;

use tokio::signal::unix::{SignalKind, signal};

/// A process signal hybridlet acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: systemd's stop.
    Terminate,
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGHUP: reload configuration.
    Hangup,
}

impl Signal {
    /// The conventional name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP as one stream. Creating it replaces the default actions
/// (terminate), so create it before anything else that takes time.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers. Needs a running tokio runtime.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Signal {
        loop {
            tokio::select! {
                Some(()) = self.term.recv() => return Signal::Terminate,
                Some(()) = self.int.recv() => return Signal::Interrupt,
                Some(()) = self.hup.recv() => return Signal::Hangup,
                else => std::future::pending::<()>().await,
            }
        }
    }
}
