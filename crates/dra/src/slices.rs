//! ResourceSlice publication: one pool per driver per node (pool name = node name),
//! devices in a stable order, chunked into slices of at most 128 devices, owned by the
//! Node object (so they go away with it), the pool generation raised whenever the device
//! set changes, obsolete slices deleted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool, ResourceSlice,
    ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};

/// The API limit on devices per slice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// The limit when any device of the slice has taints.
pub const MAX_TAINTED_DEVICES_PER_SLICE: usize = 64;

/// The stored form equals the desired one: taints compared without `timeAdded` (the API
/// server sets it), and not at all when this server drops them (feature gate off).
fn same_devices(stored: &[Device], desired: &[Device], taints_dropped: bool) -> bool {
    let key = |d: &Device| -> Vec<(String, Option<String>, String)> {
        if taints_dropped {
            return Vec::new();
        }
        d.taints
            .iter()
            .flatten()
            .map(|t| (t.key.clone(), t.value.clone(), t.effect.clone()))
            .collect()
    };
    stored.len() == desired.len()
        && stored.iter().zip(desired).all(|(a, b)| {
            a.name == b.name
                && a.attributes == b.attributes
                && a.capacity == b.capacity
                && key(a) == key(b)
        })
}

/// Keep the `timeAdded` the server gave a taint that is still wanted.
fn keep_time_added(desired: &mut [Device], stored: &[Device]) {
    for d in desired {
        let Some(old) = stored.iter().find(|s| s.name == d.name) else {
            continue;
        };
        for t in d.taints.iter_mut().flatten() {
            if let Some(o) = old
                .taints
                .iter()
                .flatten()
                .find(|o| o.key == t.key && o.value == t.value && o.effect == t.effect)
            {
                t.time_added = o.time_added.clone();
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

/// One device to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDevice {
    /// Device name, unique in the pool (a DNS label).
    pub name: String,
    /// Attributes; names without a domain belong to the driver's domain.
    pub attributes: BTreeMap<String, Attr>,
    /// Capacities as Kubernetes quantities (`memory: 141Gi`).
    pub capacity: BTreeMap<String, String>,
    /// Taints of an unhealthy device (empty when healthy).
    pub taints: Vec<crate::Taint>,
}

impl SliceDevice {
    fn to_api(&self) -> Device {
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
        Device {
            name: self.name.clone(),
            attributes: Some(attributes),
            capacity: Some(capacity),
            taints,
            ..Device::default()
        }
    }
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

/// Publishes one driver's pool for one node.
#[derive(Clone)]
pub struct SlicePublisher {
    client: kube::Client,
    driver: String,
    node: String,
    /// Set once the API server stored a slice without the taints it was sent.
    taints_dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The highest pool generation this process published.
    published: std::sync::Arc<std::sync::atomic::AtomicI64>,
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
            published: std::sync::Arc::default(),
        }
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

    fn err(&self, message: impl std::fmt::Display) -> PublishError {
        PublishError {
            driver: self.driver.clone(),
            node: self.node.clone(),
            message: message.to_string(),
        }
    }

    /// A server without device taints (DRADeviceTaints off) stores slices without them;
    /// say so once and stop comparing them, or every reconcile would rewrite the slice.
    fn note_dropped_taints(&self, sent: bool, stored: &ResourceSlice) {
        let kept = stored
            .spec
            .devices
            .iter()
            .flatten()
            .any(|d| d.taints.is_some());
        if sent
            && !kept
            && !self
                .taints_dropped
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(driver = %self.driver, "the API server dropped the device taints of unhealthy devices (is the DRADeviceTaints feature gate off?); they are reported through the kubelet's health stream only");
        }
    }

    /// Watch this pool's slices and call `deleted` whenever one disappears (the kubelet
    /// wipes a node's slices when it restarts; someone may delete them by hand), so the
    /// caller can republish at once instead of at the next reconcile. Runs until dropped:
    /// a broken or expired watch is opened again after a short, growing pause.
    pub async fn watch_deletions(&self, deleted: impl Fn()) {
        use kube::api::{WatchEvent, WatchParams};
        use tokio_stream::StreamExt as _;
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let params = WatchParams::default().fields(&format!(
            "spec.nodeName={},spec.driver={}",
            self.node, self.driver
        ));
        let mut pause = std::time::Duration::from_millis(500);
        loop {
            match api.watch(&params, "0").await {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(event) = stream.next().await {
                        match event {
                            Ok(WatchEvent::Deleted(slice)) => {
                                tracing::info!(driver = %self.driver, slice = slice.metadata.name.as_deref().unwrap_or(""), "a ResourceSlice of this node was deleted; republishing");
                                deleted();
                            }
                            Ok(WatchEvent::Error(e)) => {
                                tracing::debug!(driver = %self.driver, "slice watch ended: {}", e.message);
                                break;
                            }
                            Ok(_) => pause = std::time::Duration::from_millis(500),
                            Err(e) => {
                                tracing::debug!(driver = %self.driver, "slice watch broke: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(driver = %self.driver, "opening the slice watch failed: {e}")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(30));
        }
    }

    /// Delete this pool's slices (the driver was disabled: its devices must leave the
    /// scheduler's view, not wait for the kubelet to wipe them). Returns how many.
    pub async fn withdraw(&self) -> Result<usize, PublishError> {
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let existing = api
            .list(&ListParams::default().fields(&format!(
                "spec.nodeName={},spec.driver={}",
                self.node, self.driver
            )))
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

    /// Make the API server's slices for this pool match `devices`.
    pub async fn publish(&self, devices: &[SliceDevice]) -> Result<Published, PublishError> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let node = nodes
            .get(&self.node)
            .await
            .map_err(|e| self.err(format!("reading Node {}: {e}", self.node)))?;
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: self.node.clone(),
            uid: node.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        let api: kube::Api<ResourceSlice> = kube::Api::all(self.client.clone());
        let existing = api
            .list(&ListParams::default().fields(&format!(
                "spec.nodeName={},spec.driver={}",
                self.node, self.driver
            )))
            .await
            .map_err(|e| self.err(format!("listing slices: {e}")))?
            .items;

        let mut sorted: Vec<&SliceDevice> = devices.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let per_slice = if sorted.iter().any(|d| !d.taints.is_empty()) {
            MAX_TAINTED_DEVICES_PER_SLICE
        } else {
            MAX_DEVICES_PER_SLICE
        };
        let chunks: Vec<Vec<Device>> = if sorted.is_empty() {
            vec![Vec::new()]
        } else {
            sorted
                .chunks(per_slice)
                .map(|c| c.iter().map(|d| d.to_api()).collect())
                .collect()
        };
        let dropped = self
            .taints_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        let count = chunks.len() as i64;
        let current_gen = existing
            .iter()
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let by_name: BTreeMap<String, &ResourceSlice> = existing
            .iter()
            .filter_map(|s| s.metadata.name.clone().map(|n| (n, s)))
            .collect();
        let unchanged = existing.len() == chunks.len()
            && chunks.iter().enumerate().all(|(i, devs)| {
                by_name
                    .get(&slice_name(&self.node, &self.driver, i))
                    .is_some_and(|s| {
                        same_devices(s.spec.devices.as_deref().unwrap_or_default(), devs, dropped)
                            && s.spec.pool.resource_slice_count == count
                    })
            });
        let generation = if unchanged {
            current_gen
        } else {
            self.next_generation(current_gen)
        };
        let mut done = Published {
            generation,
            ..Published::default()
        };
        if unchanged {
            return Ok(done);
        }
        for (i, mut devs) in chunks.into_iter().enumerate() {
            let name = slice_name(&self.node, &self.driver, i);
            if let Some(old) = by_name.get(&name) {
                keep_time_added(&mut devs, old.spec.devices.as_deref().unwrap_or_default());
            }
            let sent_taints = devs.iter().any(|d| d.taints.is_some());
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
                    devices: Some(devs),
                    ..ResourceSliceSpec::default()
                },
            };
            match by_name.get(&name) {
                Some(old) => {
                    slice.metadata.resource_version = old.metadata.resource_version.clone();
                    let stored = api
                        .replace(&name, &PostParams::default(), &slice)
                        .await
                        .map_err(|e| self.err(format!("replacing {name}: {e}")))?;
                    self.note_dropped_taints(sent_taints, &stored);
                    done.updated += 1;
                }
                None => {
                    let stored = api
                        .create(&PostParams::default(), &slice)
                        .await
                        .map_err(|e| self.err(format!("creating {name}: {e}")))?;
                    self.note_dropped_taints(sent_taints, &stored);
                    done.created += 1;
                }
            }
        }
        for name in by_name.keys() {
            let wanted =
                (0..count as usize).any(|i| slice_name(&self.node, &self.driver, i) == *name);
            if !wanted {
                api.delete(name, &DeleteParams::default())
                    .await
                    .map_err(|e| self.err(format!("deleting {name}: {e}")))?;
                done.deleted += 1;
            }
        }
        self.published
            .fetch_max(generation, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(driver = %self.driver, node = %self.node, generation, created = done.created, updated = done.updated, deleted = done.deleted, "ResourceSlices published");
        Ok(done)
    }
}
