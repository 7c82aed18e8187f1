//! Root tier: the Node service with the real mounter — real bind mounts, read-only
//! remounts, statvfs, unmounts that do not follow symlinks — on a tmpfs standing in for a
//! staged volume. Needs root (CAP_SYS_ADMIN); run with
//! `cargo nextest run -p hybridlet-csi --run-ignored only` (CI does, as root).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_csi::{CsiSettings, services};
use hybridlet_proto::csi::v1::node_server::Node;
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::*;
use hybridlet_sys::mount::{MountRequest, Mounter, SystemMounter, parse_mountinfo};
use tonic::{Code, Request};

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the root tier needs root (CAP_SYS_ADMIN) to mount; run it as root"
    );
}

fn mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text).iter().any(|m| m.mount_point == path)
}

fn cap() -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    })
}

#[tokio::test]
#[ignore = "root tier: needs CAP_SYS_ADMIN; run with --run-ignored only"]
async fn real_bind_mounts_stats_and_unmounts() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("globalmount");
    std::fs::create_dir(&staging).unwrap();
    let mounter = Arc::new(SystemMounter::new());
    // Stand-in for a staged NFS export: a 16 MiB tmpfs, mounted through mount(8).
    mounter
        .mount(&MountRequest {
            fs_type: "tmpfs".into(),
            source: "hybridlet-test".into(),
            target: staging.clone(),
            options: vec!["size=16m".into()],
            timeout: Duration::from_secs(10),
        })
        .unwrap();
    assert!(mounted(&staging));
    std::fs::write(staging.join("hello"), "from staging").unwrap();

    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.mount_timeout = Duration::from_secs(10);
    let (_identity, node) = services(settings, mounter.clone());
    let pods = dir.path().join("pods");
    std::fs::create_dir_all(pods.join("p1")).unwrap();
    std::fs::create_dir_all(pods.join("p2")).unwrap();
    let (t1, t2) = (pods.join("p1/mount"), pods.join("p2/mount"));
    for (t, ro) in [(&t1, false), (&t2, true)] {
        for _ in 0..2 {
            node.node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: "v1".into(),
                staging_target_path: staging.display().to_string(),
                target_path: t.display().to_string(),
                volume_capability: cap(),
                readonly: ro,
                ..Default::default()
            }))
            .await
            .unwrap();
        }
        assert!(mounted(t));
        assert_eq!(
            std::fs::read_to_string(t.join("hello")).unwrap(),
            "from staging"
        );
    }
    std::fs::write(t1.join("from-pod"), "x").unwrap();
    assert!(staging.join("from-pod").exists());
    let err = std::fs::write(t2.join("nope"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "read-only publish must refuse writes (EROFS)"
    );

    let stats = node
        .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
            volume_id: "v1".into(),
            volume_path: t1.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 << 20);
    assert!(stats.usage[0].used > 0);

    for t in [&t1, &t2] {
        node.node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
        assert!(!mounted(t));
        assert!(!t.exists());
    }
    // The staged data is untouched.
    assert_eq!(
        std::fs::read_to_string(staging.join("hello")).unwrap(),
        "from staging"
    );

    node.node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
        volume_id: "v1".into(),
        staging_target_path: staging.display().to_string(),
    }))
    .await
    .unwrap();
    assert!(!mounted(&staging));

    // Not staged any more: the kernel's mount-root answer (no mount table read) refuses
    // the publish and creates nothing.
    let e = node
        .node_publish_volume(Request::new(NodePublishVolumeRequest {
            volume_id: "v1".into(),
            staging_target_path: staging.display().to_string(),
            target_path: t1.display().to_string(),
            volume_capability: cap(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(!t1.exists());
    // A same-file-system bind mount counts as staged (the kernel marks its root too).
    let other = dir.path().join("plain");
    std::fs::create_dir(&other).unwrap();
    mounter.bind(&other, &staging, false).unwrap();
    node.node_publish_volume(Request::new(NodePublishVolumeRequest {
        volume_id: "v2".into(),
        staging_target_path: staging.display().to_string(),
        target_path: t1.display().to_string(),
        volume_capability: cap(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(mounted(&t1));
    mounter.unmount(&t1, false).unwrap();
    mounter.unmount(&staging, false).unwrap();
}

#[tokio::test]
#[ignore = "root tier: needs CAP_SYS_ADMIN; run with --run-ignored only"]
async fn nfs_stage_failure_is_clean() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("globalmount");
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.mount_timeout = Duration::from_secs(5);
    let (_identity, node) = services(settings, Arc::new(SystemMounter::new()));
    // No NFS server listens on this loopback address: mount(8) fails (or, with mount.nfs
    // installed, gives up at the deadline); either way nothing stays mounted.
    let err = node
        .node_stage_volume(Request::new(NodeStageVolumeRequest {
            volume_id: "v1".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: cap(),
            volume_context: [("server", "127.0.0.1"), ("share", "/export")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Internal | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(!mounted(&staging));
}

/// A target path swapped for a symlink to someone else's mount (a pod that controls its
/// volume directory, a confused operator) must never unmount that other mount: not through
/// NodeUnpublish / NodeUnstage, and not through the mounter, which unmounts with
/// UMOUNT_NOFOLLOW.
#[tokio::test]
#[ignore = "root tier: needs CAP_SYS_ADMIN; run with --run-ignored only"]
async fn a_symlinked_target_never_unmounts_the_mount_it_points_to() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("host-data");
    std::fs::create_dir(&elsewhere).unwrap();
    let mounter = Arc::new(SystemMounter::new());
    mounter
        .mount(&MountRequest {
            fs_type: "tmpfs".into(),
            source: "hybridlet-other".into(),
            target: elsewhere.clone(),
            options: vec!["size=1m".into()],
            timeout: Duration::from_secs(10),
        })
        .unwrap();
    std::fs::write(elsewhere.join("precious"), "keep").unwrap();
    let pods = dir.path().join("pods/p/volumes/kubernetes.io~csi/pv");
    std::fs::create_dir_all(&pods).unwrap();
    let target = pods.join("mount");
    std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
    let staging = dir.path().join("staging-link");
    std::os::unix::fs::symlink(&elsewhere, &staging).unwrap();

    let (_identity, node) = services(
        CsiSettings::new("csi.hybridlet.io", "node-a"),
        mounter.clone(),
    );
    let err = node
        .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: target.display().to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let _ = node
        .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
        }))
        .await;
    assert!(
        mounted(&elsewhere),
        "unpublish or unstage unmounted the mount a symlink points to"
    );
    // The mounter itself, handed the symlink (as after a swap between check and unmount).
    assert!(mounter.unmount(&target, false).is_err());
    assert!(mounter.unmount(&target, true).is_err(), "not even lazily");
    assert!(mounted(&elsewhere));
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("precious")).unwrap(),
        "keep"
    );
    assert!(
        target.is_symlink() && staging.is_symlink(),
        "the links were removed"
    );
    mounter.unmount(&elsewhere, false).unwrap();
}
