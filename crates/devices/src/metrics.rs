//! The `devices` subsystem: walks sysfs when the kernel says PCI functions or network
//! interfaces changed (uevents) and at least every 10–15 minutes, samples GPU telemetry and
//! the drivers' health inputs on a timer, reads VF counters only while someone scrapes
//! them, and exports what it found — GPUs, SR-IOV PFs and VFs — with labels that join onto
//! existing dashboards (`gpu`, `UUID`, `pci_bus_id`, `modelName` as dcgm-exporter uses them;
//! `pf` as the SR-IOV exporters use it).
//!
//! A scrape reads the last snapshot from memory; it never touches sysfs or NVML (stale VF
//! counters ask the sampler to read them again, for the next scrape).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hybridlet_gpu::{GpuSample, GpuSource, XidEvent, XidWatch};
use hybridlet_metrics::prometheus_client::collector::Collector;
use hybridlet_metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use hybridlet_metrics::prometheus_client::metrics::MetricType;
use hybridlet_metrics::prometheus_client::metrics::gauge::ConstGauge;
use hybridlet_metrics::prometheus_client::registry::Unit;
use hybridlet_runtime::{BoxError, SubsystemContext};
use hybridlet_sys::uevent::UeventSource;
use hybridlet_sys::{NetdevCounters, Sysfs};

use crate::discovery::{Discovery, PfView, Report, discover};

/// What turns the sampler's observations into a DRA driver's device health.
#[derive(Debug, Clone)]
pub enum HealthPolicy {
    /// GPUs: XID errors, and NVML reading the GPU again.
    Gpu(Arc<hybridlet_gpu::GpuHealth>),
    /// VFs: their PF's link.
    Vf(Arc<hybridlet_sriov::VfHealth>),
    /// Allowlisted PCI functions: presence, AER errors, link training.
    Pci(Arc<hybridlet_pci::PciHealth>),
}

impl HealthPolicy {
    fn xid(&self, event: &XidEvent) {
        if let HealthPolicy::Gpu(p) = self {
            p.xid(event);
        }
    }

    fn sampled(&self, sysfs: &Sysfs, found: &Discovery, samples: &[GpuSample]) {
        match self {
            HealthPolicy::Gpu(p) => p.sampled(samples),
            HealthPolicy::Vf(p) => p.sampled(sysfs, &found.inventory),
            HealthPolicy::Pci(p) => p.sampled(sysfs),
        }
    }
}

/// How often GPU telemetry and the drivers' health inputs are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(60);
/// Without a uevent, sysfs is walked again after a time uniform in this range: a safety
/// net for a lost event (a full socket buffer) or a kernel that sends none.
pub const REWALK: (Duration, Duration) = (Duration::from_secs(600), Duration::from_secs(900));
/// Uevents come in bursts (a PF's 128 VFs: hundreds of events): the walk waits until none
/// came for this long...
const SETTLE: Duration = Duration::from_millis(150);
/// ... but never longer than this after the first.
const SETTLE_MAX: Duration = Duration::from_millis(600);
/// VF counters older than this when a scrape wants them are read again (for the next
/// scrape): about the shortest scrape interval in use, so two Prometheus replicas share
/// one read.
pub const COUNTERS_FRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Snapshot {
    report: Option<Report>,
    samples: Vec<GpuSample>,
    duration: Duration,
    last_success: Option<SystemTime>,
    /// Per GPU UUID: whether its XID errors are watched, and what arrived.
    xids: BTreeMap<String, XidState>,
    /// Counters of VFs that have a netdev: (PF, VF, netdev) and what sysfs says.
    vf_counters: Vec<(String, String, String, NetdevCounters)>,
    /// When they were read.
    counters_read: Option<Instant>,
    /// Sysfs walks so far (for tests and the bench: a walk is the expensive part).
    walks: u64,
    /// What each DRA kind's devices were at the last walk (a digest of their identities).
    identities: Option<[(&'static str, u64); 3]>,
}

#[derive(Debug, Default, Clone)]
struct XidState {
    watched: bool,
    count: u64,
    last: Option<u64>,
}

/// How long the XID watcher waits before watching again after NVML failed.
const XID_RETRY: Duration = Duration::from_secs(60);

/// Who holds a prepared device, for the `namespace`, `pod` and `claim` labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    /// The claim's namespace.
    pub namespace: String,
    /// The ResourceClaim's name.
    pub claim: String,
    /// The first pod the claim is reserved for ("" when the claim did not say).
    pub pod: String,
}

/// The holders of prepared devices, by GPU UUID or VF PCI address, kept current by the
/// DRA drivers.
#[derive(Debug, Clone, Default)]
pub struct Holders(Arc<Mutex<BTreeMap<String, Holder>>>);

impl Holders {
    /// Replace the entries of one driver (after each of its prepares or unprepares):
    /// those whose keys `owns` accepts.
    pub fn set(&self, owns: &dyn Fn(&str) -> bool, now: BTreeMap<String, Holder>) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|k, _| !owns(k));
        map.extend(now);
    }

    fn get(&self) -> BTreeMap<String, Holder> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Keep `holders` in step with a DRA driver's prepared claims; `keys` maps each of its
/// device names to the key the telemetry uses (GPU UUID, VF PCI address). When the driver
/// stops it is told no claims, and its entries go.
pub fn holders_observer(
    holders: Holders,
    keys: BTreeMap<String, String>,
) -> hybridlet_dra::ClaimsObserver {
    let owned: std::collections::BTreeSet<String> = keys.values().cloned().collect();
    Arc::new(move |claims| {
        let now = claims
            .values()
            .flat_map(|c| {
                c.devices.iter().filter_map(|d| {
                    let key = keys.get(&d.device)?;
                    Some((
                        key.clone(),
                        Holder {
                            namespace: c.namespace.clone(),
                            claim: c.name.clone(),
                            pod: c.pods.first().cloned().unwrap_or_default(),
                        },
                    ))
                })
            })
            .collect();
        holders.set(&|k: &str| owned.contains(k), now);
    })
}

/// Shared between the sampler and the scrape-time collector.
#[derive(Debug, Clone, Default)]
pub struct DeviceMetrics {
    latest: Arc<Mutex<Snapshot>>,
    holders: Holders,
    /// A scrape found the VF counters stale: the sampler reads them again.
    counters_wanted: Arc<tokio::sync::Notify>,
    /// Told the DRA kinds (`gpu`, `sriov`, `pci`) whose devices a walk found changed.
    changes: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<&'static str>>>>>,
    /// How old VF counters may be before a scrape asks for new ones, in milliseconds (0:
    /// [`COUNTERS_FRESH`]); shared with the registered collector.
    counters_fresh_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Turn XIDs and samples into device health (the DRA drivers' boards).
    policies: Arc<Mutex<BTreeMap<String, HealthPolicy>>>,
}

impl DeviceMetrics {
    /// Register the collector; GPU telemetry is labelled with the holders in `holders`.
    pub fn register(registry: &mut hybridlet_metrics::Registry, holders: Holders) -> Self {
        let metrics = Self {
            holders,
            ..Self::default()
        };
        registry.register_collector(Box::new(metrics.clone()));
        metrics
    }

    /// `8 GPUs, 2 SR-IOV PFs, 64 VFs` from the last sample, for systemd's STATUS line.
    pub fn summary(&self) -> Option<String> {
        let s = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = s.report.as_ref()?;
        let vfs: usize = r.physical_functions.iter().map(|p| p.vfs.len()).sum();
        Some(format!(
            "{} GPUs, {} SR-IOV PFs, {vfs} VFs",
            r.gpus.len(),
            r.physical_functions.len()
        ))
    }

    /// Feed XIDs and samples to `policy` (of the DRA driver named `owner`) from now on,
    /// in place of that owner's previous one; `None` stops feeding the owner's.
    pub fn set_health_policy(&self, owner: &str, policy: Option<HealthPolicy>) {
        let mut policies = self
            .policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match policy {
            Some(p) => policies.insert(owner.to_string(), p),
            None => policies.remove(owner),
        };
    }

    fn policies(&self) -> Vec<HealthPolicy> {
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn xid_watch_started(&self, watch: &XidWatch) {
        for (uuid, reason) in &watch.unsupported {
            tracing::warn!(gpu_uuid = %uuid, "GPU XID errors cannot be watched on this GPU: {reason}");
        }
        if !watch.watched.is_empty() {
            tracing::info!(gpus = watch.watched.len(), "watching GPU XID errors");
        }
        let mut s = self.lock();
        for uuid in &watch.watched {
            s.xids.entry(uuid.clone()).or_default().watched = true;
        }
        for (uuid, _) in &watch.unsupported {
            s.xids.entry(uuid.clone()).or_default().watched = false;
        }
    }

    fn xid(&self, event: XidEvent) {
        let code = event
            .xid
            .map_or_else(|| "unknown".to_string(), |x| x.to_string());
        let meaning = event
            .xid
            .map_or("undecodable XID", hybridlet_gpu::xid_meaning);
        // Application-caused XIDs are the job's problem, not the GPU's.
        if event
            .xid
            .is_some_and(|x| hybridlet_gpu::APPLICATION_XIDS.contains(&x))
        {
            tracing::warn!(gpu_uuid = %event.uuid, xid = %code, "GPU XID error {code}: {meaning}");
        } else {
            tracing::error!(gpu_uuid = %event.uuid, xid = %code, "GPU XID error {code}: {meaning}");
        }
        for p in self.policies() {
            p.xid(&event);
        }
        let mut s = self.lock();
        let state = s.xids.entry(event.uuid).or_default();
        state.count += 1;
        if let Some(x) = event.xid {
            state.last = Some(x);
        }
    }

    /// Watch XID errors on a blocking thread until shutdown; NVML failures are logged and
    /// the watch starts again after [`XID_RETRY`].
    fn spawn_xid_watcher(
        &self,
        gpus: Arc<dyn GpuSource>,
        shutdown: hybridlet_runtime::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        tokio::task::spawn_blocking(move || {
            let stop = || shutdown.is_cancelled();
            while !stop() {
                let result =
                    gpus.watch_xids(&stop, &mut |w| metrics.xid_watch_started(w), &mut |e| {
                        metrics.xid(e)
                    });
                match result {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(
                        "watching GPU XID errors failed: {e}; trying again in {}s",
                        XID_RETRY.as_secs()
                    ),
                }
                let until = Instant::now() + XID_RETRY;
                while !stop() && Instant::now() < until {
                    // A blocking thread (spawn_blocking), not the runtime.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
    }

    /// VF counters may be this old before a scrape asks for new ones (tests shorten it).
    pub fn counters_fresh(self, age: Duration) -> Self {
        let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX).max(1);
        self.counters_fresh_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        self
    }

    fn counters_stale(&self, read: Option<Instant>) -> bool {
        let ms = self
            .counters_fresh_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let fresh = if ms == 0 {
            COUNTERS_FRESH
        } else {
            Duration::from_millis(ms)
        };
        read.is_none_or(|t| t.elapsed() >= fresh)
    }

    /// From now on, the DRA kinds (`gpu`, `sriov`, `pci`) whose devices came or went at a
    /// walk (not their drivers or state: a VF moved to vfio-pci is the same VF), so their
    /// drivers can publish what is there now.
    pub fn device_changes(&self) -> tokio::sync::mpsc::UnboundedReceiver<Vec<&'static str>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Sysfs walks so far.
    pub fn walks(&self) -> u64 {
        self.lock().walks
    }

    /// Sample until shutdown: walk sysfs at once, again `SETTLE` after a burst of device
    /// uevents from `uevents` (when the kernel's socket opened: `None` leaves only the
    /// timer) and at the latest after [`REWALK`]; GPU telemetry and the health inputs
    /// every `interval`; VF counters after each walk and when a scrape finds them stale.
    pub async fn run(
        self,
        sysfs: Sysfs,
        gpus: Option<Arc<dyn GpuSource>>,
        interval: Duration,
        uevents: Option<Box<dyn UeventSource>>,
        ctx: SubsystemContext,
    ) -> Result<(), BoxError> {
        let xid_watcher = gpus
            .clone()
            .map(|g| self.spawn_xid_watcher(g, ctx.shutdown.clone()));
        let mut changes = uevents.map(|source| spawn_uevent_reader(source, ctx.shutdown.clone()));
        // A walk samples too: the first tick comes an interval after it.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut found: Option<Arc<Discovery>> = None;
        let mut next_walk = tokio::time::Instant::now();
        // The first and the last uevent of a burst not yet walked.
        let mut burst: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        loop {
            let settled = burst.map(|(first, last)| (last + SETTLE).min(first + SETTLE_MAX));
            let walk_at = settled.map_or(next_walk, |s| s.min(next_walk));
            let what = tokio::select! {
                () = ctx.shutdown.cancelled() => {
                    // The watcher looks at the token at least once a second.
                    if let Some(w) = xid_watcher {
                        let _ = w.await;
                    }
                    return Ok(());
                }
                () = tokio::time::sleep_until(walk_at) => Work::Walk,
                _ = ticker.tick(), if found.is_some() => Work::Sample,
                () = self.counters_wanted.notified(), if found.is_some() => Work::Counters,
                event = async { changes.as_mut()?.recv().await }, if changes.is_some() => {
                    match event {
                        Some(()) => {
                            let now = tokio::time::Instant::now();
                            burst = Some(burst.map_or((now, now), |(first, _)| (first, now)));
                        }
                        None => changes = None,
                    }
                    continue;
                }
            };
            if what == Work::Walk {
                burst = None;
                next_walk =
                    tokio::time::Instant::now() + hybridlet_runtime::jittered(REWALK.0, REWALK.1);
            }
            match self.work(what, &sysfs, &gpus, found.clone()).await {
                Ok(Some(new)) => {
                    found = Some(new);
                    ctx.ready.set_ready();
                }
                Ok(None) => {}
                Err(failure) => tracing::warn!("device discovery for metrics failed: {failure}"),
            }
        }
    }

    /// One step on a blocking thread: a walk (the new discovery), a telemetry sample over
    /// the last one, or the VF counters.
    async fn work(
        &self,
        what: Work,
        sysfs: &Sysfs,
        gpus: &Option<Arc<dyn GpuSource>>,
        found: Option<Arc<Discovery>>,
    ) -> Result<Option<Arc<Discovery>>, String> {
        let (metrics, sysfs, gpus) = (self.clone(), sysfs.clone(), gpus.clone());
        let policies = self.policies();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (found, walked) = match (what, found) {
                (Work::Walk, _) | (_, None) => (
                    Arc::new(discover(&sysfs, gpus.as_deref()).map_err(|e| format!("{e:?}"))?),
                    true,
                ),
                (_, Some(found)) => (found, false),
            };
            // A walk is stored whole (report and counters under one lock): a scrape never
            // sees the new devices with the old counters.
            let counters = (walked || what == Work::Counters).then(|| vf_counters(&sysfs, &found));
            let report = walked.then(|| found.report());
            let mut changed = Vec::new();
            {
                let mut s = metrics.lock();
                if let Some(report) = report {
                    s.report = Some(report);
                    s.duration = started.elapsed();
                    s.last_success = Some(SystemTime::now());
                    s.walks += 1;
                    let now = identities(&found);
                    if let Some(before) = s.identities {
                        changed = now
                            .iter()
                            .zip(before)
                            .filter(|(a, b)| a.1 != b.1)
                            .map(|(a, _)| a.0)
                            .collect();
                    }
                    s.identities = Some(now);
                }
                if let Some(counters) = counters {
                    s.vf_counters = counters;
                    s.counters_read = Some(Instant::now());
                }
            }
            if walked || what == Work::Sample {
                // Telemetry failing (a GPU fell off the bus) must not hide the inventory.
                let samples = match gpus.as_deref().map(|g| g.sample()) {
                    Some(Ok(samples)) => samples,
                    Some(Err(e)) => {
                        tracing::warn!("GPU telemetry sampling failed: {e}");
                        Vec::new()
                    }
                    None => Vec::new(),
                };
                for p in &policies {
                    p.sampled(&sysfs, &found, &samples);
                }
                metrics.lock().samples = samples;
            }
            if !changed.is_empty() {
                tracing::info!(kinds = ?changed, "devices came or went");
                let tx = metrics
                    .changes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if let Some(tx) = tx {
                    let _ = tx.send(changed);
                }
            }
            Ok(walked.then_some(found))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
impl DeviceMetrics {
    fn store(
        &self,
        report: Report,
        samples: Vec<GpuSample>,
        vf_counters: Vec<(String, String, String, NetdevCounters)>,
        duration: Duration,
    ) {
        let mut s = self.lock();
        s.report = Some(report);
        s.vf_counters = vf_counters;
        s.counters_read = Some(Instant::now());
        s.samples = samples;
        s.duration = duration;
        s.last_success = Some(SystemTime::now());
    }
}

/// What the sampler does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Walk sysfs (and sample, and read the counters).
    Walk,
    /// GPU telemetry and the health inputs.
    Sample,
    /// The VF counters, for a scrape.
    Counters,
}

/// The kernel's uevents, or `None` (with a warning: devices are then walked on the timer
/// only) when the socket cannot be opened.
pub fn kernel_uevents() -> Option<Box<dyn UeventSource>> {
    match hybridlet_sys::uevent::KernelUevents::open() {
        Ok(source) => Some(Box::new(source)),
        Err(e) => {
            tracing::warn!(
                "cannot read kernel uevents ({e}); devices are walked every 10-15 minutes only"
            );
            None
        }
    }
}

/// Read uevents on a blocking thread until shutdown; one message per device event.
fn spawn_uevent_reader(
    mut source: Box<dyn UeventSource>,
    shutdown: hybridlet_runtime::CancellationToken,
) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        // Until shutdown, or until the sampler is gone without one (a start-up that failed
        // after it started drops the runtime, which waits for this thread).
        while !shutdown.is_cancelled() && !tx.is_closed() {
            match source.next(Duration::from_secs(1)) {
                Ok(Some(event)) if event.concerns_devices() => {
                    tracing::debug!(action = %event.action, devpath = %event.devpath, "device uevent");
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(
                        "reading kernel uevents failed: {e}; devices are walked on the timer only"
                    );
                    return;
                }
            }
        }
    });
    rx
}

/// A digest of which devices each DRA kind would see: GPUs by UUID, SR-IOV by PF and VF
/// address, other PCI functions by address. Drivers and state are left out (a prepare
/// moving a VF to vfio-pci changes nothing here).
fn identities(found: &Discovery) -> [(&'static str, u64); 3] {
    use std::hash::{Hash, Hasher};
    let digest = |items: &mut dyn Iterator<Item = String>| {
        let mut all: Vec<String> = items.collect();
        all.sort();
        let mut h = std::hash::DefaultHasher::new();
        all.hash(&mut h);
        h.finish()
    };
    let vfs: std::collections::BTreeSet<String> = found
        .inventory
        .pfs
        .iter()
        .flat_map(|pf| pf.vfs.iter().map(|vf| vf.device.address.to_string()))
        .collect();
    [
        (
            "gpu",
            digest(&mut found.gpus.iter().map(|g| g.info.uuid.clone())),
        ),
        (
            "sriov",
            digest(
                &mut found
                    .inventory
                    .pfs
                    .iter()
                    .map(|pf| pf.device.address.to_string())
                    .chain(vfs.iter().cloned()),
            ),
        ),
        (
            "pci",
            digest(
                &mut found
                    .pci
                    .iter()
                    .map(|d| d.address.to_string())
                    .filter(|a| !vfs.contains(a)),
            ),
        ),
    ]
}

/// The counters of every VF with a netdev, read now.
fn vf_counters(sysfs: &Sysfs, found: &Discovery) -> Vec<(String, String, String, NetdevCounters)> {
    found
        .inventory
        .pfs
        .iter()
        .flat_map(|pf| {
            pf.vfs.iter().filter_map(move |vf| {
                let netdev = vf.device.net_names.first()?;
                Some((
                    pf.device.address.to_string(),
                    vf.device.address.to_string(),
                    netdev.clone(),
                    sysfs.netdev_counters(netdev),
                ))
            })
        })
        .collect()
}

type Labels<'a> = Vec<(&'static str, &'a str)>;
/// Name, help, unit and rows of one gauge family.
type GaugeFamily<'a> = (
    &'static str,
    &'static str,
    Option<Unit>,
    Vec<(Labels<'a>, f64)>,
);

fn gauge_family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DeviceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(report) = &s.report else {
            return Ok(());
        };
        gauge_family(
            &mut encoder,
            "device_discovery_duration",
            "How long the last device discovery took",
            Some(&Unit::Seconds),
            &[(vec![], s.duration.as_secs_f64())],
        )?;
        let last = s
            .last_success
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        gauge_family(
            &mut encoder,
            "device_discovery_last_success_timestamp",
            "Unix time of the last successful device discovery",
            Some(&Unit::Seconds),
            &[(vec![], last)],
        )?;
        gauge_family(
            &mut encoder,
            "device_discovery_skipped_devices",
            "PCI devices the last discovery could not read (see the log for paths)",
            None,
            &[(vec![], report.skipped.len() as f64)],
        )?;

        let indices: Vec<String> = report
            .gpus
            .iter()
            .map(|g| g.info.index.to_string())
            .collect();
        let numa: Vec<String> = report
            .gpus
            .iter()
            .map(|g| {
                g.placement
                    .numa_node
                    .map_or_else(|| "-1".to_string(), |n| n.to_string())
            })
            .collect();
        let info_rows: Vec<(Labels<'_>, f64)> = report
            .gpus
            .iter()
            .zip(indices.iter().zip(&numa))
            .map(|(g, (index, numa))| {
                (
                    vec![
                        ("gpu", index.as_str()),
                        ("UUID", g.info.uuid.as_str()),
                        ("pci_bus_id", g.info.pci_bus_id.as_str()),
                        ("modelName", g.info.name.as_str()),
                        ("driver_version", g.info.driver_version.as_str()),
                        ("numa_node", numa.as_str()),
                        ("pcie_root", g.placement.pcie_root.as_deref().unwrap_or("")),
                        (
                            "pcie_switch",
                            g.placement.pcie_switch.as_deref().unwrap_or(""),
                        ),
                    ],
                    1.0,
                )
            })
            .collect();
        gauge_family(
            &mut encoder,
            "gpu_info",
            "GPUs found (NVML), with topology labels",
            None,
            &info_rows,
        )?;
        let mem_rows: Vec<(Labels<'_>, f64)> = report
            .gpus
            .iter()
            .zip(&indices)
            .map(|(g, index)| {
                (
                    vec![("gpu", index.as_str()), ("UUID", g.info.uuid.as_str())],
                    g.info.memory_total_bytes as f64,
                )
            })
            .collect();
        gauge_family(
            &mut encoder,
            "gpu_memory_total",
            "GPU framebuffer memory",
            Some(&Unit::Bytes),
            &mem_rows,
        )?;

        encode_gpu_samples(&mut encoder, report, &s.samples, &self.holders.get())?;
        encode_xids(&mut encoder, report, &s.xids)?;

        fn pf_labels(pf: &PfView) -> Labels<'_> {
            vec![
                ("pf", pf.pci_address.as_str()),
                ("netdev", pf.netdev.as_deref().unwrap_or("")),
            ]
        }
        let pfs = &report.physical_functions;
        let rows = |f: &dyn Fn(&PfView) -> f64| -> Vec<(Labels<'_>, f64)> {
            pfs.iter().map(|pf| (pf_labels(pf), f(pf))).collect()
        };
        gauge_family(
            &mut encoder,
            "sriov_vfs",
            "Virtual functions that exist on the PF (sriov_numvfs)",
            None,
            &rows(&|pf| f64::from(pf.num_vfs)),
        )?;
        gauge_family(
            &mut encoder,
            "sriov_vfs_capacity",
            "Most virtual functions the PF supports (sriov_totalvfs)",
            None,
            &rows(&|pf| f64::from(pf.total_vfs)),
        )?;
        gauge_family(
            &mut encoder,
            "sriov_vfs_vfio",
            "Virtual functions bound to vfio-pci",
            None,
            &rows(&|pf| {
                pf.vfs
                    .iter()
                    .filter(|v| v.driver.as_deref() == Some("vfio-pci"))
                    .count() as f64
            }),
        )?;
        let holders = self.holders.get();
        gauge_family(
            &mut encoder,
            "sriov_vfs_allocated",
            "Virtual functions prepared for a ResourceClaim by the SR-IOV DRA driver",
            None,
            &rows(&|pf| {
                pf.vfs
                    .iter()
                    .filter(|v| holders.contains_key(&v.pci_address))
                    .count() as f64
            }),
        )?;
        encode_vf_counters(&mut encoder, &s.vf_counters)?;
        if self.counters_stale(s.counters_read) {
            self.counters_wanted.notify_one();
        }
        gauge_family(
            &mut encoder,
            "sriov_pf_link_speed",
            "PF link speed (0 when the link is down or unknown)",
            Some(&Unit::Other("bytes_per_second".to_string())),
            &rows(&|pf| pf.link_speed_mbps.map_or(0.0, |m| f64::from(m) * 125_000.0)),
        )?;
        Ok(())
    }
}

/// Per-VF interface counters (VFs with a netdev; vfio-bound VFs have none in sysfs).
fn encode_vf_counters(
    encoder: &mut DescriptorEncoder<'_>,
    vfs: &[(String, String, String, NetdevCounters)],
) -> Result<(), std::fmt::Error> {
    use hybridlet_metrics::prometheus_client::metrics::counter::ConstCounter;
    type Pick = fn(&NetdevCounters) -> Option<u64>;
    let families: [(&str, &str, Option<Unit>, Pick); 4] = [
        (
            "sriov_vf_receive",
            "Bytes the VF's netdev received (statistics/rx_bytes)",
            Some(Unit::Bytes),
            |c| c.rx_bytes,
        ),
        (
            "sriov_vf_transmit",
            "Bytes the VF's netdev sent (statistics/tx_bytes)",
            Some(Unit::Bytes),
            |c| c.tx_bytes,
        ),
        (
            "sriov_vf_receive_drop",
            "Received packets the VF's netdev dropped (statistics/rx_dropped)",
            None,
            |c| c.rx_dropped,
        ),
        (
            "sriov_vf_transmit_drop",
            "Packets the VF's netdev dropped on send (statistics/tx_dropped)",
            None,
            |c| c.tx_dropped,
        ),
    ];
    for (name, help, unit, pick) in families {
        let mut family =
            encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (pf, vf, netdev, counters) in vfs {
            if let Some(v) = pick(counters) {
                let labels: Labels<'_> = vec![("pf", pf), ("vf", vf), ("netdev", netdev)];
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

/// XID families for every GPU in the report whose watch has started.
fn encode_xids(
    encoder: &mut DescriptorEncoder<'_>,
    report: &Report,
    xids: &BTreeMap<String, XidState>,
) -> Result<(), std::fmt::Error> {
    use hybridlet_metrics::prometheus_client::metrics::counter::ConstCounter;
    let indices: Vec<String> = report
        .gpus
        .iter()
        .map(|g| g.info.index.to_string())
        .collect();
    let rows: Vec<(Labels<'_>, &XidState)> = report
        .gpus
        .iter()
        .zip(&indices)
        .filter_map(|(g, index)| {
            let state = xids.get(&g.info.uuid)?;
            Some((
                vec![
                    ("gpu", index.as_str()),
                    ("UUID", g.info.uuid.as_str()),
                    ("pci_bus_id", g.info.pci_bus_id.as_str()),
                    ("modelName", g.info.name.as_str()),
                ],
                state,
            ))
        })
        .collect();
    let watched: Vec<(Labels<'_>, f64)> = rows
        .iter()
        .map(|(l, s)| (l.clone(), if s.watched { 1.0 } else { 0.0 }))
        .collect();
    gauge_family(
        encoder,
        "gpu_xid_watched",
        "1 when the GPU's critical XID errors are watched through NVML events, 0 when it cannot report them",
        None,
        &watched,
    )?;
    let last: Vec<(Labels<'_>, f64)> = rows
        .iter()
        .map(|(l, s)| (l.clone(), s.last.map_or(0.0, |x| x as f64)))
        .collect();
    gauge_family(
        encoder,
        "gpu_last_xid",
        "Code of the GPU's most recent XID error since the agent started, 0 for none (DCGM_FI_DEV_XID_ERRORS)",
        None,
        &last,
    )?;
    let mut family = encoder.encode_descriptor(
        "gpu_xid_errors",
        "Critical XID errors the GPU reported since the agent started (the log names each code and what it means)",
        None,
        MetricType::Counter,
    )?;
    for (labels, state) in &rows {
        ConstCounter::new(state.count).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// GPU telemetry families, labelled like dcgm-exporter (`gpu`, `UUID`, `pci_bus_id`,
/// `modelName`) so existing dashboards join; a reading the GPU did not give is left out.
fn encode_gpu_samples(
    encoder: &mut DescriptorEncoder<'_>,
    report: &Report,
    samples: &[GpuSample],
    holders: &BTreeMap<String, Holder>,
) -> Result<(), std::fmt::Error> {
    let indices: Vec<String> = samples.iter().map(|s| s.index.to_string()).collect();
    let free = Holder::default();
    let labels = |i: usize| -> Labels<'_> {
        let s = &samples[i];
        let info = report.gpus.iter().find(|g| g.info.uuid == s.uuid);
        let holder = holders.get(&s.uuid).unwrap_or(&free);
        vec![
            ("gpu", indices[i].as_str()),
            ("UUID", s.uuid.as_str()),
            (
                "pci_bus_id",
                info.map_or("", |g| g.info.pci_bus_id.as_str()),
            ),
            ("modelName", info.map_or("", |g| g.info.name.as_str())),
            // dcgm-exporter's names for the workload holding the GPU; empty when free.
            ("namespace", holder.namespace.as_str()),
            ("pod", holder.pod.as_str()),
            ("claim", holder.claim.as_str()),
        ]
    };
    let rows = |f: &dyn Fn(&GpuSample) -> Option<f64>| -> Vec<(Labels<'_>, f64)> {
        (0..samples.len())
            .filter_map(|i| f(&samples[i]).map(|v| (labels(i), v)))
            .collect()
    };
    let families: [GaugeFamily<'_>; 9] = [
        (
            "gpu_utilization",
            "GPU utilization over NVML's last sample period (DCGM_FI_DEV_GPU_UTIL / 100)",
            Some(Unit::Other("ratio".into())),
            rows(&|s| s.utilization_percent.map(|p| f64::from(p) / 100.0)),
        ),
        (
            "gpu_memory_used",
            "Framebuffer memory in use (DCGM_FI_DEV_FB_USED, in bytes)",
            Some(Unit::Bytes),
            rows(&|s| s.memory_used_bytes.map(|b| b as f64)),
        ),
        (
            "gpu_temperature",
            "GPU core temperature (DCGM_FI_DEV_GPU_TEMP)",
            Some(Unit::Celsius),
            rows(&|s| s.temperature_celsius.map(f64::from)),
        ),
        (
            "gpu_power",
            "Power draw (DCGM_FI_DEV_POWER_USAGE)",
            Some(Unit::Other("watts".into())),
            rows(&|s| s.power_milliwatts.map(|mw| f64::from(mw) / 1000.0)),
        ),
        (
            "gpu_power_limit",
            "Enforced power limit (DCGM_FI_DEV_ENFORCED_POWER_LIMIT)",
            Some(Unit::Other("watts".into())),
            rows(&|s| s.power_limit_milliwatts.map(|mw| f64::from(mw) / 1000.0)),
        ),
        (
            "gpu_sm_clock",
            "SM clock (DCGM_FI_DEV_SM_CLOCK, in hertz)",
            Some(Unit::Other("hertz".into())),
            rows(&|s| s.sm_clock_mhz.map(|m| f64::from(m) * 1e6)),
        ),
        (
            "gpu_ecc_errors",
            "Volatile ECC errors since the driver loaded, corrected and uncorrected summed (DCGM_FI_DEV_ECC_SBE_VOL_TOTAL + DCGM_FI_DEV_ECC_DBE_VOL_TOTAL); see gpu_ecc_uncorrected_errors",
            None,
            rows(&|s| match (s.ecc_corrected, s.ecc_uncorrected) {
                (Some(c), Some(u)) => Some((c + u) as f64),
                _ => None,
            }),
        ),
        (
            "gpu_ecc_uncorrected_errors",
            "Volatile uncorrected ECC errors since the driver loaded (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL)",
            None,
            rows(&|s| s.ecc_uncorrected.map(|u| u as f64)),
        ),
        (
            "gpu_pcie_replays",
            "PCIe replays since the driver loaded (DCGM_FI_DEV_PCIE_REPLAY_COUNTER)",
            None,
            rows(&|s| s.pcie_replays.map(f64::from)),
        ),
    ];
    for (name, help, unit, rows) in &families {
        gauge_family(encoder, name, help, unit.as_ref(), rows)?;
    }
    gauge_family(
        encoder,
        "gpu_throttle_reasons",
        "Clock throttle reasons bitmask (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS; 0 = not throttled)",
        None,
        &rows(&|s| s.throttle_reasons.map(|r| r as f64)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_names_the_holder_of_a_prepared_gpu_and_xids_count() {
        let root = tempfile::tempdir().unwrap();
        hybridlet_fixtures::dgx_h200(root.path(), 0).unwrap();
        let source =
            hybridlet_gpu::FakeSource::from_file(&root.path().join("fake-nvml.json")).unwrap();
        let host = hybridlet_sys::HostRoot::new(root.path());
        let report = discover(&Sysfs::new(&host), Some(&source))
            .unwrap()
            .report();
        let holders = Holders::default();
        let mut registry = hybridlet_metrics::new_registry();
        let metrics = DeviceMetrics::register(&mut registry, holders.clone());
        metrics.store(
            report,
            source.sample().unwrap(),
            Vec::new(),
            Duration::from_millis(3),
        );
        let uuid3 = "GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003";
        holders.set(
            &|_| true,
            BTreeMap::from([(
                uuid3.to_string(),
                Holder {
                    namespace: "ml".into(),
                    claim: "train".into(),
                    pod: "train-0".into(),
                },
            )]),
        );
        metrics.xid_watch_started(&XidWatch {
            watched: vec![uuid3.into()],
            unsupported: vec![(
                "GPU-5a0b0004-1c2d-4e5f-8a9b-0000dead0004".into(),
                "no".into(),
            )],
        });
        metrics.xid(XidEvent {
            uuid: uuid3.into(),
            xid: Some(79),
        });
        metrics.xid(XidEvent {
            uuid: uuid3.into(),
            xid: None,
        });
        let text = hybridlet_metrics::encode(&registry).unwrap();
        let held = format!(
            "hybridlet_gpu_utilization_ratio{{gpu=\"3\",UUID=\"{uuid3}\",pci_bus_id=\"00000000:63:00.0\",modelName=\"NVIDIA H200\",namespace=\"ml\",pod=\"train-0\",claim=\"train\"}} 0.93"
        );
        assert!(text.contains(&held), "{text}");
        assert!(
            text.contains("hybridlet_gpu_utilization_ratio{gpu=\"0\",UUID=\"GPU-5a0b0000-1c2d-4e5f-8a9b-0000dead0000\",pci_bus_id=\"00000000:18:00.0\",modelName=\"NVIDIA H200\",namespace=\"\",pod=\"\",claim=\"\"} 0.9"),
            "{text}"
        );
        // Two events, the last decodable code kept; the unsupported GPU says so.
        assert!(text.contains(&format!("hybridlet_gpu_xid_errors_total{{gpu=\"3\",UUID=\"{uuid3}\",pci_bus_id=\"00000000:63:00.0\",modelName=\"NVIDIA H200\"}} 2")), "{text}");
        assert!(text.contains(&format!("hybridlet_gpu_last_xid{{gpu=\"3\",UUID=\"{uuid3}\",pci_bus_id=\"00000000:63:00.0\",modelName=\"NVIDIA H200\"}} 79")), "{text}");
        assert!(text.contains("hybridlet_gpu_xid_watched{gpu=\"4\",UUID=\"GPU-5a0b0004-1c2d-4e5f-8a9b-0000dead0004\",pci_bus_id=\"00000000:9A:00.0\",modelName=\"NVIDIA H200\"} 0"), "{text}");
        // A GPU whose watch never started has no XID series at all.
        assert!(
            !text.contains("hybridlet_gpu_xid_watched{gpu=\"0\""),
            "{text}"
        );
    }

    #[test]
    fn vfs_prepared_by_the_sriov_driver_count_as_allocated_and_vfio_vfs_have_no_counters() {
        let root = tempfile::tempdir().unwrap();
        hybridlet_fixtures::e810_server(root.path()).unwrap();
        let host = hybridlet_sys::HostRoot::new(root.path());
        let sysfs = Sysfs::new(&host);
        let report = discover(&sysfs, None).unwrap().report();
        let pf = &report.physical_functions[0];
        let counters = pf
            .vfs
            .iter()
            .filter_map(|v| {
                let n = v.netdev.clone()?;
                Some((
                    pf.pci_address.clone(),
                    v.pci_address.clone(),
                    n.clone(),
                    sysfs.netdev_counters(&n),
                ))
            })
            .collect::<Vec<_>>();
        assert_eq!(
            counters.len(),
            60,
            "VFs 60-63 are on vfio-pci, without a netdev"
        );
        let (vf0, vf61) = (
            pf.vfs[0].pci_address.clone(),
            pf.vfs[61].pci_address.clone(),
        );
        let holders = Holders::default();
        let mut registry = hybridlet_metrics::new_registry();
        let metrics = DeviceMetrics::register(&mut registry, holders.clone());
        metrics.store(report, Vec::new(), counters, Duration::from_millis(1));
        let held = |c: &str| Holder {
            namespace: "net".into(),
            claim: c.into(),
            pod: String::new(),
        };
        holders.set(
            &|_| true,
            BTreeMap::from([(vf0.clone(), held("a")), (vf61.clone(), held("b"))]),
        );
        let text = hybridlet_metrics::encode(&registry).unwrap();
        assert!(
            text.contains("hybridlet_sriov_vfs_allocated{pf=\"0000:81:00.0\",netdev=\"ens2f0\"} 2"),
            "{text}"
        );
        assert!(text.contains(&format!("hybridlet_sriov_vf_receive_bytes_total{{pf=\"0000:81:00.0\",vf=\"{vf0}\",netdev=\"ens2f0v0\"}} ")), "{text}");
        assert!(!text.contains(&format!("vf=\"{vf61}\"")), "{text}");
        // One driver's update leaves the other driver's holders alone.
        holders.set(&|k| k == vf0, BTreeMap::new());
        let text = hybridlet_metrics::encode(&registry).unwrap();
        assert!(
            text.contains("hybridlet_sriov_vfs_allocated{pf=\"0000:81:00.0\",netdev=\"ens2f0\"} 1"),
            "{text}"
        );
    }
}
