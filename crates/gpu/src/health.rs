//! GPU health for the DRA driver: a critical XID error outside the application-caused set
//! (13, 31, 43, 45, 68, 109, as NVIDIA's own driver ignores them) taints the GPU
//! `<driver>/xid=<code>:NoSchedule` on its health board (the kubelet's health stream and
//! the ResourceSlice read it). It recovers after [`GPU_RECOVERY`] without another such
//! error, once NVML reads it again (a reset GPU, or a transient fault): taints are not
//! sticky until a restart.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hybridlet_dra::{HealthBoard, Taint};

use crate::{GpuSample, XidEvent};

/// XIDs caused by applications (bad memory access, a killed context): not the GPU's fault.
pub const APPLICATION_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];
/// How long a GPU stays unhealthy after its last fatal XID.
pub const GPU_RECOVERY: Duration = Duration::from_secs(600);

/// GPU health from XID errors.
pub struct GpuHealth {
    board: HealthBoard,
    driver: String,
    /// GPU UUID → its devices in the slice (the GPU, or its MIG devices).
    names: BTreeMap<String, Vec<String>>,
    /// GPU UUID → when its last fatal XID arrived.
    fatal: Mutex<BTreeMap<String, Instant>>,
    recovery: Duration,
    /// The clock (tests drive their own).
    now: Box<dyn Fn() -> Instant + Send + Sync>,
}

impl std::fmt::Debug for GpuHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuHealth")
            .field("driver", &self.driver)
            .field("recovery", &self.recovery)
            .finish_non_exhaustive()
    }
}

impl GpuHealth {
    /// For the GPU driver `driver`, whose devices `names` lists as (GPU UUID, device
    /// name): a GPU's MIG devices are all its own, and an XID on it taints them all.
    pub fn new(
        board: HealthBoard,
        driver: &str,
        names: impl IntoIterator<Item = (String, String)>,
        recovery: Duration,
    ) -> Self {
        let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (uuid, name) in names {
            grouped.entry(uuid).or_default().push(name);
        }
        Self {
            board,
            driver: driver.to_string(),
            names: grouped,
            fatal: Mutex::new(BTreeMap::new()),
            recovery,
            now: Box::new(Instant::now),
        }
    }

    /// The same policy reading time from `now`.
    #[cfg(test)]
    fn with_clock(mut self, now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        self.now = Box::new(now);
        self
    }

    fn fatal(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl GpuHealth {
    /// An XID error arrived: a fatal one makes the GPU unhealthy and taints it.
    pub fn xid(&self, event: &XidEvent) {
        if event.xid.is_some_and(|x| APPLICATION_XIDS.contains(&x)) {
            return;
        }
        let Some(devices) = self.names.get(&event.uuid) else {
            return;
        };
        let code = event
            .xid
            .map_or_else(|| "unknown".to_string(), |x| x.to_string());
        let meaning = event
            .xid
            .map_or("an XID NVML could not decode", crate::xid_meaning);
        let at = (self.now)();
        self.fatal().insert(event.uuid.clone(), at);
        let message = format!("XID {code}: {meaning}");
        for device in devices {
            if self.board.set_unhealthy(
                device,
                &message,
                Taint {
                    key: format!("{}/xid", self.driver),
                    value: code.clone(),
                    effect: "NoSchedule".into(),
                },
            ) {
                tracing::warn!(device = %device, gpu_uuid = %event.uuid, "GPU marked unhealthy and tainted: {message}");
            }
        }
    }

    /// A sample finished: a GPU NVML reads again, past the recovery time since its last
    /// fatal XID, is healthy again.
    pub fn sampled(&self, gpus: &[GpuSample]) {
        let mut fatal = self.fatal();
        let recovered: Vec<String> = fatal
            .iter()
            .filter(|(uuid, at)| {
                (self.now)().saturating_duration_since(**at) >= self.recovery
                    && gpus.iter().any(|s| &s.uuid == *uuid)
            })
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in recovered {
            fatal.remove(&uuid);
            for device in self.names.get(&uuid).into_iter().flatten() {
                if self.board.set_healthy(device) {
                    tracing::info!(device = %device, gpu_uuid = %uuid, "GPU healthy again ({}s without a fatal XID, NVML reads it); taint removed", self.recovery.as_secs());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_fatal_xid_taints_until_the_gpu_reads_again_after_the_recovery_time() {
        let board = HealthBoard::new(["gpu-0".to_string()]);
        let uuid = "GPU-0".to_string();
        // A clock the test moves: the recovery time passes exactly when it says so.
        let start = Instant::now();
        let offset = std::sync::Arc::new(Mutex::new(Duration::ZERO));
        let clock = offset.clone();
        let policy = GpuHealth::new(
            board.clone(),
            "gpu.hybridlet.io",
            [(uuid.clone(), "gpu-0".to_string())],
            Duration::from_secs(300),
        )
        .with_clock(move || start + *clock.lock().unwrap());
        let advance = |by: Duration| *offset.lock().unwrap() += by;
        let sample = GpuSample {
            uuid: uuid.clone(),
            ..GpuSample::default()
        };
        policy.xid(&XidEvent {
            uuid: uuid.clone(),
            xid: Some(31),
        });
        assert!(
            board.snapshot()["gpu-0"].healthy,
            "application XIDs do not count"
        );
        policy.xid(&XidEvent {
            uuid: uuid.clone(),
            xid: Some(48),
        });
        let h = &board.snapshot()["gpu-0"];
        assert!(!h.healthy);
        assert_eq!(
            h.message,
            "XID 48: double-bit ECC error: drain the node and reset the GPU"
        );
        assert_eq!(
            h.taint,
            Some(Taint {
                key: "gpu.hybridlet.io/xid".into(),
                value: "48".into(),
                effect: "NoSchedule".into()
            })
        );
        advance(Duration::from_secs(299));
        policy.sampled(std::slice::from_ref(&sample));
        assert!(!board.snapshot()["gpu-0"].healthy, "too early");
        advance(Duration::from_secs(1));
        policy.sampled(&[]);
        assert!(!board.snapshot()["gpu-0"].healthy, "NVML did not read it");
        policy.sampled(&[sample]);
        assert!(board.snapshot()["gpu-0"].healthy);
        assert_eq!(board.taint("gpu-0"), None);
    }
}
