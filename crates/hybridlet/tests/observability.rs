//! A live scrape of `hybridlet run` on the DGX fixture (fake NVML, SR-IOV, CSI and both
//! DRA drivers on) after the events every family counts have been driven — a rejected
//! reload, a rejected registration, a refused request, CSI and DRA calls that fail and
//! succeed: every exported family is documented, every documented family is exported, and
//! every series each shipped alert rule selects (its name *and* label matchers) is in the
//! scrape. The abnormal-volume counter is driven in the root tier (it needs a mount).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, NODE, is_socket, wait_until};
use hybridlet_proto::csi::v1 as csi;
use hybridlet_proto::dra::v1;
use hybridlet_proto::pluginregistration::RegistrationStatus;
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;

/// A metric name and its `label="value"` matchers.
type Selector = (String, Vec<(String, String)>);

/// Metric selectors in a PromQL expression: name → its `label="value"` matchers (`=~`,
/// `!=` and `!~` matchers, as the dashboard's `instance=~"$node"`, are left out).
fn selectors_in(text: &str) -> Vec<Selector> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("hybridlet_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        i = end;
        if !boundary {
            continue;
        }
        let mut matchers = Vec::new();
        if text[end..].starts_with('{') {
            let close = end + text[end..].find('}').unwrap();
            for m in text[end + 1..close]
                .split(',')
                .filter(|m| !m.trim().is_empty())
            {
                let (k, v) = m.split_once('=').unwrap();
                if !k.ends_with('!') && !v.starts_with('~') {
                    matchers.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
                }
            }
            i = close;
        }
        out.push((text[start..end].to_string(), matchers));
    }
    out
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

/// Exported families from their TYPE lines, named as docs/metrics.md names them (counters
/// with `_total`, info metrics with `_info`).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("hybridlet_"))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_string(),
        })
        .collect()
}

/// Whether a series `name{...}` with every matcher is in the scrape.
fn has_series(scrape: &str, name: &str, matchers: &[(String, String)]) -> bool {
    scrape.lines().any(|l| {
        let Some(rest) = l.strip_prefix(name) else {
            return false;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return false;
        }
        matchers
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
    })
}

const CONFIG_EDIT: (&str, &str) = (
    "  dra:\n    gpu:\n      driverName: gpu.example.com\n",
    "  pluginRegistrationTimeout: 1s\n  csi:\n    nfs:\n      enabled: true\n  dra:\n    gpu:\n      enabled: true\n    sriov:\n      enabled: true\n    pci:\n      enabled: true\n      allow: [{vendor: \"0x144d\", deviceClass: nvme}]\n  images:\n    containerdSocket: /run/no-containerd-here.sock\n    prePull: [{image: \"harbor.example.com/ml/app:1\"}]\n",
);

async fn start() -> Daemon {
    Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 2).unwrap();
            // The NVMe drive the PCI driver publishes, with its link and AER counters.
            let nvme = root.join("sys/bus/pci/devices/0000:01:00.0");
            for (file, text) in [
                ("current_link_speed", "16.0 GT/s PCIe\n"),
                ("max_link_speed", "16.0 GT/s PCIe\n"),
                ("current_link_width", "4\n"),
                ("max_link_width", "4\n"),
                ("aer_dev_fatal", "TOTAL_ERR_FATAL 0\n"),
                ("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL 0\n"),
                ("aer_dev_correctable", "TOTAL_ERR_COR 0\n"),
            ] {
                std::fs::write(nvme.join(file), text).unwrap();
            }
        },
        |config| {
            let edited = config.replace(CONFIG_EDIT.0, CONFIG_EDIT.1);
            assert_ne!(edited, config, "the fixture configuration changed");
            edited
        },
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
                "--device-sample-interval".into(),
                "1s".into(),
            ]
        },
    )
    .await
}

fn sighup(d: &Daemon) {
    std::process::Command::new("kill")
        .args(["-HUP", &d.agent.child.id().to_string()])
        .status()
        .unwrap();
}

/// Scrape until every `(name, matchers)` and every line is present (10 s), then return
/// the scrape.
async fn scrape_until(d: &Daemon, wanted: &[Selector], lines: &[String]) -> String {
    let mut scrape = d.scrape().await;
    for _ in 0..100 {
        if wanted.iter().all(|(n, m)| has_series(&scrape, n, m))
            && lines.iter().all(|l| scrape.contains(l.as_str()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        scrape = d.scrape().await;
    }
    scrape
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_and_every_alert_series_is_live_after_its_events() {
    let d = start().await;
    let kubelet = d.kubelet.clone();
    let csi_reg = kubelet.join("plugins_registry/csi.hybridlet.io-reg.sock");
    let csi_sock = kubelet.join("plugins/csi.hybridlet.io/csi.sock");
    let gpu_sock = kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    wait_until("the plugin sockets", || {
        is_socket(&csi_reg) && is_socket(&csi_sock) && is_socket(&gpu_sock)
    })
    .await;
    d.wait_log("ready").await;

    // A reload that is rejected (the alert's series), then one that is accepted.
    let drop_in = d.root.path().join("etc/hybridlet/config.d/50-bad.yaml");
    std::fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
    std::fs::write(&drop_in, "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  shutdownGracePeriod: forever\n").unwrap();
    sighup(&d);
    let invalid = [(
        "hybridlet_config_reloads_total".to_string(),
        vec![("result".to_string(), "invalid".to_string())],
    )];
    scrape_until(&d, &invalid, &[]).await;
    std::fs::remove_file(&drop_in).unwrap();
    sighup(&d);

    // The kubelet rejects the CSI plugin's registration.
    RegistrationClient::new(hybridlet_kubelet_plugin::connect(&csi_reg).await.unwrap())
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "no handler registered for plugin type".into(),
        })
        .await
        .unwrap();
    // An HTTP/1.1 client on the CSI socket, waiting for its answer: refused below gRPC.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&csi_sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    // CSI: a stats call for a volume that is not there.
    let status = csi::node_client::NodeClient::new(
        hybridlet_kubelet_plugin::connect(&csi_sock).await.unwrap(),
    )
    .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
        volume_id: "v".into(),
        volume_path: kubelet.join("pods/x/volumes/v").display().to_string(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // DRA: a claim the API server does not have (a failed prepare), one it has.
    d.api.put(
        "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/train",
        serde_json::json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": "train", "namespace": "ml", "uid": "uid-ok"},
               "spec": {},
               "status": {"allocation": {"devices": {"results": [
                   {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": NODE, "device": "gpu-1"}]}}}}),
    );
    let claim = |name: &str, uid: &str| v1::Claim {
        namespace: "ml".into(),
        name: name.into(),
        uid: uid.into(),
    };
    let resp = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&gpu_sock).await.unwrap(),
    )
    .node_prepare_resources(v1::NodePrepareResourcesRequest {
        claims: vec![claim("gone", "uid-gone"), claim("train", "uid-ok")],
    })
    .await
    .unwrap()
    .into_inner();
    assert_ne!(resp.claims["uid-gone"].error, "");
    assert_eq!(resp.claims["uid-ok"].error, "");

    // The shipped alerts: each series they select, with its labels.
    let alerts_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/alerts.yaml"),
    )
    .unwrap();
    let alerts: serde_json::Value = serde_saphyr::from_str(&alerts_text).unwrap();
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    let mut by_alert: BTreeMap<String, Vec<Selector>> = BTreeMap::new();
    for rule in rules {
        let name = rule["alert"].as_str().unwrap().to_string();
        assert!(name.starts_with("Hybridlet"), "{rule}");
        assert!(rule["labels"]["severity"].is_string(), "{rule}");
        by_alert.insert(name, selectors_in(rule["expr"].as_str().unwrap()));
    }
    // Driven in the root tier: it needs a mounted volume whose device is gone.
    let root_tier = ["hybridlet_csi_volume_abnormal_total"];
    let wanted: Vec<_> = by_alert
        .values()
        .flatten()
        .filter(|(n, _)| !root_tier.contains(&n.as_str()))
        .cloned()
        .collect();
    let refused = format!(
        "hybridlet_kubelet_plugin_refused_total{{socket=\"{}\",reason=\"not_http2\"}} 1",
        csi_sock.display()
    );
    let lines: Vec<String> = [
        "hybridlet_config_reloads_total{result=\"ok\"} 1",
        "hybridlet_kubelet_plugin_registrations_total{plugin=\"csi.hybridlet.io\",result=\"failed\"} 1",
        "hybridlet_kubelet_plugin_registration_overdue{plugin=\"gpu.hybridlet.io\"} 1",
        "hybridlet_csi_operations_total{method=\"NodeGetVolumeStats\",code=\"NotFound\"} 1",
        "hybridlet_dra_operations_total{driver=\"gpu.hybridlet.io\",operation=\"prepare\",result=\"ok\"} 1",
        "hybridlet_dra_prepared_claims{driver=\"gpu.hybridlet.io\"} 1",
        "hybridlet_gpu_info{gpu=\"3\",UUID=\"GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003\",pci_bus_id=\"00000000:63:00.0\",modelName=\"NVIDIA H200\",driver_version=\"570.86.15\",numa_node=\"0\",pcie_root=\"pci0000:60\",pcie_switch=\"0000:61:00.0\"} 1",
        "hybridlet_sriov_vfs{pf=\"0000:64:00.0\",netdev=\"enp100s0np0\"} 2",
        "hybridlet_sriov_vf_receive_bytes_total{pf=\"0000:64:00.0\",vf=\"0000:64:00.2\",netdev=\"enp100s0v0\"} 797002391",
        "hybridlet_gpu_xid_errors_total{gpu=\"5\",UUID=\"GPU-5a0b0005-1c2d-4e5f-8a9b-0000dead0005\",pci_bus_id=\"00000000:C2:00.0\",modelName=\"NVIDIA H200\"} 1",
        "hybridlet_gpu_last_xid{gpu=\"5\",UUID=\"GPU-5a0b0005-1c2d-4e5f-8a9b-0000dead0005\",pci_bus_id=\"00000000:C2:00.0\",modelName=\"NVIDIA H200\"} 31",
    ]
    .into_iter()
    .map(str::to_string)
    .chain([refused])
    .collect();
    let scrape = scrape_until(&d, &wanted, &lines).await;
    for (alert, selectors) in &by_alert {
        for (name, matchers) in selectors {
            if root_tier.contains(&name.as_str()) {
                continue;
            }
            assert!(
                has_series(&scrape, name, matchers),
                "alert {alert} selects {name}{matchers:?}, not in the scrape:\n{scrape}"
            );
        }
    }
    for line in &lines {
        assert!(
            scrape.contains(line.as_str()),
            "missing {line:?} in:\n{scrape}"
        );
    }

    // Docs and scrape name the same families: nothing undocumented, nothing documented
    // that the agent does not export once its events have happened.
    let (docs, live) = (documented(), exported(&scrape));
    let undocumented: Vec<_> = live.difference(&docs).collect();
    let missing: Vec<_> = docs.difference(&live).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}\ndocumented but not exported: {missing:?}\n{scrape}"
    );

    // The Grafana dashboard: valid JSON, and every series it queries is exported
    // (histograms through their _bucket/_sum/_count series).
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
            for (name, _) in selectors_in(target["expr"].as_str().unwrap()) {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|f| live.contains(*f))
                    .unwrap_or(&name);
                assert!(
                    live.contains(family),
                    "panel {:?} queries {name}, which the scrape does not have",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "the dashboard queries only {queried} series");

    // What promtool (Debian `prometheus`) says of the live scrape, in each format a
    // scraper may ask for: OpenMetrics (Prometheus) and the 0.0.4 text format (older
    // Prometheus, Telegraf, Datadog, curl without an Accept header).
    let text = d.scrape_accepting("").await;
    assert!(!text.contains("# EOF"), "{text}");
    promtool_check_metrics("the 0.0.4 text format", &text);
    promtool_parse_openmetrics(&scrape);
    let (status, log) = d.stop().await;
    assert!(status.success(), "{log}");
}

/// `promtool check metrics` on a scrape: it must parse, and raise no lint problem but
/// one: the GPU families' `UUID` and `modelName` labels are dcgm-exporter's names, kept so
/// that its dashboards and joins work on hybridlet's series (docs/metrics.md); promtool's
/// snake_case rule is the only one they break, and no other label does.
fn promtool_check_metrics(format: &str, scrape: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): `bash .ci/run` installs it (Debian package `prometheus`)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| {
            let dcgm_label = l.starts_with("hybridlet_gpu_")
                && l.ends_with(" label names should be written in 'snake_case' not 'camelCase'");
            !dcgm_label
        })
        .collect();
    // Exit 3 is "lint problems"; anything else but 0 is a parse failure.
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && problems.is_empty(),
        "promtool check metrics ({format}): {}\n{said}\n{scrape}",
        out.status
    );
    let camel: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('{'))
        .flat_map(|(_, labels)| labels.split("\",").filter_map(|kv| kv.split_once('=')))
        .map(|(k, _)| k.trim_start_matches(','))
        .filter(|k| k.chars().any(|c| c.is_ascii_uppercase()))
        .collect();
    assert!(
        camel.iter().all(|k| ["UUID", "modelName"].contains(k)),
        "labels outside snake_case: {camel:?}"
    );
}

/// Prometheus' own OpenMetrics parser on a scrape. `promtool check metrics` reads only
/// the 0.0.4 text format, so the scrape is fed to the one promtool command that parses
/// OpenMetrics, `tsdb create-blocks-from openmetrics` (the backfill; it wants a timestamp
/// on every sample, so each gets the scrape's time, before any exemplar).
fn promtool_parse_openmetrics(scrape: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamped: String = scrape
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                let (sample, exemplar) = l.split_once(" # ").unwrap_or((l, ""));
                let exemplar = if exemplar.is_empty() {
                    String::new()
                } else {
                    format!(" # {exemplar}")
                };
                format!("{sample} {now}{exemplar}\n")
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("scrape.om");
    std::fs::write(&input, &stamped).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(dir.path().join("blocks"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): `bash .ci/run` installs it (Debian package `prometheus`)")
        });
    assert!(
        out.status.success(),
        "promtool's OpenMetrics parser refuses the scrape: {}{}\n{stamped}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// NodeGetVolumeStats on a published raw-block volume whose device is gone: abnormal, and
/// the series `HybridletStaleVolumes` selects counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root tier: a real bind mount"]
async fn an_abnormal_volume_is_counted() {
    let d = start().await;
    let csi_sock = d.kubelet.join("plugins/csi.hybridlet.io/csi.sock");
    wait_until("the CSI socket", || is_socket(&csi_sock)).await;
    // What stage records for a raw-block iSCSI LUN, with a device that is not there.
    let records = d.root.path().join("var/lib/hybridlet/csi/iscsi");
    std::fs::create_dir_all(&records).unwrap();
    std::fs::write(
        records.join("vol-abnormal.conf"),
        "version=1\nvolumeId=vol-abnormal\nportal=127.0.0.1:3260\niqn=iqn.2003-01.org.example:t\nlun=0\nfsType=\nblock=true\ndevice=/dev/hybridlet-test-missing\n",
    )
    .unwrap();
    let target = d
        .kubelet
        .join("pods/p/volumeDevices/kubernetes.io~csi/vol-abnormal");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, "").unwrap();
    let source = d.root.path().join("device-stand-in");
    std::fs::write(&source, "").unwrap();
    let ok = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&source)
        .arg(&target)
        .status()
        .unwrap();
    assert!(ok.success());
    let resp = csi::node_client::NodeClient::new(
        hybridlet_kubelet_plugin::connect(&csi_sock).await.unwrap(),
    )
    .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
        volume_id: "vol-abnormal".into(),
        volume_path: target.display().to_string(),
        ..Default::default()
    })
    .await;
    let _ = std::process::Command::new("umount").arg(&target).status();
    let condition = resp.unwrap().into_inner().volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    let wanted = [(
        "hybridlet_csi_volume_abnormal_total".to_string(),
        Vec::new(),
    )];
    let scrape = scrape_until(
        &d,
        &wanted,
        &["hybridlet_csi_volume_abnormal_total 1".into()],
    )
    .await;
    assert!(
        scrape.contains("hybridlet_csi_volume_abnormal_total 1"),
        "{scrape}"
    );
    let (status, log) = d.stop().await;
    assert!(status.success(), "{log}");
}
