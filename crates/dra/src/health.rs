//! Device health: one board per driver that observers write (the XID watcher for GPUs, the
//! PF link state for VFs) and two consumers read: the kubelet's health stream
//! (`DRAResourceHealth.NodeWatchResources`, KEP-4680), which lands in the pod's status, and
//! the ResourceSlice, where an unhealthy device carries a taint (KEP-5055) so that the
//! scheduler stops placing new claims on it. A device that recovers is untainted again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hybridlet_proto::dra_health::{v1, v1alpha1};
use tonic::{Request, Response, Status};

/// How often the complete list is sent again without a change, so the kubelet never
/// times an entry out (its default is 30 s).
pub const HEALTH_RESEND: Duration = Duration::from_secs(10);
/// The timeout announced with each entry (`health_check_timeout_seconds`).
pub const HEALTH_TIMEOUT_SECONDS: i64 = 60;
/// The kubelet truncates longer messages.
const MAX_MESSAGE: usize = 1024;

/// A device taint as published in the ResourceSlice.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Taint {
    /// `<driver domain>/<reason>`, e.g. `gpu.hybridlet.io/xid`.
    pub key: String,
    /// e.g. the XID code.
    pub value: String,
    /// `NoSchedule` (keep new claims away) or `NoExecute` (also evict).
    pub effect: String,
}

/// One device's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Healthy or not.
    pub healthy: bool,
    /// Why, for people ("XID 79: GPU has fallen off the bus").
    pub message: String,
    /// What goes into the slice while unhealthy.
    pub taint: Option<Taint>,
    /// When it last changed.
    pub since: SystemTime,
}

impl DeviceHealth {
    fn healthy() -> Self {
        Self {
            healthy: true,
            message: String::new(),
            taint: None,
            since: SystemTime::now(),
        }
    }
}

/// The health of one driver's devices, by device name; every device starts healthy.
#[derive(Debug, Clone)]
pub struct HealthBoard {
    devices: Arc<Mutex<BTreeMap<String, DeviceHealth>>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl HealthBoard {
    /// A board for these devices.
    pub fn new(devices: impl IntoIterator<Item = String>) -> Self {
        Self {
            devices: Arc::new(Mutex::new(
                devices
                    .into_iter()
                    .map(|d| (d, DeviceHealth::healthy()))
                    .collect(),
            )),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceHealth>> {
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mark `device` unhealthy; true when that changed something.
    pub fn set_unhealthy(&self, device: &str, message: &str, taint: Taint) -> bool {
        self.update(device, |h| {
            if !h.healthy && h.message == message && h.taint.as_ref() == Some(&taint) {
                return false;
            }
            *h = DeviceHealth {
                healthy: false,
                message: message.to_string(),
                taint: Some(taint),
                since: SystemTime::now(),
            };
            true
        })
    }

    /// Mark `device` healthy again; true when it was not.
    pub fn set_healthy(&self, device: &str) -> bool {
        self.update(device, |h| {
            if h.healthy {
                return false;
            }
            *h = DeviceHealth::healthy();
            true
        })
    }

    fn update(&self, device: &str, f: impl FnOnce(&mut DeviceHealth) -> bool) -> bool {
        let changed = match self.lock().get_mut(device) {
            Some(h) => f(h),
            None => false,
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        changed
    }

    /// Every device's health now.
    pub fn snapshot(&self) -> BTreeMap<String, DeviceHealth> {
        self.lock().clone()
    }

    /// The taint of `device`, if it has one.
    pub fn taint(&self, device: &str) -> Option<Taint> {
        self.lock().get(device).and_then(|h| h.taint.clone())
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// The health stream over one board: `DRAResourceHealth` in both published versions.
#[derive(Debug, Clone)]
pub struct HealthService {
    pool: String,
    board: HealthBoard,
}

impl HealthService {
    /// For the devices of `pool` (the node name) on `board`.
    pub fn new(pool: &str, board: HealthBoard) -> Self {
        Self {
            pool: pool.to_string(),
            board,
        }
    }
}

/// `v1alpha1.DRAResourceHealth` over a [`HealthService`].
#[derive(Debug, Clone)]
pub struct V1alpha1Health(pub HealthService);

/// `v1.DRAResourceHealth` over a [`HealthService`].
#[derive(Debug, Clone)]
pub struct V1Health(pub HealthService);

macro_rules! health_service {
    ($service:ty, $api:ident) => {
        impl $service {
            fn response(&self) -> $api::NodeWatchResourcesResponse {
                let devices = self
                    .0
                    .board
                    .snapshot()
                    .into_iter()
                    .map(|(name, h)| $api::DeviceHealth {
                        device: Some($api::DeviceIdentifier {
                            pool_name: self.0.pool.clone(),
                            device_name: name,
                        }),
                        health: if h.healthy {
                            $api::HealthStatus::Healthy
                        } else {
                            $api::HealthStatus::Unhealthy
                        } as i32,
                        last_updated_time: unix(SystemTime::now()),
                        health_check_timeout_seconds: HEALTH_TIMEOUT_SECONDS,
                        message: truncate(&h.message),
                    })
                    .collect();
                $api::NodeWatchResourcesResponse { devices }
            }
        }

        #[tonic::async_trait]
        impl $api::dra_resource_health_server::DraResourceHealth for $service {
            type NodeWatchResourcesStream = tokio_stream::wrappers::ReceiverStream<
                Result<$api::NodeWatchResourcesResponse, Status>,
            >;

            async fn node_watch_resources(
                &self,
                _request: Request<$api::NodeWatchResourcesRequest>,
            ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let this = self.clone();
                let mut changes = this.0.board.subscribe();
                tokio::spawn(async move {
                    loop {
                        changes.borrow_and_update();
                        if tx.send(Ok(this.response())).await.is_err() {
                            return; // the kubelet went away
                        }
                        tokio::select! {
                            changed = changes.changed() => if changed.is_err() { return },
                            () = tokio::time::sleep(HEALTH_RESEND) => {}
                            () = tx.closed() => return,
                        }
                    }
                });
                Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
                    rx,
                )))
            }
        }
    };
}

health_service!(V1alpha1Health, v1alpha1);
health_service!(V1Health, v1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_counted_once_and_messages_are_bounded() {
        let board = HealthBoard::new(["gpu-0".to_string(), "gpu-1".to_string()]);
        let rx = board.subscribe();
        let taint = Taint {
            key: "gpu.hybridlet.io/xid".into(),
            value: "79".into(),
            effect: "NoSchedule".into(),
        };
        assert!(board.set_unhealthy("gpu-1", "XID 79", taint.clone()));
        assert!(!board.set_unhealthy("gpu-1", "XID 79", taint.clone()));
        assert!(!board.set_unhealthy("gpu-9", "no such device", taint.clone()));
        assert_eq!(*rx.borrow(), 1);
        assert_eq!(board.taint("gpu-1"), Some(taint));
        assert!(board.set_healthy("gpu-1"));
        assert!(!board.set_healthy("gpu-1"));
        assert_eq!(*rx.borrow(), 2);
        assert!(board.snapshot().values().all(|h| h.healthy));
        let long = "é".repeat(600);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_MESSAGE && cut.ends_with("..."));
    }
}
