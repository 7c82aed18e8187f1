//! Health and metrics of the PCI driver's functions, from sysfs on every device sample:
//!
//! * gone (hot-unplug, surprise removal): `<driver>/gone`, until it is back;
//! * a new AER fatal or non-fatal uncorrectable error: `<driver>/aer-fatal` or
//!   `<driver>/aer-nonfatal` (value: the kernel's total), until [`PCI_RECOVERY`] passes
//!   without another (counts from before the first sample are the baseline, not news);
//! * a link trained below what the function supports (speed or width):
//!   `<driver>/link-degraded` (value like `x8-8.0GTs`), until it trains back.
//!
//! Every taint is `NoSchedule`, on the driver's health board (the kubelet's health stream
//! and the ResourceSlice read it). The worst condition wins: gone, fatal, non-fatal, link.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hybridlet_dra::{HealthBoard, Taint};
use hybridlet_metrics::prometheus_client::metrics::counter::Counter;
use hybridlet_metrics::prometheus_client::metrics::family::Family;
use hybridlet_metrics::prometheus_client::metrics::gauge::Gauge;
use hybridlet_metrics::prometheus_client::registry::Registry;
use hybridlet_sys::binding::DriverBinding;
use hybridlet_sys::pci_detail::AerCounters;
use hybridlet_sys::{PciAddress, Sysfs};

use crate::Inventory;

/// How long a function stays tainted after its last AER uncorrectable error.
pub const PCI_RECOVERY: Duration = Duration::from_secs(600);

type Labels = Vec<(String, String)>;

/// The PCI families, registered once per process; each driver's health policy writes its
/// own series.
#[derive(Debug, Clone, Default)]
pub struct PciMetrics {
    present: Family<Labels, Gauge>,
    aer: Family<Labels, Counter>,
    width: Family<Labels, Gauge>,
    speed: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    info: Family<Labels, Gauge>,
    /// The info series each function has now (its kernel driver changes at prepare).
    info_labels: Arc<Mutex<BTreeMap<String, Labels>>>,
}

impl PciMetrics {
    /// Register the families.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pci_device_present",
            "Whether an allowlisted PCI function of the PCI DRA driver is present (0 after hot-unplug or surprise removal)",
            m.present.clone(),
        );
        registry.register(
            "pci_aer_errors",
            "AER errors the kernel counted on the function since boot, by aer_severity (correctable, nonfatal, fatal)",
            m.aer.clone(),
        );
        registry.register(
            "pci_link_width",
            "PCIe link width in lanes, by link (current, max)",
            m.width.clone(),
        );
        registry.register(
            "pci_link_speed",
            "PCIe link speed in GT/s, by link (current, max)",
            m.speed.clone(),
        );
        registry.register(
            "pci_device_info",
            "Allowlisted PCI functions: IDs, class, the rule's device class and the kernel driver bound now",
            m.info.clone(),
        );
        m
    }

    /// Drop every series (the PCI driver stopped for good; one runs at a time).
    pub fn clear(&self) {
        self.present.clear();
        self.aer.clear();
        self.width.clear();
        self.speed.clear();
        self.info.clear();
        self.info_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// What the last sample saw of one function.
#[derive(Debug, Clone, Default)]
struct Seen {
    aer: AerCounters,
    last_fatal: Option<Instant>,
    last_nonfatal: Option<Instant>,
}

/// PCI function health from sysfs.
pub struct PciHealth {
    board: HealthBoard,
    driver: String,
    /// PCI address → device name in the slice.
    names: BTreeMap<String, String>,
    /// Per function: IDs for the info series.
    ids: BTreeMap<String, Labels>,
    seen: Mutex<BTreeMap<String, Seen>>,
    metrics: Option<PciMetrics>,
    recovery: Duration,
    now: Box<dyn Fn() -> Instant + Send + Sync>,
}

impl std::fmt::Debug for PciHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHealth")
            .field("driver", &self.driver)
            .field("functions", &self.names.len())
            .finish_non_exhaustive()
    }
}

fn grew(before: Option<u64>, now: Option<u64>) -> bool {
    matches!((before, now), (Some(b), Some(n)) if n > b)
}

impl PciHealth {
    /// For the PCI driver `driver` over `inventory`'s functions, on its health `board`.
    pub fn new(board: HealthBoard, driver: &str, inventory: &Inventory) -> Self {
        let hex = |v: u16| format!("0x{v:04x}");
        Self {
            board,
            driver: driver.to_string(),
            names: inventory
                .functions
                .iter()
                .map(|f| {
                    let a = f.device.address.to_string();
                    (a.clone(), crate::dra::device_name(&a))
                })
                .collect(),
            ids: inventory
                .functions
                .iter()
                .map(|f| {
                    (
                        f.device.address.to_string(),
                        vec![
                            ("vendor".to_string(), hex(f.device.vendor_id)),
                            ("pci_device".to_string(), hex(f.device.device_id)),
                            ("class".to_string(), format!("0x{:06x}", f.device.class)),
                            ("device_class".to_string(), f.device_class.clone()),
                        ],
                    )
                })
                .collect(),
            seen: Mutex::new(BTreeMap::new()),
            metrics: None,
            recovery: PCI_RECOVERY,
            now: Box::new(Instant::now),
        }
    }

    /// Export per-function series into `metrics`.
    pub fn with_metrics(mut self, metrics: PciMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same policy with another recovery period and clock.
    #[cfg(test)]
    fn with_clock(
        mut self,
        recovery: Duration,
        now: impl Fn() -> Instant + Send + Sync + 'static,
    ) -> Self {
        self.recovery = recovery;
        self.now = Box::new(now);
        self
    }

    fn labels(&self, name: &str, address: &str) -> Labels {
        vec![
            ("driver".to_string(), self.driver.clone()),
            ("device".to_string(), name.to_string()),
            ("pci_bus_id".to_string(), address.to_string()),
        ]
    }

    fn taint(&self, reason: &str, value: String) -> Taint {
        Taint {
            key: format!("{}/{reason}", self.driver),
            value,
            effect: "NoSchedule".into(),
        }
    }

    /// A device sample finished: read each function's presence, AER totals and link.
    pub fn sampled(&self, sysfs: &Sysfs) {
        let now = (self.now)();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (address, name) in &self.names {
            let Some(pci) = PciAddress::parse(address) else {
                continue;
            };
            let present = sysfs.pci_present(&pci);
            let first = !seen.contains_key(address);
            let state = seen.entry(address.clone()).or_default();
            let (aer, link) = if present {
                (sysfs.aer_counters(&pci), sysfs.pcie_link(&pci))
            } else {
                (AerCounters::default(), Default::default())
            };
            if present && !first {
                if grew(state.aer.fatal, aer.fatal) {
                    state.last_fatal = Some(now);
                }
                if grew(state.aer.nonfatal, aer.nonfatal) {
                    state.last_nonfatal = Some(now);
                }
            }
            let recent =
                |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) < self.recovery);
            let verdict = if !present {
                Some((
                    format!("{address} is gone from the PCI bus (hot-unplug or surprise removal)"),
                    self.taint("gone", String::new()),
                ))
            } else if recent(state.last_fatal) {
                let total = aer.fatal.unwrap_or(0);
                Some((
                    format!("{address} reported an AER fatal error ({total} since boot)"),
                    self.taint("aer-fatal", total.to_string()),
                ))
            } else if recent(state.last_nonfatal) {
                let total = aer.nonfatal.unwrap_or(0);
                Some((
                    format!(
                        "{address} reported an AER non-fatal uncorrectable error ({total} since boot)"
                    ),
                    self.taint("aer-nonfatal", total.to_string()),
                ))
            } else if link.degraded() == Some(true) {
                let (w, s) = (
                    link.current_width.unwrap_or(0),
                    link.current_speed_gts.unwrap_or(0.0),
                );
                Some((
                    format!(
                        "{address}'s PCIe link trained at x{w} {s:.1} GT/s, below its x{} {:.1} GT/s",
                        link.max_width.unwrap_or(0),
                        link.max_speed_gts.unwrap_or(0.0)
                    ),
                    self.taint("link-degraded", format!("x{w}-{s:.1}GTs")),
                ))
            } else {
                None
            };
            match verdict {
                Some((message, taint)) => {
                    if self.board.set_unhealthy(name, &message, taint.clone()) {
                        tracing::warn!(device = %name, pci = %address, taint = %taint.key, "PCI function marked unhealthy and tainted: {message}");
                    }
                }
                None => {
                    if self.board.set_healthy(name) {
                        tracing::info!(device = %name, pci = %address, "PCI function healthy again; taint removed");
                    }
                }
            }
            if let Some(m) = &self.metrics {
                let base = self.labels(name, address);
                m.present.get_or_create(&base).set(i64::from(present));
                for (severity, before, now) in [
                    ("correctable", state.aer.correctable, aer.correctable),
                    ("nonfatal", state.aer.nonfatal, aer.nonfatal),
                    ("fatal", state.aer.fatal, aer.fatal),
                ] {
                    let Some(now) = now else { continue };
                    let counter = m.aer.get_or_create(&with(&base, "aer_severity", severity));
                    // The kernel's totals since boot; the counter follows their growth.
                    let delta = match before {
                        Some(b) if now >= b => now - b,
                        _ => now.saturating_sub(counter.get()),
                    };
                    counter.inc_by(delta);
                }
                for (which, width, speed) in [
                    ("current", link.current_width, link.current_speed_gts),
                    ("max", link.max_width, link.max_speed_gts),
                ] {
                    if let Some(w) = width {
                        m.width
                            .get_or_create(&with(&base, "link", which))
                            .set(i64::from(w));
                    }
                    if let Some(s) = speed {
                        m.speed.get_or_create(&with(&base, "link", which)).set(s);
                    }
                }
                let mut info = base.clone();
                info.extend(self.ids.get(address).cloned().unwrap_or_default());
                let kernel_driver = if present { sysfs.driver(&pci) } else { None };
                info.push((
                    "kernel_driver".into(),
                    kernel_driver.unwrap_or_else(|| "none".into()),
                ));
                let mut infos = m
                    .info_labels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(old) = infos.insert(address.clone(), info.clone())
                    && old != info
                {
                    m.info.remove(&old);
                }
                m.info.get_or_create(&info).set(1);
            }
            if present {
                state.aer = aer;
            }
        }
    }
}

fn with(base: &Labels, key: &str, value: &str) -> Labels {
    let mut l = base.clone();
    l.push((key.to_string(), value.to_string()));
    l
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_sys::HostRoot;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn gone_aer_and_link_taint_with_recovery() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::fpga_server(dir.path()).unwrap();
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
        let (devices, _) = sysfs.pci_devices().unwrap();
        let inventory = crate::discover(&sysfs, &devices, &crate::tests::rules());
        let names: Vec<String> = inventory
            .functions
            .iter()
            .map(|f| crate::dra::device_name(f.device.address.as_str()))
            .collect();
        let board = HealthBoard::new(names);
        let mut registry = Registry::default();
        let metrics = PciMetrics::register(&mut registry);
        let secs = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let clock = secs.clone();
        let health = PciHealth::new(board.clone(), "pci.hybridlet.io", &inventory)
            .with_metrics(metrics)
            .with_clock(Duration::from_secs(600), move || {
                start + Duration::from_secs(clock.load(Ordering::SeqCst))
            });
        let dev = |a: &str| dir.path().join("sys/bus/pci/devices").join(a);
        let taint = |d: &str| board.taint(d).map(|t| (t.key, t.value));

        // A fatal error before the first sample is the baseline, not news; the DFL card's
        // link already runs at x8 of x16.
        std::fs::write(
            dev("0000:03:00.1").join("aer_dev_fatal"),
            "TOTAL_ERR_FATAL 2\n",
        )
        .unwrap();
        health.sampled(&sysfs);
        assert_eq!(taint("pci-0000-03-00-1"), None);
        assert_eq!(
            taint("pci-0000-04-00-0"),
            Some(("pci.hybridlet.io/link-degraded".into(), "x8-8.0GTs".into()))
        );

        // A new fatal error taints; a non-fatal one on another function too.
        std::fs::write(
            dev("0000:03:00.1").join("aer_dev_fatal"),
            "TOTAL_ERR_FATAL 3\n",
        )
        .unwrap();
        std::fs::write(
            dev("0000:03:00.0").join("aer_dev_nonfatal"),
            "TOTAL_ERR_NONFATAL 1\n",
        )
        .unwrap();
        secs.store(60, Ordering::SeqCst);
        health.sampled(&sysfs);
        assert_eq!(
            taint("pci-0000-03-00-1"),
            Some(("pci.hybridlet.io/aer-fatal".into(), "3".into()))
        );
        assert_eq!(
            taint("pci-0000-03-00-0"),
            Some(("pci.hybridlet.io/aer-nonfatal".into(), "1".into()))
        );
        let text = {
            let mut out = String::new();
            hybridlet_metrics::prometheus_client::encoding::text::encode(&mut out, &registry)
                .unwrap();
            out
        };
        assert!(
            text.contains("pci_aer_errors_total{driver=\"pci.hybridlet.io\",device=\"pci-0000-03-00-1\",pci_bus_id=\"0000:03:00.1\",aer_severity=\"fatal\"} 3"),
            "{text}"
        );
        assert!(text.contains("kernel_driver=\"xocl\""), "{text}");

        // Surprise removal of the accelerator; the link of the DFL card trains back.
        std::fs::remove_file(dev("0000:05:00.0").join("vendor")).unwrap();
        std::fs::write(dev("0000:04:00.0").join("current_link_width"), "16\n").unwrap();
        secs.store(120, Ordering::SeqCst);
        health.sampled(&sysfs);
        assert_eq!(
            taint("pci-0000-05-00-0").map(|t| t.0),
            Some("pci.hybridlet.io/gone".into())
        );
        assert_eq!(taint("pci-0000-04-00-0"), None);

        // Quiet for the recovery period: healthy again; back on the bus: healthy.
        std::fs::write(dev("0000:05:00.0").join("vendor"), "0x1d0f\n").unwrap();
        secs.store(60 + 600, Ordering::SeqCst);
        health.sampled(&sysfs);
        for d in ["pci-0000-03-00-1", "pci-0000-03-00-0", "pci-0000-05-00-0"] {
            assert_eq!(taint(d), None, "{d}");
        }
    }
}
