//! The PCI driver's prepare and unprepare through the DRA framework on a generated sysfs
//! tree, with the kernel stand-in applying the kernel's rules to every sysfs write: whole
//! IOMMU groups move to vfio-pci and back exactly as they were, groups with a function no
//! rule allows or another claim holds are refused by name, and a crash mid-group is
//! undone at the next start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use hybridlet_dra::{AllocatedClaim, Allocation, Driver, FakeClaims, OpaqueConfig};
use hybridlet_fixtures::kernel::KernelStandIn;
use hybridlet_pci::{Rule, dra};
use hybridlet_sys::binding::{BindingState, DriverBinding};
use hybridlet_sys::{HostRoot, PciAddress, Sysfs};

const DRIVER: &str = "pci.hybridlet.io";

fn rules() -> Vec<Rule> {
    let text = "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  dra:\n    pci:\n      enabled: true\n      allow:\n        - {vendor: \"0x10ee\", deviceClass: fpga}\n        - {vendor: \"0x8086\", device: \"0x0b30\", deviceClass: fpga}\n        - {vendor: \"0x1d0f\"}\n";
    let loaded = hybridlet_config::parse_str(text, Path::new("t.yaml")).unwrap();
    hybridlet_pci::rules(&loaded.config.agent.dra.pci)
}

fn claim(name: &str, devices: &[&str], config: Option<serde_json::Value>) -> AllocatedClaim {
    AllocatedClaim {
        namespace: "fpga".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        allocations: devices
            .iter()
            .enumerate()
            .map(|(i, d)| Allocation {
                request: format!("r{i}"),
                driver: DRIVER.into(),
                pool: "node-a".into(),
                device: (*d).into(),
            })
            .collect(),
        pods: Vec::new(),
        configs: config
            .map(|parameters| {
                vec![OpaqueConfig {
                    driver: DRIVER.into(),
                    requests: Vec::new(),
                    parameters,
                }]
            })
            .unwrap_or_default(),
    }
}

struct Rig {
    dir: tempfile::TempDir,
    kernel: KernelStandIn,
    claims: Arc<FakeClaims>,
    parts: hybridlet_dra::DriverParts,
    sysfs: Sysfs,
}

/// The driver's parts over the tree at `root`, read through `sysfs`.
fn parts_on(root: &Path, sysfs: &Sysfs) -> hybridlet_dra::DriverParts {
    let (devices, _) = sysfs.pci_devices().unwrap();
    let inventory = hybridlet_pci::discover(sysfs, &devices, &rules());
    dra::parts(
        DRIVER,
        "node-a",
        &inventory,
        Arc::new(sysfs.clone()),
        sysfs.clone(),
        root.join("dev"),
    )
}

impl Rig {
    /// The FPGA server; sysfs writes go through `writer` (the kernel stand-in by default).
    fn new() -> Self {
        Self::with_writer(|k| Arc::new(k.writer()))
    }

    fn with_writer(
        writer: impl FnOnce(&KernelStandIn) -> Arc<dyn hybridlet_sys::AttributeWriter>,
    ) -> Self {
        Self::build(writer, |_| {})
    }

    /// The FPGA server changed by `edit` before anything reads it.
    fn build(
        writer: impl FnOnce(&KernelStandIn) -> Arc<dyn hybridlet_sys::AttributeWriter>,
        edit: impl FnOnce(&Path),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::fpga_server(dir.path()).unwrap();
        edit(dir.path());
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let kernel = KernelStandIn::new(dir.path());
        let sysfs = Sysfs::new(&HostRoot::new(dir.path())).with_writer(writer(&kernel));
        let parts = parts_on(dir.path(), &sysfs);
        Self {
            dir,
            kernel,
            claims: Arc::new(FakeClaims::default()),
            parts,
            sysfs,
        }
    }

    fn open(&self) -> Driver {
        self.open_with(self.parts.backend.clone())
    }

    /// A start of the driver over `backend` with this rig's checkpoint and CDI directory.
    fn open_with(&self, backend: Arc<dyn hybridlet_dra::DeviceBackend>) -> Driver {
        Driver::open(
            backend,
            self.claims.clone(),
            &hybridlet_dra::checkpoint_path(&self.dir.path().join("state"), DRIVER),
            &self.dir.path().join("cdi"),
            "boot-1",
        )
        .unwrap()
    }

    fn state(&self, address: &str) -> BindingState {
        self.sysfs.state(&PciAddress::parse(address).unwrap())
    }

    fn spec(&self, uid: &str) -> serde_json::Value {
        let path = self
            .dir
            .path()
            .join(format!("cdi/pci_hybridlet_io-{uid}.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
}

/// Prepare claim `name` (UID `uid-<name>`), which must fail: the per-claim message.
async fn refused(driver: &Driver, name: &str) -> String {
    driver
        .prepare("fpga", name, &format!("uid-{name}"))
        .await
        .unwrap_err()
        .to_string()
}

const ALVEO: [&str; 2] = ["0000:03:00.0", "0000:03:00.1"];

#[tokio::test]
async fn a_claim_moves_the_whole_group_to_vfio_and_gives_it_back_exactly() {
    let rig = Rig::new();
    let before: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    assert_eq!(before[0].driver.as_deref(), Some("xclmgmt"));
    rig.claims.put(claim("mgmt", &["pci-0000-03-00-0"], None));
    let driver = rig.open();
    driver.prepare("fpga", "mgmt", "uid-mgmt").await.unwrap();
    for a in ALVEO {
        assert_eq!(rig.state(a).driver.as_deref(), Some("vfio-pci"), "{a}");
    }
    // The switch's downstream port shares the group and stays a bridge on pcieport.
    assert_eq!(
        rig.state("0000:02:00.0").driver.as_deref(),
        Some("pcieport")
    );
    let spec = rig.spec("uid-mgmt");
    if let Err(problem) = hybridlet_fixtures::cdi::validate(&spec) {
        panic!("{problem}\n{spec}");
    }
    let group = std::fs::read_link(
        rig.dir
            .path()
            .join("sys/bus/pci/devices/0000:03:00.0/iommu_group"),
    )
    .unwrap()
    .file_name()
    .unwrap()
    .to_string_lossy()
    .into_owned();
    let text = spec.to_string();
    assert!(
        text.contains(&format!("/dev/vfio/{group}")) && text.contains("/dev/vfio/vfio"),
        "{text}"
    );
    assert!(
        text.contains("PCI_RESOURCE_PCI_HYBRIDLET_IO=0000:03:00.0")
            && text.contains("PCI_RESOURCE_PCI_HYBRIDLET_IO_GROUP=0000:03:00.0,0000:03:00.1"),
        "{text}"
    );
    // A restart in between: the checkpoint knows what to put back.
    drop(driver);
    let driver = rig.open();
    driver.unprepare("uid-mgmt").await.unwrap();
    let after: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    assert_eq!(after, before);
    // Nothing but the two functions and the probe were ever written.
    for (path, value) in rig.kernel.writes() {
        assert!(
            ALVEO.iter().any(|a| path.contains(a) || value.contains(a)),
            "unexpected write {path} = {value}"
        );
    }
}

#[tokio::test]
async fn a_function_of_a_held_group_is_refused_naming_the_holder_and_one_claim_may_take_both() {
    let rig = Rig::new();
    rig.claims.put(claim("mgmt", &["pci-0000-03-00-0"], None));
    rig.claims.put(claim("user", &["pci-0000-03-00-1"], None));
    rig.claims.put(claim(
        "both",
        &["pci-0000-03-00-0", "pci-0000-03-00-1"],
        None,
    ));
    let driver = rig.open();
    driver.prepare("fpga", "mgmt", "uid-mgmt").await.unwrap();
    let err = refused(&driver, "user").await;
    assert!(
        err.contains("pci-0000-03-00-1")
            && err.contains("pci-0000-03-00-0")
            && err.contains("uid-mgmt")
            && err.contains("IOMMU group"),
        "{err}"
    );
    // Refused in memory too after a restart (the reservation is rebuilt from the checkpoint).
    drop(driver);
    let driver = rig.open();
    assert!(driver.prepare("fpga", "user", "uid-user").await.is_err());
    driver.unprepare("uid-mgmt").await.unwrap();
    driver.prepare("fpga", "both", "uid-both").await.unwrap();
    driver.unprepare("uid-both").await.unwrap();
    assert_eq!(rig.state(ALVEO[0]).driver.as_deref(), Some("xclmgmt"));
    assert_eq!(rig.state(ALVEO[1]).driver.as_deref(), Some("xocl"));
}

#[tokio::test]
async fn a_group_with_a_function_no_rule_allows_is_refused_before_any_write() {
    let rig = Rig::new();
    rig.claims.put(claim("mixed", &["pci-0000-05-00-0"], None));
    let driver = rig.open();
    let err = refused(&driver, "mixed").await;
    assert!(
        err.contains("0000:05:00.1") && err.contains("igb") && err.contains("does not allow"),
        "{err}"
    );
    assert!(rig.kernel.writes().is_empty(), "{:?}", rig.kernel.writes());
    assert_eq!(rig.state("0000:05:00.1").driver.as_deref(), Some("igb"));
}

/// Only PCI-to-PCI bridges stay behind when a group moves: an "other bridge" class
/// function (an NVSwitch-like 0x0680 on its own driver) in the group refuses the claim.
#[tokio::test]
async fn a_group_with_a_non_pci_bridge_member_is_refused() {
    let rig = Rig::build(
        |k| Arc::new(k.writer()),
        |root| {
            let dfl = std::fs::canonicalize(root.join("sys/bus/pci/devices/0000:04:00.0")).unwrap();
            let group: u32 = std::fs::read_link(dfl.join("iommu_group"))
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .parse()
                .unwrap();
            let mut b = hybridlet_fixtures::SysfsBuilder::new(root).unwrap();
            b.function(
                dfl.parent().unwrap(),
                "0000:04:00.1",
                &hybridlet_fixtures::Function {
                    vendor: 0x10de,
                    device: 0x22a3,
                    class: 0x068000,
                    driver: Some("nvidia-nvswitch".into()),
                    numa: 1,
                    iommu_group: Some(group),
                    ..Default::default()
                },
            )
            .unwrap();
        },
    );
    rig.claims.put(claim("dfl", &["pci-0000-04-00-0"], None));
    let driver = rig.open();
    let err = refused(&driver, "dfl").await;
    assert!(
        err.contains("0000:04:00.1") && err.contains("nvidia-nvswitch"),
        "{err}"
    );
    assert!(rig.kernel.writes().is_empty(), "{:?}", rig.kernel.writes());
}

#[tokio::test]
async fn driver_mode_keeps_the_vendor_driver_and_hands_over_its_device_nodes() {
    let rig = Rig::new();
    let dev = rig.dir.path().join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    let mode = serde_json::json!({"mode": "driver"});
    rig.claims
        .put(claim("dfl", &["pci-0000-04-00-0"], Some(mode.clone())));
    let driver = rig.open();
    // No device nodes under /dev yet: refused by name, nothing moved.
    let err = refused(&driver, "dfl").await;
    assert!(err.contains("/dev/dfl-fme.0"), "{err}");
    for node in ["dfl-fme.0", "dfl-port.0"] {
        std::fs::write(dev.join(node), "").unwrap();
    }
    driver.prepare("fpga", "dfl", "uid-dfl").await.unwrap();
    let text = rig.spec("uid-dfl").to_string();
    assert!(
        text.contains("/dev/dfl-fme.0") && text.contains("/dev/dfl-port.0"),
        "{text}"
    );
    assert!(!text.contains("/dev/vfio"), "{text}");
    assert_eq!(rig.state("0000:04:00.0").driver.as_deref(), Some("dfl-pci"));
    assert!(rig.kernel.writes().is_empty());
    // A typo in the mode is refused, naming it.
    rig.claims.put(claim(
        "typo",
        &["pci-0000-04-00-0"],
        Some(serde_json::json!({"mode": "vfi0"})),
    ));
    let err = refused(&driver, "typo").await;
    assert!(err.contains("\"vfi0\""), "{err}");
}

/// The group bind fails halfway (the second function refuses vfio-pci): the first goes
/// back to its driver before the claim fails.
#[tokio::test]
async fn a_group_bind_failing_halfway_puts_back_what_moved() {
    let rig = Rig::with_writer(|k| {
        let k = k.clone();
        let inner = k.writer();
        Arc::new(move |path: &Path, value: &str| {
            if path.ends_with("drivers_probe") && value.trim() == "0000:03:00.1" {
                return Err(std::io::Error::other("EIO: the stand-in refuses this one"));
            }
            inner(path, value)
        })
    });
    let before: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    rig.claims.put(claim("mgmt", &["pci-0000-03-00-0"], None));
    let driver = rig.open();
    let err = refused(&driver, "mgmt").await;
    assert!(err.contains("0000:03:00.1"), "{err}");
    let after: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    assert_eq!(after, before);
    assert!(driver.prepared().await.is_empty());
}

/// The process dies with the first function on vfio-pci and the second not yet moved
/// (its probe never returns): the next start puts the group back as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_group_is_undone_at_the_next_start() {
    let gate = Arc::new((Mutex::new((false, true)), Condvar::new())); // (reached, holding)
    let g = gate.clone();
    let rig = Rig::with_writer(move |k| {
        let inner = k.writer();
        Arc::new(move |path: &Path, value: &str| {
            if path.ends_with("drivers_probe") && value.trim() == "0000:03:00.1" {
                let (lock, cv) = &*g;
                let mut s = lock.lock().unwrap();
                s.0 = true;
                cv.notify_all();
                while s.1 {
                    s = cv.wait(s).unwrap();
                }
            }
            inner(path, value)
        })
    });
    let before: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    rig.claims.put(claim("mgmt", &["pci-0000-03-00-0"], None));
    let driver = Arc::new(rig.open());
    let in_flight = tokio::spawn({
        let driver = driver.clone();
        async move { driver.prepare("fpga", "mgmt", "uid-mgmt").await }
    });
    {
        let (lock, cv) = &*gate;
        let mut s = lock.lock().unwrap();
        while !s.0 {
            s = cv.wait(s).unwrap();
        }
    }
    assert_eq!(rig.state(ALVEO[0]).driver.as_deref(), Some("vfio-pci"));
    in_flight.abort();
    let checkpoint = std::fs::read_to_string(hybridlet_dra::checkpoint_path(
        &rig.dir.path().join("state"),
        DRIVER,
    ))
    .unwrap();
    assert!(
        checkpoint.contains("\"attaching\"") && checkpoint.contains("xclmgmt"),
        "{checkpoint}"
    );

    // The next start, with a kernel that answers: both functions as they were.
    let fresh =
        Sysfs::new(&HostRoot::new(rig.dir.path())).with_writer(Arc::new(rig.kernel.writer()));
    let restarted = rig.open_with(parts_on(rig.dir.path(), &fresh).backend);
    assert!(restarted.prepared().await.is_empty());
    let after: Vec<BindingState> = ALVEO.iter().map(|a| rig.state(a)).collect();
    assert_eq!(after, before);

    // Let the stuck thread finish.
    let (lock, cv) = &*gate;
    lock.lock().unwrap().1 = false;
    cv.notify_all();
}
