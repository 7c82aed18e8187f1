use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::CsiError;

type MethodCode = Vec<(String, String)>;
type Method = Vec<(String, String)>;

/// CSI call counts and latencies, by method and gRPC code.
#[derive(Debug, Clone)]
pub struct CsiMetrics {
    operations: Family<MethodCode, Counter>,
    duration: Family<Method, Histogram>,
}

fn new_histogram() -> Histogram {
    // 1 ms .. ~2 min: bind mounts take microseconds, NFS mounts up to the deadline.
    Histogram::new([0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0, 60.0, 120.0])
}

impl Default for CsiMetrics {
    fn default() -> Self {
        Self {
            operations: Family::default(),
            duration: Family::new_with_constructor(new_histogram as fn() -> Histogram),
        }
    }
}

impl CsiMetrics {
    /// Register `csi_operations_total{method,code}` and
    /// `csi_operation_duration_seconds{method}`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "csi_operations",
            "CSI calls served, by method and gRPC status code",
            m.operations.clone(),
        );
        registry.register_with_unit(
            "csi_operation_duration",
            "Time to serve a CSI call, by method",
            Unit::Seconds,
            m.duration.clone(),
        );
        m
    }

    /// Record one call.
    pub(crate) fn observe<T>(&self, method: &str, started: Instant, result: &Result<T, CsiError>) {
        let code = match result {
            Ok(_) => "OK".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        self.operations
            .get_or_create(&vec![
                ("method".to_string(), method.to_string()),
                ("code".to_string(), code),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("method".to_string(), method.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }
}
