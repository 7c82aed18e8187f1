//! ResourceSlice publication: one pool per driver per node (pool name = node name),
//! devices in a stable order, chunked into slices of at most 128 devices, owned by the
//! Node object (so they go away with it), the pool generation raised whenever the device
//! set changes, obsolete slices deleted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    Counter, CounterSet as ApiCounterSet, Device, DeviceAttribute, DeviceCapacity,
    DeviceCounterConsumption, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};

use crate::pool::{NodeSliceWatch, PoolView, Subscription, WatchTiming};

/// The API limit on devices per slice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// The limit when any device of the slice has taints.
pub const MAX_TAINTED_DEVICES_PER_SLICE: usize = 64;

/// Keep the `timeAdded` the server gave a taint that is still wanted.
fn keep_time_added(desired: &mut [Device], stored: &[crate::pool::TaintTime]) {
    for d in desired {
        for t in d.taints.iter_mut().flatten() {
            if let Some((.., time)) = stored.iter().find(|(device, key, value, effect, _)| {
                *device == d.name && *key == t.key && *value == t.value && *effect == t.effect
            }) {
                t.time_added = Some(time.clone());
            }
        }
    }
}

/// A device attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// A string.
    String(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A semantic version (`9.0.0`).
    Version(String),
}

/// A set of counters the pool's devices share (KEP-4815 partitionable devices): a GPU's
/// memory and compute slices, from which each of its partitions takes its part, so the
/// scheduler never allocates two partitions that overlap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CounterSet {
    /// Unique in the pool (a DNS label).
    pub name: String,
    /// Counter name (a DNS label) → how much there is (a quantity).
    pub counters: BTreeMap<String, String>,
}

/// What a device takes from one counter set while it is allocated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CounterUse {
    /// The counter set's name.
    pub set: String,
    /// Counter name → how much (a quantity).
    pub counters: BTreeMap<String, String>,
}

/// How a pool with counter sets is laid out in slices, which the API server's version
/// decides: 1.34 wants each counter set in the slice of the devices that consume it; from
/// 1.35 a slice holds devices or counter sets, never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterLayout {
    /// 1.34: one slice per counter set, with its devices.
    WithDevices,
    /// 1.35 and later: counter sets in slices of their own (8 per slice), then the devices.
    Separate,
}

impl CounterLayout {
    /// The layout for an API server reporting `minor` as its minor version (`"35"`,
    /// `"35+"` on managed clusters).
    pub fn for_minor(minor: &str) -> Option<Self> {
        let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
        let minor: u32 = digits.parse().ok()?;
        Some(if minor <= 34 {
            CounterLayout::WithDevices
        } else {
            CounterLayout::Separate
        })
    }
}

/// Counter sets in one slice from 1.35 on.
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;

/// One device to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceDevice {
    /// Device name, unique in the pool (a DNS label).
    pub name: String,
    /// Attributes; names without a domain belong to the driver's domain.
    pub attributes: BTreeMap<String, Attr>,
    /// Capacities as Kubernetes quantities (`memory: 141Gi`).
    pub capacity: BTreeMap<String, String>,
    /// Taints of an unhealthy device (empty when healthy).
    pub taints: Vec<crate::Taint>,
    /// What it takes from the pool's counter sets while allocated.
    pub consumes: Vec<CounterUse>,
}

impl SliceDevice {
    pub(crate) fn to_api(&self) -> Device {
        let attributes = self
            .attributes
            .iter()
            .map(|(k, v)| {
                let mut a = DeviceAttribute::default();
                match v {
                    Attr::String(s) => a.string = Some(s.clone()),
                    Attr::Int(i) => a.int = Some(*i),
                    Attr::Bool(b) => a.bool = Some(*b),
                    Attr::Version(s) => a.version = Some(s.clone()),
                }
                (k.clone(), a)
            })
            .collect();
        let capacity = self
            .capacity
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    DeviceCapacity {
                        value: Quantity(v.clone()),
                        ..DeviceCapacity::default()
                    },
                )
            })
            .collect();
        let taints = (!self.taints.is_empty()).then(|| {
            self.taints
                .iter()
                .map(|t| DeviceTaint {
                    key: t.key.clone(),
                    value: Some(t.value.clone()),
                    effect: t.effect.clone(),
                    time_added: None,
                })
                .collect()
        });
        let consumes_counters = (!self.consumes.is_empty()).then(|| {
            self.consumes
                .iter()
                .map(|c| DeviceCounterConsumption {
                    counter_set: c.set.clone(),
                    counters: counters_to_api(&c.counters),
                })
                .collect()
        });
        Device {
            name: self.name.clone(),
            attributes: Some(attributes),
            capacity: Some(capacity),
            taints,
            consumes_counters,
            ..Device::default()
        }
    }
}

fn counters_to_api(counters: &BTreeMap<String, String>) -> BTreeMap<String, Counter> {
    counters
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Counter {
                    value: Quantity(v.clone()),
                },
            )
        })
        .collect()
}

impl CounterSet {
    pub(crate) fn to_api(&self) -> ApiCounterSet {
        ApiCounterSet {
            name: self.name.clone(),
            counters: counters_to_api(&self.counters),
        }
    }
}

/// One slice's share of a pool: counter sets, devices, or (1.34) both.
struct Chunk<'a> {
    sets: Vec<&'a CounterSet>,
    devices: Vec<&'a SliceDevice>,
}

/// A pool cut into slices: with no counter sets, `per_slice` devices each; with counter
/// sets, as `layout` wants them.
fn chunks<'a>(
    sets: &'a [CounterSet],
    devices: &'a [SliceDevice],
    layout: CounterLayout,
) -> Vec<Chunk<'a>> {
    let mut sorted: Vec<&SliceDevice> = devices.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut sets: Vec<&CounterSet> = sets.iter().collect();
    sets.sort_by(|a, b| a.name.cmp(&b.name));
    let limited = sorted
        .iter()
        .any(|d| !d.taints.is_empty() || !d.consumes.is_empty());
    let per_slice = if limited {
        MAX_TAINTED_DEVICES_PER_SLICE
    } else {
        MAX_DEVICES_PER_SLICE
    };
    let mut out = Vec::new();
    if !sets.is_empty() {
        match layout {
            CounterLayout::Separate => {
                for group in sets.chunks(MAX_COUNTER_SETS_PER_SLICE) {
                    out.push(Chunk {
                        sets: group.to_vec(),
                        devices: Vec::new(),
                    });
                }
            }
            CounterLayout::WithDevices => {
                for set in &sets {
                    let (with, rest): (Vec<&SliceDevice>, Vec<&SliceDevice>) = sorted
                        .into_iter()
                        .partition(|d| d.consumes.iter().any(|c| c.set == set.name));
                    sorted = rest;
                    // 1.34 counts 128 devices per slice with counters.
                    for (i, part) in with.chunks(MAX_DEVICES_PER_SLICE).enumerate() {
                        out.push(Chunk {
                            sets: if i == 0 { vec![*set] } else { Vec::new() },
                            devices: part.to_vec(),
                        });
                    }
                }
            }
        }
    }
    for part in sorted.chunks(per_slice) {
        out.push(Chunk {
            sets: Vec::new(),
            devices: part.to_vec(),
        });
    }
    if out.is_empty() {
        out.push(Chunk {
            sets: Vec::new(),
            devices: Vec::new(),
        });
    }
    out
}

/// Publication failures (all retryable).
#[derive(Debug, thiserror::Error)]
#[error("publishing ResourceSlices for {driver} on {node}: {message}")]
pub struct PublishError {
    driver: String,
    node: String,
    message: String,
}

/// What a publish did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Slices created.
    pub created: usize,
    /// Slices replaced.
    pub updated: usize,
    /// Slices deleted.
    pub deleted: usize,
    /// The pool generation now.
    pub generation: i64,
}

/// Publishes one driver's pool for one node. With [`SlicePublisher::watch`] running, a
/// publish whose content matches what the server holds costs no request.
#[derive(Clone)]
pub struct SlicePublisher {
    client: kube::Client,
    driver: String,
    node: String,
    /// The pool as the watch last saw it.
    view: PoolView,
    /// The Node's UID (the slices' owner), read once.
    node_uid: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    timing: WatchTiming,
    /// Set once the API server stored a slice without the taints it was sent.
    taints_dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set once the API server stored a slice without the counters it was sent.
    counters_dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The highest pool generation this process published.
    published: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// The pool's counter sets (partitionable devices), published with its devices.
    counter_sets: std::sync::Arc<[CounterSet]>,
    /// Where counter sets go, from the API server's version (read once, when needed).
    layout: std::sync::Arc<std::sync::Mutex<Option<CounterLayout>>>,
}

impl std::fmt::Debug for SlicePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlicePublisher")
            .field("driver", &self.driver)
            .field("node", &self.node)
            .finish()
    }
}

fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let driver: String = driver
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{node}-{driver}-{index}")
}

impl SlicePublisher {
    /// For `driver` on `node`.
    pub fn new(client: kube::Client, driver: &str, node: &str) -> Self {
        Self {
            client,
            driver: driver.to_string(),
            node: node.to_string(),
            taints_dropped: std::sync::Arc::default(),
            counters_dropped: std::sync::Arc::default(),
            published: std::sync::Arc::default(),
            view: PoolView::default(),
            node_uid: std::sync::Arc::default(),
            timing: WatchTiming::default(),
            counter_sets: std::sync::Arc::new([]),
            layout: std::sync::Arc::default(),
        }
    }

    /// Publish these counter sets with the devices (which consume from them).
    pub fn with_counter_sets(mut self, sets: Vec<CounterSet>) -> Self {
        self.counter_sets = sets.into();
        self
    }

    /// Lay counter sets out this way instead of asking the API server's `/version`.
    pub fn with_counter_layout(self, layout: CounterLayout) -> Self {
        *self.lock_layout() = Some(layout);
        self
    }

    fn lock_layout(&self) -> std::sync::MutexGuard<'_, Option<CounterLayout>> {
        self.layout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where this pool's counter sets go: asked of the API server once (`/version`).
    async fn layout(&self) -> Result<CounterLayout, PublishError> {
        if let Some(layout) = *self.lock_layout() {
            return Ok(layout);
        }
        let info =
            self.client.apiserver_version().await.map_err(|e| {
                self.err(format!("reading the API server's version (/version): {e}"))
            })?;
        let layout = CounterLayout::for_minor(&info.minor).ok_or_else(|| {
            self.err(format!(
                "the API server reports minor version {:?} ({}), which is not a number",
                info.minor, info.git_version
            ))
        })?;
        tracing::info!(driver = %self.driver, server = %info.git_version, ?layout, "counter sets laid out for this API server");
        *self.lock_layout() = Some(layout);
        Ok(layout)
    }

    /// The watch's timers (tests shrink them).
    pub fn with_timing(mut self, timing: WatchTiming) -> Self {
        self.timing = timing;
        self
    }

    /// The generation of a changed pool: above the slices on the server, above anything
    /// this process published (the kubelet may have wiped the slices), and at least the
    /// wall clock in milliseconds — so a restart that finds no slices still goes above
    /// what the previous process published, and a consumer holding an older slice never
    /// sees a newer pool with a lower generation.
    fn next_generation(&self, on_server: i64) -> i64 {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let last = self.published.load(std::sync::atomic::Ordering::Relaxed);
        on_server.max(last).saturating_add(1).max(clock)
    }

    /// The field selector of this pool's slices.
    fn selector(&self) -> String {
        format!("spec.nodeName={},spec.driver={}", self.node, self.driver)
    }

    fn err(&self, message: impl std::fmt::Display) -> PublishError {
        PublishError {
            driver: self.driver.clone(),
            node: self.node.clone(),
            message: message.to_string(),
        }
    }

    /// A refused write. A slice refused as invalid while counter sets are published may be
    /// laid out for another release (the API server was upgraded): `/version` is read
    /// again before the next attempt.
    fn write_failed(&self, what: String, e: kube::Error) -> PublishError {
        if matches!(&e, kube::Error::Api(s) if s.code == 422) && !self.counter_sets.is_empty() {
            *self.lock_layout() = None;
        }
        self.err(format!("{what}: {e}"))
    }

    /// A server without device taints (DRADeviceTaints off) or partitionable devices
    /// (DRAPartitionableDevices off) stores slices without those fields; say so once and
    /// stop comparing them, or every reconcile would rewrite the slice.
    fn note_dropped_fields(&self, sent: &ResourceSlice, stored: &ResourceSlice) {
        let taints =
            |s: &ResourceSlice| s.spec.devices.iter().flatten().any(|d| d.taints.is_some());
        let counters = |s: &ResourceSlice| {
            s.spec.shared_counters.is_some()
                || s.spec
                    .devices
                    .iter()
                    .flatten()
                    .any(|d| d.consumes_counters.is_some())
        };
        let first = |flag: &std::sync::atomic::AtomicBool| {
            !flag.swap(true, std::sync::atomic::Ordering::Relaxed)
        };
        if taints(sent) && !taints(stored) && first(&self.taints_dropped) {
            tracing::warn!(driver = %self.driver, "the API server dropped the device taints of unhealthy devices (is the DRADeviceTaints feature gate off?); they are reported through the kubelet's health stream only");
        }
        if counters(sent) && !counters(stored) && first(&self.counters_dropped) {
            tracing::error!(driver = %self.driver, "the API server dropped the shared counters of partitionable devices (is the DRAPartitionableDevices feature gate off? It is beta, on by default, from Kubernetes 1.36): the scheduler cannot tell overlapping partitions apart, and a prepare whose partition overlaps another fails; enable the gate, or turn dynamic partitioning off (spec.dra.gpu.dynamicMig)");
        }
    }

    /// Follow this pool through `watch`, the node's slice watch (started if it is not
    /// running): from now on a publish whose content matches what the server holds costs
    /// no request, and `changed` is called whenever the server reports a change to the pool
    /// (the kubelet wipes a node's slices when it restarts; someone may delete or edit one),
    /// so the caller publishes again at once. Until the returned subscription is dropped.
    pub fn follow(
        &mut self,
        watch: &NodeSliceWatch,
        changed: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> Subscription {
        let (view, subscription) = watch.subscribe(
            &self.driver,
            self.node_uid.clone(),
            changed,
            (self.client.clone(), &self.node, &self.timing),
        );
        self.view = view;
        subscription
    }

    /// The Node's UID: read once, again after a slice of the pool was deleted.
    async fn node_uid(&self) -> Result<String, PublishError> {
        if let Some(uid) = self.lock_uid().clone() {
            return Ok(uid);
        }
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let node = nodes
            .get(&self.node)
            .await
            .map_err(|e| self.err(format!("reading Node {}: {e}", self.node)))?;
        let uid = node.metadata.uid.unwrap_or_default();
        *self.lock_uid() = Some(uid.clone());
        Ok(uid)
    }

    fn lock_uid(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.node_uid
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delete this pool's slices (the driver was disabled: its devices must leave the
    /// scheduler's view, not wait for the kubelet to wipe them). Returns how many.
    pub async fn withdraw(&self) -> Result<usize, PublishError> {
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let existing = api
            .list(&ListParams::default().fields(&self.selector()))
            .await
            .map_err(|e| self.err(format!("listing slices: {e}")))?
            .items;
        let mut deleted = 0;
        for name in existing.iter().filter_map(|s| s.metadata.name.as_deref()) {
            match api.delete(name, &kube::api::DeleteParams::default()).await {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(self.err(format!("deleting {name}: {e}"))),
            }
        }
        Ok(deleted)
    }

    /// Make the API server's slices for this pool match `devices`. While the watch keeps
    /// the view current, content that matches it costs no request; otherwise the pool is
    /// listed, compared, and written only where it differs.
    pub async fn publish(&self, devices: &[SliceDevice]) -> Result<Published, PublishError> {
        let layout = if self.counter_sets.is_empty() {
            CounterLayout::Separate
        } else {
            self.layout().await?
        };
        let chunks = chunks(&self.counter_sets, devices, layout);
        let count = chunks.len() as i64;
        let wanted: Vec<(String, (u64, u64))> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    slice_name(&self.node, &self.driver, i),
                    (
                        crate::pool::desired_digest(&c.sets, &c.devices, count, true),
                        crate::pool::desired_digest(&c.sets, &c.devices, count, false),
                    ),
                )
            })
            .collect();
        let dropped = self
            .taints_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            || self
                .counters_dropped
                .load(std::sync::atomic::Ordering::Relaxed);
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        // What the server holds: the watch's view when current (no request), else a list.
        let by_name = match self.view.snapshot() {
            Some(view) => view,
            None => api
                .list(&ListParams::default().fields(&self.selector()))
                .await
                .map_err(|e| self.err(format!("listing slices: {e}")))?
                .items
                .iter()
                .filter_map(|s| Some((s.metadata.name.clone()?, crate::pool::stored(s))))
                .collect::<BTreeMap<_, _>>(),
        };
        if let Some(generation) = crate::pool::matching_generation(&by_name, &wanted, dropped) {
            return Ok(Published {
                generation,
                ..Published::default()
            });
        }
        let current_gen = by_name.values().map(|s| s.generation).max().unwrap_or(0);
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: self.node.clone(),
            uid: self.node_uid().await?,
            controller: Some(true),
            block_owner_deletion: None,
        };
        let generation = self.next_generation(current_gen);
        let mut done = Published {
            generation,
            ..Published::default()
        };
        // Each chunk becomes API objects only for its own write: the peak is one slice's
        // worth, not the pool's.
        for (i, chunk) in chunks.iter().enumerate() {
            let mut devs: Vec<Device> = chunk.devices.iter().map(|d| d.to_api()).collect();
            let sets: Vec<ApiCounterSet> = chunk.sets.iter().map(|c| c.to_api()).collect();
            let name = slice_name(&self.node, &self.driver, i);
            if let Some(old) = by_name.get(&name) {
                keep_time_added(&mut devs, &old.taint_times);
            }
            let mut slice = ResourceSlice {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..ObjectMeta::default()
                },
                spec: ResourceSliceSpec {
                    driver: self.driver.clone(),
                    node_name: Some(self.node.clone()),
                    pool: ResourcePool {
                        name: self.node.clone(),
                        generation,
                        resource_slice_count: count,
                    },
                    // A slice of counter sets alone carries no devices (1.35+).
                    devices: (!devs.is_empty() || sets.is_empty()).then_some(devs),
                    shared_counters: (!sets.is_empty()).then_some(sets),
                    ..ResourceSliceSpec::default()
                },
            };
            match by_name.get(&name) {
                Some(old) => {
                    slice.metadata.resource_version = old.resource_version.clone();
                    let stored = api
                        .replace(&name, &PostParams::default(), &slice)
                        .await
                        .map_err(|e| self.write_failed(format!("replacing {name}"), e))?;
                    self.note_dropped_fields(&slice, &stored);
                    self.view.upsert(&stored);
                    done.updated += 1;
                }
                None => {
                    let stored = api
                        .create(&PostParams::default(), &slice)
                        .await
                        .map_err(|e| self.write_failed(format!("creating {name}"), e))?;
                    self.note_dropped_fields(&slice, &stored);
                    self.view.upsert(&stored);
                    done.created += 1;
                }
            }
        }
        for name in by_name.keys() {
            let wanted =
                (0..count as usize).any(|i| slice_name(&self.node, &self.driver, i) == *name);
            if !wanted {
                let gone = api
                    .delete(name, &DeleteParams::default())
                    .await
                    .map_err(|e| self.err(format!("deleting {name}: {e}")))?;
                if let Some(slice) = gone.left() {
                    self.view.remove(&slice);
                }
                done.deleted += 1;
            }
        }
        self.published
            .fetch_max(generation, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(driver = %self.driver, node = %self.node, generation, created = done.created, updated = done.updated, deleted = done.deleted, "ResourceSlices published");
        Ok(done)
    }
}
