//! A DRA driver as a subsystem of `hybridlet run`: its sockets (`<kubelet-root>/plugins/
//! <driver>/dra.sock`, v1 and v1beta1, the health stream; registration as a `DRAPlugin` in
//! `plugins_registry`), its ResourceSlices (compared with the pool the watch keeps — no
//! request while they match —, written with jittered backoff while the API server is away,
//! republished at once when deleted, withdrawn when the driver is disabled), and the claim
//! reconcile loop. What the devices are comes
//! in [`DriverParts`] from a domain crate (GPU, SR-IOV).
//!
//! Readiness means "sockets serve": it never waits for the API server or the kubelet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hybridlet_kubelet_plugin::{
    PluginMetrics, PluginSocket, RegistrationService, registration_socket_path, serve,
    service_socket_path,
};
use hybridlet_proto::dra::{v1, v1beta1};
use hybridlet_proto::dra_health;
use hybridlet_proto::pluginregistration::{DRA_PLUGIN, PluginInfo};
use hybridlet_runtime::{Backoff, BoxError, SubsystemContext};

use crate::{
    DeviceBackend, DraMetrics, Driver, HealthBoard, HealthService, KubeClaims, PreparedClaim,
    SliceDevice, SlicePublisher, V1Health, V1Service, V1alpha1Health, V1beta1Service,
};

/// How often prepared claims are reconciled (a request per prepared claim; none when
/// nothing is prepared).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// The longest a write of the pool waits between failed attempts (full jitter).
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(5 * 60);
/// At start, how long the first publish waits for the watch's first list (which spares
/// the publish a list of its own).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);
/// How long a disabled driver may spend deleting its slices on the way out.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(10);

/// What a domain crate provides for one driver: the backend, the devices it publishes,
/// and each device's key on the host (GPU UUID, VF PCI address) by device name.
#[derive(Debug)]
pub struct DriverParts {
    /// What the devices are and the host changes they need.
    pub backend: Arc<dyn DeviceBackend>,
    /// The slice's devices.
    pub devices: Vec<SliceDevice>,
    /// Device name → its key on the host.
    pub keys: BTreeMap<String, String>,
    /// Counter sets the devices consume from (partitionable devices; usually none).
    pub counter_sets: Vec<crate::CounterSet>,
}

/// Where a DRA driver lives on the host (resolved under `--root`).
#[derive(Debug, Clone)]
pub struct PluginPaths {
    /// The kubelet's kubeconfig (the driver reads claims and writes slices as the node).
    pub kubeconfig: PathBuf,
    /// The kubelet's root directory.
    pub kubelet_root: PathBuf,
    /// hybridlet's state directory (the checkpoint: `dra-<driver>.json`).
    pub state_dir: PathBuf,
    /// The CDI spec directory.
    pub cdi_dir: PathBuf,
    /// The kernel boot ID (a checkpoint from another boot is stale).
    pub boot_id: String,
}

/// Called with the prepared claims whenever they change, and with none when the driver
/// stops.
pub type ClaimsObserver = Arc<dyn Fn(&BTreeMap<String, PreparedClaim>) + Send + Sync>;

/// A DRA driver subsystem, configured.
pub struct DraPlugin {
    label: &'static str,
    driver: String,
    node: String,
    kubeconfig: PathBuf,
    kubelet_root: PathBuf,
    checkpoint: PathBuf,
    cdi_dir: PathBuf,
    boot_id: String,
    backend: Arc<dyn DeviceBackend>,
    devices: Vec<SliceDevice>,
    counter_sets: Vec<crate::CounterSet>,
    metrics: PluginMetrics,
    registration_timeout: Duration,
    orphan_grace: Duration,
    observer: Option<ClaimsObserver>,
    /// The devices' health: the health stream and the slice taints read it.
    health: HealthBoard,
    /// This driver's share of the DRA families.
    dra_metrics: Option<DraMetrics>,
    /// Set before stopping the driver for good (disabled): its slices are deleted on the
    /// way out, so the scheduler stops placing claims on its devices.
    withdraw: Arc<AtomicBool>,
    /// Where this driver's device counts go for the node labels, under its kind.
    capacity: Option<(crate::CapacityBoard, String)>,
    /// The pool watch's and the publisher's timers.
    timing: crate::WatchTiming,
    /// The node's slice watch, shared with the node's other DRA drivers.
    slice_watch: crate::NodeSliceWatch,
}

impl std::fmt::Debug for DraPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraPlugin")
            .field("driver", &self.driver)
            .field("node", &self.node)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

/// Keep `observer` told of the driver's prepared claims until shutdown, then tell it none.
async fn observe(
    mut claims: tokio::sync::watch::Receiver<BTreeMap<String, PreparedClaim>>,
    observer: ClaimsObserver,
    shutdown: hybridlet_runtime::CancellationToken,
) {
    loop {
        observer(&claims.borrow_and_update());
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = claims.changed() => if changed.is_err() { break },
        }
    }
    observer(&BTreeMap::new());
}

/// Keep the driver's device counts (metrics, the capacity board) current as health and
/// prepared claims change (a prepared device's companions count as allocated; devices whose
/// shared counters the prepared ones use up are blocked); the board entry goes when the
/// driver stops.
async fn count_devices(
    (devices, counter_sets): (Arc<[SliceDevice]>, Arc<[crate::CounterSet]>),
    backend: Arc<dyn DeviceBackend>,
    health: HealthBoard,
    mut claims: tokio::sync::watch::Receiver<BTreeMap<String, PreparedClaim>>,
    metrics: Option<DraMetrics>,
    capacity: Option<(crate::CapacityBoard, String)>,
    shutdown: hybridlet_runtime::CancellationToken,
) {
    let product = most_common_product(&devices);
    let mut health_changes = health.subscribe();
    loop {
        // A prepared device's companions (its IOMMU group's other functions) are held too.
        let prepared: std::collections::BTreeSet<String> = claims
            .borrow_and_update()
            .values()
            .flat_map(|c| c.devices.iter().map(|d| d.device.clone()))
            .flat_map(|d| {
                let mut held = backend.companions(&d);
                held.push(d);
                held
            })
            .collect();
        health_changes.borrow_and_update();
        let states = health.snapshot();
        let blocked = if counter_sets.is_empty() {
            std::collections::BTreeSet::new()
        } else {
            crate::capacity::blocked_by_counters(&counter_sets, &devices, &prepared)
        };
        let counts = crate::DeviceCounts::of(
            devices.iter().map(|d| d.name.as_str()),
            |d| states.get(d).is_some_and(|h| !h.healthy),
            |d| prepared.contains(d),
            |d| blocked.contains(d),
        );
        if let Some(m) = &metrics {
            m.devices(counts);
        }
        if let Some((board, kind)) = &capacity {
            board.set(
                kind,
                Some(crate::DriverCapacity {
                    counts,
                    product: product.clone(),
                }),
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = claims.changed() => if changed.is_err() { break },
            changed = health_changes.changed() => if changed.is_err() { break },
        }
    }
    if let Some((board, kind)) = &capacity {
        board.set(kind, None);
    }
}

/// The `productName` most of the devices carry (GPUs), if any.
fn most_common_product(devices: &[SliceDevice]) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in devices {
        if let Some(crate::Attr::String(p)) = d.attributes.get("productName") {
            *counts.entry(p.as_str()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(p, _)| p.to_string())
}

impl DraPlugin {
    /// The driver `driver` on `node` over `parts`; `label` names its kind in logs
    /// (`GPU`, `SR-IOV`).
    pub fn new(
        label: &'static str,
        driver: &str,
        node: &str,
        paths: PluginPaths,
        parts: DriverParts,
        registrations: PluginMetrics,
    ) -> Self {
        let health = HealthBoard::new(parts.devices.iter().map(|d| d.name.clone()));
        Self {
            health,
            dra_metrics: None,
            label,
            checkpoint: checkpoint_path(&paths.state_dir, driver),
            driver: driver.to_string(),
            node: node.to_string(),
            kubeconfig: paths.kubeconfig,
            kubelet_root: paths.kubelet_root,
            cdi_dir: paths.cdi_dir,
            boot_id: paths.boot_id,
            backend: parts.backend,
            devices: parts.devices,
            counter_sets: parts.counter_sets,
            metrics: registrations,
            registration_timeout: Duration::from_secs(300),
            orphan_grace: Duration::from_secs(300),
            observer: None,
            withdraw: Arc::default(),
            capacity: None,
            timing: crate::WatchTiming::default(),
            slice_watch: crate::NodeSliceWatch::default(),
        }
    }

    /// Share `watch` (one per node) with the node's other DRA drivers instead of a watch of
    /// this driver's own.
    pub fn share_slice_watch(mut self, watch: &crate::NodeSliceWatch) -> Self {
        self.slice_watch = watch.clone();
        self
    }

    /// The pool watch's and the publisher's timers (tests shrink them).
    pub fn watch_timing(mut self, timing: crate::WatchTiming) -> Self {
        self.timing = timing;
        self
    }

    /// Setting this flag before stopping the driver withdraws its slices on the way out.
    pub fn withdraw_flag(&self) -> Arc<AtomicBool> {
        self.withdraw.clone()
    }

    /// Raise `kubelet_plugin_registration_overdue` when no kubelet registered the driver
    /// this long after start (`spec.pluginRegistrationTimeout`).
    pub fn registration_timeout(mut self, after: Duration) -> Self {
        self.registration_timeout = after;
        self
    }

    /// Release a prepared claim whose ResourceClaim has been gone this long
    /// (`spec.dra.orphanedClaimGracePeriod`).
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Export this driver's calls, checkpoint writes, prepared state, unhealthy devices
    /// and last publication in `metrics`' families.
    pub fn with_metrics(mut self, metrics: &DraMetrics) -> Self {
        self.dra_metrics = Some(metrics.for_driver(&self.driver));
        self
    }

    /// Tell `observer` the prepared claims whenever they change (who holds a device, for
    /// telemetry labels).
    pub fn observe_claims(mut self, observer: ClaimsObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Keep this driver's device counts on `board` under `kind` (`gpu`, `sriov`, `pci`).
    pub fn report_capacity(mut self, board: crate::CapacityBoard, kind: &str) -> Self {
        self.capacity = Some((board, kind.to_string()));
        self
    }

    /// The health board of this driver's devices, for whoever observes their health.
    pub fn health(&self) -> HealthBoard {
        self.health.clone()
    }

    /// Serve until shutdown.
    pub async fn run(self, ctx: SubsystemContext) -> Result<(), BoxError> {
        let label = self.label;
        let client = hybridlet_kube::client_from_kubeconfig(&self.kubeconfig)
            .await
            .map_err(|e| {
                format!(
                    "the {label} DRA driver talks to the API server with the kubelet's kubeconfig: {e}"
                )
            })?;
        // One copy of the devices for the publisher and the counts (1,024 VFs: ~1.5 MB).
        let devices: Arc<[SliceDevice]> = self.devices.into();
        let backend = self.backend.clone();
        let mut driver = Driver::open(
            self.backend,
            Arc::new(KubeClaims::new(client.clone(), &self.node)),
            &self.checkpoint,
            &self.cdi_dir,
            &self.boot_id,
        )?;
        if let Some(m) = &self.dra_metrics {
            driver = driver.with_metrics(m.clone());
        }
        let driver = Arc::new(driver);
        {
            // Claims prepared for ResourceClaims that are gone: at start, then every minute.
            let (driver, grace, shutdown) =
                (driver.clone(), self.orphan_grace, ctx.shutdown.clone());
            tokio::spawn(async move {
                loop {
                    driver.reconcile(grace).await;
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                    }
                }
            });
        }
        if let Some(observer) = self.observer {
            tokio::spawn(observe(driver.subscribe(), observer, ctx.shutdown.clone()));
        }
        tokio::spawn(count_devices(
            (devices.clone(), self.counter_sets.clone().into()),
            backend,
            self.health.clone(),
            driver.subscribe(),
            self.dra_metrics.clone(),
            self.capacity.clone(),
            ctx.shutdown.clone(),
        ));
        let dra_path = service_socket_path(&self.kubelet_root, &self.driver, "dra.sock");
        let reg_path = registration_socket_path(&self.kubelet_root, &self.driver);
        let dra_socket = PluginSocket::bind(&dra_path)?.with_metrics(&self.metrics);
        let reg_socket = PluginSocket::bind(&reg_path)?.with_metrics(&self.metrics);
        let registration = RegistrationService::new(
            PluginInfo {
                r#type: DRA_PLUGIN.to_string(),
                name: self.driver.clone(),
                endpoint: dra_path.display().to_string(),
                // The kubelet takes the first DRA service it supports (v1 before v1beta1),
                // and the health stream in the newest version it knows.
                supported_versions: vec![
                    "v1.DRAPlugin".into(),
                    "v1beta1.DRAPlugin".into(),
                    "v1.DRAResourceHealth".into(),
                    "v1alpha1.DRAResourceHealth".into(),
                ],
            },
            self.metrics,
        );
        let overdue = registration.watch_overdue(self.registration_timeout, ctx.shutdown.clone());
        let health_service = HealthService::new(&self.node, self.health.clone());
        let dra_router = tonic::transport::Server::builder()
            .add_service(v1::dra_plugin_server::DraPluginServer::new(V1Service(
                driver.clone(),
            )))
            .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                V1beta1Service(driver),
            ))
            .add_service(
                dra_health::v1::dra_resource_health_server::DraResourceHealthServer::new(V1Health(
                    health_service.clone(),
                )),
            )
            .add_service(
                dra_health::v1alpha1::dra_resource_health_server::DraResourceHealthServer::new(
                    V1alpha1Health(health_service),
                ),
            );
        let reg_router =
            tonic::transport::Server::builder().add_service(registration.into_server());
        tracing::info!(kind = label, driver = %self.driver, node = %self.node, devices = devices.len(), socket = %dra_path.display(), "DRA driver serving");
        ctx.ready.set_ready();

        let timing = self.timing.clone();
        let mut publisher = SlicePublisher::new(client, &self.driver, &self.node)
            .with_timing(timing.clone())
            .with_counter_sets(self.counter_sets);
        // Any change the server reports (a deleted slice: the kubelet wipes them when it
        // restarts) makes the publisher compare again at once.
        let republish = Arc::new(tokio::sync::Notify::new());
        let subscription = {
            let republish = republish.clone();
            publisher.follow(&self.slice_watch, Arc::new(move || republish.notify_one()))
        };
        let withdraw_publisher = publisher.clone();
        let shutdown = ctx.shutdown.clone();
        let health = self.health.clone();
        let metrics = self.dra_metrics.clone();
        let slice_watch = self.slice_watch.clone();
        let publish = async move {
            let _ = tokio::time::timeout(FIRST_LIST_WAIT, republish.notified()).await;
            let mut backoff =
                Backoff::new(Duration::from_millis(500), PUBLISH_RETRY_MAX).full_jitter();
            let mut health_changes = health.subscribe();
            loop {
                health_changes.borrow_and_update();
                if let Some(m) = &metrics {
                    m.unhealthy(health.snapshot().values().filter(|h| !h.healthy).count());
                }
                // An unhealthy device is published with its taint; a recovered one without.
                // Healthy devices as they are: no copy (the copy lives only for the publish).
                let tainted = devices.iter().any(|d| health.taint(&d.name).is_some());
                let current: std::borrow::Cow<'_, [SliceDevice]> = if tainted {
                    devices
                        .iter()
                        .map(|d| SliceDevice {
                            taints: health.taint(&d.name).into_iter().collect(),
                            ..d.clone()
                        })
                        .collect::<Vec<_>>()
                        .into()
                } else {
                    std::borrow::Cow::Borrowed(&devices[..])
                };
                let published = publisher.publish(&current).await;
                drop(current);
                let wait = match published {
                    Ok(_) => {
                        // Known to match the server: written now, or compared with what
                        // the connected watch reports (not the state before an outage).
                        if let Some(m) = &metrics
                            && slice_watch.connected()
                        {
                            m.published();
                        }
                        backoff.reset();
                        hybridlet_runtime::jittered(timing.resync.0, timing.resync.1)
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
                    changed = health_changes.changed() => if changed.is_err() { return },
                    () = republish.notified() => {}
                }
            }
        };
        let (a, b, (), ()) = tokio::join!(
            serve(dra_socket, dra_router, ctx.shutdown.clone()),
            serve(reg_socket, reg_router, ctx.shutdown.clone()),
            publish,
            overdue,
        );
        drop(subscription);
        if self.withdraw.load(Ordering::Relaxed) {
            match tokio::time::timeout(WITHDRAW_TIMEOUT, withdraw_publisher.withdraw()).await {
                Ok(Ok(n)) => {
                    tracing::info!(driver = %self.driver, slices = n, "DRA driver disabled; its ResourceSlices were deleted")
                }
                Ok(Err(e)) => {
                    tracing::warn!(driver = %self.driver, "DRA driver disabled, but its ResourceSlices stay (the kubelet deletes them once it sees the plugin gone): {e}")
                }
                Err(_) => {
                    tracing::warn!(driver = %self.driver, "DRA driver disabled, but deleting its ResourceSlices took longer than {WITHDRAW_TIMEOUT:?}; the kubelet deletes them once it sees the plugin gone")
                }
            }
        }
        a?;
        b?;
        Ok(())
    }
}

/// Where the checkpoint of `driver` lives under the state directory.
pub fn checkpoint_path(state_dir: &std::path::Path, driver: &str) -> PathBuf {
    state_dir.join(format!("dra-{driver}.json"))
}
