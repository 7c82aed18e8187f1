//! VF provisioning against a fixture tree, with a thread standing in for the kernel: it
//! watches `sriov_numvfs` and creates or removes VFs the way the PF driver would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hybridlet_fixtures::{Function, SysfsBuilder, vf_bdf};
use hybridlet_sriov::{PfSelector, ProvisionError, provision};
use hybridlet_sys::{HostRoot, PciAddress, Sysfs};

const POLL: Duration = Duration::from_millis(5);

/// Emulates the PF driver: makes the VF links match sriov_numvfs.
fn fake_kernel(
    root: PathBuf,
    pf_dir: PathBuf,
    bus: u8,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u32>> {
    let ready = Arc::new(std::sync::Barrier::new(2));
    let started = ready.clone();
    let handle = std::thread::spawn(move || {
        let mut writes = Vec::new();
        // The tree starts consistent: only changes need work.
        let mut last: Option<u32> = std::fs::read_to_string(pf_dir.join("sriov_numvfs"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        started.wait();
        while !stop.load(Ordering::Relaxed) {
            let n: u32 = std::fs::read_to_string(pf_dir.join("sriov_numvfs"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if last != Some(n) {
                writes.push(n);
                last = Some(n);
                let mut b = SysfsBuilder::new(&root).unwrap();
                let mut index = 0;
                while pf_dir.join(format!("virtfn{index}")).exists() {
                    let vf = std::fs::canonicalize(pf_dir.join(format!("virtfn{index}"))).unwrap();
                    std::fs::remove_file(pf_dir.join(format!("virtfn{index}"))).unwrap();
                    let addr = vf.file_name().unwrap().to_owned();
                    std::fs::remove_dir_all(&vf).unwrap();
                    std::fs::remove_file(root.join("sys/bus/pci/devices").join(addr)).unwrap();
                    index += 1;
                }
                for v in 0..n {
                    let f = Function {
                        vendor: 0x8086,
                        device: 0x1889,
                        class: 0x020000,
                        driver: Some("iavf".into()),
                        numa: 1,
                        ..Function::default()
                    };
                    b.vf(&pf_dir, v, &vf_bdf(bus, v), &f).unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        writes
    });
    ready.wait();
    handle
}

fn e810(dir: &Path) -> (Sysfs, PathBuf) {
    hybridlet_fixtures::e810_server(dir).unwrap();
    let pf_dir = dir.join("sys/devices/pci0000:80/0000:80:02.0/0000:81:00.0");
    (Sysfs::new(&HostRoot::new(dir)), pf_dir)
}

#[test]
fn changes_go_through_zero_and_wait_for_the_vfs() {
    let dir = tempfile::tempdir().unwrap();
    let (sysfs, pf_dir) = e810(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let kernel = fake_kernel(dir.path().to_path_buf(), pf_dir.clone(), 0x81, stop.clone());
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
    stop.store(true, Ordering::Relaxed);
    let writes = kernel.join().unwrap();
    // The fake kernel polls, so it may or may not catch the intermediate 0; it must end
    // on 8.
    assert_eq!(writes.last(), Some(&8), "{writes:?}");
    assert!(!writes.contains(&64), "{writes:?}");
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
