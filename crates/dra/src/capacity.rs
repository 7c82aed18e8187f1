//! What the node's DRA drivers have free, for decisions made off the node (bursting to
//! the cloud when on-prem accelerators are full): each driver's devices by state, as
//! metrics (`hybridlet_dra_devices{driver,state}`) and, when the operator turns it on, as
//! coarse Node labels written only when they change (`NodeLabeler`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybridlet_runtime::CancellationToken;

/// One driver's devices by state; the three add up to the devices it publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Healthy and not prepared for any claim.
    pub free: usize,
    /// Prepared for a claim (and healthy).
    pub allocated: usize,
    /// Tainted (whether prepared or not).
    pub unhealthy: usize,
    /// Healthy, not prepared, but what it needs from the pool's shared counters is taken by
    /// prepared devices (a MIG placement that overlaps a prepared one): it cannot be
    /// allocated now.
    pub blocked: usize,
}

impl DeviceCounts {
    /// From the driver's devices, which are unhealthy, which are prepared and which are
    /// blocked by the prepared ones.
    pub fn of<'a>(
        devices: impl IntoIterator<Item = &'a str>,
        unhealthy: impl Fn(&str) -> bool,
        prepared: impl Fn(&str) -> bool,
        blocked: impl Fn(&str) -> bool,
    ) -> Self {
        let mut c = Self::default();
        for d in devices {
            if unhealthy(d) {
                c.unhealthy += 1;
            } else if prepared(d) {
                c.allocated += 1;
            } else if blocked(d) {
                c.blocked += 1;
            } else {
                c.free += 1;
            }
        }
        c
    }
}

/// The devices not in `prepared` whose counter needs no longer fit what the `prepared`
/// ones leave of the pool's counter sets (KEP-4815: the scheduler allocates a device only
/// while every counter it consumes has enough left). Counter values that are not plain
/// integers are taken to fit.
pub fn blocked_by_counters(
    sets: &[crate::CounterSet],
    devices: &[crate::SliceDevice],
    prepared: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    let number = |v: &str| v.parse::<u64>().ok();
    let mut left: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for set in sets {
        for (k, v) in &set.counters {
            if let Some(n) = number(v) {
                left.insert((set.name.as_str(), k.as_str()), n);
            }
        }
    }
    for d in devices.iter().filter(|d| prepared.contains(&d.name)) {
        for c in &d.consumes {
            for (k, v) in &c.counters {
                if let (Some(n), Some(have)) =
                    (number(v), left.get_mut(&(c.set.as_str(), k.as_str())))
                {
                    *have = have.saturating_sub(n);
                }
            }
        }
    }
    devices
        .iter()
        .filter(|d| !prepared.contains(&d.name))
        .filter(|d| {
            d.consumes.iter().any(|c| {
                c.counters.iter().any(|(k, v)| {
                    matches!((number(v), left.get(&(c.set.as_str(), k.as_str()))), (Some(n), Some(have)) if n > *have)
                })
            })
        })
        .map(|d| d.name.clone())
        .collect()
}

/// One driver's entry on the board.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverCapacity {
    /// The devices by state.
    pub counts: DeviceCounts,
    /// The most common `productName` among its devices (GPUs), if any.
    pub product: Option<String>,
}

/// Every running DRA driver's capacity, by kind (`gpu`, `sriov`, `pci`); each plugin
/// keeps its own entry current, the labeler reads them.
#[derive(Debug, Clone)]
pub struct CapacityBoard {
    drivers: Arc<Mutex<BTreeMap<String, DriverCapacity>>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for CapacityBoard {
    fn default() -> Self {
        Self {
            drivers: Arc::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl CapacityBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DriverCapacity>> {
        self.drivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Set `kind`'s entry (`None`: the driver stopped).
    pub fn set(&self, kind: &str, capacity: Option<DriverCapacity>) {
        let changed = {
            let mut drivers = self.lock();
            match capacity {
                Some(c) => drivers.insert(kind.to_string(), c.clone()) != Some(c),
                None => drivers.remove(kind).is_some(),
            }
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Every entry now.
    pub fn snapshot(&self) -> BTreeMap<String, DriverCapacity> {
        self.lock().clone()
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The label prefix hybridlet owns on its Node.
pub const LABEL_PREFIX: &str = "hybridlet.io/";

/// Every label the labeler may write; only these are ever removed.
pub fn owned_label(key: &str) -> bool {
    key.strip_prefix(LABEL_PREFIX).is_some_and(|rest| {
        rest == "site"
            || rest == "gpu.product"
            || ["gpu", "sriov", "pci"]
                .iter()
                .any(|k| rest == format!("{k}.free"))
    })
}

/// A coarse bucket for a free-device count, so a label changes when the order of
/// magnitude does, not at every claim: `0`, `1`, `2-3`, `4-7`, … up to `512-1023`, then
/// `1024-plus`.
pub fn free_bucket(n: usize) -> String {
    match n {
        0 => "0".into(),
        1 => "1".into(),
        n if n >= 1024 => "1024-plus".into(),
        n => {
            let low = 1usize << (usize::BITS - 1 - n.leading_zeros());
            format!("{low}-{}", low * 2 - 1)
        }
    }
}

/// `text` as a label value: at most 63 characters of letters, digits, `-`, `_`, `.`,
/// alphanumeric at both ends (`NVIDIA H200` → `NVIDIA-H200`); `None` when nothing is left.
pub fn label_value(text: &str) -> Option<String> {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// The labels the node should carry for `board` and the operator's `site`.
pub fn desired_labels(
    board: &BTreeMap<String, DriverCapacity>,
    site: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Some(site) = site.and_then(label_value) {
        labels.insert(format!("{LABEL_PREFIX}site"), site);
    }
    for (kind, c) in board {
        labels.insert(
            format!("{LABEL_PREFIX}{kind}.free"),
            free_bucket(c.counts.free),
        );
        if kind == "gpu"
            && let Some(product) = c.product.as_deref().and_then(label_value)
        {
            labels.insert(format!("{LABEL_PREFIX}gpu.product"), product);
        }
    }
    labels
}

/// What a patch must change to turn `current` (the node's labels) into `desired`: owned
/// labels set to their new value, or removed (`None`) when no longer wanted.
pub fn label_changes(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<String>> {
    let mut changes: BTreeMap<String, Option<String>> = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    for key in current.keys() {
        if owned_label(key) && !desired.contains_key(key) {
            changes.insert(key.clone(), None);
        }
    }
    changes
}

/// Writes the capacity labels on the node's own Node object: read once at start, then a
/// merge patch only when the desired labels differ from what it last wrote, at most once
/// per `min_interval`. Steady state costs the API server nothing.
#[derive(Debug)]
pub struct NodeLabeler {
    /// The kubelet's kubeconfig (the node's identity).
    pub kubeconfig: std::path::PathBuf,
    /// The node.
    pub node: String,
    /// `hybridlet.io/site`, if the operator set one.
    pub site: Option<String>,
    /// The board the DRA plugins keep.
    pub board: CapacityBoard,
    /// Fewest seconds between two patches (a minute in the daemon).
    pub min_interval: Duration,
    /// The kinds of the DRA drivers that run: the first write waits until each has
    /// reported (at most [`FIRST_REPORT_WAIT`]), so a start writes once, not once per
    /// driver.
    pub expected: Vec<String>,
}

/// Longest wait for every running driver's first report before the first write.
pub const FIRST_REPORT_WAIT: Duration = Duration::from_secs(30);

impl NodeLabeler {
    /// As a subsystem: ready at once (labels are best effort), running until shutdown.
    pub async fn subsystem(
        self,
        ctx: hybridlet_runtime::SubsystemContext,
    ) -> Result<(), hybridlet_runtime::BoxError> {
        ctx.ready.set_ready();
        self.run(ctx.shutdown.clone()).await;
        Ok(())
    }

    /// Keep the labels current until `shutdown`; API errors are retried with backoff and
    /// never stop the daemon.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.board.subscribe();
        let reported = |board: &CapacityBoard| {
            let now = board.snapshot();
            self.expected.iter().all(|k| now.contains_key(k))
        };
        let deadline = tokio::time::Instant::now() + FIRST_REPORT_WAIT;
        while !reported(&self.board) {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => break,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
        let mut known: Option<BTreeMap<String, String>> = None;
        let mut backoff =
            hybridlet_runtime::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        loop {
            changes.borrow_and_update();
            let wait = match self.sync(&mut known).await {
                Ok(()) => {
                    backoff.reset();
                    self.min_interval
                }
                Err(e) => {
                    known = None; // read the node again before the next write
                    let wait = backoff.next_delay();
                    tracing::warn!(retry_in = ?wait, "node capacity labels: {e}");
                    wait
                }
            };
            // At most one write per interval; after a success, nothing until a change.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if known.is_some() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        }
    }

    async fn sync(&self, known: &mut Option<BTreeMap<String, String>>) -> Result<(), String> {
        let client = hybridlet_kube::client_from_kubeconfig(&self.kubeconfig)
            .await
            .map_err(|e| e.to_string())?;
        let current = match known.take() {
            Some(k) => k,
            None => hybridlet_kube::node_labels(&client, &self.node)
                .await
                .map_err(|e| e.to_string())?,
        };
        let desired = desired_labels(&self.board.snapshot(), self.site.as_deref());
        let changes = label_changes(&current, &desired);
        let mut next = current;
        if !changes.is_empty() {
            hybridlet_kube::patch_node_labels(&client, &self.node, &changes)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(node = %self.node, ?changes, "node capacity labels updated");
        }
        for (k, v) in changes {
            match v {
                Some(v) => next.insert(k, v),
                None => next.remove(&k),
            };
        }
        *known = Some(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_labels_and_changes() {
        let b: Vec<String> = [0, 1, 2, 3, 4, 7, 8, 1000, 1023, 1024, 5000]
            .into_iter()
            .map(free_bucket)
            .collect();
        assert_eq!(
            b,
            [
                "0",
                "1",
                "2-3",
                "2-3",
                "4-7",
                "4-7",
                "8-15",
                "512-1023",
                "512-1023",
                "1024-plus",
                "1024-plus"
            ]
        );
        assert_eq!(
            label_value("NVIDIA H200 NVL").as_deref(),
            Some("NVIDIA-H200-NVL")
        );
        assert_eq!(label_value(" (x) ").as_deref(), Some("x"));
        assert_eq!(label_value("--"), None);

        let board = BTreeMap::from([(
            "gpu".to_string(),
            DriverCapacity {
                counts: DeviceCounts {
                    blocked: 0,
                    free: 5,
                    allocated: 2,
                    unhealthy: 1,
                },
                product: Some("NVIDIA H200".into()),
            },
        )]);
        let desired = desired_labels(&board, Some("fra1"));
        assert_eq!(
            desired,
            BTreeMap::from([
                ("hybridlet.io/gpu.free".to_string(), "4-7".to_string()),
                (
                    "hybridlet.io/gpu.product".to_string(),
                    "NVIDIA-H200".to_string()
                ),
                ("hybridlet.io/site".to_string(), "fra1".to_string()),
            ])
        );
        // The operator's own labels, and labels of other tools, are never touched; an owned
        // label no longer wanted is removed.
        let current = BTreeMap::from([
            ("hybridlet.io/gpu.free".to_string(), "4-7".to_string()),
            ("hybridlet.io/sriov.free".to_string(), "8-15".to_string()),
            ("hybridlet.io/rack".to_string(), "r12".to_string()),
            (
                "topology.kubernetes.io/zone".to_string(),
                "fra1-a".to_string(),
            ),
        ]);
        assert_eq!(
            label_changes(&current, &desired),
            BTreeMap::from([
                (
                    "hybridlet.io/gpu.product".to_string(),
                    Some("NVIDIA-H200".to_string())
                ),
                ("hybridlet.io/site".to_string(), Some("fra1".to_string())),
                ("hybridlet.io/sriov.free".to_string(), None),
            ])
        );
        let counts = DeviceCounts::of(
            ["a", "b", "c", "d"],
            |d| d == "a",
            |d| d == "a" || d == "b",
            |_| false,
        );
        assert_eq!(
            counts,
            DeviceCounts {
                free: 2,
                allocated: 1,
                unhealthy: 1,
                blocked: 0,
            }
        );
    }

    #[test]
    fn placements_that_overlap_a_prepared_one_are_blocked() {
        use crate::{CounterSet, CounterUse, SliceDevice};
        let set = CounterSet {
            name: "gpu-0-counter-set".into(),
            counters: (0..8)
                .map(|i| (format!("memory-slice-{i}"), "1".to_string()))
                .chain([("compute-slices".to_string(), "7".to_string())])
                .collect(),
        };
        let placement = |name: &str, slices: std::ops::Range<u32>, compute: u32| SliceDevice {
            name: name.into(),
            consumes: vec![CounterUse {
                set: set.name.clone(),
                counters: slices
                    .map(|i| (format!("memory-slice-{i}"), "1".to_string()))
                    .chain([("compute-slices".to_string(), compute.to_string())])
                    .collect(),
            }],
            ..SliceDevice::default()
        };
        let devices = [
            placement("3g-0", 0..4, 3),
            placement("3g-4", 4..8, 3),
            placement("4g-0", 0..4, 4),
            placement("1g-3", 3..4, 1),
            placement("7g-0", 0..8, 7),
            SliceDevice {
                name: "other".into(),
                ..SliceDevice::default()
            },
        ];
        let sets = [set.clone()];
        let blocked = |held: &[&str]| -> Vec<String> {
            let held = held.iter().map(|s| s.to_string()).collect();
            blocked_by_counters(&sets, &devices, &held)
                .into_iter()
                .collect()
        };
        assert!(blocked(&[]).is_empty());
        assert_eq!(blocked(&["3g-4"]), ["7g-0"]);
        // 3g at 0 and 3g at 4 leave 1 compute slice but no memory slice.
        assert_eq!(blocked(&["3g-0", "3g-4"]), ["1g-3", "4g-0", "7g-0"]);
        let counts = DeviceCounts::of(
            devices.iter().map(|d| d.name.as_str()),
            |_| false,
            |d| d == "3g-4",
            |d| blocked(&["3g-4"]).iter().any(|b| b == d),
        );
        assert_eq!((counts.free, counts.allocated, counts.blocked), (4, 1, 1));
    }
}
