//! `cargo bench -p hybridlet --bench discovery`: full device discovery (one sysfs walk, the
//! GPU view through the fake NVML source, the SR-IOV inventory) on a DGX-like tree with
//! 8 PFs × 128 VFs (1,024 VFs) and 8 GPUs, against the bare cost of touching the same
//! sysfs entries with no processing (read each attribute file, read each link, list each
//! device directory). Plain timing loop; results in docs/benchmarks.md.

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use hybridlet_gpu::FakeSource;
use hybridlet_sys::{HostRoot, Sysfs};

const FILES: &[&str] = &[
    "vendor",
    "device",
    "class",
    "numa_node",
    "sriov_totalvfs",
    "sriov_numvfs",
];
const LINKS: &[&str] = &["driver", "iommu_group", "physfn"];

/// Touch what discovery touches, doing nothing with it.
fn bare(root: &Path) -> usize {
    let mut bytes = 0;
    let devices = root.join("sys/bus/pci/devices");
    for entry in fs::read_dir(&devices).expect("devices") {
        let link = entry.expect("entry").path();
        let target = fs::read_link(&link).expect("link");
        let dir = devices.join(target);
        for f in FILES {
            if let Ok(s) = fs::read(dir.join(f)) {
                bytes += s.len();
            }
        }
        for l in LINKS {
            if let Ok(t) = fs::read_link(dir.join(l)) {
                bytes += t.as_os_str().len();
            }
        }
        for e in fs::read_dir(&dir).expect("dir").flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("virtfn") {
                bytes += fs::read_link(e.path())
                    .map(|t| t.as_os_str().len())
                    .unwrap_or(0);
            } else if name == "net" || name == "infiniband" {
                bytes += fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0);
            }
        }
    }
    bytes
}

fn best<F: FnMut()>(rounds: usize, iterations: u32, mut f: F) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..iterations {
            f();
        }
        best = best.min(start.elapsed() / iterations);
    }
    best
}

fn main() {
    // sysfs lives in memory; a tmpfs tree is the closest stand-in (the disk-backed /tmp
    // adds its own overhead to every lookup).
    let dir = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").expect("tempdir"),
        false => tempfile::tempdir().expect("tempdir"),
    };
    println!("tree under {}", dir.path().display());
    hybridlet_fixtures::dgx_h200(dir.path(), 128).expect("fixture");
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let gpus = FakeSource::from_file(&dir.path().join("fake-nvml.json")).expect("nvml fixture");

    let report = hybridlet_devices::discover(&sysfs, Some(&gpus))
        .expect("discover")
        .report();
    let vfs: usize = report_vfs(&report);
    assert_eq!((report.gpus.len(), vfs), (8, 8 * 128));

    // Warm the page and dentry caches, as on a host where sysfs is always in memory.
    for _ in 0..3 {
        black_box(bare(dir.path()));
        black_box(hybridlet_devices::discover(&sysfs, Some(&gpus)).expect("discover"));
    }
    let bare_t = best(5, 10, || {
        black_box(bare(dir.path()));
    });
    let full_t = best(5, 10, || {
        black_box(hybridlet_devices::discover(&sysfs, Some(&gpus)).expect("discover"));
    });
    let seq_t = best(5, 10, || {
        black_box(sysfs.pci_devices_with_threads(1).expect("walk"));
    });
    let walk_t = best(5, 10, || {
        black_box(sysfs.pci_devices().expect("walk"));
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |d: Duration| d.as_secs_f64() / bare_t.as_secs_f64();
    let functions = sysfs.pci_addresses().expect("addresses").len();
    println!("tree: {functions} PCI functions, 8 GPUs, {vfs} VFs");
    println!("bare sysfs reads (1 thread):   {:7.2} ms", ms(bare_t));
    println!(
        "sysfs walk (1 thread):         {:7.2} ms  {:.2}x bare",
        ms(seq_t),
        ratio(seq_t)
    );
    println!(
        "sysfs walk (parallel):         {:7.2} ms  {:.2}x bare",
        ms(walk_t),
        ratio(walk_t)
    );
    println!(
        "full discovery (parallel):     {:7.2} ms  {:.2}x bare",
        ms(full_t),
        ratio(full_t)
    );
}

fn report_vfs(r: &hybridlet_devices::Report) -> usize {
    serde_json::to_value(r).expect("json")["physicalFunctions"]
        .as_array()
        .expect("pfs")
        .iter()
        .map(|p| p["vfs"].as_array().map_or(0, Vec::len))
        .sum()
}
