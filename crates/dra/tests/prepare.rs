//! Prepare/unprepare through the kubelet's gRPC API over a Unix socket, with a fake claim
//! source and a fake device backend: CDI specs, the checkpoint, idempotency, per-claim
//! errors, restart after a reboot, a corrupt checkpoint, an API server outage.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hybridlet_dra::{
    AllocatedClaim, Allocation, ContainerEdits, DeviceBackend, DeviceError, Driver, FakeClaims,
    V1Service, V1beta1Service,
};
use hybridlet_kubelet_plugin::{PluginSocket, connect, serve};
use hybridlet_proto::dra::{v1, v1beta1};
use hybridlet_runtime::CancellationToken;

const DRIVER: &str = "gpu.hybridlet.io";

#[derive(Debug)]
struct Gpus;

impl DeviceBackend for Gpus {
    fn driver_name(&self) -> &str {
        DRIVER
    }
    fn pool_name(&self) -> &str {
        "node-a"
    }
    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError> {
        let index: u32 = device
            .strip_prefix("gpu-")
            .and_then(|i| i.parse().ok())
            .ok_or(DeviceError::Host(format!(
                "no device {device} on this node"
            )))?;
        if index > 3 {
            return Err(DeviceError::Host(format!(
                "no device {device} on this node"
            )));
        }
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES=GPU-uuid-{index}")],
            device_nodes: vec![format!("/dev/nvidia{index}"), "/dev/nvidiactl".into()],
        })
    }
}

fn claim(name: &str, uid: &str, allocations: &[(&str, &str, &str, &str)]) -> AllocatedClaim {
    AllocatedClaim {
        namespace: "ml".into(),
        name: name.into(),
        uid: uid.into(),
        allocations: allocations
            .iter()
            .map(|(request, driver, pool, device)| Allocation {
                request: request.to_string(),
                driver: driver.to_string(),
                pool: pool.to_string(),
                device: device.to_string(),
            })
            .collect(),
        pods: Vec::new(),
        configs: Vec::new(),
    }
}

fn v1claim(name: &str, uid: &str) -> v1::Claim {
    v1::Claim {
        namespace: "ml".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

struct Rig {
    dir: tempfile::TempDir,
    claims: Arc<FakeClaims>,
}

impl Rig {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            claims: Arc::new(FakeClaims::default()),
        }
    }
    fn checkpoint(&self) -> PathBuf {
        self.dir.path().join("state/dra-gpu.json")
    }
    fn cdi(&self) -> PathBuf {
        self.dir.path().join("run/cdi")
    }
    fn open(&self, boot: &str) -> Arc<Driver> {
        std::fs::create_dir_all(self.dir.path().join("state")).unwrap();
        Arc::new(
            Driver::open(
                Arc::new(Gpus),
                self.claims.clone(),
                &self.checkpoint(),
                &self.cdi(),
                boot,
            )
            .unwrap(),
        )
    }
    async fn serve(&self, driver: Arc<Driver>) -> (CancellationToken, PathBuf) {
        let sock = self.dir.path().join(format!(
            "plugins/{DRIVER}/dra-{}.sock",
            std::process::id() ^ rand_id()
        ));
        let socket = PluginSocket::bind(&sock).unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(v1::dra_plugin_server::DraPluginServer::new(V1Service(
                driver.clone(),
            )))
            .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                V1beta1Service(driver),
            ));
        let stop = CancellationToken::new();
        tokio::spawn(serve(socket, router, stop.clone()));
        (stop, sock)
    }
}

fn rand_id() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn spec_path(cdi: &Path, uid: &str) -> PathBuf {
    cdi.join(format!("gpu_hybridlet_io-{uid}.json"))
}

#[tokio::test]
async fn prepare_unprepare_with_per_claim_errors() {
    let rig = Rig::new();
    rig.claims.put(claim(
        "a",
        "uid-a",
        &[
            ("gpu", DRIVER, "node-a", "gpu-0"),
            ("nic", "sriov.hybridlet.io", "node-a", "vf-1"),
        ],
    ));
    rig.claims.put(claim(
        "c",
        "uid-c-new",
        &[("gpu", DRIVER, "node-a", "gpu-1")],
    ));
    rig.claims
        .put(claim("d", "uid-d", &[("gpu", DRIVER, "node-a", "gpu-0")]));
    rig.claims.put(claim(
        "e",
        "uid-e",
        &[("nic", "sriov.hybridlet.io", "node-a", "vf-2")],
    ));
    rig.claims
        .put(claim("f", "uid-f", &[("gpu", DRIVER, "node-b", "gpu-2")]));
    rig.claims
        .put(claim("g", "uid-g", &[("gpu", DRIVER, "node-a", "gpu-9")]));
    let driver = rig.open("boot-1");
    let (stop, sock) = rig.serve(driver.clone()).await;
    let mut client = v1::dra_plugin_client::DraPluginClient::new(connect(&sock).await.unwrap());

    let resp = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![
                v1claim("a", "uid-a"),
                v1claim("b", "uid-b"),
                v1claim("c", "uid-c-old"),
                v1claim("d", "uid-d"),
                v1claim("e", "uid-e"),
                v1claim("f", "uid-f"),
                v1claim("g", "uid-g"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.claims.len(), 7, "every claim gets an entry");
    let a = &resp.claims["uid-a"];
    assert_eq!(a.error, "");
    assert_eq!(a.devices.len(), 1, "only our driver's devices");
    assert_eq!(a.devices[0].device_name, "gpu-0");
    assert_eq!(a.devices[0].pool_name, "node-a");
    assert_eq!(a.devices[0].request_names, ["gpu"]);
    assert_eq!(
        a.devices[0].cdi_device_ids,
        ["gpu.hybridlet.io/claim=uid-a-gpu-0"]
    );
    let expect = [
        ("uid-b", "not found"),
        ("uid-c-old", "has UID uid-c-new"),
        ("uid-d", "already prepared for claim uid-a"),
        ("uid-e", "no devices allocated by gpu.hybridlet.io"),
        ("uid-f", "not this node's pool node-a"),
        ("uid-g", "no device gpu-9 on this node"),
    ];
    for (uid, needle) in expect {
        assert!(
            resp.claims[uid].error.contains(needle),
            "{uid}: {:?}",
            resp.claims[uid].error
        );
        assert!(resp.claims[uid].devices.is_empty());
        assert!(!spec_path(&rig.cdi(), uid).exists());
    }

    // The CDI spec and the checkpoint.
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(spec_path(&rig.cdi(), "uid-a")).unwrap())
            .unwrap();
    // As the CDI specification's rules judge it (hybridlet_fixtures::cdi).
    hybridlet_fixtures::cdi::validate(&spec).unwrap();
    assert_eq!(
        spec["cdiVersion"],
        hybridlet_fixtures::cdi::minimum_version(&spec).unwrap()
    );
    assert_eq!(spec["kind"], "gpu.hybridlet.io/claim");
    assert_eq!(spec["devices"][0]["name"], "uid-a-gpu-0");
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/nvidia0"
    );
    assert_eq!(
        spec["devices"][0]["containerEdits"]["env"][0],
        "NVIDIA_VISIBLE_DEVICES=GPU-uuid-0"
    );
    let cp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rig.checkpoint()).unwrap()).unwrap();
    assert_eq!(cp["version"], 2);
    assert_eq!(cp["bootId"], "boot-1");
    assert_eq!(cp["claims"]["uid-a"]["devices"][0]["device"], "gpu-0");
    assert_eq!(cp["claims"].as_object().unwrap().len(), 1);

    // Idempotent, and the spec comes back if it vanished.
    std::fs::remove_file(spec_path(&rig.cdi(), "uid-a")).unwrap();
    let again = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1claim("a", "uid-a")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.claims["uid-a"], *a);
    assert!(spec_path(&rig.cdi(), "uid-a").exists());

    // The v1beta1 service serves the same driver.
    let mut beta = v1beta1::dra_plugin_client::DraPluginClient::new(connect(&sock).await.unwrap());
    let b = beta
        .node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1::Claim {
                namespace: "ml".into(),
                name: "a".into(),
                uid: "uid-a".into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.claims["uid-a"].devices[0].cdi_device_ids,
        ["gpu.hybridlet.io/claim=uid-a-gpu-0"]
    );

    // Unprepare: known and unknown both succeed; spec and checkpoint entry are gone.
    let un = client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![v1claim("a", "uid-a"), v1claim("z", "uid-z")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(un.claims.len(), 2);
    assert!(un.claims.values().all(|r| r.error.is_empty()));
    assert!(!spec_path(&rig.cdi(), "uid-a").exists());
    assert!(driver.prepared().await.is_empty());
    // gpu-0 is free again.
    let d = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1claim("d", "uid-d")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.claims["uid-d"].error, "");
    stop.cancel();
}

#[tokio::test]
async fn restart_after_reboot_rebuilds_cdi_specs() {
    let rig = Rig::new();
    rig.claims
        .put(claim("a", "uid-a", &[("gpu", DRIVER, "node-a", "gpu-2")]));
    let driver = rig.open("boot-1");
    driver.prepare("ml", "a", "uid-a").await.unwrap();
    drop(driver);
    // Reboot: /run is empty, the checkpoint in the state directory survives.
    std::fs::remove_dir_all(rig.cdi()).unwrap();
    let driver = rig.open("boot-2");
    assert!(
        spec_path(&rig.cdi(), "uid-a").exists(),
        "CDI spec not rebuilt"
    );
    let cp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rig.checkpoint()).unwrap()).unwrap();
    assert_eq!(cp["bootId"], "boot-2");
    // The kubelet forgets prepared claims when it restarts and asks again: same answer,
    // even with the API server gone.
    rig.claims.set_unavailable(true);
    let devices = driver.prepare("ml", "a", "uid-a").await.unwrap();
    assert_eq!(
        devices[0].cdi_device_ids,
        ["gpu.hybridlet.io/claim=uid-a-gpu-2"]
    );
    // A new claim during the outage fails with a retryable error.
    let err = driver.prepare("ml", "b", "uid-b").await.unwrap_err();
    assert!(err.to_string().contains("retryable"), "{err}");
}

#[tokio::test]
async fn corrupt_checkpoint_is_moved_aside() {
    let rig = Rig::new();
    std::fs::create_dir_all(rig.checkpoint().parent().unwrap()).unwrap();
    std::fs::write(rig.checkpoint(), "{ not json").unwrap();
    let driver = rig.open("boot-1");
    assert!(driver.prepared().await.is_empty());
    let aside: Vec<_> = std::fs::read_dir(rig.checkpoint().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // Unknown fields (of the same version) are tolerated.
    std::fs::write(rig.checkpoint(), r#"{"version":2,"bootId":"boot-1","future":true,"claims":{"u":{"namespace":"n","name":"c","devices":[{"pool":"node-a","device":"gpu-1","cdiDeviceIds":["x"],"extra":1}]}}}"#).unwrap();
    let driver = rig.open("boot-1");
    assert_eq!(driver.prepared().await["u"].devices[0].device, "gpu-1");
}

/// A backend whose devices need host changes (like SR-IOV VFs moved to vfio-pci).
#[derive(Debug, Default)]
struct Vfs {
    log: std::sync::Mutex<Vec<String>>,
    fail_release: std::sync::atomic::AtomicBool,
}

impl DeviceBackend for Vfs {
    fn driver_name(&self) -> &str {
        "sriov.hybridlet.io"
    }
    fn pool_name(&self) -> &str {
        "node-a"
    }
    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError> {
        if device == "vf-missing" {
            return Err(DeviceError::Host(format!("{device} is not on this node")));
        }
        Ok(ContainerEdits {
            env: vec![format!("PCIDEVICE={device}")],
            device_nodes: vec!["/dev/vfio/vfio".into()],
        })
    }
    fn attach(&self, device: &str, _config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        self.log.lock().unwrap().push(format!("attach {device}"));
        if device == "vf-bad" {
            return Err(DeviceError::Host("the kernel refused vfio-pci".into()));
        }
        Ok(())
    }
    fn release(
        &self,
        device: &str,
        original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        self.log.lock().unwrap().push(match original {
            Some(o) => format!("release {device} original={o}"),
            None => format!("release {device} original=none"),
        });
        if self.fail_release.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DeviceError::Host("device busy".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn attach_is_all_or_nothing_and_release_failures_keep_the_claim() {
    let dir = tempfile::tempdir().unwrap();
    let claims = Arc::new(FakeClaims::default());
    let backend = Arc::new(Vfs::default());
    let d = "sriov.hybridlet.io";
    claims.put(claim(
        "mixed",
        "uid-mixed",
        &[("a", d, "node-a", "vf-0"), ("b", d, "node-a", "vf-bad")],
    ));
    claims.put(claim("good", "uid-good", &[("a", d, "node-a", "vf-0")]));
    let driver = Driver::open(
        backend.clone(),
        claims,
        &dir.path().join("dra.json"),
        &dir.path().join("cdi"),
        "boot-1",
    )
    .unwrap();

    let err = driver
        .prepare("ml", "mixed", "uid-mixed")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("vf-bad") && err.to_string().contains("refused"),
        "{err}"
    );
    assert_eq!(
        backend.log.lock().unwrap().clone(),
        ["attach vf-0", "attach vf-bad", "release vf-0 original=none"],
        "a failed prepare must release what it attached"
    );
    assert!(driver.prepared().await.is_empty());

    driver.prepare("ml", "good", "uid-good").await.unwrap();
    driver.prepare("ml", "good", "uid-good").await.unwrap();
    let log = backend.log.lock().unwrap().clone();
    assert_eq!(
        log[3..],
        ["attach vf-0", "attach vf-0"],
        "a repeated prepare re-attaches (idempotent)"
    );

    backend
        .fail_release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = driver.unprepare("uid-good").await.unwrap_err();
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(
        driver.prepared().await.contains_key("uid-good"),
        "claim forgotten before its release"
    );
    backend
        .fail_release
        .store(false, std::sync::atomic::Ordering::SeqCst);
    driver.unprepare("uid-good").await.unwrap();
    assert!(driver.prepared().await.is_empty());
    assert_eq!(
        backend.log.lock().unwrap().last().unwrap(),
        "release vf-0 original=none"
    );
}

/// A backend whose attach waits until `parties` attaches are in flight at once: it only
/// finishes when claims really prepare in parallel (a driver-wide lock would time out).
#[derive(Debug)]
struct Rendezvous {
    parties: usize,
    arrived: std::sync::Mutex<usize>,
    all_here: std::sync::Condvar,
    attaches: std::sync::atomic::AtomicUsize,
}

impl DeviceBackend for Rendezvous {
    fn driver_name(&self) -> &str {
        DRIVER
    }
    fn pool_name(&self) -> &str {
        "node-a"
    }
    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError> {
        Ok(ContainerEdits {
            env: vec![format!("DEV={device}")],
            device_nodes: Vec::new(),
        })
    }
    fn attach(
        &self,
        _device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        self.attaches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut n = self.arrived.lock().unwrap();
        *n += 1;
        self.all_here.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *n < self.parties {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(DeviceError::Host(format!(
                    "only {} of {} attaches ran at once",
                    *n, self.parties
                )));
            }
            n = self.all_here.wait_timeout(n, left).unwrap().0;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_on_different_devices_prepare_in_parallel_and_a_shared_device_is_refused() {
    let rig = Rig::new();
    std::fs::create_dir_all(rig.dir.path().join("state")).unwrap();
    let backend = Arc::new(Rendezvous {
        parties: 4,
        arrived: std::sync::Mutex::new(0),
        all_here: std::sync::Condvar::new(),
        attaches: std::sync::atomic::AtomicUsize::new(0),
    });
    let driver = Arc::new(
        Driver::open(
            backend.clone(),
            rig.claims.clone(),
            &rig.checkpoint(),
            &rig.cdi(),
            "boot-1",
        )
        .unwrap(),
    );
    for i in 0..4 {
        rig.claims.put(claim(
            &format!("c{i}"),
            &format!("uid-{i}"),
            &[("gpu", DRIVER, "node-a", &format!("gpu-{i}"))],
        ));
    }
    let mut tasks = Vec::new();
    for i in 0..4 {
        let d = driver.clone();
        tasks.push(tokio::spawn(async move {
            d.prepare("ml", &format!("c{i}"), &format!("uid-{i}")).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Group commit or not, the checkpoint on disk has all four.
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rig.checkpoint()).unwrap()).unwrap();
    assert_eq!(on_disk["claims"].as_object().unwrap().len(), 4);

    // Another claim for a device that is taken: refused at once, naming the holder.
    rig.claims.put(claim(
        "thief",
        "uid-thief",
        &[("gpu", DRIVER, "node-a", "gpu-2")],
    ));
    let err = driver
        .prepare("ml", "thief", "uid-thief")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("gpu-2 is already prepared for claim uid-2"),
        "{err}"
    );

    // The same claim prepared twice at once (a kubelet retry): one prepare, same answer.
    driver.unprepare("uid-0").await.unwrap();
    let before = backend.attaches.load(std::sync::atomic::Ordering::SeqCst);
    // Three more parties arrive by themselves below; the rendezvous needs none now.
    *backend.arrived.lock().unwrap() = 4;
    let (a, b) = tokio::join!(
        driver.prepare("ml", "c0", "uid-0"),
        driver.prepare("ml", "c0", "uid-0")
    );
    assert_eq!(a.unwrap(), b.unwrap());
    // The second call found it prepared and only re-checked the host state (one attach
    // each, no second set-up).
    assert_eq!(
        backend.attaches.load(std::sync::atomic::Ordering::SeqCst) - before,
        2
    );
    assert_eq!(driver.prepared().await.len(), 4);
}

/// A backend that changes the host (like SR-IOV): attach records the device and, while
/// `hold` is set, blocks — a prepare caught there by a crash.
#[derive(Debug, Default)]
struct HostChanging {
    hold: std::sync::Mutex<bool>,
    moved: std::sync::Condvar,
    attached: std::sync::Mutex<Vec<String>>,
    released: std::sync::Mutex<Vec<String>>,
}

impl DeviceBackend for HostChanging {
    fn driver_name(&self) -> &str {
        DRIVER
    }
    fn pool_name(&self) -> &str {
        "node-a"
    }
    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError> {
        Ok(ContainerEdits {
            env: vec![format!("DEV={device}")],
            device_nodes: Vec::new(),
        })
    }
    fn changes_host(&self) -> bool {
        true
    }
    fn attach(&self, device: &str, _config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        self.attached.lock().unwrap().push(device.to_string());
        let mut hold = self.hold.lock().unwrap();
        while *hold {
            hold = self.moved.wait(hold).unwrap();
        }
        Ok(())
    }
    fn release(
        &self,
        device: &str,
        _original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        self.released.lock().unwrap().push(device.to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_changing_the_host_is_undone_at_the_next_start() {
    let rig = Rig::new();
    std::fs::create_dir_all(rig.dir.path().join("state")).unwrap();
    rig.claims
        .put(claim("vf", "uid-vf", &[("vf", DRIVER, "node-a", "vf-1")]));
    let open = |backend: Arc<HostChanging>| {
        Driver::open(
            backend,
            rig.claims.clone(),
            &rig.checkpoint(),
            &rig.cdi(),
            "boot-1",
        )
        .unwrap()
    };

    // A normal prepare leaves no intent behind.
    let backend = Arc::new(HostChanging::default());
    let driver = open(backend.clone());
    driver.prepare("ml", "vf", "uid-vf").await.unwrap();
    let disk = std::fs::read_to_string(rig.checkpoint()).unwrap();
    assert!(!disk.contains("attaching"), "{disk}");
    driver.unprepare("uid-vf").await.unwrap();
    drop(driver);

    // The process dies while the VF is being moved: the intent is on disk.
    let stuck = Arc::new(HostChanging::default());
    *stuck.hold.lock().unwrap() = true;
    let driver = Arc::new(open(stuck.clone()));
    let in_flight = tokio::spawn({
        let driver = driver.clone();
        async move { driver.prepare("ml", "vf", "uid-vf").await }
    });
    // Wait (no deadline to beat, only a bound) until attach has started and holds.
    let bound = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stuck.attached.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < bound, "attach never started");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the prepare should still be inside attach"
    );
    assert_eq!(*stuck.attached.lock().unwrap(), ["vf-1"]);
    // The crash: the call is gone while the host change is half done.
    in_flight.abort();
    let disk = std::fs::read_to_string(rig.checkpoint()).unwrap();
    assert!(
        disk.contains("\"attaching\"") && disk.contains("vf-1"),
        "{disk}"
    );

    // The next start gives the VF back and forgets the intent; nothing is prepared.
    let fresh = Arc::new(HostChanging::default());
    let restarted = open(fresh.clone());
    assert_eq!(*fresh.released.lock().unwrap(), ["vf-1"]);
    assert!(restarted.prepared().await.is_empty());
    let disk = std::fs::read_to_string(rig.checkpoint()).unwrap();
    assert!(!disk.contains("attaching"), "{disk}");
    assert!(
        std::fs::read_dir(rig.cdi()).unwrap().next().is_none(),
        "a CDI spec was left"
    );

    // Let the stuck thread finish.
    *stuck.hold.lock().unwrap() = false;
    stuck.moved.notify_all();
}

/// A checkpoint written by a newer hybridlet is refused by name and left byte for byte as
/// it was (a downgrade must not lose the claims it records); an older one is migrated.
#[tokio::test]
async fn checkpoint_versions_newer_refused_and_kept_older_migrated() {
    let rig = Rig::new();
    std::fs::create_dir_all(rig.checkpoint().parent().unwrap()).unwrap();
    let newer = r#"{"version":3,"bootId":"boot-1","claims":{"u":{"namespace":"n","name":"c","devices":[]}},"somethingNew":{}}"#;
    std::fs::write(rig.checkpoint(), newer).unwrap();
    let err = Driver::open(
        Arc::new(Vfs::default()),
        rig.claims.clone(),
        &rig.checkpoint(),
        &rig.cdi(),
        "boot-1",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "written by a newer hybridlet (checkpoint version 3; this one reads up to 2)"
        ),
        "{text}"
    );
    assert!(
        text.contains(&rig.checkpoint().display().to_string()),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(rig.checkpoint()).unwrap(), newer);

    // Version 1: `attaching` held bare device names. Migrated: the interrupted prepare is
    // undone (no original known: the backend's fallback), the claim kept, version 2 written.
    let older = r#"{"version":1,"bootId":"boot-1","claims":{"u":{"namespace":"n","name":"c","devices":[{"pool":"node-a","device":"vf-1","cdiDeviceIds":["x"]}]}},"attaching":{"uid-x":["vf-2"]}}"#;
    std::fs::write(rig.checkpoint(), older).unwrap();
    let backend = Arc::new(Vfs::default());
    let driver = Driver::open(
        backend.clone(),
        rig.claims.clone(),
        &rig.checkpoint(),
        &rig.cdi(),
        "boot-1",
    )
    .unwrap();
    assert_eq!(*backend.log.lock().unwrap(), ["release vf-2 original=none"]);
    assert_eq!(driver.prepared().await["u"].devices[0].device, "vf-1");
    let cp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rig.checkpoint()).unwrap()).unwrap();
    assert_eq!(cp["version"], 2);
    assert!(cp.get("attaching").is_none(), "{cp}");
}

/// A claim naming a device this node does not have fails before any intent is recorded,
/// and a prepare that fails after recording one leaves none on disk.
#[tokio::test]
async fn a_failed_prepare_leaves_no_intent_behind() {
    let rig = Rig::new();
    std::fs::create_dir_all(rig.checkpoint().parent().unwrap()).unwrap();
    rig.claims.put(claim(
        "gone",
        "uid-gone",
        &[("vf", "sriov.hybridlet.io", "node-a", "vf-missing")],
    ));
    rig.claims.put(claim(
        "bad",
        "uid-bad",
        &[("vf", "sriov.hybridlet.io", "node-a", "vf-bad")],
    ));
    let backend = Arc::new(Vfs::default());
    let driver = Driver::open(
        backend.clone(),
        rig.claims.clone(),
        &rig.checkpoint(),
        &rig.cdi(),
        "boot-1",
    )
    .unwrap();
    let err = driver.prepare("ml", "gone", "uid-gone").await.unwrap_err();
    assert!(
        err.to_string().contains("vf-missing") && err.to_string().contains("not on this node"),
        "{err}"
    );
    assert!(
        !backend
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("attach")),
        "attached a device that is not there"
    );
    let err = driver.prepare("ml", "bad", "uid-bad").await.unwrap_err();
    assert!(
        err.to_string().contains("the kernel refused vfio-pci"),
        "{err}"
    );
    let disk = std::fs::read_to_string(rig.checkpoint()).unwrap();
    assert!(!disk.contains("attaching"), "{disk}");
    // And a restart releases nothing: there is nothing left to undo.
    drop(driver);
    let fresh = Arc::new(Vfs::default());
    Driver::open(
        fresh.clone(),
        rig.claims.clone(),
        &rig.checkpoint(),
        &rig.cdi(),
        "boot-1",
    )
    .unwrap();
    assert!(
        fresh.log.lock().unwrap().is_empty(),
        "{:?}",
        fresh.log.lock().unwrap()
    );
}

/// Claims prepared for ResourceClaims that are gone (NVIDIA's driver keeps them forever:
/// dra-driver-nvidia-gpu#1278): released after the grace period once none of their pods is
/// left on the node, never while the API server does not answer, and a name reused by a
/// new claim (another UID) counts as gone.
#[tokio::test]
async fn prepared_claims_whose_resourceclaim_is_gone_are_released() {
    use hybridlet_dra::NodePod;
    use std::time::Duration;
    let rig = Rig::new();
    std::fs::create_dir_all(rig.checkpoint().parent().unwrap()).unwrap();
    let mut a = claim("a", "uid-a", &[("gpu", DRIVER, "node-a", "gpu-0")]);
    a.pods = vec!["train-0".into()];
    rig.claims.put(a);
    rig.claims
        .put(claim("b", "uid-b", &[("gpu", DRIVER, "node-a", "gpu-1")]));
    rig.claims
        .put(claim("c", "uid-c", &[("gpu", DRIVER, "node-a", "gpu-2")]));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = hybridlet_dra::DraMetrics::register(&mut registry);
    let driver = Driver::open(
        Arc::new(Gpus),
        rig.claims.clone(),
        &rig.checkpoint(),
        &rig.cdi(),
        "boot-1",
    )
    .unwrap()
    .with_metrics(metrics.for_driver(DRIVER));
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b"), ("c", "uid-c")] {
        driver.prepare("ml", name, uid).await.unwrap();
    }
    let long = Duration::from_secs(3600);

    // All there: nothing to do.
    assert_eq!(driver.reconcile(Duration::ZERO).await, Default::default());
    // a is force-deleted while its pod still runs here; b's name is reused by a new claim.
    rig.claims.remove("ml", "a");
    rig.claims
        .put(claim("b", "uid-b2", &[("gpu", DRIVER, "node-a", "gpu-5")]));
    rig.claims.set_pods(
        "ml",
        vec![NodePod {
            name: "train-0".into(),
            claims: vec!["a".into()],
            finished: false,
        }],
    );
    // Within the grace period: both wait.
    let r = driver.reconcile(long).await;
    assert_eq!(
        (r.released.len(), r.waiting.len(), r.skipped),
        (0, 2, false),
        "{r:?}"
    );
    // The API server is down: nothing is decided, whatever the grace.
    rig.claims.set_unavailable(true);
    let r = driver.reconcile(Duration::ZERO).await;
    assert!(r.skipped && r.released.is_empty(), "{r:?}");
    rig.claims.set_unavailable(false);
    // Past the grace: b (its name now another claim's) is released; a waits for its pod.
    let r = driver.reconcile(Duration::ZERO).await;
    assert_eq!(r.released, ["uid-b"]);
    assert_eq!(r.waiting, ["uid-a"]);
    // The pod finished: a goes too, and its device can serve a new claim.
    rig.claims.set_pods(
        "ml",
        vec![NodePod {
            name: "train-0".into(),
            claims: vec!["a".into()],
            finished: true,
        }],
    );
    let r = driver.reconcile(Duration::ZERO).await;
    assert_eq!(r.released, ["uid-a"]);
    let prepared = driver.prepared().await;
    assert_eq!(prepared.keys().collect::<Vec<_>>(), ["uid-c"]);
    assert!(!spec_path(&rig.cdi(), "uid-a").exists());
    rig.claims
        .put(claim("d", "uid-d", &[("gpu", DRIVER, "node-a", "gpu-0")]));
    driver.prepare("ml", "d", "uid-d").await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "dra_orphaned_claims_released_total{{driver=\"{DRIVER}\"}} 2"
        )),
        "{text}"
    );
}
