//! Root tier: the aws/eks-hybrid #664 case with a real bind mount. A pod bind-mounted a
//! host directory under the kubelet's tree; removing the tree must delete nothing at all,
//! and after the unmount it removes everything. Run with
//! `cargo nextest run -p hybridlet-sys --run-ignored only` (CI does, as root).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::fs;

use hybridlet_sys::mount::{Mounter, SystemMounter};
use hybridlet_sys::tree::{RemoveTreeError, mount_points_under, remove_tree_on_one_fs};

#[test]
#[ignore = "root tier: needs CAP_SYS_ADMIN; run with --run-ignored only"]
fn a_bind_mount_inside_the_tree_stops_the_removal() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the root tier needs root (CAP_SYS_ADMIN) to mount; run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let host_etc = dir.path().join("host-etc");
    fs::create_dir_all(&host_etc).unwrap();
    fs::write(host_etc.join("passwd"), "root:x:0:0").unwrap();
    let kubelet = dir.path().join("var/lib/kubelet");
    let volume = kubelet.join("pods/p1/volumes/kubernetes.io~host-path/host-root");
    fs::create_dir_all(&volume).unwrap();
    fs::write(kubelet.join("pods/p1/etc-hosts"), "127.0.0.1 localhost").unwrap();
    let mounter = SystemMounter::new();
    // Same file system: only the mount table and STATX_ATTR_MOUNT_ROOT can tell.
    mounter.bind(&host_etc, &volume, false).unwrap();

    let found = mount_points_under(&kubelet).unwrap();
    assert_eq!(found, vec![volume.clone()]);
    let err = remove_tree_on_one_fs(&kubelet).unwrap_err();
    assert!(matches!(err, RemoveTreeError::MountPoints { .. }), "{err}");
    assert!(err.to_string().contains("nothing was deleted"), "{err}");
    assert_eq!(
        fs::read_to_string(host_etc.join("passwd")).unwrap(),
        "root:x:0:0"
    );
    assert!(
        kubelet.join("pods/p1/etc-hosts").exists(),
        "deleted despite the refusal"
    );

    mounter.unmount(&volume, false).unwrap();
    remove_tree_on_one_fs(&kubelet).unwrap();
    assert!(!kubelet.exists());
    assert_eq!(
        fs::read_to_string(host_etc.join("passwd")).unwrap(),
        "root:x:0:0"
    );
}
