//! ResourceSlice publication against the fake API server: chunking at 128, ownership by
//! the Node, generation bumps only on change, obsolete slices deleted, deleted slices
//! recreated.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::BTreeMap;

use hybridlet_dra::{
    Attr, CounterLayout, CounterSet, CounterUse, SliceDevice, SlicePublisher, Taint,
};
use hybridlet_fixtures::apiserver::FakeApiServer;
use serde_json::json;

fn devices(n: usize) -> Vec<SliceDevice> {
    (0..n)
        .map(|i| SliceDevice {
            name: format!("vf-{i:04}"),
            attributes: BTreeMap::from([
                (
                    "pciAddress".to_string(),
                    Attr::String(format!("0000:19:{:02x}.{}", i / 8, i % 8)),
                ),
                (
                    "resource.kubernetes.io/pcieRoot".to_string(),
                    Attr::String("pci0000:15".into()),
                ),
                ("numaNode".to_string(), Attr::Int(0)),
            ]),
            capacity: BTreeMap::new(),
            ..SliceDevice::default()
        })
        .collect()
}

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

#[tokio::test]
async fn publish_chunks_owns_bumps_and_cleans_up() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await.unwrap();
    api.put("/api/v1/nodes/node-a", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid-1"}}));
    let mut config = kube::Config::new(api.url().parse::<http::Uri>().unwrap());
    // As hybridlet-kube builds its clients: no hidden retries inside a call (kube's default
    // retries 503s for minutes); callers back off themselves.
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let publisher = SlicePublisher::new(client, "sriov.hybridlet.io", "node-a");

    let done = publisher.publish(&devices(300)).await.unwrap();
    assert_eq!((done.created, done.updated, done.deleted), (3, 0, 0));
    let first = done.generation;
    assert!(
        first > 1_700_000_000_000,
        "a clock-based generation: {first}"
    );
    let slices = api.list(SLICES);
    assert_eq!(slices.len(), 3);
    let sizes: Vec<usize> = slices
        .iter()
        .map(|s| s["spec"]["devices"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [128, 128, 44]);
    for s in &slices {
        assert_eq!(s["spec"]["driver"], "sriov.hybridlet.io");
        assert_eq!(s["spec"]["nodeName"], "node-a");
        assert_eq!(s["spec"]["pool"]["name"], "node-a");
        assert_eq!(s["spec"]["pool"]["resourceSliceCount"], 3);
        assert_eq!(s["metadata"]["ownerReferences"][0]["uid"], "node-uid-1");
        assert_eq!(s["metadata"]["ownerReferences"][0]["controller"], true);
    }
    assert_eq!(
        slices[0]["spec"]["devices"][0]["attributes"]["numaNode"]["int"],
        0
    );
    assert_eq!(
        slices[0]["spec"]["devices"][0]["attributes"]["resource.kubernetes.io/pcieRoot"]["string"],
        "pci0000:15"
    );

    // Nothing changed: no writes, same generation.
    let before = api.requests().len();
    let done = publisher.publish(&devices(300)).await.unwrap();
    assert_eq!(
        (done.created, done.updated, done.deleted, done.generation),
        (0, 0, 0, first)
    );
    assert!(
        api.requests()[before..]
            .iter()
            .all(|r| r.starts_with("GET")),
        "{:?}",
        &api.requests()[before..]
    );

    // Fewer devices: one slice replaced, two deleted, generation bumped.
    let done = publisher.publish(&devices(100)).await.unwrap();
    assert_eq!((done.created, done.updated, done.deleted), (0, 1, 2));
    assert!(done.generation > first);
    let second = done.generation;
    let slices = api.list(SLICES);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0]["spec"]["pool"]["generation"], second);
    assert_eq!(slices[0]["spec"]["pool"]["resourceSliceCount"], 1);

    // Someone (the kubelet on restart) deletes the slice: the next publish recreates it.
    let name = slices[0]["metadata"]["name"].as_str().unwrap().to_string();
    api.remove(&format!("{SLICES}/{name}"));
    let done = publisher.publish(&devices(100)).await.unwrap();
    assert_eq!(done.created, 1);
    assert_eq!(api.list(SLICES).len(), 1);
    // The pool generation never goes back, though no slice of it was left on the server.
    assert!(
        done.generation > second,
        "{} after {second}",
        done.generation
    );
    let third = done.generation;
    // Nor after a restart (a new publisher) that finds the slices wiped again.
    api.remove(&format!("{SLICES}/{name}"));
    let restarted = SlicePublisher::new(
        {
            let mut config = kube::Config::new(api.url().parse::<http::Uri>().unwrap());
            config.default_retry = false;
            kube::Client::try_from(config).unwrap()
        },
        "sriov.hybridlet.io",
        "node-a",
    );
    let done = restarted.publish(&devices(100)).await.unwrap();
    assert!(done.generation > third, "{} after {third}", done.generation);

    // A tainted (unhealthy) device: slices of at most 64, the taint published; the same
    // state again writes nothing, even once the server has stamped timeAdded.
    let mut tainted = devices(100);
    tainted[70].taints = vec![Taint {
        key: "sriov.hybridlet.io/pf-link-down".into(),
        value: "ens2f0".into(),
        effect: "NoSchedule".into(),
    }];
    let done = publisher.publish(&tainted).await.unwrap();
    assert_eq!((done.created, done.updated), (1, 1));
    let slices = api.list(SLICES);
    let sizes: Vec<usize> = slices
        .iter()
        .map(|s| s["spec"]["devices"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [64, 36]);
    let taint = &slices[1]["spec"]["devices"][6]["taints"][0];
    assert_eq!(slices[1]["spec"]["devices"][6]["name"], "vf-0070");
    assert_eq!(taint["key"], "sriov.hybridlet.io/pf-link-down");
    assert_eq!(taint["effect"], "NoSchedule");
    let mut stamped = slices[1].clone();
    stamped["spec"]["devices"][6]["taints"][0]["timeAdded"] = json!("2026-11-26T04:00:00Z");
    let path = format!("{SLICES}/{}", stamped["metadata"]["name"].as_str().unwrap());
    api.put(&path, stamped);
    let generation = done.generation;
    let done = publisher.publish(&tainted).await.unwrap();
    assert_eq!(
        (done.created, done.updated, done.generation),
        (0, 0, generation)
    );
    // Healthy again: the taint goes, 128 per slice again.
    let done = publisher.publish(&devices(100)).await.unwrap();
    assert_eq!((done.updated, done.deleted), (1, 1));
    assert!(
        api.list(SLICES)[0]["spec"]["devices"][70]
            .get("taints")
            .is_none()
    );

    // An outage is a clear, retryable error.
    api.set_down(true);
    let err = publisher.publish(&devices(100)).await.unwrap_err();
    assert!(err.to_string().contains("listing slices"), "{err}");
}

fn client(api: &FakeApiServer) -> kube::Client {
    let mut config = kube::Config::new(api.url().parse::<http::Uri>().unwrap());
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Two drivers of one node share one watch: a publish that matches the server costs no
/// request, a deletion tells only the driver whose slice it was, and after one the Node is
/// read again (it may have been recreated with a new UID: slices owned by the old one
/// would be collected again).
#[tokio::test]
async fn drivers_share_one_watch_and_a_matching_publish_costs_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await.unwrap();
    api.put(
        "/api/v1/nodes/node-a",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "uid-1"}}),
    );
    let watch = hybridlet_dra::NodeSliceWatch::default();
    let told: [Arc<AtomicUsize>; 2] = Default::default();
    let mut gpu = SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a");
    let mut vfs = SlicePublisher::new(client(&api), "sriov.hybridlet.io", "node-a");
    let t = told[0].clone();
    let _g = gpu.follow(
        &watch,
        Arc::new(move || _ = t.fetch_add(1, Ordering::SeqCst)),
    );
    let t = told[1].clone();
    let _v = vfs.follow(
        &watch,
        Arc::new(move || _ = t.fetch_add(1, Ordering::SeqCst)),
    );
    eventually("the watch", || api.watches() == 1).await;
    assert_eq!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /apis/resource.k8s.io/v1/resourceslices?"))
            .count(),
        2,
        "one list and one watch for both drivers: {:?}",
        api.requests()
    );
    gpu.publish(&devices(8)).await.unwrap();
    vfs.publish(&devices(200)).await.unwrap();
    assert_eq!(api.list(SLICES).len(), 3);

    // Nothing changed: no request at all.
    let before = api.requests().len();
    for _ in 0..10 {
        gpu.publish(&devices(8)).await.unwrap();
        vfs.publish(&devices(200)).await.unwrap();
    }
    assert_eq!(api.requests()[before..], [] as [String; 0]);

    // The node is recreated (a new UID) and the GC collects the slices it owned: the
    // deletion tells the GPU driver, whose next publish reads the Node again.
    eventually("the creates seen", || told[0].load(Ordering::SeqCst) >= 2).await;
    let (gpu_told, vfs_told) = (
        told[0].load(Ordering::SeqCst),
        told[1].load(Ordering::SeqCst),
    );
    api.put(
        "/api/v1/nodes/node-a",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "uid-2"}}),
    );
    api.remove(&format!("{SLICES}/node-a-gpu-hybridlet-io-0"));
    eventually("the GPU driver told", || {
        told[0].load(Ordering::SeqCst) > gpu_told
    })
    .await;
    assert_eq!(
        told[1].load(Ordering::SeqCst),
        vfs_told,
        "the SR-IOV driver is not told"
    );
    let done = gpu.publish(&devices(8)).await.unwrap();
    assert_eq!(done.created, 1);
    let gpu_slice = api
        .list(SLICES)
        .into_iter()
        .find(|s| s["spec"]["driver"] == "gpu.hybridlet.io")
        .unwrap();
    assert_eq!(gpu_slice["metadata"]["ownerReferences"][0]["uid"], "uid-2");

    // The last subscription gone, the watch ends.
    drop((_g, _v));
    eventually("the watch closed", || api.watches() == 0).await;
}

/// A pool of partitionable devices: `gpus` counter sets of 10 counters, each with 26
/// devices consuming from it (as an H200 with dynamic MIG), and 2 devices without counters.
fn partitioned(gpus: usize) -> (Vec<CounterSet>, Vec<SliceDevice>) {
    let mut sets = Vec::new();
    let mut devices = Vec::new();
    for g in 0..gpus {
        let set = format!("gpu-{g}-counter-set");
        let counters: BTreeMap<String, String> = (0..10)
            .map(|c| (format!("memory-slice-{c}"), "1".to_string()))
            .collect();
        sets.push(CounterSet {
            name: set.clone(),
            counters,
        });
        for d in 0..26 {
            devices.push(SliceDevice {
                name: format!("gpu-{g}-mig-{d}"),
                consumes: vec![CounterUse {
                    set: set.clone(),
                    counters: BTreeMap::from([(format!("memory-slice-{}", d % 8), "1".into())]),
                }],
                ..SliceDevice::default()
            });
        }
    }
    devices.extend((0..2).map(|i| SliceDevice {
        name: format!("gpu-whole-{i}"),
        ..SliceDevice::default()
    }));
    (sets, devices)
}

/// Counter sets in both layouts: each accepted by its release's validation, and a second
/// publish of the same pool costs no write (what the server stores digests as what a publish
/// wants, counters included), while a changed counter is written.
#[tokio::test]
async fn counter_sets_are_laid_out_per_release_and_republish_for_free() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    for (minor, layout, slices) in [
        // 1.35: 9 sets → 2 counter slices (8 + 1); 236 devices → 4 slices of ≤ 64.
        (35, CounterLayout::Separate, 2 + 4),
        // 1.34: one slice per set with its 26 devices; the 2 others in one more.
        (34, CounterLayout::WithDevices, 9 + 1),
    ] {
        let api = FakeApiServer::start().await.unwrap();
        api.set_minor_version(minor);
        api.put("/api/v1/nodes/node-a", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid-1"}}));
        let (sets, devices) = partitioned(9);
        // The layout comes from /version.
        let publisher = SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a")
            .with_counter_sets(sets.clone());
        let done = publisher.publish(&devices).await.unwrap();
        assert_eq!(done.created, slices, "1.{minor}");
        assert!(api.requests().iter().any(|r| r.ends_with("/version")));
        let stored = api.list(SLICES);
        let with_sets = stored
            .iter()
            .filter(|s| s["spec"].get("sharedCounters").is_some())
            .count();
        match layout {
            CounterLayout::Separate => {
                assert_eq!(with_sets, 2);
                assert!(
                    stored
                        .iter()
                        .all(|s| s["spec"].get("sharedCounters").is_none()
                            || s["spec"].get("devices").is_none())
                );
            }
            CounterLayout::WithDevices => {
                assert_eq!(with_sets, 9);
                for s in stored
                    .iter()
                    .filter(|s| s["spec"].get("sharedCounters").is_some())
                {
                    let set = &s["spec"]["sharedCounters"][0]["name"];
                    assert!(
                        s["spec"]["devices"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .all(|d| d["consumesCounters"][0]["counterSet"] == *set)
                    );
                }
            }
        }
        // The same pool again: compared with the listed slices, nothing written.
        let again = SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a")
            .with_counter_sets(sets.clone())
            .with_counter_layout(layout);
        let done = again.publish(&devices).await.unwrap();
        assert_eq!(
            (done.created, done.updated, done.deleted),
            (0, 0, 0),
            "1.{minor}"
        );
        // A counter changes: written.
        let mut changed = sets.clone();
        changed[3]
            .counters
            .insert("compute-slices".into(), "7".into());
        let done = SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a")
            .with_counter_sets(changed)
            .with_counter_layout(layout)
            .publish(&devices)
            .await
            .unwrap();
        assert!(done.updated >= 1, "1.{minor}: {done:?}");
    }
}

/// A server with DRAPartitionableDevices off stores the slices without their counters
/// (the publisher says so once, as an error naming the gate): the next publish compares
/// without them and writes nothing, instead of rewriting every slice at every resync.
#[tokio::test]
async fn a_server_that_drops_counters_is_not_rewritten_forever() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await.unwrap();
    api.set_minor_version(35);
    api.disable_partitionable_devices();
    api.put("/api/v1/nodes/node-a", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid-1"}}));
    let (sets, devices) = partitioned(2);
    let publisher =
        SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a").with_counter_sets(sets);
    let done = publisher.publish(&devices).await.unwrap();
    assert_eq!(done.created, 1 + 1);
    assert!(api.list(SLICES).iter().all(|s| {
        s["spec"].get("sharedCounters").is_none()
            && s["spec"]["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|d| d.get("consumesCounters").is_none())
    }));
    let done = publisher.publish(&devices).await.unwrap();
    assert_eq!((done.created, done.updated, done.deleted), (0, 0, 0));
}

/// The API server is upgraded from 1.34 to 1.35 under a running driver: its first write in
/// the old layout is refused as invalid, the next publish reads `/version` again and lays
/// the counter sets out for 1.35.
#[tokio::test]
async fn an_upgraded_server_gets_the_new_layout_after_one_refusal() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await.unwrap();
    api.set_minor_version(34);
    api.put("/api/v1/nodes/node-a", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid-1"}}));
    let (sets, mut devices) = partitioned(2);
    let publisher =
        SlicePublisher::new(client(&api), "gpu.hybridlet.io", "node-a").with_counter_sets(sets);
    publisher.publish(&devices).await.unwrap();
    assert!(
        api.list(SLICES).iter().any(
            |s| s["spec"].get("sharedCounters").is_some() && s["spec"].get("devices").is_some()
        )
    );
    api.set_minor_version(35);
    devices[0]
        .attributes
        .insert("note".into(), Attr::String("changed".into()));
    let err = publisher.publish(&devices).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("only one of devices or sharedCounters"),
        "{err}"
    );
    publisher.publish(&devices).await.unwrap();
    let stored = api.list(SLICES);
    assert!(
        stored.iter().all(
            |s| s["spec"].get("sharedCounters").is_none() || s["spec"].get("devices").is_none()
        )
    );
    assert_eq!(
        stored
            .iter()
            .filter(|s| s["spec"].get("sharedCounters").is_some())
            .count(),
        1
    );
}
