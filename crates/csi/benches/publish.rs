//! `cargo bench -p hybridlet-csi --bench publish` (as root): NodePublishVolume — a bind
//! mount of a staged volume, with all of the plugin's checks — against a bare bind mount of
//! the same paths (mkdir + mount(2)), p50/p99 over 300 runs; then 100 concurrent publishes
//! of distinct volumes. A tmpfs stands in for the staged NFS export. Plain timing loop;
//! results in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridlet_csi::{CsiSettings, services};
use hybridlet_proto::csi::v1::node_server::Node;
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use hybridlet_sys::mount::{MountRequest, Mounter, SystemMounter};
use tonic::Request;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn publish_req(id: &str, staging: &Path, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        }),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("publish bench: needs root (mounts); not run");
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let mounter = Arc::new(SystemMounter::new());
    mounter
        .mount(&MountRequest {
            fs_type: "tmpfs".into(),
            source: "bench".into(),
            target: staging.clone(),
            options: vec!["size=1m".into()],
            timeout: Duration::from_secs(10),
        })
        .unwrap();
    let (_identity, node) = services(
        CsiSettings::new("csi.hybridlet.io", "bench"),
        mounter.clone(),
    );
    let target = dir.path().join("target");
    let runs = 300;

    let mut bare = Vec::with_capacity(runs);
    let mut ours = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::fs::create_dir(&target).unwrap();
        rustix::mount::mount_bind(&staging, &target).unwrap();
        bare.push(t.elapsed());
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::NOFOLLOW).unwrap();
        std::fs::remove_dir(&target).unwrap();

        let t = Instant::now();
        node.node_publish_volume(Request::new(publish_req("v1", &staging, &target)))
            .await
            .unwrap();
        ours.push(t.elapsed());
        node.node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: target.display().to_string(),
        }))
        .await
        .unwrap();
    }
    bare.sort();
    ours.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "bare bind (mkdir + mount(2)):  p50 {:7.1} µs  p99 {:7.1} µs",
        us(pct(&bare, 0.5)),
        us(pct(&bare, 0.99))
    );
    println!(
        "NodePublishVolume:             p50 {:7.1} µs  p99 {:7.1} µs",
        us(pct(&ours, 0.5)),
        us(pct(&ours, 0.99))
    );
    println!(
        "ratio:                         p50 {:.2}x  p99 {:.2}x",
        pct(&ours, 0.5).as_secs_f64() / pct(&bare, 0.5).as_secs_f64(),
        pct(&ours, 0.99).as_secs_f64() / pct(&bare, 0.99).as_secs_f64()
    );

    // 100 concurrent publishes of distinct volumes (distinct staging mounts).
    let mut stagings = Vec::new();
    for i in 0..100 {
        let s = dir.path().join(format!("s{i}"));
        std::fs::create_dir(&s).unwrap();
        rustix::mount::mount_bind(&staging, &s).unwrap();
        stagings.push(s);
    }
    let t = Instant::now();
    let tasks: Vec<_> = stagings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let node = node.clone();
            let req = publish_req(&format!("v{i}"), s, &dir.path().join(format!("t{i}")));
            tokio::spawn(async move { node.node_publish_volume(Request::new(req)).await })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    println!(
        "100 concurrent publishes:      {ok}/100 succeeded in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    for (i, s) in stagings.iter().enumerate() {
        let t = dir.path().join(format!("t{i}"));
        let _ = rustix::mount::unmount(&t, rustix::mount::UnmountFlags::NOFOLLOW);
        let _ = std::fs::remove_dir(&t);
        let _ = rustix::mount::unmount(s, rustix::mount::UnmountFlags::NOFOLLOW);
    }
    mounter.unmount(&staging, false).unwrap();
}
