use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// The state of one subsystem, as shown by `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentStatus {
    /// Subsystem name.
    pub name: String,
    /// Its task is running.
    pub up: bool,
    /// It has said it is ready to serve.
    pub ready: bool,
    /// Why it is not ready, when it said so.
    pub reason: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    components: BTreeMap<String, ComponentStatus>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

/// Explicit readiness: ready only when every registered subsystem is ready.
#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A readiness set with no subsystems (and therefore not ready).
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent (every update
        // is a single insert), so a poisoned lock is still safe to use.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ComponentStatus)) {
        {
            let mut state = self.lock();
            let entry =
                state
                    .components
                    .entry(name.to_string())
                    .or_insert_with(|| ComponentStatus {
                        name: name.to_string(),
                        up: false,
                        ready: false,
                        reason: None,
                    });
            f(entry);
        }
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Register a subsystem; it starts up but not ready.
    pub fn register(&self, name: &str) -> ReadyHandle {
        self.update(name, |c| {
            c.up = true;
            c.ready = false;
            c.reason = Some("starting".to_string());
        });
        ReadyHandle {
            name: name.to_string(),
            readiness: self.clone(),
        }
    }

    /// Mark a subsystem as stopped (its task ended).
    pub fn mark_down(&self, name: &str, reason: &str) {
        self.update(name, |c| {
            c.up = false;
            c.ready = false;
            c.reason = Some(reason.to_string());
        });
    }

    /// Forget a subsystem (stopped on purpose, not failed): it no longer counts.
    pub fn remove(&self, name: &str) {
        let removed = self.lock().components.remove(name).is_some();
        if removed {
            self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// True when at least one subsystem is registered and all are ready.
    pub fn is_ready(&self) -> bool {
        let state = self.lock();
        !state.components.is_empty() && state.components.values().all(|c| c.ready)
    }

    /// Every subsystem's status, by name.
    pub fn snapshot(&self) -> Vec<ComponentStatus> {
        self.lock().components.values().cloned().collect()
    }

    /// A receiver that changes whenever any status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// A subsystem's handle for reporting its own readiness.
#[derive(Debug, Clone)]
pub struct ReadyHandle {
    name: String,
    readiness: Readiness,
}

impl ReadyHandle {
    /// The subsystem's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subsystem is ready to serve.
    pub fn set_ready(&self) {
        self.readiness.update(&self.name, |c| {
            c.ready = true;
            c.reason = None;
        });
    }

    /// The subsystem cannot serve right now, and why.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.readiness.update(&self.name, |c| {
            c.ready = false;
            c.reason = Some(reason);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_are() {
        let r = Readiness::new();
        assert!(!r.is_ready(), "nothing registered is not ready");
        let a = r.register("admin");
        let b = r.register("dra");
        let mut rx = r.subscribe();
        a.set_ready();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(!r.is_ready());
        b.set_ready();
        assert!(r.is_ready());
        b.set_not_ready("kubelet gone");
        assert!(!r.is_ready());
        let snap = r.snapshot();
        assert_eq!(snap[1].name, "dra");
        assert_eq!(snap[1].reason.as_deref(), Some("kubelet gone"));
        b.set_ready();
        r.mark_down("admin", "exited");
        assert!(!r.is_ready());
        assert!(!r.snapshot()[0].up);
    }
}
