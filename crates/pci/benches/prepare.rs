//! `cargo bench -p hybridlet-pci --bench prepare`: a claim for one function of the
//! FPGA fixture's two-function IOMMU group, prepared and unprepared through the DRA
//! framework as the kubelet's calls drive it (claim lookup in memory, group read, snapshot,
//! intent and checkpoint fsync'ed, both functions moved to vfio-pci, CDI spec), p50/p99
//! over 200 cycles, against the floor: the same sysfs writes (override, unbind, probe for
//! each function, and back) made directly through the same kernel stand-in, alone and with
//! the three fsync'ed files a crash-safe prepare needs. Plain timing loop; results in
//! docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridlet_dra::{AllocatedClaim, Allocation, Driver, FakeClaims};
use hybridlet_fixtures::kernel::KernelStandIn;
use hybridlet_sys::{HostRoot, Sysfs};

const CYCLES: usize = 200;
const GROUP: [&str; 2] = ["0000:03:00.0", "0000:03:00.1"];

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut times: Vec<Duration>) -> Duration {
    times.sort();
    let (p50, p99) = (pct(&times, 0.5), pct(&times, 0.99));
    println!("{what}: p50 {p50:?}, p99 {p99:?} ({} runs)", times.len());
    p99
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::fpga_server(dir.path()).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let kernel = KernelStandIn::new(dir.path());
    let sysfs = Sysfs::new(&HostRoot::new(dir.path())).with_writer(Arc::new(kernel.writer()));

    // The floor: what the kernel is asked to do, nothing else.
    let write = kernel.writer();
    let sys = dir.path().join("sys");
    let devices = sys.join("bus/pci/devices");
    let mut floor = Vec::with_capacity(CYCLES);
    for _ in 0..CYCLES {
        let started = Instant::now();
        for (address, own) in GROUP.iter().zip(["xclmgmt", "xocl"]) {
            let dev = devices.join(address);
            write(&dev.join("driver_override"), "vfio-pci").unwrap();
            write(&sys.join(format!("bus/pci/drivers/{own}/unbind")), address).unwrap();
            write(&sys.join("bus/pci/drivers_probe"), address).unwrap();
        }
        floor.push(started.elapsed());
        for (address, own) in GROUP.iter().zip(["xclmgmt", "xocl"]) {
            let dev = devices.join(address);
            write(&dev.join("driver_override"), "\n").unwrap();
            write(&sys.join("bus/pci/drivers/vfio-pci/unbind"), address).unwrap();
            write(&sys.join(format!("bus/pci/drivers/{own}/bind")), address).unwrap();
        }
    }
    let floor_p99 = report("floor (6 sysfs writes: 2 functions to vfio-pci)", floor);

    // The same writes plus the three fsync'ed files a crash-safe prepare cannot skip: the
    // intent before the first sysfs write, the CDI spec, the checkpoint after.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut durable = Vec::with_capacity(CYCLES);
    for _ in 0..CYCLES {
        let started = Instant::now();
        hybridlet_sys::atomic_write(&scratch.join("intent.json"), &[b'x'; 600], 0o600).unwrap();
        for (address, own) in GROUP.iter().zip(["xclmgmt", "xocl"]) {
            write(&devices.join(address).join("driver_override"), "vfio-pci").unwrap();
            write(&sys.join(format!("bus/pci/drivers/{own}/unbind")), address).unwrap();
            write(&sys.join("bus/pci/drivers_probe"), address).unwrap();
        }
        hybridlet_sys::atomic_write(&scratch.join("cdi.json"), &[b'x'; 700], 0o644).unwrap();
        hybridlet_sys::atomic_write(&scratch.join("checkpoint.json"), &[b'x'; 900], 0o600).unwrap();
        durable.push(started.elapsed());
        for (address, own) in GROUP.iter().zip(["xclmgmt", "xocl"]) {
            write(&devices.join(address).join("driver_override"), "\n").unwrap();
            write(&sys.join("bus/pci/drivers/vfio-pci/unbind"), address).unwrap();
            write(&sys.join(format!("bus/pci/drivers/{own}/bind")), address).unwrap();
        }
    }
    let durable_p99 = report(
        "floor with durability (the writes + intent, CDI spec, checkpoint fsync'ed)",
        durable,
    );

    let text = "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  dra:\n    pci:\n      enabled: true\n      allow: [{vendor: \"0x10ee\", deviceClass: fpga}]\n";
    let loaded = hybridlet_config::parse_str(text, Path::new("bench.yaml")).unwrap();
    let rules = hybridlet_pci::rules(&loaded.config.agent.dra.pci);
    let (pci, _) = sysfs.pci_devices().unwrap();
    let inventory = hybridlet_pci::discover(&sysfs, &pci, &rules);
    let parts = hybridlet_pci::dra::parts(
        "pci.hybridlet.io",
        "node-a",
        &inventory,
        Arc::new(sysfs.clone()),
        sysfs.clone(),
        dir.path().join("dev"),
    );
    let claims = Arc::new(FakeClaims::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let driver = Driver::open(
        parts.backend,
        claims.clone(),
        &hybridlet_dra::checkpoint_path(&dir.path().join("state"), "pci.hybridlet.io"),
        &dir.path().join("cdi"),
        "boot-1",
    )
    .unwrap();
    let (mut prepare, mut unprepare) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        for i in 0..CYCLES {
            let uid = format!("uid-{i}");
            claims.put(AllocatedClaim {
                namespace: "fpga".into(),
                name: format!("c{i}"),
                uid: uid.clone(),
                allocations: vec![Allocation {
                    request: "fpga".into(),
                    driver: "pci.hybridlet.io".into(),
                    pool: "node-a".into(),
                    device: "pci-0000-03-00-0".into(),
                }],
                pods: Vec::new(),
                configs: Vec::new(),
            });
            let started = Instant::now();
            driver
                .prepare("fpga", &format!("c{i}"), &uid)
                .await
                .unwrap();
            prepare.push(started.elapsed());
            let started = Instant::now();
            driver.unprepare(&uid).await.unwrap();
            unprepare.push(started.elapsed());
        }
    });
    let p99 = report(
        "prepare (2-function group to vfio-pci, intent + checkpoint + CDI spec fsync'ed)",
        prepare,
    );
    report(
        "unprepare (both functions back, checkpoint fsync'ed)",
        unprepare,
    );
    println!(
        "prepare p99 / floor p99: {:.1}x; / floor with durability p99: {:.1}x",
        p99.as_secs_f64() / floor_p99.as_secs_f64(),
        p99.as_secs_f64() / durable_p99.as_secs_f64()
    );
}
