use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hybridlet_runtime::Readiness;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// What was built, for `hybridlet_build_info`.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    /// Crate version.
    pub version: String,
    /// Git commit, or `unknown`.
    pub commit: String,
    /// Build date (UTC, RFC 3339; the commit's date for reproducible builds), or `unknown`.
    pub date: String,
}

/// The agent's own metrics.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Configuration reloads by result (`ok`, `invalid`).
    pub config_reloads: Family<Vec<(String, String)>, Counter>,
    /// Admin HTTP requests by route and status code.
    pub admin_requests: Family<Vec<(String, String)>, Counter>,
}

impl AgentMetrics {
    /// Register the agent metrics. `mode` is `standalone` or `joined`.
    pub fn register(
        registry: &mut Registry,
        build: &BuildInfo,
        mode: &str,
        readiness: Readiness,
    ) -> Self {
        registry.register(
            "build",
            "hybridlet build information",
            Info::new(vec![
                ("version".to_string(), build.version.clone()),
                ("commit".to_string(), build.commit.clone()),
                ("build_date".to_string(), build.date.clone()),
            ]),
        );
        registry.register(
            "config",
            "Configuration mode in use",
            Info::new(vec![("mode".to_string(), mode.to_string())]),
        );
        let start_time: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        start_time.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register_with_unit(
            "start_time",
            "Unix time at which the process started",
            Unit::Seconds,
            start_time,
        );
        registry.register_collector(Box::new(StateCollector {
            started: Instant::now(),
            readiness,
        }));
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) by result: ok, invalid (refused, nothing changed), failed (valid, a step of applying it failed)",
            config_reloads.clone(),
        );
        let admin_requests = Family::default();
        registry.register(
            "admin_http_requests",
            "Requests to the admin HTTP server by route and status code",
            admin_requests.clone(),
        );
        Self {
            config_reloads,
            admin_requests,
        }
    }

    /// Count a configuration reload: `ok` (applied), `invalid` (refused; nothing
    /// changed) or `failed` (valid, but a step of applying it failed; see the log).
    pub fn config_reloaded(&self, result: &str) {
        self.config_reloads
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }
}

/// Values read at scrape time: uptime and per-subsystem state. Reading them only takes a
/// short in-memory lock.
#[derive(Debug)]
struct StateCollector {
    started: Instant,
    readiness: Readiness,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let uptime = ConstGauge::new(self.started.elapsed().as_secs_f64());
        let m = encoder.encode_descriptor(
            "uptime",
            "Seconds since the process started",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        uptime.encode(m)?;

        let snapshot = self.readiness.snapshot();
        let ready = ConstGauge::new(i64::from(self.readiness.is_ready()));
        ready.encode(encoder.encode_descriptor(
            "ready",
            "1 when every enabled subsystem is ready",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, pick) in [
            (
                "subsystem_up",
                "1 while the subsystem's task runs",
                (|c: &hybridlet_runtime::ComponentStatus| c.up) as fn(&_) -> bool,
            ),
            (
                "subsystem_ready",
                "1 when the subsystem reports ready",
                |c: &hybridlet_runtime::ComponentStatus| c.ready,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for c in &snapshot {
                let labels = [("subsystem", c.name.as_str())];
                ConstGauge::new(i64::from(pick(c))).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
