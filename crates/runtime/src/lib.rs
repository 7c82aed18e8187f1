//! Shared runtime pieces for `hybridlet run`.
//!
//! * [`Supervisor`]: starts each subsystem as a task with a shared cancellation token,
//!   treats any subsystem that stops on its own as a failure, and shuts everything down
//!   within a grace period. This is the one shutdown path.
//! * [`Readiness`]: explicit per-subsystem readiness; the process is ready only when every
//!   registered subsystem says so. It feeds sd_notify `READY=1`, `/readyz` and metrics.
//! * [`Signals`]: SIGTERM, SIGINT and SIGHUP as one stream.
//! * [`Backoff`]: bounded exponential backoff with jitter for retries.
//!
//! What this crate must never do: perform IO on the host or the network, or know about
//! any particular subsystem.

mod backoff;
mod readiness;
mod signals;
mod supervisor;

pub use backoff::{Backoff, jittered};
pub use readiness::{ComponentStatus, Readiness, ReadyHandle};
pub use signals::{Signal, Signals};
pub use supervisor::{
    BoxError, ShutdownError, Stopped, SubsystemContext, SubsystemExit, Supervisor, error_chain,
};
pub use tokio_util::sync::CancellationToken;
