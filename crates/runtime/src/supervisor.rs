use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use tokio::task::{AbortHandle, Id, JoinSet};
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

/// How [`Supervisor::stop`] ended a subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// It returned within the grace period.
    Cleanly,
    /// It returned an error or panicked while stopping.
    Failed(String),
    /// It was still running when the grace period ran out, and was aborted.
    Aborted,
    /// No subsystem of that name was running.
    NotRunning,
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
/// process (the caller decides to shut down); no task's end goes unobserved. One
/// subsystem can also be stopped on its own ([`Supervisor::stop`], for a reload that
/// disables or restarts it): it gets its own token cancelled and the same grace period.
#[derive(Debug)]
pub struct Supervisor {
    shutdown: CancellationToken,
    readiness: Readiness,
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<Id, String>,
    /// Each running subsystem's own token and abort handle, by name.
    handles: HashMap<String, (CancellationToken, AbortHandle)>,
    /// Exits seen while [`Supervisor::stop`] waited for another subsystem.
    pending: VecDeque<SubsystemExit>,
}

impl Supervisor {
    /// A supervisor reporting into `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        Self {
            shutdown: CancellationToken::new(),
            readiness,
            tasks: JoinSet::new(),
            names: HashMap::new(),
            handles: HashMap::new(),
            pending: VecDeque::new(),
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

    /// Whether a subsystem of this name is running.
    pub fn is_running(&self, name: &str) -> bool {
        self.handles.contains_key(name)
    }

    /// Start a subsystem. It is registered (up, not ready) before its task starts. Names
    /// are unique: stop the running one first to start another of the same name.
    pub fn spawn<F, Fut>(&mut self, name: &str, start: F)
    where
        F: FnOnce(SubsystemContext) -> Fut,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        debug_assert!(
            !self.is_running(name),
            "subsystem {name} is already running"
        );
        let token = self.shutdown.child_token();
        let ctx = SubsystemContext {
            shutdown: token.clone(),
            ready: self.readiness.register(name),
        };
        let fut = start(ctx);
        let handle = self
            .tasks
            .spawn(async move { fut.await.map_err(|e| error_chain(e.as_ref())) });
        self.names.insert(handle.id(), name.to_string());
        self.handles.insert(name.to_string(), (token, handle));
        tracing::debug!(subsystem = name, "subsystem started");
    }

    /// Wait for the next subsystem to end. Pending forever when none are running, so it
    /// can sit in a `select!` beside signals.
    pub async fn next_exit(&mut self) -> SubsystemExit {
        if let Some(exit) = self.pending.pop_front() {
            return exit;
        }
        match self.tasks.join_next_with_id().await {
            Some(joined) => self.record(joined),
            None => std::future::pending().await,
        }
    }

    /// Stop one subsystem: cancel its token and wait up to `grace` for it to end, then
    /// abort it. It leaves the readiness set (a disabled subsystem does not hold the
    /// process unready). Other subsystems that end meanwhile are kept for
    /// [`Supervisor::next_exit`].
    pub async fn stop(&mut self, name: &str, grace: Duration) -> Stopped {
        let Some((token, abort)) = self.handles.get(name).cloned() else {
            return Stopped::NotRunning;
        };
        token.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut aborted = false;
        loop {
            let joined = if aborted {
                self.tasks.join_next_with_id().await
            } else {
                match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                    Ok(joined) => joined,
                    Err(_elapsed) => {
                        tracing::warn!(
                            subsystem = name,
                            ?grace,
                            "subsystem did not stop in time; aborting it"
                        );
                        abort.abort();
                        aborted = true;
                        continue;
                    }
                }
            };
            let Some(joined) = joined else {
                return Stopped::NotRunning;
            };
            let exit = self.record(joined);
            if exit.name != name {
                self.pending.push_back(exit);
                continue;
            }
            self.readiness.remove(name);
            return match exit.result {
                Ok(()) => Stopped::Cleanly,
                Err(_) if aborted => Stopped::Aborted,
                Err(e) => Stopped::Failed(e),
            };
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
        self.handles.remove(&name);
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
    async fn one_subsystem_stops_and_the_others_keep_running() {
        let readiness = Readiness::new();
        let mut sup = Supervisor::new(readiness.clone());
        for name in ["admin", "csi"] {
            sup.spawn(name, |ctx| async move {
                ctx.ready.set_ready();
                ctx.shutdown.cancelled().await;
                Ok(())
            });
        }
        sup.spawn("stubborn", |ctx| async move {
            ctx.ready.set_ready();
            std::future::pending::<()>().await;
            Ok(())
        });
        // A subsystem that fails while another is being stopped is not lost.
        sup.spawn("quitter", |ctx| async move {
            ctx.ready.set_ready();
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err::<(), BoxError>("gone".into())
        });
        tokio::task::yield_now().await;
        assert_eq!(
            sup.stop("stubborn", Duration::from_secs(1)).await,
            Stopped::Aborted
        );
        assert_eq!(
            sup.stop("csi", Duration::from_secs(1)).await,
            Stopped::Cleanly
        );
        assert_eq!(
            sup.stop("csi", Duration::from_secs(1)).await,
            Stopped::NotRunning
        );
        assert_eq!(sup.running(), ["admin"]);
        let names: Vec<String> = readiness.snapshot().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["admin", "quitter"]);
        let exit = sup.next_exit().await;
        assert_eq!(
            (exit.name.as_str(), exit.result),
            ("quitter", Err("gone".to_string()))
        );
        // The name is free again.
        sup.spawn("csi", |ctx| async move {
            ctx.ready.set_ready();
            ctx.shutdown.cancelled().await;
            Ok(())
        });
        assert!(sup.is_running("csi"));
        sup.shutdown(Duration::from_secs(1)).await.unwrap();
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
