//! The on-prem capacity signal for bursting: `hybridlet run` with the GPU driver on the
//! DGX-like fixture (8 GPUs) and `spec.nodeLabels` on, against the fake API server. The
//! GPUs by state are in `hybridlet_dra_devices`; the node's own Node object carries
//! `hybridlet.io/gpu.free` (a coarse bucket), `gpu.product` and `site`, written with a JSON
//! merge patch only when a bucket changes: a prepare that moves free GPUs from 8 to 7
//! changes the bucket (8-15 → 4-7) and patches, the next (7 → 6) does not; an operator's
//! own labels are left alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use common::{Daemon, is_socket, wait_until};
use hybridlet_proto::dra::v1;
use serde_json::json;

const NODE_PATH: &str = "/api/v1/nodes/fra1-r12-n07";

#[tokio::test(flavor = "multi_thread")]
async fn free_devices_are_metrics_and_node_labels_written_only_on_change() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
        },
        |config| {
            config.replace(
                "      driverName: gpu.example.com",
                "      enabled: true\n  nodeLabels:\n    enabled: true\n    site: fra1\n    minInterval: 1s",
            )
        },
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
            ]
        },
    )
    .await;
    let api = &d.api;
    let labels = || api.list(NODE_PATH)[0]["metadata"]["labels"].clone();
    let patches = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with(&format!("PATCH {NODE_PATH}")))
            .count()
    };
    wait_until("the capacity labels", || {
        labels()["hybridlet.io/gpu.free"] == "8-15"
    })
    .await;
    let l = labels();
    assert_eq!(l["hybridlet.io/gpu.product"], "NVIDIA-H200", "{l}");
    assert_eq!(l["hybridlet.io/site"], "fra1", "{l}");
    // An operator's own label, which a merge patch of ours must never touch.
    let mut node = api.list(NODE_PATH)[0].clone();
    node["metadata"]["labels"]["hybridlet.io/rack"] = json!("r12");
    api.put(NODE_PATH, node);
    let metrics = d.scrape().await;
    assert!(
        metrics.contains("hybridlet_dra_devices{driver=\"gpu.hybridlet.io\",state=\"free\"} 8"),
        "{metrics}"
    );
    let first = patches();
    assert_eq!(first, 1, "{:?}", api.requests());

    let dra = d.kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    wait_until("the DRA socket", || is_socket(&dra)).await;
    let mut client = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&dra).await.unwrap(),
    );
    for (i, gpu) in ["gpu-0", "gpu-1"].iter().enumerate() {
        let name = format!("train-{i}");
        api.put(
            &format!("/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/{name}"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                   "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{i}")},
                   "spec": {}, "status": {"allocation": {"devices": {"results": [
                       {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": "fra1-r12-n07", "device": gpu}]}}}}),
        );
        let resp = client
            .node_prepare_resources(v1::NodePrepareResourcesRequest {
                claims: vec![v1::Claim {
                    namespace: "ml".into(),
                    name,
                    uid: format!("uid-{i}"),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.claims[&format!("uid-{i}")].error, "");
        let free = 7 - i;
        wait_until("the free gauge", || {
            let m = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(d.scrape())
            });
            m.contains(&format!(
                "hybridlet_dra_devices{{driver=\"gpu.hybridlet.io\",state=\"free\"}} {free}"
            )) && m.contains(&format!(
                "hybridlet_dra_devices{{driver=\"gpu.hybridlet.io\",state=\"allocated\"}} {}",
                i + 1
            ))
        })
        .await;
        if i == 0 {
            wait_until("the bucket written", || {
                labels()["hybridlet.io/gpu.free"] == "4-7"
            })
            .await;
        }
    }
    // 7 → 6 stays in 4-7: no write, even after more than the interval.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(patches(), 2, "{:?}", api.requests());
    assert_eq!(labels()["hybridlet.io/rack"], "r12");
    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}
