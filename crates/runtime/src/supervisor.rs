use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{Readiness, ReadyHandle};

/// Error type subsystems return; the supervisor only logs and counts it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a subsystem gets when it starts.
#[derive(Debug, Clone)]
pub struct SubsystemContext {
    /// Cancelled when the process shuts down; the subsystem must then stop promptly.
    pub shutdown: CancellationToken,
    /// Report readiness through this.
    pub ready: ReadyHandle,
}

/// A subsystem that ended.
#[derive(Debug)]
pub struct SubsystemExit {
    /// Its name.
    pub name: String,
    /// How it ended: `Ok` (returned), or the error or panic message.
    pub result: Result<(), String>,
}

/// Why shutdown was not clean.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// Subsystems still running when the grace period ran out (they were aborted).
    #[error("subsystems did not stop within {grace:?}: {}", stuck.join(", "))]
    GraceExceeded {
        /// The grace period.
        grace: Duration,
        /// Names of the subsystems that were still running.
        stuck: Vec<String>,
    },
    /// Subsystems that failed while stopping.
    #[error("subsystems failed while stopping: {}", failed.join("; "))]
    Failed {
        /// `name: reason` for each.
        failed: Vec<String>,
    },
}

/// Runs subsystems as tasks that share one cancellation token.
///
/// Any subsystem that ends before shutdown was requested is a failure of the whole
/// process (the caller decides to shut down); no task's end goes unobserved.
#[derive(Debug)]
pub struct Supervisor {
    shutdown: CancellationToken,
    readiness: Readiness,
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<Id, String>,
}

impl Supervisor {
    /// A supervisor reporting into `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        Self {
            shutdown: CancellationToken::new(),
            readiness,
            tasks: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// The token every subsystem watches.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Names of running subsystems.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.names.values().cloned().collect();
        names.sort();
        names
    }

    /// Start a subsystem. It is registered (up, not ready) before its task starts.
    pub fn spawn<F, Fut>(&mut self, name: &str, start: F)
    where
        F: FnOnce(SubsystemContext) -> Fut,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let ctx = SubsystemContext {
            shutdown: self.shutdown.child_token(),
            ready: self.readiness.register(name),
        };
        let fut = start(ctx);
        let handle = self
            .tasks
            .spawn(async move { fut.await.map_err(|e| error_chain(e.as_ref())) });
        self.names.insert(handle.id(), name.to_string());
        tracing::debug!(subsystem = name, "subsystem started");
    }

    /// Wait for the next subsystem to end. Pending forever when none are running, so it
    /// can sit in a `select!` beside signals.
    pub async fn next_exit(&mut self) -> SubsystemExit {
        match self.tasks.join_next_with_id().await {
            Some(joined) => self.record(joined),
            None => std::future::pending().await,
        }
    }

    fn record(
        &mut self,
        joined: Result<(Id, Result<(), String>), tokio::task::JoinError>,
    ) -> SubsystemExit {
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            Err(e) => {
                let why = if e.is_panic() {
                    "panicked".to_string()
                } else {
                    "was aborted".to_string()
                };
                (e.id(), Err(why))
            }
        };
        let name = self
            .names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"));
        let reason = match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        self.readiness.mark_down(&name, &reason);
        SubsystemExit { name, result }
    }

    /// Cancel every subsystem and wait up to `grace` for them to end; abort the rest.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), ShutdownError> {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut failed = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    let exit = self.record(joined);
                    match exit.result {
                        Ok(()) => tracing::debug!(subsystem = %exit.name, "subsystem stopped"),
                        Err(e) => {
                            tracing::error!(subsystem = %exit.name, error = %e, "subsystem failed while stopping");
                            failed.push(format!("{}: {e}", exit.name));
                        }
                    }
                }
                Ok(None) => break,
                Err(_elapsed) => {
                    let stuck = self.running();
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    return Err(ShutdownError::GraceExceeded { grace, stuck });
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ShutdownError::Failed { failed })
        }
    }
}

/// An error and its sources, `outer: inner: innermost` (library errors often say little
/// at the top). A source whose text the chain already holds is left out: wrappers such
/// as the AWS SDK's repeat their inner error.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_name_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Leaf(String);
        #[derive(Debug, thiserror::Error)]
        #[error("{text}")]
        struct Wrap {
            text: String,
            #[source]
            inner: Leaf,
        }
        let e = Wrap {
            text: "service error: NotFound: no cluster".into(),
            inner: Leaf("NotFound: no cluster".into()),
        };
        assert_eq!(error_chain(&e), "service error: NotFound: no cluster");
        let e = Wrap {
            text: "dispatch failure".into(),
            inner: Leaf("connection refused".into()),
        };
        assert_eq!(error_chain(&e), "dispatch failure: connection refused");
    }

    #[tokio::test]
    async fn clean_shutdown_within_grace() {
        let readiness = Readiness::new();
        let mut sup = Supervisor::new(readiness.clone());
        for name in ["a", "b"] {
            sup.spawn(name, |ctx| async move {
                ctx.ready.set_ready();
                ctx.shutdown.cancelled().await;
                Ok(())
            });
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while !readiness.is_ready() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(sup.running(), ["a", "b"]);
        sup.shutdown(Duration::from_secs(5)).await.unwrap();
        assert!(readiness.snapshot().iter().all(|c| !c.up && !c.ready));
    }

    #[tokio::test]
    async fn early_exit_and_panic_are_reported_by_name() {
        let mut sup = Supervisor::new(Readiness::new());
        sup.spawn("quitter", |_ctx| async {
            Err::<(), BoxError>("port in use".into())
        });
        let exit = sup.next_exit().await;
        assert_eq!(exit.name, "quitter");
        assert_eq!(exit.result.unwrap_err(), "port in use");

        sup.spawn("panicker", |_ctx| async {
            panic!("deliberate panic in a subsystem");
        });
        let exit = sup.next_exit().await;
        assert_eq!(exit.name, "panicker");
        assert_eq!(exit.result.unwrap_err(), "panicked");
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_subsystem_is_aborted_after_grace() {
        let mut sup = Supervisor::new(Readiness::new());
        sup.spawn("stubborn", |_ctx| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        sup.spawn("polite", |ctx| async move {
            ctx.shutdown.cancelled().await;
            Ok(())
        });
        let err = sup.shutdown(Duration::from_secs(3)).await.unwrap_err();
        match err {
            ShutdownError::GraceExceeded { stuck, .. } => assert_eq!(stuck, ["stubborn"]),
            other => panic!("unexpected {other}"),
        }
    }
}
