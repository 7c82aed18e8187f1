//! Wiring of the GPU DRA driver into `hybridlet run`: GPUs from discovery (NVML, or a
//! fixture) become devices of a ResourceSlice pool named after the node; the kubelet
//! prepares claims through `<kubelet-root>/plugins/<driver>/dra.sock` (v1 and v1beta1),
//! registered as a `DRAPlugin` in `plugins_registry`. CDI specs go to `/var/run/cdi`, the
//! checkpoint to the state directory.
//!
//! Readiness means "sockets serve": publication retries in the background with jittered
//! backoff (the API server may be unreachable when the node boots), then reconciles every
//! minute, which also recreates slices someone deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_dra::{
    Attr, ContainerEdits, DeviceBackend, Driver, KubeClaims, SliceDevice, SlicePublisher,
    V1Service, V1beta1Service,
};
use hybridlet_kubelet_plugin::{
    PluginSocket, RegistrationMetrics, RegistrationService, registration_socket_path, serve,
    service_socket_path,
};
use hybridlet_proto::dra::{v1, v1beta1};
use hybridlet_proto::pluginregistration::{DRA_PLUGIN, PluginInfo};
use hybridlet_runtime::{Backoff, BoxError, SubsystemContext};

use crate::devices::{GpuView, Report};

/// How often slices are reconciled after the first publication.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct GpuBackend {
    driver: String,
    node: String,
    gpus: BTreeMap<String, GpuView>,
}

fn device_name(g: &GpuView) -> String {
    format!("gpu-{}", g.info.index)
}

/// `12.8` → `12.8.0`: DRA version attributes are semantic versions.
fn semver(v: &str) -> String {
    let parts: Vec<&str> = v.split('.').collect();
    match parts.len() {
        1 => format!("{v}.0.0"),
        2 => format!("{v}.0"),
        _ => parts[..3].join("."),
    }
}

impl DeviceBackend for GpuBackend {
    fn driver_name(&self) -> &str {
        &self.driver
    }

    fn pool_name(&self) -> &str {
        &self.node
    }

    fn edits(&self, device: &str) -> Result<ContainerEdits, String> {
        let g = self
            .gpus
            .get(device)
            .ok_or_else(|| format!("no device {device} on this node (was the slice stale?)"))?;
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={}", g.info.uuid)],
            device_nodes: vec![
                format!("/dev/nvidia{}", g.info.minor_number),
                "/dev/nvidiactl".into(),
                "/dev/nvidia-uvm".into(),
                "/dev/nvidia-uvm-tools".into(),
            ],
        })
    }
}

fn slice_device(g: &GpuView) -> SliceDevice {
    let mut attributes = BTreeMap::from([
        ("type".to_string(), Attr::String("gpu".into())),
        ("uuid".to_string(), Attr::String(g.info.uuid.clone())),
        ("index".to_string(), Attr::Int(i64::from(g.info.index))),
        ("productName".to_string(), Attr::String(g.info.name.clone())),
        ("brand".to_string(), Attr::String(g.info.brand.clone())),
        (
            "architecture".to_string(),
            Attr::String(g.info.architecture.clone()),
        ),
        (
            "driverVersion".to_string(),
            Attr::Version(semver(&g.info.driver_version)),
        ),
        (
            "cudaDriverVersion".to_string(),
            Attr::Version(semver(&g.info.cuda_driver_version)),
        ),
        (
            "cudaComputeCapability".to_string(),
            Attr::Version(format!(
                "{}.{}.0",
                g.info.cuda_compute_capability.major, g.info.cuda_compute_capability.minor
            )),
        ),
    ]);
    if let Some(addr) = &g.pci_address {
        attributes.insert(
            "resource.kubernetes.io/pciBusID".into(),
            Attr::String(addr.clone()),
        );
    }
    if let Some(root) = &g.placement.pcie_root {
        attributes.insert(
            "resource.kubernetes.io/pcieRoot".into(),
            Attr::String(root.clone()),
        );
    }
    if let Some(switch) = &g.placement.pcie_switch {
        attributes.insert("pcieSwitch".into(), Attr::String(switch.clone()));
    }
    if let Some(numa) = g.placement.numa_node {
        attributes.insert("numaNode".into(), Attr::Int(i64::from(numa)));
    }
    SliceDevice {
        name: device_name(g),
        attributes,
        capacity: BTreeMap::from([("memory".to_string(), g.info.memory_total_bytes.to_string())]),
    }
}

/// The GPU DRA subsystem, configured.
#[derive(Debug)]
pub struct GpuDra {
    driver: String,
    node: String,
    kubeconfig: PathBuf,
    kubelet_root: PathBuf,
    checkpoint: PathBuf,
    cdi_dir: PathBuf,
    boot_id: String,
    report: Report,
    metrics: RegistrationMetrics,
}

impl GpuDra {
    /// Everything the subsystem needs, resolved under the host root.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        driver: &str,
        node: &str,
        kubeconfig: PathBuf,
        kubelet_root: PathBuf,
        state_dir: PathBuf,
        cdi_dir: PathBuf,
        boot_id: String,
        report: Report,
        registry: &mut hybridlet_metrics::Registry,
    ) -> Self {
        Self {
            checkpoint: state_dir.join(format!("dra-{driver}.json")),
            driver: driver.to_string(),
            node: node.to_string(),
            kubeconfig,
            kubelet_root,
            cdi_dir,
            boot_id,
            report,
            metrics: RegistrationMetrics::register(registry),
        }
    }

    /// Serve until shutdown.
    pub async fn run(self, ctx: SubsystemContext) -> Result<(), BoxError> {
        let client = hybridlet_kube::client_from_kubeconfig(&self.kubeconfig)
            .await
            .map_err(|e| {
                format!(
                    "the GPU DRA driver talks to the API server with the kubelet's kubeconfig: {e}"
                )
            })?;
        let gpus: BTreeMap<String, GpuView> = self
            .report
            .gpus
            .into_iter()
            .map(|g| (device_name(&g), g))
            .collect();
        let devices: Vec<SliceDevice> = gpus.values().map(slice_device).collect();
        let backend = Arc::new(GpuBackend {
            driver: self.driver.clone(),
            node: self.node.clone(),
            gpus,
        });
        let driver = Arc::new(Driver::open(
            backend,
            Arc::new(KubeClaims::new(client.clone())),
            &self.checkpoint,
            &self.cdi_dir,
            &self.boot_id,
        )?);
        let dra_path = service_socket_path(&self.kubelet_root, &self.driver, "dra.sock");
        let reg_path = registration_socket_path(&self.kubelet_root, &self.driver);
        let dra_socket = PluginSocket::bind(&dra_path)?;
        let reg_socket = PluginSocket::bind(&reg_path)?;
        let registration = RegistrationService::new(
            PluginInfo {
                r#type: DRA_PLUGIN.to_string(),
                name: self.driver.clone(),
                endpoint: dra_path.display().to_string(),
                // The kubelet takes the first it supports: v1 before v1beta1.
                supported_versions: vec!["v1.DRAPlugin".into(), "v1beta1.DRAPlugin".into()],
            },
            self.metrics,
        );
        let dra_router = tonic::transport::Server::builder()
            .add_service(v1::dra_plugin_server::DraPluginServer::new(V1Service(
                driver.clone(),
            )))
            .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                V1beta1Service(driver),
            ));
        let reg_router =
            tonic::transport::Server::builder().add_service(registration.into_server());
        tracing::info!(driver = %self.driver, node = %self.node, devices = devices.len(), socket = %dra_path.display(), "GPU DRA driver serving");
        ctx.ready.set_ready();

        let publisher = SlicePublisher::new(client, &self.driver, &self.node);
        let shutdown = ctx.shutdown.clone();
        let publish = async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
            loop {
                let wait = match publisher.publish(&devices).await {
                    Ok(_) => {
                        backoff.reset();
                        RECONCILE_INTERVAL
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(retry_in = ?wait, "{e}");
                        wait
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        };
        let (a, b, ()) = tokio::join!(
            serve(dra_socket, dra_router, ctx.shutdown.clone()),
            serve(reg_socket, reg_router, ctx.shutdown.clone()),
            publish,
        );
        a?;
        b?;
        Ok(())
    }
}
