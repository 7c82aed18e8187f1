//! The CSI services over a real Unix socket, driven the way the kubelet drives them, with
//! the recording fake mounter. Covers the Identity and Node cases a CSI sanity suite
//! checks for node plugins: required fields, idempotency, ordering, status codes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use hybridlet_csi::{CsiSettings, services};
use hybridlet_kubelet_plugin::{PluginSocket, serve};
use hybridlet_proto::csi::v1::identity_client::IdentityClient;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use hybridlet_proto::csi::v1::node_server::NodeServer;
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::*;
use hybridlet_runtime::CancellationToken;
use hybridlet_sys::mount::{FakeMounter, FsStats};
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    dir: tempfile::TempDir,
    mounter: Arc<FakeMounter>,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
    stop: CancellationToken,
}

async fn start() -> Harness {
    start_with(CsiSettings::new("csi.hybridlet.io", "node-a")).await
}

async fn start_with(settings: CsiSettings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(FakeMounter::new());
    let served = common::serve_csi(
        &dir.path().join("plugins/csi.hybridlet.io/csi.sock"),
        settings,
        hybridlet_csi::Host::with_mounter(mounter.clone()),
    )
    .await;
    Harness {
        dir,
        mounter,
        node: served.node,
        identity: served.identity,
        stop: served.stop,
    }
}

fn mount_cap(mode: Mode, flags: &[&str]) -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn nfs_ctx() -> HashMap<String, String> {
    [
        ("server", "nfs.example.internal"),
        ("share", "/export/team"),
        ("subDir", "vol1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Harness {
    fn staging(&self) -> PathBuf {
        let p = self
            .dir
            .path()
            .join("plugins/kubernetes.io/csi/csi.hybridlet.io/abc/globalmount");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn target(&self, pod: &str) -> PathBuf {
        let parent = self
            .dir
            .path()
            .join(format!("pods/{pod}/volumes/kubernetes.io~csi/pv1"));
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    fn stage_req(&self, id: &str, staging: &Path) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: mount_cap(Mode::MultiNodeMultiWriter, &["nfsvers=4.1"]),
            volume_context: nfs_ctx(),
            ..Default::default()
        }
    }

    fn publish_req(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        readonly: bool,
    ) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: mount_cap(Mode::MultiNodeMultiWriter, &[]),
            readonly,
            volume_context: nfs_ctx(),
            ..Default::default()
        }
    }
}

#[tokio::test]
async fn identity_answers() {
    let mut h = start().await;
    let info = h
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.hybridlet.io");
    assert!(!info.vendor_version.is_empty());
    let caps = h
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "node-only plugin must not claim a controller"
    );
    let probe = h
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    h.mounter.remove_helper("nfs");
    let err = h.identity.probe(ProbeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("mount.nfs"), "{}", err.message());
    h.stop.cancel();
}

#[tokio::test]
async fn node_capabilities_and_info() {
    let mut h = start().await;
    let caps = h
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    assert_eq!(types, [1, 2, 3, 4, 5]); // STAGE_UNSTAGE, GET_VOLUME_STATS, EXPAND_VOLUME, VOLUME_CONDITION, SINGLE_NODE_MULTI_WRITER
    let info = h
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    h.stop.cancel();
}

#[tokio::test]
async fn required_fields_are_invalid_argument() {
    let mut h = start().await;
    let staging = h.staging();
    let target = h.target("p1");
    let mut r = h.stage_req("v1", &staging);
    r.volume_id.clear();
    assert_eq!(
        h.node.node_stage_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = h.stage_req("v1", &staging);
    r.staging_target_path.clear();
    assert_eq!(
        h.node.node_stage_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = h.stage_req("v1", &staging);
    r.volume_capability = None;
    assert_eq!(
        h.node.node_stage_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = h.publish_req("v1", &staging, &target, false);
    r.target_path.clear();
    assert_eq!(
        h.node.node_publish_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = NodeUnpublishVolumeRequest {
        volume_id: "v1".into(),
        target_path: String::new(),
    };
    assert_eq!(
        h.node.node_unpublish_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = NodeUnstageVolumeRequest {
        volume_id: String::new(),
        staging_target_path: "/x".into(),
    };
    assert_eq!(
        h.node.node_unstage_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = NodeGetVolumeStatsRequest {
        volume_id: "v1".into(),
        volume_path: String::new(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        h.node.node_get_volume_stats(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Option injection through the PV's mountOptions never reaches mount(8).
    let mut r = h.stage_req("v1", &staging);
    r.volume_capability = mount_cap(Mode::MultiNodeMultiWriter, &["rw,remount"]);
    assert_eq!(
        h.node.node_stage_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(h.mounter.calls().is_empty(), "{:?}", h.mounter.calls());
    h.stop.cancel();
}

#[tokio::test]
async fn full_lifecycle_is_idempotent() {
    let mut h = start().await;
    let staging = h.staging();
    let t1 = h.target("p1");
    let t2 = h.target("p2");

    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    let mounts: Vec<String> = h
        .mounter
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("mount"))
        .collect();
    assert_eq!(
        mounts,
        [format!(
            "mount nfs nfs.example.internal:/export/team/vol1 {}",
            staging.display()
        )]
    );

    h.node
        .node_publish_volume(h.publish_req("v1", &staging, &t1, false))
        .await
        .unwrap();
    h.node
        .node_publish_volume(h.publish_req("v1", &staging, &t1, false))
        .await
        .unwrap();
    h.node
        .node_publish_volume(h.publish_req("v1", &staging, &t2, true))
        .await
        .unwrap();
    assert!(t1.is_dir() && t2.is_dir());
    let err = h
        .node
        .node_publish_volume(h.publish_req("v1", &staging, &t1, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    let table = h.mounter.table();
    let t2_entry = table.iter().find(|m| m.mount_point == t2).unwrap();
    assert!(t2_entry.read_only());

    let stats = h
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v1".into(),
            volume_path: t1.display().to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert_eq!(stats.usage[0].unit, volume_usage::Unit::Bytes as i32);
    assert_eq!(stats.usage[0].total, 1 << 30);
    assert_eq!(stats.usage[1].unit, volume_usage::Unit::Inodes as i32);
    assert_eq!(stats.usage[1].used, 400);
    assert!(!stats.volume_condition.unwrap().abnormal);

    for t in [&t1, &t2] {
        for _ in 0..2 {
            h.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: "v1".into(),
                    target_path: t.display().to_string(),
                })
                .await
                .unwrap();
        }
        assert!(!t.exists(), "{} left behind", t.display());
        assert!(
            t.parent().unwrap().exists(),
            "the kubelet's directory must stay"
        );
    }
    for _ in 0..2 {
        h.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: "v1".into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }
    assert!(h.mounter.table().is_empty());
    assert!(
        staging.exists(),
        "the staging directory belongs to the kubelet"
    );
    h.stop.cancel();
}

#[tokio::test]
async fn ordering_and_conflicts() {
    let mut h = start().await;
    let staging = h.staging();
    let t1 = h.target("p1");
    let err = h
        .node
        .node_publish_volume(h.publish_req("v1", &staging, &t1, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(!t1.exists());
    let mut r = h.publish_req("v1", &staging, &t1, false);
    r.staging_target_path.clear();
    assert_eq!(
        h.node.node_publish_volume(r).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    let mut other = h.stage_req("v2", &staging);
    other
        .volume_context
        .insert("share".into(), "/export/other".into());
    assert_eq!(
        h.node.node_stage_volume(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let mut block = h.stage_req("v3", &h.dir.path().join("s3"));
    block.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    });
    assert_eq!(
        h.node.node_stage_volume(block).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut iscsi = h.stage_req("v4", &h.dir.path().join("s4"));
    iscsi.volume_context = [("targetPortal".to_string(), "10.0.0.9:3260".to_string())].into();
    let err = h.node.node_stage_volume(iscsi).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("iSCSI"), "{}", err.message());

    // A symlink planted at the target path is never mounted through.
    let t2 = h.target("p2");
    std::os::unix::fs::symlink("/etc", &t2).unwrap();
    let err = h
        .node
        .node_publish_volume(h.publish_req("v1", &staging, &t2, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = h
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: t2.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        std::fs::symlink_metadata(&t2)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    h.stop.cancel();
}

#[tokio::test]
async fn stats_not_found_and_abnormal() {
    let mut h = start().await;
    let staging = h.staging();
    let err = h
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v1".into(),
            volume_path: staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    h.mounter
        .set_stats(&staging, Err::<FsStats, _>("Stale file handle".into()));
    let stats = h
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v1".into(),
            volume_path: staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal);
    assert!(
        cond.message.contains("Stale file handle"),
        "{}",
        cond.message
    );
    h.stop.cancel();
}

fn stats_req(id: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

/// A dead NFS server: statvfs blocks and the blocked thread keeps the mount busy (what
/// the VM suite saw on a real kernel). Stats answers within its deadline, later stats do
/// not pile up more blocked threads, and unpublish detaches lazily instead of failing
/// with EBUSY forever. A busy mount whose file system answers is still an error.
#[tokio::test]
async fn dead_server_stats_do_not_pile_up_and_busy_unmounts_detach() {
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.stats_timeout = Duration::from_millis(200);
    let mut h = start_with(settings).await;
    let staging = h.staging();
    let target = h.target("pod-dead");
    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    h.node
        .node_publish_volume(h.publish_req("v1", &staging, &target, false))
        .await
        .unwrap();

    h.mounter.hang_stats(&target);
    h.mounter.set_busy(&target);
    for _ in 0..3 {
        let cond = h
            .node
            .node_get_volume_stats(stats_req("v1", &target))
            .await
            .unwrap()
            .into_inner()
            .volume_condition
            .unwrap();
        assert!(cond.abnormal);
        assert!(cond.message.contains("no answer"), "{}", cond.message);
    }
    assert_eq!(
        h.mounter.stats_calls(),
        1,
        "one blocked statvfs per path, not one per call"
    );

    h.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    let calls = h.mounter.calls();
    assert!(
        calls.contains(&format!("unmount {} lazy", target.display())),
        "{calls:?}"
    );
    assert!(!target.exists());

    // The server returns: the blocked probe finishes and stats are normal again.
    h.mounter.release_stats();
    let target2 = h.target("pod-live");
    h.node
        .node_publish_volume(h.publish_req("v1", &staging, &target2, false))
        .await
        .unwrap();
    let cond = h
        .node
        .node_get_volume_stats(stats_req("v1", &target2))
        .await
        .unwrap()
        .into_inner()
        .volume_condition
        .unwrap();
    assert!(!cond.abnormal, "{}", cond.message);

    // Busy with a healthy file system: an error, and the mount stays.
    h.mounter.set_busy(&target2);
    let err = h
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: target2.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    assert!(h.mounter.table().iter().any(|m| m.mount_point == target2));
    h.stop.cancel();
}

#[tokio::test]
async fn node_get_info_reports_the_configured_topology() {
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings
        .topology
        .insert("topology.hybridlet.io/site".into(), "fra1".into());
    let mut h = start_with(settings).await;
    let info = h
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(segments["topology.hybridlet.io/site"], "fra1");
    h.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_on_one_volume_are_aborted() {
    let h = start().await;
    let staging = h.staging();
    // v1's mount blocks (a helper waiting on its server) until released; released
    // whatever happens, so a failing assertion cannot leave the runtime waiting on it.
    h.mounter.hold_mounts_at(&staging);
    struct Release(Arc<FakeMounter>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release_mounts();
        }
    }
    let _release = Release(h.mounter.clone());
    let (mut a, mut b) = (h.node.clone(), h.node.clone());
    let first = tokio::spawn({
        let req = h.stage_req("v1", &staging);
        async move { a.node_stage_volume(req).await }
    });
    let mounter = h.mounter.clone();
    let parked =
        tokio::task::spawn_blocking(move || mounter.wait_parked(1, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(parked, "v1's mount never started");
    // While v1's stage is certainly in flight: a second call on v1 is ABORTED ...
    let second = b
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::Aborted);
    // ... and another volume is not blocked by it: v2 completes before v1 does.
    let staging2 = h.dir.path().join("s2");
    b.node_stage_volume(h.stage_req("v2", &staging2))
        .await
        .unwrap();
    assert!(!first.is_finished(), "v1 finished before it was released");
    h.mounter.release_mounts();
    first.await.unwrap().unwrap();
    h.stop.cancel();
}

#[tokio::test]
async fn mount_failures_are_internal_and_leave_nothing() {
    let mut h = start().await;
    let staging = h.staging();
    h.mounter
        .fail_next_mount("mount.nfs: access denied by server");
    let err = h
        .node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains("access denied by server"),
        "{}",
        err.message()
    );
    assert!(h.mounter.table().is_empty());
    // The retry succeeds.
    h.node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap();
    h.stop.cancel();
}

/// csi-sanity's NodeGetVolumeStats and NodeExpandVolume "volume not found" cases send
/// `volume_path: "some/path"` and expect NOT_FOUND (as csi-driver-nfs answers); an empty
/// path stays INVALID_ARGUMENT; nothing is mounted or looked up either way.
#[tokio::test]
async fn a_path_where_no_volume_can_be_is_not_found() {
    let mut h = start().await;
    for path in ["some/path", "/var/lib/kubelet/../etc", "relative"] {
        let err = h
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "vol-x".into(),
                volume_path: path.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::NotFound,
            "stats {path}: {}",
            err.message()
        );
        let err = h
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "vol-x".into(),
                volume_path: path.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::NotFound,
            "expand {path}: {}",
            err.message()
        );
    }
    let err = h
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-x".into(),
            volume_path: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(h.mounter.calls().is_empty(), "{:?}", h.mounter.calls());
    h.stop.cancel();
}

/// A mount that outlives the call's deadline keeps the volume's guard: the caller gets
/// DEADLINE_EXCEEDED, a retry gets ABORTED while the helper still runs (never a second
/// mount beside it), and once the helper ends the retry goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_is_held_until_the_host_work_really_ends() {
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.mount_timeout = Duration::from_millis(100);
    let mut h = start_with(settings).await;
    let staging = h.staging();
    h.mounter.hold_mounts_at(&staging);
    struct Release(Arc<FakeMounter>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release_mounts();
        }
    }
    let _release = Release(h.mounter.clone());
    let err = h
        .node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(
        h.mounter.wait_parked(1, Duration::from_secs(1)),
        "the mount is still running"
    );
    let retry = h
        .node
        .node_stage_volume(h.stage_req("v1", &staging))
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::Aborted, "{}", retry.message());
    let mounts = |h: &Harness| {
        h.mounter
            .calls()
            .iter()
            .filter(|c| c.starts_with("mount "))
            .count()
    };
    assert_eq!(mounts(&h), 0, "no second mount beside the running one");
    h.mounter.release_mounts();
    // The first mount finishes on its own thread; then the guard is free again.
    let bound = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match h.node.node_stage_volume(h.stage_req("v1", &staging)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < bound => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(mounts(&h), 1, "{:?}", h.mounter.calls());
    h.stop.cancel();
}

/// A node service that replaces a stopped one (a reload restarting the CSI plugin) shares
/// its volume guard: while the old instance's mount still runs, the new one answers
/// ABORTED for that volume instead of mounting beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_service_keeps_the_guard_of_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(FakeMounter::new());
    let guard = hybridlet_csi::VolumeGuard::default();
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.mount_timeout = Duration::from_millis(100);
    let instance = |n: u32| {
        let (_, node) = services(settings.clone(), mounter.clone());
        let node = node.with_guard(guard.clone());
        let sock = dir.path().join(format!("csi-{n}.sock"));
        let socket = PluginSocket::bind(&sock).unwrap();
        let stop = CancellationToken::new();
        let router = tonic::transport::Server::builder().add_service(NodeServer::new(node));
        tokio::spawn(serve(socket, router, stop.clone()));
        (sock, stop)
    };
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let request = || NodeStageVolumeRequest {
        volume_id: "v1".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: mount_cap(Mode::MultiNodeMultiWriter, &[]),
        volume_context: nfs_ctx(),
        ..Default::default()
    };
    mounter.hold_mounts_at(&staging);
    struct Release(Arc<FakeMounter>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release_mounts();
        }
    }
    let _release = Release(mounter.clone());

    let (first, stop_first) = instance(1);
    let mut client = NodeClient::new(hybridlet_kubelet_plugin::connect(&first).await.unwrap());
    let err = client.node_stage_volume(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(mounter.wait_parked(1, Duration::from_secs(1)));
    stop_first.cancel();

    let (second, stop_second) = instance(2);
    let mut client = NodeClient::new(hybridlet_kubelet_plugin::connect(&second).await.unwrap());
    let retry = client.node_stage_volume(request()).await.unwrap_err();
    assert_eq!(retry.code(), Code::Aborted, "{}", retry.message());
    assert!(
        !mounter.calls().iter().any(|c| c.starts_with("mount ")),
        "{:?}",
        mounter.calls()
    );
    stop_second.cancel();
}
