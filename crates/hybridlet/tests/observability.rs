//! A live scrape of `hybridlet run` on the DGX fixture (fake NVML, SR-IOV, CSI on): device
//! metrics carry the join labels, every exported metric is documented, and every metric
//! the shipped alert rules use is really exported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("hybridlet_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

fn documented() -> BTreeSet<String> {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md"),
    )
    .unwrap();
    docs.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("hybridlet_"))
        .map(str::to_string)
        .collect()
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_scrape_matches_docs_and_alerts() {
    let root = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(root.path(), 2).unwrap();
    // Both DRA drivers on, publishing to a fake API server, so their families show too.
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    let api = hybridlet_fixtures::apiserver::FakeApiServer::start()
        .await
        .unwrap();
    api.put(
        &format!("/api/v1/nodes/{node}"),
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "uid": "u"}}),
    );
    let kubelet = root.path().join("var/lib/kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    std::fs::write(
        kubelet.join("kubeconfig"),
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\ncurrent-context: k\nusers:\n- name: u\n  user:\n    token: t\n", api.url()),
    )
    .unwrap();
    let etc = root.path().join("etc/hybridlet");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("config.yaml"),
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  admin:\n    listenAddress: 127.0.0.1:0\n  shutdownGracePeriod: 5s\n  csi:\n    nfs:\n      enabled: true\n  dra:\n    gpu:\n      enabled: true\n    sriov:\n      enabled: true\n",
    )
    .unwrap();
    let fixture = root.path().join("fake-nvml.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .args([
            "--root",
            root.path().to_str().unwrap(),
            "--log-format",
            "json",
            "run",
        ])
        .args([
            "--nvml-fixture",
            fixture.to_str().unwrap(),
            "--device-sample-interval",
            "1s",
        ])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("admin server listening"))
        {
            addr = v["address"].as_str().map(str::to_string);
        }
        if v["message"] == "ready" {
            break;
        }
    }
    let addr = addr.expect("admin address");
    // Keep draining the log so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let needles = [
        "hybridlet_gpu_info{gpu=\"3\",UUID=\"GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003\",pci_bus_id=\"00000000:63:00.0\",modelName=\"NVIDIA H200\",driver_version=\"570.86.15\",numa_node=\"0\",pcie_root=\"pci0000:60\",pcie_switch=\"0000:61:00.0\"} 1",
        "hybridlet_gpu_memory_total_bytes{gpu=\"0\",UUID=\"GPU-5a0b0000-1c2d-4e5f-8a9b-0000dead0000\"} 150754820096",
        "hybridlet_sriov_vfs{pf=\"0000:64:00.0\",netdev=\"enp100s0np0\"} 2",
        "hybridlet_sriov_vfs_capacity{pf=\"0000:0e:00.0\",netdev=\"enp14s0np0\"} 16",
        "hybridlet_sriov_pf_link_speed_bytes_per_second{pf=\"0000:64:00.0\",netdev=\"enp100s0np0\"} 50000000000",
        "hybridlet_subsystem_ready{subsystem=\"csi\"} 1",
        "hybridlet_dra_prepared_claims{driver=\"gpu.hybridlet.io\"} 0",
        "hybridlet_apiserver_requests_total{verb=\"get\",code=\"200\"}",
        // Set by each driver's first publication, which runs just after "ready".
        "hybridlet_dra_slices_published_timestamp_seconds{driver=\"gpu.hybridlet.io\"}",
        "hybridlet_dra_slices_published_timestamp_seconds{driver=\"sriov.hybridlet.io\"}",
        "hybridlet_dra_unhealthy_devices{driver=\"sriov.hybridlet.io\"} 0",
        "hybridlet_sriov_vfs_allocated{pf=\"0000:64:00.0\",netdev=\"enp100s0np0\"} 0",
        "hybridlet_sriov_vf_receive_bytes_total{pf=\"0000:64:00.0\",vf=\"0000:64:00.2\",netdev=\"enp100s0v0\"} 797002391",
        "hybridlet_sriov_vf_transmit_bytes_total{pf=\"0000:64:00.0\",vf=\"0000:64:00.3\",netdev=\"enp100s0v1\"} 1596002394",
        "hybridlet_sriov_vf_receive_drop_total{pf=\"0000:64:00.0\",vf=\"0000:64:00.2\",netdev=\"enp100s0v0\"} 6",
        "hybridlet_gpu_xid_errors_total{gpu=\"5\",UUID=\"GPU-5a0b0005-1c2d-4e5f-8a9b-0000dead0005\",pci_bus_id=\"00000000:C2:00.0\",modelName=\"NVIDIA H200\"} 1",
        "hybridlet_gpu_xid_errors_total{gpu=\"0\",UUID=\"GPU-5a0b0000-1c2d-4e5f-8a9b-0000dead0000\",pci_bus_id=\"00000000:18:00.0\",modelName=\"NVIDIA H200\"} 0",
        "hybridlet_gpu_last_xid{gpu=\"5\",UUID=\"GPU-5a0b0005-1c2d-4e5f-8a9b-0000dead0005\",pci_bus_id=\"00000000:C2:00.0\",modelName=\"NVIDIA H200\"} 31",
        "hybridlet_gpu_xid_watched{gpu=\"5\",",
        "hybridlet_subsystem_ready{subsystem=\"devices\"} 1",
    ];
    // Some series appear with the first publication, just after "ready": scrape until
    // they are there (or 10 s pass, and the assertion below names what is missing).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = scrape(&addr);
    while !needles.iter().all(|n| body.contains(n)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        body = scrape(&addr);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    for needle in needles {
        assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
    }

    let docs = documented();
    // Exported families from their TYPE lines (counters are sampled as NAME_total, info
    // metrics as NAME_info, which is how docs/metrics.md names them).
    let mut event_families = BTreeSet::new();
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("hybridlet_"))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_string(),
        })
        .collect();
    for name in &exported {
        assert!(
            docs.contains(name),
            "{name} is exported but not in docs/metrics.md"
        );
    }
    let doc_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md"),
    )
    .unwrap();
    for line in doc_text.lines() {
        if (line.contains("| counter |") || line.contains("| histogram |"))
            && let Some(name) = line.strip_prefix("| `").and_then(|l| l.split('`').next())
        {
            event_families.insert(name.to_string());
        }
    }
    for name in &docs {
        // Counter and histogram families appear after their first event.
        assert!(
            exported.contains(name) || event_families.contains(name),
            "{name} is documented but not exported:\n{body}"
        );
    }

    let alerts_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/alerts.yaml"),
    )
    .unwrap();
    let alerts: serde_json::Value = serde_saphyr::from_str(&alerts_text).unwrap();
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 8);
    for rule in rules {
        assert!(
            rule["alert"]
                .as_str()
                .is_some_and(|a| a.starts_with("Hybridlet")),
            "{rule}"
        );
        assert!(rule["labels"]["severity"].is_string(), "{rule}");
        let expr = rule["expr"].as_str().unwrap();
        for name in metric_names_in(expr) {
            assert!(
                docs.contains(&name),
                "alert {} uses {name}, which hybridlet does not export",
                rule["alert"]
            );
        }
    }

    // The Grafana dashboard: valid JSON, and every series it queries is one the agent
    // exports (histograms through their _bucket/_sum/_count series).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/hybridlet.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 12);
    let mut queried = 0;
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names_in(expr) {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|f| docs.contains(*f))
                    .unwrap_or(&name);
                assert!(
                    docs.contains(family),
                    "panel {:?} queries {name}, which hybridlet does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "the dashboard queries only {queried} series");
}
