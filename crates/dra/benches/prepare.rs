//! `cargo bench -p hybridlet-dra --bench prepare`: NodePrepareResources as the driver does
//! it for the kubelet — claim lookup (fake, in memory), conflict check, the CDI spec and the
//! checkpoint, each written atomically with fsync — for a claim with 8 GPUs (p50/p99 over
//! 200 prepare/unprepare cycles), and for 64 concurrent single-device claims (per-claim
//! p50/p99 and the batch), each against the floor: one fsync'ed checkpoint-sized write plus
//! one CDI-sized write. Plain timing loop; results in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridlet_dra::{
    AllocatedClaim, Allocation, ContainerEdits, DeviceBackend, Driver, FakeClaims,
};

#[derive(Debug)]
struct Gpus;

impl DeviceBackend for Gpus {
    fn driver_name(&self) -> &str {
        "gpu.hybridlet.io"
    }
    fn pool_name(&self) -> &str {
        "node-a"
    }
    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, hybridlet_dra::DeviceError> {
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={device}")],
            device_nodes: vec!["/dev/nvidia0".into(), "/dev/nvidiactl".into()],
        })
    }
}

fn claim(name: &str, uid: &str, devices: std::ops::Range<usize>) -> AllocatedClaim {
    AllocatedClaim {
        namespace: "ml".into(),
        name: name.into(),
        uid: uid.into(),
        allocations: devices
            .map(|d| Allocation {
                request: "gpu".into(),
                driver: "gpu.hybridlet.io".into(),
                pool: "node-a".into(),
                device: format!("gpu-{d}"),
            })
            .collect(),
        pods: Vec::new(),
        configs: Vec::new(),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            // The floor: what any crash-safe prepare must write.
            let mut floor = Vec::new();
            let checkpoint_bytes = vec![b'x'; 2048];
            let cdi_bytes = vec![b'y'; 1024];
            for i in 0..200 {
                let t = Instant::now();
                hybridlet_sys::atomic_write(&dir.path().join("floor.json"), &checkpoint_bytes, 0o600).unwrap();
                hybridlet_sys::atomic_write(&dir.path().join(format!("cdi-{}.json", i % 2)), &cdi_bytes, 0o644).unwrap();
                floor.push(t.elapsed());
            }
            floor.sort();

            let claims = Arc::new(FakeClaims::default());
            claims.put(claim("eight", "uid-eight", 0..8));
            for i in 0..64 {
                claims.put(claim(&format!("c{i}"), &format!("uid-{i}"), 100 + i..101 + i));
            }
            let driver = Arc::new(
                Driver::open(Arc::new(Gpus), claims, &dir.path().join("dra.json"), &dir.path().join("cdi"), "boot")
                    .unwrap(),
            );
            let mut eight = Vec::new();
            for _ in 0..200 {
                let t = Instant::now();
                driver.prepare("ml", "eight", "uid-eight").await.unwrap();
                eight.push(t.elapsed());
                driver.unprepare("uid-eight").await.unwrap();
            }
            eight.sort();

            // The concurrent floor: 64 tasks at once, each writing its own CDI-sized file and
            // a checkpoint-sized file with fsync, as 64 bare prepares would at the least.
            let mut floor64 = Vec::new();
            {
                let mut tasks = Vec::new();
                for i in 0..64 {
                    let (dir, c, y) = (dir.path().to_path_buf(), checkpoint_bytes.clone(), cdi_bytes.clone());
                    tasks.push(tokio::task::spawn_blocking(move || {
                        let t = Instant::now();
                        hybridlet_sys::atomic_write(&dir.join(format!("floor64-{i}.json")), &c, 0o600).unwrap();
                        hybridlet_sys::atomic_write(&dir.join(format!("cdi64-{i}.json")), &y, 0o644).unwrap();
                        t.elapsed()
                    }));
                }
                for task in tasks {
                    floor64.push(task.await.unwrap());
                }
            }
            floor64.sort();

            let t = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..64 {
                let d = driver.clone();
                tasks.push(tokio::spawn(async move {
                    let t = Instant::now();
                    d.prepare("ml", &format!("c{i}"), &format!("uid-{i}")).await.map(|_| t.elapsed())
                }));
            }
            let mut each = Vec::new();
            for task in tasks {
                each.push(task.await.unwrap().unwrap());
            }
            let batch = t.elapsed();
            each.sort();
            let (f50, f99) = (pct(&floor, 0.5), pct(&floor, 0.99));
            println!(
                "round {round}: floor p50 {f50:?} p99 {f99:?}; 8-GPU claim p50 {:?} p99 {:?} ({:.1}x floor p99); 64 concurrent single-device claims: each p50 {:?} p99 {:?}, batch {batch:?}; concurrent floor p50 {:?} p99 {:?} ({:.1}x its p99)",
                pct(&eight, 0.5),
                pct(&eight, 0.99),
                pct(&eight, 0.99).as_secs_f64() / f99.as_secs_f64(),
                pct(&each, 0.5),
                pct(&each, 0.99),
                pct(&floor64, 0.5),
                pct(&floor64, 0.99),
                pct(&each, 0.99).as_secs_f64() / pct(&floor64, 0.99).as_secs_f64(),
            );
        }
    });
}
