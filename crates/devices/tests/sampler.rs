//! The `devices` sampler sleeps until something changes: one walk at start, then a walk
//! only after a burst of device uevents has settled (one walk for the whole burst), none
//! for other uevents or for the telemetry timer; VF counters are read again only when a
//! scrape finds them stale, and that scrape's successor sees the new values. The kernel's
//! side is the fixtures' stand-in (a PF's `sriov_numvfs` written to 0 removes its VFs) and
//! the uevents come from `FakeUevents` (`hybridlet-sys` holds `KernelUevents` to the real
//! kernel in the root tier).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::time::{Duration, Instant};

use hybridlet_devices::{DeviceMetrics, Holders};
use hybridlet_runtime::{Readiness, Supervisor};
use hybridlet_sys::uevent::{FakeUevents, Uevent};
use hybridlet_sys::{HostRoot, Sysfs};

async fn eventually(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn uevent(action: &str, devpath: &str, subsystem: &str) -> Uevent {
    Uevent::parse(
        format!("{action}@{devpath}\0ACTION={action}\0SUBSYSTEM={subsystem}\0").as_bytes(),
    )
    .unwrap()
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn walks_after_device_uevents_only_and_reads_counters_when_scraped() {
    let root = tempfile::tempdir().unwrap();
    hybridlet_fixtures::e810_server(root.path()).unwrap();
    let kernel = hybridlet_fixtures::kernel::KernelStandIn::new(root.path());
    let sysfs = Sysfs::new(&HostRoot::new(root.path()));
    let mut registry = hybridlet_metrics::new_registry();
    let metrics = DeviceMetrics::register(&mut registry, Holders::default())
        .counters_fresh(Duration::from_millis(200));
    let (events, source) = FakeUevents::channel();
    let mut supervisor = Supervisor::new(Readiness::new());
    // Stop the sampler however the test ends (its uevent reader would keep the runtime).
    let _stop = supervisor.shutdown_token().drop_guard();
    let mut changes = metrics.device_changes();
    let sampler = metrics.clone();
    supervisor.spawn("devices", move |ctx| {
        sampler.run(
            sysfs,
            None,
            Duration::from_secs(3600),
            Some(Box::new(source)),
            ctx,
        )
    });
    eventually("the first walk", Duration::from_secs(5), || {
        metrics.walks() == 1
    })
    .await;
    let text = hybridlet_metrics::encode(&registry).unwrap();
    assert!(
        line(&text, "hybridlet_sriov_vfs{").ends_with(" 64.0"),
        "{text}"
    );

    // Counters: read with the walk; a scrape that finds them stale asks for new ones, which
    // the next scrape shows. No walk for that.
    let rx = |text: &str| {
        line(
            text,
            "hybridlet_sriov_vf_receive_bytes_total{pf=\"0000:81:00.0\",vf=\"0000:81:00.2\"",
        )
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
    };
    let stats = root
        .path()
        .join("sys/class/net/ens2f0v0/statistics/rx_bytes");
    let before = rx(&text);
    std::fs::write(&stats, "987654321\n").unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let text = hybridlet_metrics::encode(&registry).unwrap();
    assert_eq!(rx(&text), before, "a scrape never reads sysfs itself");
    eventually("the counters read again", Duration::from_secs(2), || {
        rx(&hybridlet_metrics::encode(&registry).unwrap()) == "987654321"
    })
    .await;
    assert_eq!(metrics.walks(), 1);

    // A VF moved to another driver is the same VF: a walk, but no change for the drivers.
    let vf0 = root.path().join("sys/bus/pci/devices/0000:81:00.2");
    (kernel.writer())(&vf0.join("driver/unbind"), "0000:81:00.2").unwrap();
    events
        .send(uevent(
            "unbind",
            "/devices/pci0000:80/0000:80:02.0/0000:81:00.2",
            "pci",
        ))
        .unwrap();
    eventually("the walk after the unbind", Duration::from_secs(2), || {
        metrics.walks() == 2
    })
    .await;
    assert!(changes.try_recv().is_err(), "an unbind is no device change");

    // Quiet: no walk. Events of other subsystems: no walk either.
    events
        .send(uevent("change", "/devices/virtual/block/loop0", "block"))
        .unwrap();
    events
        .send(uevent("add", "/devices/virtual/tty/ttyS9", "tty"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(metrics.walks(), 2);

    // The kernel removes the PF's 64 VFs: a burst of 128 events (remove, unbind) makes one
    // walk, soon after it settles.
    let pf = root.path().join("sys/bus/pci/devices/0000:81:00.0");
    (kernel.writer())(&pf.join("sriov_numvfs"), "0").unwrap();
    let sent = Instant::now();
    for v in 0..64u32 {
        let vf = format!(
            "/devices/pci0000:80/0000:80:02.0/{}",
            hybridlet_fixtures::vf_bdf(0x81, v)
        );
        events.send(uevent("unbind", &vf, "pci")).unwrap();
        events.send(uevent("remove", &vf, "pci")).unwrap();
    }
    eventually("the walk after the burst", Duration::from_secs(2), || {
        metrics.walks() == 3
    })
    .await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(metrics.walks(), 3, "one walk for the burst");
    let text = hybridlet_metrics::encode(&registry).unwrap();
    assert!(
        line(&text, "hybridlet_sriov_vfs{").ends_with(" 0.0"),
        "{text}"
    );
    // The SR-IOV driver is told its devices changed; the PCI and GPU ones are not.
    assert_eq!(changes.try_recv().unwrap(), ["sriov"]);
    assert!(changes.try_recv().is_err());
    assert!(
        !text.contains("hybridlet_sriov_vf_receive_bytes_total{"),
        "{text}"
    );

    // Back to 4 VFs (the stand-in gives them no netdev) and a netdev of our own making for
    // the counters: a walk, then counters read when a scrape finds them stale.
    (kernel.writer())(&pf.join("sriov_numvfs"), "4").unwrap();
    events
        .send(uevent(
            "add",
            "/devices/pci0000:80/0000:80:02.0/0000:81:00.1",
            "pci",
        ))
        .unwrap();
    eventually("the walk after the add", Duration::from_secs(2), || {
        metrics.walks() == 4
    })
    .await;
    let text = hybridlet_metrics::encode(&registry).unwrap();
    assert!(
        line(&text, "hybridlet_sriov_vfs{").ends_with(" 4.0"),
        "{text}"
    );
    assert_eq!(changes.try_recv().unwrap(), ["sriov"]);
    assert_eq!(metrics.walks(), 4);
}
