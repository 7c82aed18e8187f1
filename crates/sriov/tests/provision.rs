//! VF provisioning against a fixture tree, with the fixtures' kernel stand-in taking the
//! `sriov_numvfs` writes: it records them and creates or removes VFs the way the kernel
//! does, refusing what the kernel refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hybridlet_fixtures::kernel::KernelStandIn;
use hybridlet_sriov::{PfSelector, ProvisionError, provision};
use hybridlet_sys::{HostRoot, PciAddress, Sysfs};

const POLL: Duration = Duration::from_millis(5);

fn e810(dir: &Path) -> (Sysfs, PathBuf) {
    hybridlet_fixtures::e810_server(dir).unwrap();
    let pf_dir = dir.join("sys/devices/pci0000:80/0000:80:02.0/0000:81:00.0");
    (Sysfs::new(&HostRoot::new(dir)), pf_dir)
}

#[test]
fn changes_go_through_zero_and_wait_for_the_vfs() {
    let dir = tempfile::tempdir().unwrap();
    let (sysfs, _) = e810(dir.path());
    // The kernel stand-in records every write and refuses a direct 64 → 8 (EBUSY).
    let kernel = KernelStandIn::new(dir.path());
    let sysfs = sysfs.with_writer(Arc::new(kernel.writer()));
    let done = provision(
        &sysfs,
        &PfSelector::Interface("ens2f0".into()),
        8,
        Duration::from_secs(20),
        POLL,
    )
    .unwrap();
    assert_eq!(done.pf, PciAddress::parse("0000:81:00.0").unwrap());
    assert_eq!((done.before, done.after), (64, 8));
    let pf = sysfs.pci_device(&done.pf).unwrap();
    assert_eq!(pf.virtfns.len(), 8);
    let writes: Vec<(String, String)> = kernel.writes();
    let numvfs = "devices/pci0000:80/0000:80:02.0/0000:81:00.0/sriov_numvfs".to_string();
    assert_eq!(
        writes,
        [(numvfs.clone(), "0\n".into()), (numvfs, "8\n".into())]
    );
}

#[test]
fn same_count_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (sysfs, _) = e810(dir.path());
    let pf = PfSelector::Address(PciAddress::parse("0000:81:00.0").unwrap());
    let done = provision(&sysfs, &pf, 64, Duration::from_millis(50), POLL).unwrap();
    assert_eq!((done.before, done.after), (64, 64));
}

#[test]
fn too_many_vfs_and_missing_pf_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (sysfs, _) = e810(dir.path());
    let err = provision(
        &sysfs,
        &PfSelector::Interface("ens2f0".into()),
        500,
        Duration::from_millis(50),
        POLL,
    )
    .unwrap_err();
    assert!(matches!(err, ProvisionError::Write { .. }));
    assert!(err.to_string().contains("at most 128 VFs"), "{err}");
    let err = provision(
        &sysfs,
        &PfSelector::Interface("nope0".into()),
        1,
        Duration::from_millis(50),
        POLL,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("interface nope0: "), "{err}");
}

#[test]
fn a_driver_that_never_creates_vfs_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (sysfs, _) = e810(dir.path());
    // No fake kernel: the write happens, the VFs never change.
    let err = provision(
        &sysfs,
        &PfSelector::Interface("ens2f0".into()),
        4,
        Duration::from_millis(100),
        POLL,
    )
    .unwrap_err();
    assert!(
        matches!(err, ProvisionError::Timeout { wanted: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("check `dmesg`"), "{err}");
}
