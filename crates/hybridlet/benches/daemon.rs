//! `cargo bench -p hybridlet --bench daemon`: the running agent as an operator's Prometheus
//! sees it, on a DGX-like tree (8 GPUs with telemetry through the fake NVML source, 8 PFs ×
//! 128 VFs = 1,024 VFs with their counters) with the CSI plugin and the GPU and SR-IOV DRA
//! drivers serving:
//!
//! 1. `/metrics` scrape latency over loopback HTTP (a fresh connection per scrape, as
//!    Prometheus does after an idle interval): p50, p99, max of 1,000 scrapes;
//! 2. the idle daemon: resident memory (VmRSS, VmHWM) and CPU (utime + stime from
//!    /proc/<pid>/stat) over `HYBRIDLET_BENCH_IDLE_SECONDS` (default 60) with the default
//!    60 s device sample interval;
//! 3. as root: a VF count change to the SR-IOV slice — the first PF's VFs go from 128 to
//!    64 and back (the fixtures' kernel stand-in changes the tree) and the real kernel sends
//!    a device uevent (`change` written to `lo`'s uevent file); the time until the slices
//!    hold the new count, 10 changes.
//!
//! CSI volumes add no series (`hybridlet_csi_volumes{protocol,state}` counts them), so the
//! scrape does not grow with them. Results in docs/benchmarks.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One scrape as Prometheus sends it (its default Accept header: OpenMetrics).
fn scrape(addr: &str) -> usize {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut body = Vec::new();
    s.read_to_end(&mut body).expect("response");
    assert!(body.starts_with(b"HTTP/1.1 200"), "scrape failed");
    body.len()
}

/// A plain HTTP/1.1 request to the fake API server; the body of the answer.
fn http(url: &str, method: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect to the fake API server");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn slice_names(url: &str) -> Vec<String> {
    let body = http(url, "GET", "/apis/resource.k8s.io/v1/resourceslices");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may contain spaces): utime is the 14th field
    // overall, stime the 15th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field")
}

fn main() {
    let root = tempfile::tempdir().expect("tempdir");
    // The agent names the node after the host (no NodeConfig here).
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    // HYBRIDLET_BENCH_VFS_PER_PF (default 128) sizes the SR-IOV side.
    let vfs_per_pf: u32 = std::env::var("HYBRIDLET_BENCH_VFS_PER_PF")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    hybridlet_fixtures::dgx_h200(root.path(), vfs_per_pf).expect("fixture");
    // The fake API server lives on its own runtime thread for the whole run.
    let node_for_api = node.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let api = hybridlet_fixtures::apiserver::FakeApiServer::start()
                .await
                .expect("fake API server");
            api.put(
                &format!("/api/v1/nodes/{node_for_api}"),
                serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_for_api, "uid": "u"}}),
            );
            let _ = tx.send((api.url(), api.clone()));
            std::future::pending::<()>().await;
        });
    });
    let (url, api) = rx.recv().expect("fake API server URL");
    let kubelet = root.path().join("var/lib/kubelet");
    std::fs::create_dir_all(&kubelet).expect("kubelet dir");
    std::fs::write(
        kubelet.join("kubeconfig"),
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\ncurrent-context: k\nusers:\n- name: u\n  user:\n    token: t\n"),
    )
    .expect("kubeconfig");
    let etc = root.path().join("etc/hybridlet");
    std::fs::create_dir_all(&etc).expect("etc");
    let config = etc.join("config.yaml");
    // HYBRIDLET_BENCH_DRA=0 leaves the DRA drivers off, to tell their share apart.
    let dra = std::env::var("HYBRIDLET_BENCH_DRA").map_or(true, |v| v != "0");
    std::fs::write(
        &config,
        format!(
            "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  admin:\n    listenAddress: 127.0.0.1:19474\n  csi:\n    nfs:\n      enabled: true\n  dra:\n    gpu:\n      enabled: {dra}\n    sriov:\n      enabled: {dra}\n"
        ),
    )
    .expect("config");
    let fixture = root.path().join("fake-nvml.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--root")
        .arg(root.path())
        .args(["--log-level", "warn", "run", "--nvml-fixture"])
        .arg(&fixture)
        .env_remove("NOTIFY_SOCKET")
        // BENCH_CHILD_ENV=K=V[,K=V...]: the daemon's environment (MALLOC_ARENA_MAX=2, ...).
        .envs(
            std::env::var("BENCH_CHILD_ENV")
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hybridlet");
    let pid = child.id();
    let addr = "127.0.0.1:19474";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
            let mut r = Vec::new();
            let _ = s.read_to_end(&mut r);
            if r.starts_with(b"HTTP/1.1 200") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        #[allow(clippy::disallowed_methods)] // a benchmark driver, no runtime here
        std::thread::sleep(Duration::from_millis(100));
    }
    if dra {
        // The first publication of both pools: API requests used.
        let deadline = Instant::now() + Duration::from_secs(30);
        while slice_names(&url).len() < 1 + (8 * vfs_per_pf as usize).div_ceil(128) {
            assert!(Instant::now() < deadline, "slices not published");
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
        let requests = api.requests();
        let writes = requests
            .iter()
            .filter(|r| r.contains("resourceslices") && !r.starts_with("GET"))
            .count();
        let node_reads = requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/nodes/"))
            .count();
        println!(
            "first publication of 8 GPUs + {} VFs (two pools): {writes} slice writes, {node_reads} Node reads (plus one slice list per pool)",
            8 * vfs_per_pf
        );
    }
    let bytes = scrape(addr);
    let mut lat = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        scrape(addr);
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "scrape /metrics ({bytes} bytes, 8 GPUs, {} VFs): p50 {:?}, p99 {:?}, max {:?}",
        8 * vfs_per_pf,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );

    if dra {
        // Slice deletion (as the kubelet does on restart) to republished, through the watch.
        let mut gaps = Vec::new();
        for _ in 0..20 {
            let names = slice_names(&url);
            let Some(victim) = names.iter().find(|n| n.contains("gpu")).cloned() else {
                break;
            };
            let t = Instant::now();
            http(
                &url,
                "DELETE",
                &format!("/apis/resource.k8s.io/v1/resourceslices/{victim}"),
            );
            while !slice_names(&url).contains(&victim) {
                assert!(t.elapsed() < Duration::from_secs(30), "not republished");
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(2));
            }
            gaps.push(t.elapsed());
        }
        gaps.sort();
        if !gaps.is_empty() {
            println!(
                "slice deleted to republished ({} times): p50 {:?}, max {:?}",
                gaps.len(),
                pct(&gaps, 0.5),
                gaps[gaps.len() - 1]
            );
        }
    }

    let idle: u64 = std::env::var("HYBRIDLET_BENCH_IDLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // Let the scrapes' allocations settle, then watch it idle.
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(Duration::from_secs(2));
    let (t0, c0) = (Instant::now(), ticks(pid));
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(Duration::from_secs(idle));
    let (elapsed, used) = (t0.elapsed(), ticks(pid) - c0);
    // USER_HZ is 100 on Linux.
    let cpu = used as f64 / 100.0 / elapsed.as_secs_f64() * 100.0;
    println!(
        "{}idle {}s: CPU {cpu:.3}% of a core ({used} ticks), VmRSS {} KiB, VmHWM {} KiB",
        if dra { "" } else { "(DRA drivers off) " },
        elapsed.as_secs(),
        status_kib(pid, "VmRSS:"),
        status_kib(pid, "VmHWM:")
    );
    if dra && vfs_per_pf > 1 && std::fs::write("/sys/class/net/lo/uevent", "change").is_ok() {
        vf_change_to_slice(root.path(), &url, vfs_per_pf);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
}

/// VF devices in the published slices.
fn vf_devices(url: &str) -> usize {
    let body = http(url, "GET", "/apis/resource.k8s.io/v1/resourceslices");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["items"].as_array().map_or(0, |items| {
        items
            .iter()
            .flat_map(|i| i["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .filter(|d| d["name"].as_str().is_some_and(|n| n.starts_with("vf-")))
            .count()
    })
}

/// The first PF's VFs halved and restored, 10 times: from the uevent to the slices.
fn vf_change_to_slice(root: &std::path::Path, url: &str, vfs_per_pf: u32) {
    let kernel = hybridlet_fixtures::kernel::KernelStandIn::new(root);
    let pf = std::fs::read_dir(root.join("sys/bus/pci/devices"))
        .expect("devices")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("sriov_numvfs"))
                .is_ok_and(|n| n.trim() == vfs_per_pf.to_string())
        })
        .min()
        .expect("a PF with VFs");
    let total = 8 * vfs_per_pf as usize;
    let mut took = Vec::new();
    for round in 0..10 {
        let n = if round % 2 == 0 {
            vfs_per_pf / 2
        } else {
            vfs_per_pf
        };
        let want = total - vfs_per_pf as usize + n as usize;
        (kernel.writer())(&pf.join("sriov_numvfs"), "0").expect("sriov_numvfs 0");
        (kernel.writer())(&pf.join("sriov_numvfs"), &n.to_string()).expect("sriov_numvfs");
        let t = Instant::now();
        std::fs::write("/sys/class/net/lo/uevent", "change").expect("uevent");
        while vf_devices(url) != want {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the slices did not follow"
            );
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(5));
        }
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "VF count change to the slices (uevent, walk, driver restart, publish; {} changes): p50 {:?}, max {:?}",
        took.len(),
        pct(&took, 0.5),
        took[took.len() - 1]
    );
}
