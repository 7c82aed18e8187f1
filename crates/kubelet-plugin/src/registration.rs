use std::sync::Arc;

use hybridlet_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use hybridlet_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// What the kubelet last told us about our registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// No verdict yet.
    Pending,
    /// The kubelet accepted the plugin.
    Registered,
    /// The kubelet rejected it, and why.
    Failed(String),
}

/// Registration outcomes, by plugin and result.
#[derive(Debug, Clone, Default)]
pub struct RegistrationMetrics {
    notifications: Family<Vec<(String, String)>, Counter>,
}

impl RegistrationMetrics {
    /// Register `kubelet_plugin_registrations_total{plugin, result}` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kubelet_plugin_registrations",
            "Registration verdicts the kubelet sent (NotifyRegistrationStatus), by plugin and result",
            metrics.notifications.clone(),
        );
        metrics
    }
}

/// The kubelet's `pluginregistration.Registration` service for one plugin.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    info: Arc<PluginInfo>,
    state: watch::Sender<RegistrationState>,
    metrics: RegistrationMetrics,
}

impl RegistrationService {
    /// A service that advertises `info` (type, name, endpoint, supported versions in order
    /// of preference).
    pub fn new(info: PluginInfo, metrics: RegistrationMetrics) -> Self {
        let (state, _) = watch::channel(RegistrationState::Pending);
        Self {
            info: Arc::new(info),
            state,
            metrics,
        }
    }

    /// Follow the registration state (readiness waits for `Registered`).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }

    /// The gRPC service to add to a server.
    pub fn into_server(self) -> RegistrationServer<Self> {
        RegistrationServer::new(self)
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        // Newer kubelets poll this as a liveness check: answer from memory, never block.
        Ok(Response::new((*self.info).clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let plugin = self.info.name.clone();
        let (result, state) = if status.plugin_registered {
            tracing::info!(plugin = %plugin, plugin_type = %self.info.r#type, "kubelet registered the plugin");
            ("registered", RegistrationState::Registered)
        } else {
            tracing::error!(plugin = %plugin, error = %status.error, "kubelet rejected the plugin registration");
            ("failed", RegistrationState::Failed(status.error.clone()))
        };
        self.metrics
            .notifications
            .get_or_create(&vec![
                ("plugin".to_string(), plugin),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
