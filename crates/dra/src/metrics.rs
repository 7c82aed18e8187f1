//! What the DRA drivers export: calls by operation and result with their latency,
//! checkpoint write latency, prepared claims and devices, unhealthy devices, and when the
//! slices were last published — labelled by driver, so both drivers share the families.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(String, String)>;

/// The DRA families; clone one per driver with [`DraMetrics::for_driver`].
#[derive(Debug, Clone)]
pub struct DraMetrics {
    driver: String,
    operations: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    checkpoint: Family<Labels, Histogram>,
    prepared_claims: Family<Labels, Gauge>,
    prepared_devices: Family<Labels, Gauge>,
    unhealthy: Family<Labels, Gauge>,
    devices: Family<Labels, Gauge>,
    published: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    orphans: Family<Labels, Counter>,
}

fn latency() -> Histogram {
    // 0.5 ms .. 30 s: a GPU claim is one or two fsyncs; a VF move can take seconds.
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0,
    ])
}

impl DraMetrics {
    /// Register the families (once per process).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            driver: String::new(),
            operations: Family::default(),
            duration: Family::new_with_constructor(latency as fn() -> Histogram),
            checkpoint: Family::new_with_constructor(latency as fn() -> Histogram),
            prepared_claims: Family::default(),
            prepared_devices: Family::default(),
            unhealthy: Family::default(),
            devices: Family::default(),
            published: Family::default(),
            orphans: Family::default(),
        };
        registry.register(
            "dra_operations",
            "DRA calls from the kubelet, by driver, operation (prepare, unprepare) and result (ok, error); one per claim",
            m.operations.clone(),
        );
        registry.register_with_unit(
            "dra_operation_duration",
            "Time to prepare or unprepare one claim, by driver and operation",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register_with_unit(
            "dra_checkpoint_write_duration",
            "Time to write the checkpoint (fsync'ed; one write can cover several claims)",
            Unit::Seconds,
            m.checkpoint.clone(),
        );
        registry.register(
            "dra_prepared_claims",
            "Claims prepared on this node now, by driver",
            m.prepared_claims.clone(),
        );
        registry.register(
            "dra_prepared_devices",
            "Devices prepared for claims on this node now, by driver",
            m.prepared_devices.clone(),
        );
        registry.register(
            "dra_unhealthy_devices",
            "Devices reported unhealthy (tainted in the slice and on the health stream), by driver",
            m.unhealthy.clone(),
        );
        registry.register(
            "dra_devices",
            "Devices the driver publishes, by state: free (healthy, not prepared), allocated (prepared for a claim), unhealthy (tainted); the on-prem capacity signal for bursting",
            m.devices.clone(),
        );
        registry.register(
            "dra_orphaned_claims_released",
            "Prepared claims whose ResourceClaim was gone (deleted, or its name reused with another UID) past the grace period with no pod of theirs left on the node: unprepared and their devices released, by driver",
            m.orphans.clone(),
        );
        registry.register_with_unit(
            "dra_slices_published_timestamp",
            "Unix time of the last successful ResourceSlice publication or reconcile, by driver",
            Unit::Seconds,
            m.published.clone(),
        );
        m
    }

    /// The same families, labelled with `driver`; its gauges start at 0.
    pub fn for_driver(&self, driver: &str) -> Self {
        let m = Self {
            driver: driver.to_string(),
            ..self.clone()
        };
        for family in [&m.prepared_claims, &m.prepared_devices, &m.unhealthy] {
            family.get_or_create(&m.labels(&[])).set(0);
        }
        let _ = m.orphans.get_or_create(&m.labels(&[]));
        m
    }

    /// Drop this driver's gauges (a reload disabled it): a stopped driver prepares nothing
    /// and publishes nothing. Counters and histograms stay.
    pub fn forget(&self) {
        let labels = self.labels(&[]);
        for family in [
            &self.prepared_claims,
            &self.prepared_devices,
            &self.unhealthy,
        ] {
            family.remove(&labels);
        }
        self.published.remove(&labels);
        for state in ["free", "allocated", "unhealthy"] {
            self.devices.remove(&self.labels(&[("state", state)]));
        }
    }

    fn labels(&self, extra: &[(&str, &str)]) -> Labels {
        let mut l = vec![("driver".to_string(), self.driver.clone())];
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    }

    /// One claim's call finished.
    pub fn operation(&self, operation: &str, ok: bool, took: Duration) {
        self.operations
            .get_or_create(&self.labels(&[
                ("operation", operation),
                ("result", if ok { "ok" } else { "error" }),
            ]))
            .inc();
        self.duration
            .get_or_create(&self.labels(&[("operation", operation)]))
            .observe(took.as_secs_f64());
    }

    /// A checkpoint write finished.
    pub fn checkpoint_written(&self, took: Duration) {
        self.checkpoint
            .get_or_create(&self.labels(&[]))
            .observe(took.as_secs_f64());
    }

    /// The prepared state now.
    pub fn prepared(&self, claims: usize, devices: usize) {
        self.prepared_claims
            .get_or_create(&self.labels(&[]))
            .set(i64::try_from(claims).unwrap_or(i64::MAX));
        self.prepared_devices
            .get_or_create(&self.labels(&[]))
            .set(i64::try_from(devices).unwrap_or(i64::MAX));
    }

    /// How many devices are unhealthy now.
    pub fn unhealthy(&self, count: usize) {
        self.unhealthy
            .get_or_create(&self.labels(&[]))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The devices by state now.
    pub fn devices(&self, counts: crate::DeviceCounts) {
        for (state, n) in [
            ("free", counts.free),
            ("allocated", counts.allocated),
            ("unhealthy", counts.unhealthy),
            ("blocked", counts.blocked),
        ] {
            self.devices
                .get_or_create(&self.labels(&[("state", state)]))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// An orphaned claim was released.
    pub fn orphan_released(&self) {
        self.orphans.get_or_create(&self.labels(&[])).inc();
    }

    /// The slices were published (or found current) just now.
    pub fn published(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.published.get_or_create(&self.labels(&[])).set(now);
    }
}
