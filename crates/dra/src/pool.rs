//! What the API server holds of one driver's pool on this node, kept current by one watch
//! (list once, then watch from that version with bookmarks, resume from the last version
//! seen, list again only when the server answers 410 Expired), so that deciding whether the
//! pool needs writing costs no request: each slice is remembered as a digest of what a
//! publish compares (device names, attributes, capacities, taints), never as the object.
//!
//! The request budget this buys, per driver and node (docs/fleet.md): one open watch; a
//! new watch every 3–6 hours (`timeoutSeconds`, jittered); after an outage one resumed
//! watch, or a list and a watch when the server forgot the version; no write while the
//! published content matches.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{Attr, SliceDevice};

/// The watch's timers. The defaults are what `hybridlet run` uses; tests shrink them.
#[derive(Debug, Clone)]
pub struct WatchTiming {
    /// Each watch asks the server to end it after a time uniform in this range
    /// (`timeoutSeconds`); it is then resumed from the last version, without a list.
    pub lifetime: (Duration, Duration),
    /// A watch that delivered nothing, not even a bookmark, this long is taken for dead
    /// (the API server's watch cache sends a bookmark about every minute).
    pub idle: Duration,
    /// First retry after a failure; doubles, full jitter.
    pub retry_initial: Duration,
    /// The most a retry waits: it spreads a fleet's reconnects after an outage.
    pub retry_max: Duration,
    /// The publisher compares the pool with its view again after a time uniform in this
    /// range, though nothing reported a change (a safety net: it costs no request).
    pub resync: (Duration, Duration),
}

impl Default for WatchTiming {
    fn default() -> Self {
        Self {
            lifetime: (Duration::from_secs(3 * 3600), Duration::from_secs(6 * 3600)),
            idle: Duration::from_secs(5 * 60),
            retry_initial: Duration::from_secs(1),
            retry_max: WATCH_RETRY_MAX,
            resync: (Duration::from_secs(10 * 60), Duration::from_secs(15 * 60)),
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
    /// A list has filled the view and the watch since kept it current (or is resuming).
    synced: bool,
    resource_version: Option<String>,
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

    /// The view is current and `wanted` (name → digest pair) is exactly what it holds, with
    /// one pool generation: that generation.
    pub(crate) fn matches(&self, wanted: &[(String, (u64, u64))], dropped: bool) -> Option<i64> {
        let s = self.lock();
        if !s.synced {
            return None;
        }
        matching_generation(&s.slices, wanted, dropped)
    }

    pub(crate) fn replace_all(&self, slices: &[ResourceSlice], version: Option<String>) {
        let mut s = self.lock();
        s.slices = slices
            .iter()
            .filter_map(|slice| Some((slice.metadata.name.clone()?, stored(slice))))
            .collect();
        s.resource_version = version;
        s.synced = true;
    }

    /// A slice as the server stored it (a watch event, or the answer to our own write —
    /// which may arrive before the watch's event for it): kept unless the view already
    /// holds a newer version. Only the watch's own events move the version it resumes
    /// from (`from_watch`): events older than our write may still be on their way.
    pub(crate) fn upsert(&self, slice: &ResourceSlice, from_watch: bool) {
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
        if from_watch {
            advance(
                &mut s.resource_version,
                slice.metadata.resource_version.as_deref(),
            );
        }
    }

    /// A slice the server deleted (a watch event, or our own delete), unless the view holds
    /// a version newer than the deletion (we created it again since).
    pub(crate) fn remove(&self, slice: &ResourceSlice, from_watch: bool) {
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
        if from_watch {
            advance(
                &mut s.resource_version,
                slice.metadata.resource_version.as_deref(),
            );
        }
    }

    fn set_version(&self, version: String) {
        self.lock().resource_version = Some(version);
    }

    fn version(&self) -> Option<String> {
        let s = self.lock();
        s.synced.then(|| s.resource_version.clone()).flatten()
    }

    /// The server no longer has the version the view is at: list again.
    fn forget(&self) {
        let mut s = self.lock();
        s.synced = false;
        s.resource_version = None;
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
/// generation. `dropped`: compare without taints (the server drops them).
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
            stored_digest(devices, count, true),
            stored_digest(devices, count, false),
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
    taints: Option<impl Iterator<Item = (&'a str, &'a str, &'a str)>>,
) {
    name.hash(h);
    for (k, v) in attributes {
        (1u8, k, v).hash(h);
    }
    for (k, v) in capacity {
        (2u8, k, v).hash(h);
    }
    if let Some(taints) = taints {
        for t in taints {
            (3u8, t).hash(h);
        }
    }
    0xffu8.hash(h);
}

/// Digest of one slice as a publish would write it: its devices and the pool's slice
/// count; `with_taints` false for a server that drops device taints.
pub(crate) fn desired_digest(devices: &[&SliceDevice], count: i64, with_taints: bool) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    count.hash(&mut h);
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
            with_taints.then(|| {
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
fn stored_digest(devices: &[Device], count: i64, with_taints: bool) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    count.hash(&mut h);
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
            with_taints.then(|| {
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

/// What the watch loop needs of its publisher.
pub(crate) struct PoolWatch {
    pub(crate) client: kube::Client,
    pub(crate) driver: String,
    pub(crate) node: String,
    pub(crate) view: PoolView,
    /// Cleared when a slice of the pool is deleted by someone: the Node may have been
    /// recreated (a new UID), and slices owned by the old one would be collected again.
    pub(crate) node_uid: Arc<Mutex<Option<String>>>,
    pub(crate) timing: WatchTiming,
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

impl PoolWatch {
    fn selector(&self) -> String {
        format!("spec.nodeName={},spec.driver={}", self.node, self.driver)
    }

    /// Keep the view current until dropped; `changed` is called after every change the
    /// server reports (and after every list), so the publisher compares again.
    pub(crate) async fn run(self, changed: impl Fn()) {
        use kube::api::ListParams;
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let mut backoff =
            hybridlet_runtime::Backoff::new(self.timing.retry_initial, self.timing.retry_max)
                .full_jitter();
        loop {
            let ended = match self.view.version() {
                None => match api
                    .list(&ListParams::default().fields(&self.selector()))
                    .await
                {
                    Ok(list) => {
                        self.view
                            .replace_all(&list.items, list.metadata.resource_version.clone());
                        backoff.reset();
                        changed();
                        continue;
                    }
                    Err(e) => Ended::Failed(format!("listing the pool's slices: {e}")),
                },
                Some(version) => self.watch_once(&api, &version, &changed).await,
            };
            let wait = match ended {
                Ended::Resume => {
                    backoff.reset();
                    continue;
                }
                Ended::Expired => {
                    tracing::debug!(driver = %self.driver, "the API server no longer has the slice watch's version; listing again");
                    self.view.forget();
                    backoff.reset();
                    continue;
                }
                Ended::Failed(why) => {
                    let wait = backoff.next_delay();
                    tracing::debug!(driver = %self.driver, retry_in = ?wait, "slice watch: {why}");
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
        changed: &impl Fn(),
    ) -> Ended {
        use kube::api::{WatchEvent, WatchParams};
        use tokio_stream::StreamExt as _;
        let lifetime = hybridlet_runtime::jittered(self.timing.lifetime.0, self.timing.lifetime.1);
        let params = WatchParams::default()
            .fields(&self.selector())
            .timeout(u32::try_from(lifetime.as_secs().max(1)).unwrap_or(u32::MAX));
        let stream = match api.watch(&params, version).await {
            Ok(stream) => stream,
            Err(kube::Error::Api(e)) if e.code == 410 => return Ended::Expired,
            Err(e) => return Ended::Failed(format!("opening the watch: {e}")),
        };
        let mut stream = std::pin::pin!(stream);
        let started = tokio::time::Instant::now();
        let mut delivered = false;
        loop {
            let event = match tokio::time::timeout(self.timing.idle, stream.next()).await {
                Err(_) => {
                    return Ended::Failed(format!(
                        "nothing arrived for {:?}, not even a bookmark",
                        self.timing.idle
                    ));
                }
                // Its lifetime is up (or the server ended it after delivering): resume. A
                // stream that ends at once, empty, is a failure: retrying it at once would spin.
                Ok(None) if delivered || started.elapsed() >= Duration::from_secs(1) => {
                    return Ended::Resume;
                }
                Ok(None) => return Ended::Failed("the server ended the watch at once".into()),
                Ok(Some(event)) => event,
            };
            delivered = true;
            match event {
                Ok(WatchEvent::Added(slice) | WatchEvent::Modified(slice)) => {
                    self.view.upsert(&slice, true);
                    changed();
                }
                Ok(WatchEvent::Deleted(slice)) => {
                    tracing::info!(driver = %self.driver, slice = slice.metadata.name.as_deref().unwrap_or(""), "a ResourceSlice of this node was deleted; republishing");
                    self.view.remove(&slice, true);
                    *self
                        .node_uid
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                    changed();
                }
                Ok(WatchEvent::Bookmark(b)) => self.view.set_version(b.metadata.resource_version),
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
        }
    }

    #[test]
    fn a_stored_slice_digests_as_the_devices_it_was_written_from() {
        let devices = [device("a"), device("b")];
        let refs: Vec<&SliceDevice> = devices.iter().collect();
        let api: Vec<Device> = devices.iter().map(SliceDevice::to_api).collect();
        for taints in [true, false] {
            assert_eq!(
                desired_digest(&refs, 1, taints),
                stored_digest(&api, 1, taints)
            );
        }
        // Any difference shows: the count, a value, a type, a taint, the order.
        let base = desired_digest(&refs, 1, true);
        assert_ne!(base, desired_digest(&refs, 2, true));
        let mut changed = devices.clone();
        changed[1]
            .attributes
            .insert("numaNode".into(), Attr::Int(1));
        let r: Vec<&SliceDevice> = changed.iter().collect();
        assert_ne!(base, desired_digest(&r, 1, true));
        let mut retyped = devices.clone();
        retyped[1]
            .attributes
            .insert("driverVersion".into(), Attr::String("1.2.3".into()));
        let r: Vec<&SliceDevice> = retyped.iter().collect();
        assert_ne!(base, desired_digest(&r, 1, true));
        let mut healed = devices.clone();
        healed[0].taints.clear();
        let r: Vec<&SliceDevice> = healed.iter().collect();
        assert_ne!(base, desired_digest(&r, 1, true));
        // ... unless the server drops taints: then they do not count.
        assert_eq!(
            desired_digest(&refs, 1, false),
            desired_digest(&r, 1, false)
        );
        let swapped = [&devices[1], &devices[0]];
        assert_ne!(base, desired_digest(&swapped, 1, true));
    }
}
