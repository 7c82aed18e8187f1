//! Observability plumbing: the agent's own metrics and the admin HTTP server.
//!
//! Every component registers its metrics in an explicit `prometheus-client` registry
//! (prefix `hybridlet`) that is handed down at start-up; there are no global registries.
//! Values that are cheap to read at scrape time (uptime, subsystem state) are read then;
//! anything that could block (NVML, sysfs) must be sampled by its owner on a timer, so
//! that a scrape never waits on hardware.
//!
//! The admin server serves `/metrics` (OpenMetrics text when the scraper asks for it, as
//! Prometheus does, the Prometheus text format 0.0.4 otherwise), `/healthz` (the process is
//! alive and its event loop answers) and `/readyz` (every subsystem is ready; the body
//! lists those that are not).
//!
//! What this crate must never do: listen on anything but the configured address, or
//! expose configuration values or secrets.

mod agent;
pub mod format;
mod server;

pub use agent::{AgentMetrics, BuildInfo};
pub use prometheus_client;
pub use prometheus_client::registry::Registry;
pub use server::{AdminListener, AdminParts, AdminServer, AdminServerError, AdminTls, tls_config};

/// A fresh registry with hybridlet's metric prefix.
pub fn new_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::with_prefix("hybridlet")
}

/// Encode a registry as OpenMetrics text.
pub fn encode(registry: &prometheus_client::registry::Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
