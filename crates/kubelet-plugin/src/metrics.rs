use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// What the plugin sockets saw of the kubelet: registration verdicts, requests refused
/// below the gRPC layer, and plugins still unregistered after their deadline.
#[derive(Debug, Clone, Default)]
pub struct PluginMetrics {
    notifications: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    registered: Family<Labels, Gauge>,
    overdue: Family<Labels, Gauge>,
}

impl PluginMetrics {
    /// Register the `kubelet_plugin_*` families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kubelet_plugin_registrations",
            "Registration verdicts the kubelet sent (NotifyRegistrationStatus), by plugin and result",
            metrics.notifications.clone(),
        );
        registry.register(
            "kubelet_plugin_refused",
            "Client requests or connections on a plugin socket refused below the gRPC layer (HTTP/2 resets and closes with an error code, or bytes that are not HTTP/2), by socket and reason",
            metrics.refused.clone(),
        );
        registry.register(
            "kubelet_plugin_registered",
            "1 when the kubelet's last registration verdict for the plugin was success, else 0",
            metrics.registered.clone(),
        );
        registry.register(
            "kubelet_plugin_registration_overdue",
            "1 when no kubelet has registered the plugin within spec.pluginRegistrationTimeout of its start (and it is still unregistered), else 0",
            metrics.overdue.clone(),
        );
        metrics
    }

    pub(crate) fn notification(&self, plugin: &str, result: &str) {
        self.notifications
            .get_or_create(&vec![
                ("plugin".to_string(), plugin.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
    }

    pub(crate) fn refused(&self, socket: &str, reason: &str) {
        self.refused
            .get_or_create(&vec![
                ("socket".to_string(), socket.to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .inc();
    }

    pub(crate) fn set_registered(&self, plugin: &str, registered: bool) {
        self.registered
            .get_or_create(&vec![("plugin".to_string(), plugin.to_string())])
            .set(i64::from(registered));
    }

    pub(crate) fn set_overdue(&self, plugin: &str, overdue: bool) {
        self.overdue
            .get_or_create(&vec![("plugin".to_string(), plugin.to_string())])
            .set(i64::from(overdue));
    }

    /// Drop the gauges of a plugin that was stopped on purpose (a reload disabled it), so
    /// it does not look registered, or overdue, after it is gone. Counters stay.
    pub fn forget(&self, plugin: &str) {
        let labels = vec![("plugin".to_string(), plugin.to_string())];
        self.registered.remove(&labels);
        self.overdue.remove(&labels);
    }
}
