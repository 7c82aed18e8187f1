//! The `devices` subsystem: samples device discovery on a timer (never during a scrape)
//! and exports what it found — GPUs, SR-IOV PFs and VFs — with labels that join onto
//! existing dashboards (`gpu`, `UUID`, `pci_bus_id`, `modelName` as dcgm-exporter uses them;
//! `pf` as the SR-IOV exporters use it).
//!
//! A scrape reads the last snapshot from memory; it never touches sysfs or NVML.

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

/// How often discovery runs for metrics.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(60);

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
        s.samples = samples;
        s.duration = duration;
        s.last_success = Some(SystemTime::now());
    }

    /// Sample until shutdown.
    pub async fn run(
        self,
        sysfs: Sysfs,
        gpus: Option<Arc<dyn GpuSource>>,
        interval: Duration,
        ctx: SubsystemContext,
    ) -> Result<(), BoxError> {
        let xid_watcher = gpus
            .clone()
            .map(|g| self.spawn_xid_watcher(g, ctx.shutdown.clone()));
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => {
                    // The watcher looks at the token at least once a second.
                    if let Some(w) = xid_watcher {
                        let _ = w.await;
                    }
                    return Ok(());
                }
                _ = ticker.tick() => {}
            }
            let (sysfs, gpus) = (sysfs.clone(), gpus.clone());
            let started = Instant::now();
            let policies = self.policies();
            let result = tokio::task::spawn_blocking(move || {
                let found = discover(&sysfs, gpus.as_deref())?;
                let report = found.report();
                // Telemetry failing (a GPU fell off the bus) must not hide the inventory.
                let samples = match gpus.as_deref().map(|g| g.sample()) {
                    Some(Ok(samples)) => samples,
                    Some(Err(e)) => {
                        tracing::warn!("GPU telemetry sampling failed: {e}");
                        Vec::new()
                    }
                    None => Vec::new(),
                };
                let vf_counters = report
                    .physical_functions
                    .iter()
                    .flat_map(|pf| {
                        pf.vfs.iter().filter_map(|vf| {
                            let netdev = vf.netdev.as_ref()?;
                            Some((
                                pf.pci_address.clone(),
                                vf.pci_address.clone(),
                                netdev.clone(),
                                sysfs.netdev_counters(netdev),
                            ))
                        })
                    })
                    .collect();
                for p in &policies {
                    p.sampled(&sysfs, &found, &samples);
                }
                Ok::<_, crate::Error>((report, samples, vf_counters))
            })
            .await;
            match result {
                Ok(Ok((report, samples, vf_counters))) => {
                    self.store(report, samples, vf_counters, started.elapsed());
                    ctx.ready.set_ready();
                }
                Ok(Err(failure)) => {
                    tracing::warn!("device discovery for metrics failed: {failure:?}")
                }
                Err(join) => tracing::warn!("device discovery for metrics failed: {join}"),
            }
        }
    }
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
