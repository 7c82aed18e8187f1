//! What the API server holds of this node's pools, kept current by one watch shared by the
//! node's DRA drivers ([`NodeSliceWatch`]: list once, then watch from that version with
//! bookmarks, resume from the last version seen; list again when the server answers 410
//! Expired or the watch was away longer than the server keeps versions), so that deciding
//! whether a pool needs writing costs no request: each slice is remembered as a digest of
//! what a publish compares (device names, attributes, capacities, taints), never as the
//! object.
//!
//! The request budget this buys per node (docs/fleet.md): one open watch; a new one every
//! 3–6 hours (`timeoutSeconds`, jittered); after an outage one resumed watch, or a list
//! and a watch; no write while the published content matches.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{Attr, CounterSet, SliceDevice};

/// The watch's timers. The defaults are what `hybridlet run` uses; tests shrink them.
#[derive(Debug, Clone)]
pub struct WatchTiming {
    /// Each watch asks the server to end it after a time uniform in this range
    /// (`timeoutSeconds`); it is then resumed from the last version, without a list.
    pub lifetime: (Duration, Duration),
    /// A watch that delivered nothing, not even a bookmark, this long is taken for dead
    /// (the API server's watch cache sends a bookmark about every minute).
    pub idle: Duration,
    /// First retry after a failure (a watch cut before its lifetime is one); doubles, full
    /// jitter. Not shorter: when a server restarts every node's watch is cut at once.
    pub retry_initial: Duration,
    /// The most a retry waits: it spreads a fleet's reconnects after an outage.
    pub retry_max: Duration,
    /// The publisher compares the pool with its view again after a time uniform in this
    /// range, though nothing reported a change: a safety net that costs no request, and
    /// what keeps `hybridlet_dra_slices_published_timestamp_seconds` fresh while the watch
    /// is connected.
    pub resync: (Duration, Duration),
    /// A watch away longer than this lists again instead of resuming: the server has
    /// forgotten the version by then (etcd compacts every 5 minutes), and trying costs the
    /// server a request per node after an outage.
    pub resume_within: Duration,
}

impl Default for WatchTiming {
    fn default() -> Self {
        Self {
            lifetime: (Duration::from_secs(3 * 3600), Duration::from_secs(6 * 3600)),
            idle: Duration::from_secs(5 * 60),
            retry_initial: Duration::from_secs(10),
            retry_max: WATCH_RETRY_MAX,
            resync: (Duration::from_secs(50), Duration::from_secs(70)),
            resume_within: Duration::from_secs(5 * 60),
        }
    }
}

impl WatchTiming {
    /// Every timer `divisor` times shorter (a watch's lifetime at least 1 s: the API takes
    /// whole seconds), to replay hours of the daemon's schedule in seconds in tests.
    pub fn scaled(divisor: u32) -> Self {
        let d = Self::default();
        let n = divisor.max(1);
        let lifetime = |t: Duration| (t / n).max(Duration::from_secs(1));
        Self {
            lifetime: (lifetime(d.lifetime.0), lifetime(d.lifetime.1)),
            idle: d.idle / n,
            retry_initial: d.retry_initial / n,
            retry_max: d.retry_max / n,
            resync: (d.resync.0 / n, d.resync.1 / n),
            resume_within: d.resume_within / n,
        }
    }
}

/// The cap of the watch's reconnect backoff (full jitter). docs/fleet.md explains the
/// figure: it spreads 5,000 nodes' reconnects after an outage under the API server's
/// budget.
pub const WATCH_RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// A slice as the pool view remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredSlice {
    pub(crate) resource_version: Option<String>,
    pub(crate) generation: i64,
    /// Digest of the content with taints, and without (for a server that drops them).
    pub(crate) digest: (u64, u64),
    /// When the server says each taint was added (device, key, value, effect): a rewrite
    /// keeps it.
    pub(crate) taint_times: Vec<TaintTime>,
}

/// A taint's identity (device, key, value, effect) and the `timeAdded` the server gave it.
pub(crate) type TaintTime = (String, String, Option<String>, String, Time);

#[derive(Debug, Default)]
struct ViewState {
    /// A list has filled the view and the watch since kept it current (or is resuming, or
    /// about to list again).
    synced: bool,
    slices: BTreeMap<String, StoredSlice>,
}

/// The pool as the watch last saw it; shared by the watch and the publisher.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolView(Arc<Mutex<ViewState>>);

impl PoolView {
    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When the view is current: the slices by name.
    pub(crate) fn snapshot(&self) -> Option<BTreeMap<String, StoredSlice>> {
        let s = self.lock();
        s.synced.then(|| s.slices.clone())
    }

    fn replace_all<'a>(&self, slices: impl Iterator<Item = &'a ResourceSlice>) {
        let mut s = self.lock();
        s.slices = slices
            .filter_map(|slice| Some((slice.metadata.name.clone()?, stored(slice))))
            .collect();
        s.synced = true;
    }

    /// A slice as the server stored it (a watch event, or the answer to our own write —
    /// which may arrive before the watch's event for it): kept unless the view already
    /// holds a newer version.
    pub(crate) fn upsert(&self, slice: &ResourceSlice) {
        let mut s = self.lock();
        let Some(name) = slice.metadata.name.clone() else {
            return;
        };
        let incoming = stored(slice);
        let older = s.slices.get(&name).is_some_and(|held| {
            newer(
                held.resource_version.as_deref(),
                incoming.resource_version.as_deref(),
            )
        });
        if !older {
            s.slices.insert(name, incoming);
        }
    }

    /// A slice the server deleted (a watch event, or our own delete), unless the view holds
    /// a version newer than the deletion (we created it again since).
    pub(crate) fn remove(&self, slice: &ResourceSlice) {
        let mut s = self.lock();
        if let Some(name) = &slice.metadata.name {
            let recreated = s.slices.get(name).is_some_and(|held| {
                newer(
                    held.resource_version.as_deref(),
                    slice.metadata.resource_version.as_deref(),
                )
            });
            if !recreated {
                s.slices.remove(name);
            }
        }
    }
}

/// `held` is a newer version than `incoming`. Versions are opaque to clients, but the API
/// server's are etcd revisions; when either does not parse, the incoming one wins.
fn newer(held: Option<&str>, incoming: Option<&str>) -> bool {
    match (
        held.and_then(|v| v.parse::<u64>().ok()),
        incoming.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(h), Some(i)) => h > i,
        _ => false,
    }
}

/// Move the watch's version forward to `incoming` (never back: an answer to our own write
/// can carry a newer version than events still on their way).
fn advance(version: &mut Option<String>, incoming: Option<&str>) {
    if let Some(v) = incoming
        && !newer(version.as_deref(), Some(v))
    {
        *version = Some(v.to_string());
    }
}

/// `slices` hold exactly `wanted` (name → digest pair) with one pool generation: that
/// generation. `dropped`: compare without taints and counters (the server drops them).
pub(crate) fn matching_generation(
    slices: &BTreeMap<String, StoredSlice>,
    wanted: &[(String, (u64, u64))],
    dropped: bool,
) -> Option<i64> {
    if slices.len() != wanted.len() {
        return None;
    }
    let mut generation = None;
    for (name, digest) in wanted {
        let stored = slices.get(name)?;
        let same = if dropped {
            stored.digest.1 == digest.1
        } else {
            stored.digest == *digest
        };
        if !same || generation.is_some_and(|g| g != stored.generation) {
            return None;
        }
        generation = Some(stored.generation);
    }
    generation
}

/// A listed or watched slice as the view keeps it.
pub(crate) fn stored(slice: &ResourceSlice) -> StoredSlice {
    let devices = slice.spec.devices.as_deref().unwrap_or_default();
    let sets = slice.spec.shared_counters.as_deref().unwrap_or_default();
    let count = slice.spec.pool.resource_slice_count;
    StoredSlice {
        taint_times: devices
            .iter()
            .flat_map(|d| {
                d.taints.iter().flatten().filter_map(|t| {
                    Some((
                        d.name.clone(),
                        t.key.clone(),
                        t.value.clone(),
                        t.effect.clone(),
                        t.time_added.clone()?,
                    ))
                })
            })
            .collect(),
        resource_version: slice.metadata.resource_version.clone(),
        generation: slice.spec.pool.generation,
        digest: (
            stored_digest(sets, devices, count, true),
            stored_digest(sets, devices, count, false),
        ),
    }
}

/// One attribute value in the form both sides hash.
#[derive(Hash)]
enum Value<'a> {
    String(&'a str),
    Int(i64),
    Bool(bool),
    Version(&'a str),
    Unset,
}

/// Hash one device the same way whichever side it comes from.
fn hash_device<'a>(
    h: &mut impl Hasher,
    name: &str,
    attributes: impl Iterator<Item = (&'a str, Value<'a>)>,
    capacity: impl Iterator<Item = (&'a str, &'a str)>,
    consumes: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
    taints: Option<impl Iterator<Item = (&'a str, &'a str, &'a str)>>,
) {
    name.hash(h);
    for (k, v) in attributes {
        (1u8, k, v).hash(h);
    }
    for (k, v) in capacity {
        (2u8, k, v).hash(h);
    }
    for c in consumes {
        (4u8, c).hash(h);
    }
    if let Some(taints) = taints {
        for t in taints {
            (3u8, t).hash(h);
        }
    }
    0xffu8.hash(h);
}

/// Digest of one slice as a publish would write it: its devices and the pool's slice
/// count; `full` false for a server that drops device taints and counters (both left out).
pub(crate) fn desired_digest(
    sets: &[&CounterSet],
    devices: &[&SliceDevice],
    count: i64,
    full: bool,
) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    count.hash(&mut h);
    for set in sets.iter().filter(|_| full) {
        (5u8, &set.name).hash(&mut h);
        for (k, v) in &set.counters {
            (k.as_str(), v.as_str()).hash(&mut h);
        }
    }
    for d in devices {
        hash_device(
            &mut h,
            &d.name,
            d.attributes.iter().map(|(k, v)| {
                let v = match v {
                    Attr::String(s) => Value::String(s),
                    Attr::Int(i) => Value::Int(*i),
                    Attr::Bool(b) => Value::Bool(*b),
                    Attr::Version(s) => Value::Version(s),
                };
                (k.as_str(), v)
            }),
            d.capacity.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            d.consumes.iter().filter(|_| full).flat_map(|c| {
                c.counters
                    .iter()
                    .map(|(k, v)| (c.set.as_str(), k.as_str(), v.as_str()))
            }),
            full.then(|| {
                d.taints
                    .iter()
                    .map(|t| (t.key.as_str(), t.value.as_str(), t.effect.as_str()))
            }),
        );
    }
    h.finish()
}

/// Digest of one stored slice, comparable with [`desired_digest`] (the server's
/// `timeAdded` on taints is left out: it sets it).
fn stored_digest(
    sets: &[k8s_openapi::api::resource::v1::CounterSet],
    devices: &[Device],
    count: i64,
    full: bool,
) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    count.hash(&mut h);
    for set in sets.iter().filter(|_| full) {
        (5u8, &set.name).hash(&mut h);
        for (k, v) in &set.counters {
            (k.as_str(), v.value.0.as_str()).hash(&mut h);
        }
    }
    for d in devices {
        hash_device(
            &mut h,
            &d.name,
            d.attributes.iter().flatten().map(|(k, a)| {
                let v = if let Some(s) = &a.string {
                    Value::String(s)
                } else if let Some(i) = a.int {
                    Value::Int(i)
                } else if let Some(b) = a.bool {
                    Value::Bool(b)
                } else if let Some(s) = &a.version {
                    Value::Version(s)
                } else {
                    Value::Unset
                };
                (k.as_str(), v)
            }),
            d.capacity
                .iter()
                .flatten()
                .map(|(k, c)| (k.as_str(), c.value.0.as_str())),
            d.consumes_counters
                .iter()
                .flatten()
                .filter(|_| full)
                .flat_map(|c| {
                    c.counters
                        .iter()
                        .map(|(k, v)| (c.counter_set.as_str(), k.as_str(), v.value.0.as_str()))
                }),
            full.then(|| {
                d.taints.iter().flatten().map(|t| {
                    (
                        t.key.as_str(),
                        t.value.as_deref().unwrap_or_default(),
                        t.effect.as_str(),
                    )
                })
            }),
        );
    }
    h.finish()
}

/// One driver's share of the node's watch.
struct Subscriber {
    /// Cleared when a slice of the pool is deleted by someone: the Node may have been
    /// recreated (a new UID), and slices owned by the old one would be collected again.
    node_uid: Arc<Mutex<Option<String>>>,
    /// Told after every change to the pool the server reports, and after every list.
    changed: Arc<dyn Fn() + Send + Sync>,
}

#[derive(Default)]
struct Shared {
    /// Every pool of the node seen, by driver (another driver's too: one that starts later
    /// finds its view current, with no list of its own).
    views: BTreeMap<String, PoolView>,
    subscribers: BTreeMap<String, Subscriber>,
    /// The version the watch resumes from; none until a list.
    version: Option<String>,
    /// The running watch, while anyone subscribes.
    running: Option<hybridlet_runtime::CancellationToken>,
    /// The watch is open, or was just ended at its lifetime (not failing).
    connected: bool,
}

/// The watch of every ResourceSlice of one node, shared by the node's DRA drivers: one
/// request stream for all of them, each driver seeing its own pool.
#[derive(Clone, Default)]
pub struct NodeSliceWatch(Arc<Mutex<Shared>>);

impl std::fmt::Debug for NodeSliceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("NodeSliceWatch")
            .field("drivers", &s.subscribers.keys().collect::<Vec<_>>())
            .field("running", &s.running.is_some())
            .finish()
    }
}

/// A driver's subscription to the node's slice watch: dropping it ends it, and the watch
/// with the last one.
#[derive(Debug)]
pub struct Subscription {
    watch: NodeSliceWatch,
    driver: String,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut s = self.watch.lock();
        s.subscribers.remove(&self.driver);
        if s.subscribers.is_empty()
            && let Some(token) = s.running.take()
        {
            token.cancel();
        }
    }
}

/// How one watch ended.
enum Ended {
    /// Resume from the last version at once (timeout reached, stream closed after events).
    Resume,
    /// The server forgot the version: list again at once.
    Expired,
    /// A failure: wait (backoff) before the next attempt.
    Failed(String),
}

/// What the running watch works with.
struct Runner {
    shared: NodeSliceWatch,
    client: kube::Client,
    node: String,
    timing: WatchTiming,
}

impl NodeSliceWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The view of `driver`'s pool (current when the watch has listed).
    fn view(s: &mut Shared, driver: &str) -> PoolView {
        let listed = s.version.is_some();
        s.views
            .entry(driver.to_string())
            .or_insert_with(|| {
                let view = PoolView::default();
                if listed {
                    view.replace_all(std::iter::empty());
                }
                view
            })
            .clone()
    }

    /// Subscribe `driver` (its publisher's Node UID cache and what to call on a change) and
    /// start the watch with `client` when it is not running. The view of its pool.
    pub(crate) fn subscribe(
        &self,
        driver: &str,
        node_uid: Arc<Mutex<Option<String>>>,
        changed: Arc<dyn Fn() + Send + Sync>,
        start: (kube::Client, &str, &WatchTiming),
    ) -> (PoolView, Subscription) {
        let mut s = self.lock();
        let view = Self::view(&mut s, driver);
        s.subscribers
            .insert(driver.to_string(), Subscriber { node_uid, changed });
        if s.running.is_none() {
            let token = hybridlet_runtime::CancellationToken::new();
            s.running = Some(token.clone());
            let (client, node, timing) = start;
            let runner = Runner {
                shared: self.clone(),
                client,
                node: node.to_string(),
                timing: timing.clone(),
            };
            tokio::spawn(async move {
                tokio::select! {
                    () = runner.run() => {}
                    () = token.cancelled() => {}
                }
            });
        }
        // Listed before (by this watch, or by one that ran for an earlier subscriber and
        // resumes from its version): the new subscriber compares at once.
        if s.version.is_some()
            && let Some(sub) = s.subscribers.get(driver)
        {
            (sub.changed)();
        }
        (
            view,
            Subscription {
                watch: self.clone(),
                driver: driver.to_string(),
            },
        )
    }

    /// Whether the watch is connected: the views are the server's state, not the last one
    /// known before an outage.
    pub fn connected(&self) -> bool {
        let s = self.lock();
        s.connected && s.version.is_some()
    }

    fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
    }

    /// Call every subscriber's `changed`, or only `driver`'s (outside the lock).
    fn tell(&self, driver: Option<&str>) {
        let calls: Vec<Arc<dyn Fn() + Send + Sync>> = {
            let s = self.lock();
            s.subscribers
                .iter()
                .filter(|(d, _)| driver.is_none_or(|w| w == d.as_str()))
                .map(|(_, sub)| sub.changed.clone())
                .collect()
        };
        for call in calls {
            call();
        }
    }

    fn listed(&self, items: &[ResourceSlice], version: Option<String>) {
        let mut s = self.lock();
        let mut by_driver: BTreeMap<&str, Vec<&ResourceSlice>> = BTreeMap::new();
        for item in items {
            by_driver
                .entry(item.spec.driver.as_str())
                .or_default()
                .push(item);
        }
        for driver in by_driver.keys() {
            Self::view(&mut s, driver);
        }
        for (driver, view) in &s.views {
            view.replace_all(
                by_driver
                    .get(driver.as_str())
                    .into_iter()
                    .flatten()
                    .copied(),
            );
        }
        s.version = version;
    }

    fn event(&self, slice: &ResourceSlice, deleted: bool) {
        let mut s = self.lock();
        let view = Self::view(&mut s, &slice.spec.driver);
        if deleted {
            view.remove(slice);
            if let Some(sub) = s.subscribers.get(&slice.spec.driver) {
                *sub.node_uid
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
        } else {
            view.upsert(slice);
        }
        advance(&mut s.version, slice.metadata.resource_version.as_deref());
    }

    /// The server forgot the version (or the watch was away too long): list again. The
    /// views stay as they are until the list replaces them: the best knowledge there is,
    /// and a publish that matches them needs no request while the server is away.
    fn forget(&self) {
        self.lock().version = None;
    }
}

impl Runner {
    fn selector(&self) -> String {
        format!("spec.nodeName={}", self.node)
    }

    /// Keep the views current until cancelled.
    async fn run(self) {
        use kube::api::ListParams;
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let mut backoff =
            hybridlet_runtime::Backoff::new(self.timing.retry_initial, self.timing.retry_max)
                .full_jitter();
        // Since when the watch has been away (an outage), if it is.
        let mut away_since: Option<tokio::time::Instant> = None;
        loop {
            if away_since.is_some_and(|t| t.elapsed() > self.timing.resume_within) {
                self.shared.forget();
            }
            let version = self.shared.lock().version.clone();
            let ended = match version {
                None => match api
                    .list(&ListParams::default().fields(&self.selector()))
                    .await
                {
                    Ok(list) => {
                        self.shared
                            .listed(&list.items, list.metadata.resource_version.clone());
                        backoff.reset();
                        away_since = None;
                        self.shared.set_connected(true);
                        self.shared.tell(None);
                        continue;
                    }
                    Err(e) => Ended::Failed(format!("listing the node's slices: {e}")),
                },
                Some(version) => {
                    self.watch_once(&api, &version, &mut away_since, &mut backoff)
                        .await
                }
            };
            let wait = match ended {
                Ended::Resume => {
                    backoff.reset();
                    continue;
                }
                Ended::Expired => {
                    tracing::debug!(node = %self.node, "the API server no longer has the slice watch's version; listing again");
                    self.shared.forget();
                    backoff.reset();
                    continue;
                }
                Ended::Failed(why) => {
                    self.shared.set_connected(false);
                    away_since.get_or_insert_with(tokio::time::Instant::now);
                    let wait = backoff.next_delay();
                    tracing::debug!(node = %self.node, retry_in = ?wait, "slice watch: {why}");
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn watch_once(
        &self,
        api: &kube::Api<ResourceSlice>,
        version: &str,
        away_since: &mut Option<tokio::time::Instant>,
        backoff: &mut hybridlet_runtime::Backoff,
    ) -> Ended {
        use kube::api::{WatchEvent, WatchParams};
        use tokio_stream::StreamExt as _;
        let lifetime = hybridlet_runtime::jittered(self.timing.lifetime.0, self.timing.lifetime.1);
        let params = WatchParams::default()
            .fields(&self.selector())
            .timeout(u32::try_from(lifetime.as_secs().max(1)).unwrap_or(u32::MAX));
        let stream = match api.watch(&params, version).await {
            Ok(stream) => {
                // The server answers: the watch is back, and the next failure starts the
                // backoff from its first step.
                *away_since = None;
                backoff.reset();
                self.shared.set_connected(true);
                stream
            }
            Err(kube::Error::Api(e)) if e.code == 410 => return Ended::Expired,
            Err(e) => return Ended::Failed(format!("opening the watch: {e}")),
        };
        let mut stream = std::pin::pin!(stream);
        let started = tokio::time::Instant::now();
        loop {
            let event = match tokio::time::timeout(self.timing.idle, stream.next()).await {
                Err(_) => {
                    return Ended::Failed(format!(
                        "nothing arrived for {:?}, not even a bookmark",
                        self.timing.idle
                    ));
                }
                // Its lifetime is up: resume at once. A stream cut before (a server going
                // away, a proxy resetting it) is a failure: when a server restarts it cuts
                // every node's watch at the same moment, and they must not all come back
                // in that moment.
                Ok(None) if started.elapsed() >= lifetime.mul_f64(0.9) => return Ended::Resume,
                Ok(None) => {
                    return Ended::Failed(format!(
                        "the server ended the watch after {:?} of {lifetime:?}",
                        started.elapsed()
                    ));
                }
                Ok(Some(event)) => event,
            };
            match event {
                Ok(WatchEvent::Added(slice) | WatchEvent::Modified(slice)) => {
                    self.shared.event(&slice, false);
                    self.shared.tell(Some(&slice.spec.driver));
                }
                Ok(WatchEvent::Deleted(slice)) => {
                    tracing::info!(driver = %slice.spec.driver, slice = slice.metadata.name.as_deref().unwrap_or(""), "a ResourceSlice of this node was deleted; republishing");
                    self.shared.event(&slice, true);
                    self.shared.tell(Some(&slice.spec.driver));
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    self.shared.lock().version = Some(b.metadata.resource_version);
                }
                Ok(WatchEvent::Error(e)) if e.code == 410 => return Ended::Expired,
                Ok(WatchEvent::Error(e)) => return Ended::Failed(e.message),
                Err(e) => return Ended::Failed(format!("the watch broke: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Taint;

    fn device(name: &str) -> SliceDevice {
        SliceDevice {
            name: name.into(),
            attributes: BTreeMap::from([
                (
                    "pciAddress".to_string(),
                    Attr::String("0000:19:00.1".into()),
                ),
                ("numaNode".to_string(), Attr::Int(0)),
                ("sriov".to_string(), Attr::Bool(true)),
                ("driverVersion".to_string(), Attr::Version("1.2.3".into())),
            ]),
            capacity: BTreeMap::from([("memory".to_string(), "80Gi".to_string())]),
            taints: vec![Taint {
                key: "k".into(),
                value: "v".into(),
                effect: "NoSchedule".into(),
            }],
            consumes: Vec::new(),
        }
    }

    #[test]
    fn a_stored_slice_digests_as_the_devices_it_was_written_from() {
        let devices = [device("a"), device("b")];
        let refs: Vec<&SliceDevice> = devices.iter().collect();
        let api: Vec<Device> = devices.iter().map(SliceDevice::to_api).collect();
        for taints in [true, false] {
            assert_eq!(
                desired_digest(&[], &refs, 1, taints),
                stored_digest(&[], &api, 1, taints)
            );
        }
        // Any difference shows: the count, a value, a type, a taint, the order.
        let base = desired_digest(&[], &refs, 1, true);
        assert_ne!(base, desired_digest(&[], &refs, 2, true));
        let mut changed = devices.clone();
        changed[1]
            .attributes
            .insert("numaNode".into(), Attr::Int(1));
        let r: Vec<&SliceDevice> = changed.iter().collect();
        assert_ne!(base, desired_digest(&[], &r, 1, true));
        let mut retyped = devices.clone();
        retyped[1]
            .attributes
            .insert("driverVersion".into(), Attr::String("1.2.3".into()));
        let r: Vec<&SliceDevice> = retyped.iter().collect();
        assert_ne!(base, desired_digest(&[], &r, 1, true));
        let mut healed = devices.clone();
        healed[0].taints.clear();
        let r: Vec<&SliceDevice> = healed.iter().collect();
        assert_ne!(base, desired_digest(&[], &r, 1, true));
        // ... unless the server drops taints: then they do not count.
        assert_eq!(
            desired_digest(&[], &refs, 1, false),
            desired_digest(&[], &r, 1, false)
        );
        let swapped = [&devices[1], &devices[0]];
        assert_ne!(base, desired_digest(&[], &swapped, 1, true));
    }
}
