use std::sync::Arc;

use hybridlet_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use hybridlet_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use std::time::Duration;

use hybridlet_runtime::CancellationToken;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::PluginMetrics;

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

/// The kubelet's `pluginregistration.Registration` service for one plugin.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    info: Arc<PluginInfo>,
    state: watch::Sender<RegistrationState>,
    metrics: PluginMetrics,
}

impl RegistrationService {
    /// A service that advertises `info` (type, name, endpoint, supported versions in order
    /// of preference).
    pub fn new(info: PluginInfo, metrics: PluginMetrics) -> Self {
        let (state, _) = watch::channel(RegistrationState::Pending);
        metrics.set_registered(&info.name, false);
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

    /// Raise `kubelet_plugin_registration_overdue` (and warn) when no kubelet has
    /// registered the plugin `after` this long, and lower it once one does. The kubelet may
    /// start after us, so this never touches readiness. Runs until `shutdown`.
    pub fn watch_overdue(
        &self,
        after: Duration,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut state = self.state.subscribe();
        let metrics = self.metrics.clone();
        let plugin = self.info.name.clone();
        async move {
            metrics.set_overdue(&plugin, false);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(after) => {}
            }
            loop {
                let registered = *state.borrow_and_update() == RegistrationState::Registered;
                metrics.set_overdue(&plugin, !registered);
                if !registered {
                    let last = match &*state.borrow() {
                        RegistrationState::Failed(e) => {
                            format!("the kubelet's last verdict was a failure: {e}")
                        }
                        _ => "no kubelet has called NotifyRegistrationStatus".to_string(),
                    };
                    tracing::warn!(
                        plugin = %plugin,
                        "plugin not registered {}s after start ({last}); is the kubelet running, with the root directory spec.kubeletRootDir names? Requests it could not make are counted in hybridlet_kubelet_plugin_refused_total",
                        after.as_secs()
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = state.changed() => if changed.is_err() { return },
                }
            }
        }
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
        self.metrics.notification(&plugin, result);
        self.metrics
            .set_registered(&plugin, state == RegistrationState::Registered);
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
