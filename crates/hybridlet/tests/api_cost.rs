//! What one agent costs the API server: `hybridlet run` with the GPU and SR-IOV DRA drivers
//! and CSI on, on the DGX-like tree (8 GPUs, 8 PFs × 128 VFs = 1,024 VFs: 9 slices), against
//! the fake API server, its timers run 360 times faster (`--api-timer-scale 360`: one
//! simulated hour is 10 s; the fake API server's bookmarks come every simulated minute, as
//! the real watch cache sends them). Every request is counted by verb, with its bytes:
//!
//! - start: what the first publication costs (one list and one watch for the node, shared
//!   by both drivers; one Node read and the creates per driver);
//! - a simulated hour of steady state: no request at all (the one watch stays open; its
//!   lifetime is 3–6 hours), no write, no list;
//! - a 1-minute outage (every request 503, the watch cut): the watch resumes from its
//!   version, one request; the same when the server forgot the version meanwhile: the
//!   resumed watch is answered 410 Expired, then a list and a watch;
//! - a 10-minute outage: longer than the server keeps versions, so no resume is tried: a
//!   list and a watch. Never a write: the slices match.
//!
//! `docs/fleet.md` multiplies these figures by the fleet (`cargo bench -p hybridlet-dra
//! --bench fleet`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use common::{Daemon, wait_until};
use hybridlet_fixtures::apiserver::{FakeApiServer, Record};

/// The daemon's timers run this many times faster.
const SCALE: u32 = 360;
/// One simulated minute.
const MINUTE: Duration = Duration::from_millis(60_000 / SCALE as u64);

/// Requests by verb and resource (`list resourceslices`), with the response bytes.
fn tally(records: &[Record]) -> BTreeMap<String, (usize, usize)> {
    let mut out = BTreeMap::new();
    for r in records {
        let resource = r
            .path
            .split('/')
            .rev()
            .find(|s| {
                s.ends_with('s') && !s.starts_with("fra1") && *s != "namespaces" && !s.is_empty()
            })
            .unwrap_or("?")
            .to_string();
        let key = format!(
            "{} {resource} {}",
            r.verb(FakeApiServer::is_object_path(&r.path)),
            r.status
        );
        let e = out.entry(key).or_insert((0, 0));
        e.0 += 1;
        e.1 += r.response_bytes();
    }
    out
}

fn writes(records: &[Record]) -> usize {
    records.iter().filter(|r| r.method != "GET").count()
}

fn count(t: &BTreeMap<String, (usize, usize)>, key: &str) -> usize {
    t.get(key).map_or(0, |e| e.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hour_of_steady_state_and_an_outage_cost_what_docs_fleet_says() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 128).unwrap();
        },
        |config| {
            config.replace(
                "  dra:\n    gpu:\n      driverName: gpu.example.com\n",
                "  csi:\n    nfs:\n      enabled: true\n  dra:\n    gpu:\n      enabled: true\n    sriov:\n      enabled: true\n",
            )
        },
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
                "--api-timer-scale".into(),
                SCALE.to_string(),
            ]
        },
    )
    .await;
    d.api.set_bookmark_period(MINUTE);
    let slices = "/apis/resource.k8s.io/v1/resourceslices";
    wait_until("9 slices and the watch", || {
        d.api.list(slices).len() == 9 && d.api.watches() == 1
    })
    .await;
    // Let the first publication's own events come back through the watches.
    tokio::time::sleep(3 * MINUTE).await;
    let start = d.api.records();
    let t = tally(&start);
    eprintln!("start: {t:#?}");
    assert_eq!(count(&t, "create resourceslices 201"), 9, "{t:#?}");
    assert_eq!(
        count(&t, "get nodes 200"),
        2,
        "one Node read per driver: {t:#?}"
    );
    // One list, the shared watch's; the first publishes wait for it instead of listing.
    assert_eq!(count(&t, "list resourceslices 200"), 1, "{t:#?}");
    assert_eq!(count(&t, "watch resourceslices 200"), 1, "{t:#?}");
    assert_eq!(writes(&start), 9, "{t:#?}");

    // A simulated hour of steady state.
    tokio::time::sleep(60 * MINUTE).await;
    let hour = &d.api.records()[start.len()..];
    let t = tally(hour);
    eprintln!("steady hour: {t:#?}");
    assert!(hour.is_empty(), "requests in a steady hour: {t:#?}");
    assert_eq!(d.api.watches(), 1, "one open watch for the node");
    let bookmarks: usize = start
        .iter()
        .filter(|r| r.watch)
        .map(Record::response_bytes)
        .sum();
    eprintln!("watch bytes so far (initial events and bookmarks): {bookmarks}");

    // A 1-minute outage (well inside the 5 minutes within which the agent tries to resume,
    // also once its backoff has grown); the server still has the watch's version (nothing
    // changed): the watch resumes, one request.
    let (during, after) = outage(&d, 1, false).await;
    let t = tally(&after);
    eprintln!("1-minute outage, version kept: {during} requests during it; after it: {t:#?}");
    assert_eq!(after.len(), 1, "{t:#?}");
    assert_eq!(count(&t, "watch resourceslices 200"), 1, "{t:#?}");
    // The watch retried with exponential backoff, not in a loop: from 1/360 s doubling.
    assert!(during <= 10, "{during} requests during the outage");

    // The same, but the cluster moved on meanwhile (other objects changed) and the server
    // forgot the version (a restart, an etcd compaction): the resumed watch is answered
    // 410 Expired in its stream, then one list and one new watch.
    let (during, after) = outage(&d, 1, true).await;
    let t = tally(&after);
    eprintln!("1-minute outage, version lost: {during} requests during it; after it: {t:#?}");
    assert_eq!(count(&t, "watch resourceslices 200"), 2, "{t:#?}");
    assert_eq!(count(&t, "list resourceslices 200"), 1, "{t:#?}");
    assert_eq!(after.len(), 3, "{t:#?}");
    assert_eq!(
        writes(&after),
        0,
        "the slices matched: nothing to write: {t:#?}"
    );

    // A 10-minute outage: longer than the server keeps versions, so no resume is tried.
    let (during, after) = outage(&d, 10, true).await;
    let t = tally(&after);
    eprintln!("10-minute outage: {during} requests during it; after it: {t:#?}");
    assert_eq!(count(&t, "list resourceslices 200"), 1, "{t:#?}");
    assert_eq!(count(&t, "watch resourceslices 200"), 1, "{t:#?}");
    assert_eq!(after.len(), 2, "{t:#?}");
    assert_eq!(
        writes(&after),
        0,
        "the slices matched: nothing to write: {t:#?}"
    );
    // About a dozen attempts in 10 simulated minutes.
    assert!(during <= 14, "{during} requests during the outage");
    assert_eq!(d.api.list(slices).len(), 9);
    assert_eq!(d.api.watches(), 1);
}

/// `minutes` simulated minutes of 503s (the watch cut), then the server back; `forget`:
/// other objects changed meanwhile and the server forgot every older version. The number
/// of requests during the outage, and the requests from its end until the watch is open
/// again and three more simulated minutes passed.
async fn outage(d: &Daemon, minutes: u32, forget: bool) -> (usize, Vec<Record>) {
    let before = d.api.records().len();
    d.api.set_down(true);
    tokio::time::sleep(minutes * MINUTE).await;
    if forget {
        for i in 0..3 {
            d.api.put(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/other-node",
                serde_json::json!({"metadata": {"name": "other-node"}, "spec": {"renewTime": i}}),
            );
        }
        d.api.compact();
    }
    let during = d.api.records().len() - before;
    d.api.set_down(false);
    // The retries are spread over up to 15 simulated minutes (full jitter).
    wait_until("the watch back", || d.api.watches() == 1).await;
    tokio::time::sleep(3 * MINUTE).await;
    (during, d.api.records()[before + during..].to_vec())
}
