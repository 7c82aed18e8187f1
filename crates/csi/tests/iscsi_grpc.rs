//! iSCSI volumes over the CSI socket, with the fake initiator and disks: format once,
//! fsck on re-stage, mount and raw block publish, expansion, CHAP from node-stage secrets
//! only (never echoed), validation, and logout only when no other LUN of the target is
//! staged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use hybridlet_csi::{CsiSettings, Host};
use hybridlet_proto::csi::v1::identity_client::IdentityClient;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::*;
use hybridlet_runtime::CancellationToken;
use hybridlet_sys::iscsi::{DiskFormat, FakeIscsi, IscsiTarget};
use hybridlet_sys::mount::FakeMounter;
use tonic::Code;
use tonic::transport::Channel;

const IQN: &str = "iqn.2024-01.io.example.rig:lun-test";

struct Harness {
    dir: tempfile::TempDir,
    mounter: Arc<FakeMounter>,
    iscsi: Arc<FakeIscsi>,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
    stop: CancellationToken,
}

fn target() -> IscsiTarget {
    IscsiTarget {
        portal: "127.0.0.1:3260".into(),
        iqn: IQN.into(),
    }
}

async fn start(iscsi_enabled: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(FakeMounter::new());
    let iscsi = Arc::new(FakeIscsi::new());
    iscsi.add_lun(&target(), 0, Path::new("/dev/sdb"), 1 << 30);
    iscsi.add_lun(&target(), 1, Path::new("/dev/sdc"), 2 << 30);
    let mut settings = CsiSettings::new("csi.hybridlet.io", "node-a");
    settings.iscsi_enabled = iscsi_enabled;
    settings.state_dir = dir.path().join("state/csi");
    let host = Host {
        mounter: mounter.clone(),
        initiator: iscsi.clone(),
        disks: iscsi.clone(),
    };
    let served = common::serve_csi(&dir.path().join("csi.sock"), settings, host).await;
    Harness {
        dir,
        mounter,
        iscsi,
        node: served.node,
        identity: served.identity,
        stop: served.stop,
    }
}

fn ctx(lun: u32, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let lun = lun.to_string();
    [
        ("targetPortal", "127.0.0.1"),
        ("iqn", IQN),
        ("lun", lun.as_str()),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn cap(block: bool, fs: &str) -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    })
}

impl Harness {
    fn path(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    fn stage(
        &self,
        id: &str,
        lun: u32,
        block: bool,
        extra: &[(&str, &str)],
        secrets: &[(&str, &str)],
    ) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self
                .path(&format!("staging/{id}/globalmount"))
                .display()
                .to_string(),
            volume_capability: cap(block, ""),
            volume_context: ctx(lun, extra),
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn unstage(&self, id: &str) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self
                .path(&format!("staging/{id}/globalmount"))
                .display()
                .to_string(),
        }
    }
}

#[tokio::test]
async fn stage_formats_once_then_checks_and_logs_out_at_unstage() {
    let mut h = start(true).await;
    let staging = h.path("staging/v0/globalmount");
    h.node
        .node_stage_volume(h.stage("v0", 0, false, &[], &[]))
        .await
        .unwrap();
    h.node
        .node_stage_volume(h.stage("v0", 0, false, &[], &[]))
        .await
        .unwrap();
    assert_eq!(
        h.iscsi.calls(),
        [
            format!("login {IQN} 127.0.0.1:3260"),
            "format /dev/sdb ext4".to_string()
        ],
        "the second stage must neither log in again nor format"
    );
    let m = h
        .mounter
        .table()
        .into_iter()
        .find(|m| m.mount_point == staging)
        .unwrap();
    assert_eq!(
        (m.source.as_str(), m.fs_type.as_str()),
        ("/dev/sdb", "ext4")
    );

    // Mount publish is the same bind as NFS.
    let target = h.path("pods/p1/volumes/kubernetes.io~csi/pv/mount");
    h.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "v0".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: cap(false, ""),
            volume_context: ctx(0, &[]),
            ..Default::default()
        })
        .await
        .unwrap();
    h.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v0".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();

    h.node.node_unstage_volume(h.unstage("v0")).await.unwrap();
    h.node.node_unstage_volume(h.unstage("v0")).await.unwrap();
    assert!(h.iscsi.current_sessions().is_empty(), "not logged out");
    assert!(h.mounter.table().is_empty());

    // Staged again: the filesystem is there, so it is checked, not formatted.
    h.node
        .node_stage_volume(h.stage("v0", 0, false, &[], &[]))
        .await
        .unwrap();
    let calls = h.iscsi.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("format")).count(),
        1,
        "{calls:?}"
    );
    assert!(
        calls.contains(&"check /dev/sdb ext4".to_string()),
        "{calls:?}"
    );
    h.stop.cancel();
}

#[tokio::test]
async fn logout_waits_for_the_last_lun_of_the_target() {
    let mut h = start(true).await;
    h.node
        .node_stage_volume(h.stage("a", 0, false, &[], &[]))
        .await
        .unwrap();
    h.node
        .node_stage_volume(h.stage("b", 1, false, &[], &[]))
        .await
        .unwrap();
    h.node.node_unstage_volume(h.unstage("a")).await.unwrap();
    assert_eq!(
        h.iscsi.current_sessions(),
        vec![target()],
        "logged out while LUN 1 is staged"
    );
    h.node.node_unstage_volume(h.unstage("b")).await.unwrap();
    assert!(h.iscsi.current_sessions().is_empty());
    let calls = h.iscsi.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("logout")).count(),
        1,
        "{calls:?}"
    );
    h.stop.cancel();
}

#[tokio::test]
async fn block_publish_stats_and_expansion() {
    let mut h = start(true).await;
    let staging = h.path("staging/blk/globalmount");
    h.node
        .node_stage_volume(h.stage("blk", 1, true, &[], &[]))
        .await
        .unwrap();
    assert!(
        !h.iscsi.calls().iter().any(|c| c.starts_with("format")),
        "block volumes are never formatted"
    );
    assert!(h.mounter.table().is_empty(), "block stage mounts nothing");
    let target = h.path("plugins/kubernetes.io/csi/volumeDevices/publish/blk/pod1");
    let publish = NodePublishVolumeRequest {
        volume_id: "blk".into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: cap(true, ""),
        volume_context: ctx(1, &[]),
        ..Default::default()
    };
    h.node.node_publish_volume(publish.clone()).await.unwrap();
    h.node.node_publish_volume(publish.clone()).await.unwrap();
    assert!(target.is_file(), "block volumes are published on a file");
    assert!(
        h.mounter
            .calls()
            .contains(&format!("bind /dev/sdc {}", target.display()))
    );
    let stats = h
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "blk".into(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 2 << 30);

    h.iscsi.set_size(Path::new("/dev/sdc"), 3 << 30);
    let grown = h
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "blk".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 3 << 30);
    assert!(
        h.iscsi
            .calls()
            .contains(&format!("rescan {IQN} 127.0.0.1:3260"))
    );

    h.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "blk".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    assert!(!target.exists(), "the block target file was left");

    // A mounted ext4 volume grows its filesystem.
    let staging0 = h.path("staging/v0/globalmount");
    h.node
        .node_stage_volume(h.stage("v0", 0, false, &[], &[]))
        .await
        .unwrap();
    h.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "v0".into(),
            volume_path: staging0.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        h.iscsi
            .calls()
            .contains(&format!("grow /dev/sdb ext4 {}", staging0.display()))
    );
    let err = h
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "nope".into(),
            volume_path: h.path("elsewhere").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let caps = h
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(node_service_capability::Type::Rpc(r)) if r.r#type() == node_service_capability::rpc::Type::ExpandVolume
    )));
    h.stop.cancel();
}

#[tokio::test]
async fn chap_validation_and_refusals() {
    let mut h = start(true).await;
    h.iscsi.require_chap(IQN, "rig", "chap-secret-123");
    let chap = [("sessionCHAPAuth", "true")];
    let good = [
        ("node.session.auth.username", "rig"),
        ("node.session.auth.password", "chap-secret-123"),
    ];

    // No CHAP asked for: the target refuses the login.
    let err = h
        .node
        .node_stage_volume(h.stage("c", 0, false, &[], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("CHAP"), "{}", err.message());

    // CHAP asked for, secret incomplete: named, before any login.
    let err = h
        .node
        .node_stage_volume(h.stage(
            "c",
            0,
            false,
            &chap,
            &[("node.session.auth.username", "rig")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("node.session.auth.password"),
        "{}",
        err.message()
    );

    // Wrong password: refused, and the password is not echoed.
    let err = h
        .node
        .node_stage_volume(h.stage(
            "c",
            0,
            false,
            &chap,
            &[
                ("node.session.auth.username", "rig"),
                ("node.session.auth.password", "wrong-pass-456"),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        !err.message().contains("wrong-pass-456"),
        "{}",
        err.message()
    );

    h.node
        .node_stage_volume(h.stage(
            "c",
            0,
            false,
            &chap,
            &[
                ("node.session.auth.username", "rig"),
                ("node.session.auth.password", "chap-secret-123"),
            ],
        ))
        .await
        .unwrap();

    // A LUN with another filesystem or a partition table is never formatted over.
    h.iscsi
        .set_format(Path::new("/dev/sdc"), DiskFormat::Filesystem("xfs".into()));
    let err = h
        .node
        .node_stage_volume(h.stage("x", 1, false, &chap, &good))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("holds xfs"), "{}", err.message());
    h.iscsi.set_format(
        Path::new("/dev/sdc"),
        DiskFormat::PartitionTable("gpt".into()),
    );
    let err = h
        .node
        .node_stage_volume(h.stage("x", 1, false, &chap, &good))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("partition table"),
        "{}",
        err.message()
    );
    assert!(!h.iscsi.calls().iter().any(|c| c == "format /dev/sdc ext4"));

    // Bad input never reaches iscsiadm.
    for (key, value) in [
        ("targetPortal", "san.example.com"),
        ("iqn", "iqn.2024-01.x;reboot"),
        ("lun", "-1"),
    ] {
        let mut req = h.stage("bad", 0, false, &[], &[]);
        req.volume_context.insert(key.into(), value.into());
        let err = h.node.node_stage_volume(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{key}={value}: {}",
            err.message()
        );
    }
    // Staged as LUN 0 under one ID; the same ID for another LUN conflicts.
    let err = h
        .node
        .node_stage_volume(h.stage("c", 1, false, &chap, &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::AlreadyExists | Code::InvalidArgument),
        "{err:?}"
    );

    h.iscsi.remove_iscsiadm();
    let err = h.identity.probe(ProbeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("iscsiadm"), "{}", err.message());
    h.stop.cancel();
}

#[tokio::test]
async fn iscsi_disabled_is_a_failed_precondition() {
    let mut h = start(false).await;
    let err = h
        .node
        .node_stage_volume(h.stage("v", 0, false, &[], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("spec.csi.iscsi.enabled"),
        "{}",
        err.message()
    );
    assert!(h.iscsi.calls().is_empty());
    h.stop.cancel();
}

fn second_path() -> IscsiTarget {
    IscsiTarget {
        portal: "127.0.0.2:3260".into(),
        iqn: IQN.into(),
    }
}

/// Multipath: stage logs in through both portals, mounts the dm-multipath map (not a
/// path disk), and works degraded when one portal is down; unstage removes the map before
/// the paths, and logs out of a portal only when no other volume uses it.
#[tokio::test]
async fn multipath_uses_the_map_and_tears_down_in_order() {
    let mut h = start(true).await;
    // LUN 0 through the second portal is /dev/sdd; multipathd joins sdb and sdd.
    h.iscsi
        .add_lun(&second_path(), 0, Path::new("/dev/sdd"), 1 << 30);
    h.iscsi.add_multipath(
        Path::new("/dev/mapper/mpatha"),
        &[Path::new("/dev/sdb"), Path::new("/dev/sdd")],
        1 << 30,
    );
    let portals = [("portals", "[\"127.0.0.2:3260\"]")];
    let staging = h.path("staging/mp/globalmount");
    h.node
        .node_stage_volume(h.stage("mp", 0, false, &portals, &[]))
        .await
        .unwrap();
    h.node
        .node_stage_volume(h.stage("mp", 0, false, &portals, &[]))
        .await
        .unwrap();
    assert_eq!(
        h.iscsi.calls(),
        [
            format!("login {IQN} 127.0.0.1:3260"),
            format!("login {IQN} 127.0.0.2:3260"),
            "format /dev/mapper/mpatha ext4".to_string()
        ],
        "both paths, the map formatted, and a second stage changes nothing"
    );
    let m = h
        .mounter
        .table()
        .into_iter()
        .find(|m| m.mount_point == staging)
        .unwrap();
    assert_eq!(m.source, "/dev/mapper/mpatha", "a path disk was mounted");

    // Another volume (LUN 1) through the first portal only.
    h.node
        .node_stage_volume(h.stage("single", 1, false, &[], &[]))
        .await
        .unwrap();
    // The same volume with a different portal set is another volume.
    let e = h
        .node
        .node_stage_volume(h.stage("mp", 0, false, &[], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Expansion rescans both paths and resizes the map.
    h.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "mp".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let calls = h.iscsi.calls();
    for want in [
        format!("rescan {IQN} 127.0.0.1:3260"),
        format!("rescan {IQN} 127.0.0.2:3260"),
        "multipathd resize /dev/mapper/mpatha".to_string(),
        "grow /dev/mapper/mpatha ext4 ".to_string() + &staging.display().to_string(),
    ] {
        assert!(calls.contains(&want), "{want} not in {calls:?}");
    }

    let before = h.iscsi.calls().len();
    h.node.node_unstage_volume(h.unstage("mp")).await.unwrap();
    let teardown: Vec<String> = h.iscsi.calls()[before..].to_vec();
    // The map goes first; portal 1 stays (LUN 1 uses it): only its path disk is removed
    // (sdb does not exist on this machine, so nothing to remove); portal 2 is logged out.
    assert_eq!(
        teardown,
        [
            "multipath -f /dev/mapper/mpatha".to_string(),
            format!("logout {IQN} 127.0.0.2:3260"),
        ],
        "{teardown:?}"
    );
    assert_eq!(h.iscsi.current_sessions(), vec![target()]);
    h.node.node_unstage_volume(h.unstage("mp")).await.unwrap();
    h.stop.cancel();
}

#[tokio::test]
async fn multipath_stages_degraded_and_fails_clearly_without_a_map() {
    let mut h = start(true).await;
    // The second portal is down (no LUN there): one path, still a map.
    h.iscsi.add_multipath(
        Path::new("/dev/mapper/mpathb"),
        &[Path::new("/dev/sdb"), Path::new("/dev/sdd")],
        1 << 30,
    );
    let portals = [("portals", "127.0.0.9")];
    h.node
        .node_stage_volume(h.stage("deg", 0, true, &portals, &[]))
        .await
        .unwrap();
    assert_eq!(h.iscsi.current_sessions(), vec![target()]);
    h.node.node_unstage_volume(h.unstage("deg")).await.unwrap();
    assert!(h.iscsi.current_sessions().is_empty());

    // No multipathd map over the paths: FAILED_PRECONDITION naming multipathd; the
    // record is kept so unstage logs out.
    let mut h = start(true).await;
    h.iscsi
        .add_lun(&second_path(), 1, Path::new("/dev/sde"), 1 << 30);
    let portals = [("portals", "127.0.0.2")];
    let e = h
        .node
        .node_stage_volume(h.stage("nomap", 1, false, &portals, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("multipathd"), "{}", e.message());
    assert_eq!(h.iscsi.current_sessions().len(), 2);
    h.node
        .node_unstage_volume(h.unstage("nomap"))
        .await
        .unwrap();
    assert!(
        h.iscsi.current_sessions().is_empty(),
        "paths left logged in"
    );
    h.stop.cancel();
}
