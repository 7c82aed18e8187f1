//! The CSI node plugin as a subsystem of `hybridlet run`: the CSI socket
//! (`<kubelet-root>/plugins/<driver>/csi.sock`, Identity and Node services) and the
//! registration socket (`<kubelet-root>/plugins_registry/<driver>-reg.sock`), so the
//! kubelet finds the driver without a node-driver-registrar sidecar.
//!
//! Readiness means "both sockets serve". It does not wait for the kubelet to register the
//! plugin: the unit starts before the kubelet, and waiting would deadlock start-up. The
//! kubelet's verdict is logged and counted (`hybridlet_kubelet_plugin_registrations_total`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{CsiMetrics, CsiSettings, VolumeGuard, services_with_metrics};
use hybridlet_kubelet_plugin::{
    PluginMetrics, PluginSocket, RegistrationService, registration_socket_path, serve,
    service_socket_path,
};
use hybridlet_proto::csi::v1::identity_server::IdentityServer;
use hybridlet_proto::csi::v1::node_server::NodeServer;
use hybridlet_proto::pluginregistration::{CSI_PLUGIN, PluginInfo};
use hybridlet_runtime::{BoxError, SubsystemContext};
use hybridlet_sys::mount::SystemMounter;

/// The CSI subsystem, configured and ready to run.
#[derive(Debug)]
pub struct CsiPlugin {
    settings: CsiSettings,
    csi_socket: PathBuf,
    registration_socket: PathBuf,
    kubelet_root: PathBuf,
    metrics: PluginMetrics,
    csi_metrics: CsiMetrics,
    registration_timeout: std::time::Duration,
    /// Shared with the instances before and after this one (reloads restart the plugin).
    guard: VolumeGuard,
}

/// How often the volume gauges are sampled (the mount table and, with iSCSI, iscsiadm):
/// on a timer, never per scrape, so a scrape cannot block on the host.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

impl CsiPlugin {
    /// The plugin with `settings`, its sockets under `kubelet_root`; `guard` is shared
    /// with the instances before and after this one.
    pub fn new(
        settings: CsiSettings,
        kubelet_root: &Path,
        registrations: PluginMetrics,
        csi_metrics: CsiMetrics,
        guard: VolumeGuard,
        registration_timeout: std::time::Duration,
    ) -> Self {
        let driver = settings.driver_name.clone();
        Self {
            csi_socket: service_socket_path(kubelet_root, &driver, "csi.sock"),
            registration_socket: registration_socket_path(kubelet_root, &driver),
            kubelet_root: kubelet_root.to_path_buf(),
            metrics: registrations,
            csi_metrics,
            guard,
            registration_timeout,
            settings,
        }
    }

    /// Serve until shutdown.
    pub async fn run(self, ctx: SubsystemContext) -> Result<(), BoxError> {
        let (identity, node) = services_with_metrics(
            self.settings.clone(),
            Arc::new(SystemMounter::new()),
            self.csi_metrics.clone(),
        );
        let node = node.with_guard(self.guard);
        tokio::spawn(sample_volumes(
            self.csi_metrics,
            self.kubelet_root.clone(),
            self.settings.driver_name.clone(),
            self.settings.iscsi_enabled,
            ctx.shutdown.clone(),
        ));
        if let Err(e) = identity.health() {
            // Probe reports it to the kubelet and `hybridlet check` to the operator; the
            // other volume types and the sockets still work.
            tracing::error!("CSI: {e}");
        }
        let csi_socket = PluginSocket::bind(&self.csi_socket)?.with_metrics(&self.metrics);
        let registration_socket =
            PluginSocket::bind(&self.registration_socket)?.with_metrics(&self.metrics);
        let registration = RegistrationService::new(
            PluginInfo {
                r#type: CSI_PLUGIN.to_string(),
                name: self.settings.driver_name.clone(),
                endpoint: self.csi_socket.display().to_string(),
                supported_versions: vec!["1.0.0".to_string()],
            },
            self.metrics,
        );
        let overdue = registration.watch_overdue(self.registration_timeout, ctx.shutdown.clone());
        let csi_router = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_service(NodeServer::new(node));
        let registration_router =
            tonic::transport::Server::builder().add_service(registration.into_server());
        tracing::info!(
            driver = %self.settings.driver_name,
            node_id = %self.settings.node_id,
            csi_socket = %self.csi_socket.display(),
            registration_socket = %self.registration_socket.display(),
            "CSI node plugin serving"
        );
        ctx.ready.set_ready();
        let (a, b, ()) = tokio::join!(
            serve(csi_socket, csi_router, ctx.shutdown.clone()),
            serve(
                registration_socket,
                registration_router,
                ctx.shutdown.clone()
            ),
            overdue,
        );
        a?;
        b?;
        Ok(())
    }
}

/// Keep the volume gauges current until shutdown.
async fn sample_volumes(
    metrics: CsiMetrics,
    kubelet_root: PathBuf,
    driver: String,
    iscsi: bool,
    shutdown: hybridlet_runtime::CancellationToken,
) {
    use hybridlet_sys::iscsi::{Initiator as _, Iscsiadm};
    use hybridlet_sys::mount::Mounter as _;
    let mounter = SystemMounter::new();
    let initiator = Iscsiadm::new("iscsiadm", std::time::Duration::from_secs(5));
    loop {
        let (m, root, d, mounter, initiator) = (
            metrics.clone(),
            kubelet_root.clone(),
            driver.clone(),
            mounter.clone(),
            initiator.clone(),
        );
        let sampled = tokio::task::spawn_blocking(move || {
            let table = mounter.mount_table().unwrap_or_default();
            let sessions = iscsi
                .then(|| initiator.sessions().map(|s| s.len()).ok())
                .flatten();
            m.set_volumes(&table, &root, &d, sessions);
        });
        if let Err(e) = sampled.await {
            tracing::warn!(error = %e, "CSI volume sampling failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}
