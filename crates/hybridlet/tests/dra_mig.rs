//! `hybridlet run` with the GPU DRA driver over GPUs in MIG mode (the fake NVML: NVML's
//! MIG rules, instances written back to its fixture so a restarted daemon finds them),
//! against the fake API server, through the kubelet's DRA gRPC calls on the plugin socket:
//! static MIG devices with their capability nodes and parent's health; dynamic MIG with
//! counter sets laid out for a 1.35 and a 1.34 API server (each validated by that
//! release's rules), instances created at prepare and destroyed at unprepare, overlaps
//! refused; a crash between NVML's change and the checkpoint undone at restart, a
//! prepared instance adopted after a crash, an instance nobody holds destroyed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::Path;
use std::time::Duration;

mod common;

use common::{Daemon, NODE, cdi_spec, is_socket, wait_until};
use hybridlet_fixtures::apiserver::FakeApiServer;
use hybridlet_proto::dra::v1;
use serde_json::{Value, json};

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";
const GPU0: &str = "GPU-5a0b0000-1c2d-4e5f-8a9b-0000dead0000";

fn gpu_config(dynamic: bool) -> impl FnOnce(String) -> String {
    move |config| {
        config.replace(
            "      driverName: gpu.example.com",
            &format!("      enabled: true\n      dynamicMig: {dynamic}"),
        )
    }
}

fn nvml_args(root: &Path) -> Vec<String> {
    vec![
        "--nvml-fixture".into(),
        root.join("fake-nvml.json").display().to_string(),
    ]
}

/// The fixture's MIG instances of GPU 0 now (the fake writes them back).
fn instances(root: &Path) -> Vec<Value> {
    let nvml: Value =
        serde_json::from_slice(&std::fs::read(root.join("fake-nvml.json")).unwrap()).unwrap();
    nvml["gpus"][0]["mig"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Put a ResourceClaim allocated `device` of this node into the API server.
fn claim(api: &FakeApiServer, name: &str, device: &str) {
    api.put(
        &format!("/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/{name}"),
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}")},
               "spec": {},
               "status": {"allocation": {"devices": {"results": [
                   {"request": "mig", "driver": "gpu.hybridlet.io", "pool": NODE, "device": device}]}},
                          "reservedFor": [{"resource": "pods", "name": format!("{name}-0"), "uid": "pod-uid"}]}}),
    );
}

async fn client(d: &Daemon) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
    let dra = d.kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    // After a crash the old socket file is still there until the new process replaces
    // it: dial until one answers, as the kubelet does.
    for _ in 0..200 {
        if is_socket(&dra)
            && let Ok(channel) = hybridlet_kubelet_plugin::connect(&dra).await
        {
            return v1::dra_plugin_client::DraPluginClient::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no DRA plugin answers on {}", dra.display());
}

/// The kubelet's reference to claim `name` of this test.
fn claim_ref(name: &str) -> v1::Claim {
    v1::Claim {
        namespace: "ml".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// NodePrepareResources for one claim, as the kubelet sends it: the per-claim result.
async fn prepare(d: &Daemon, name: &str) -> v1::NodePrepareResourceResponse {
    let mut c = client(d).await;
    let resp = c
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim_ref(name)],
        })
        .await
        .unwrap()
        .into_inner();
    resp.claims[&format!("uid-{name}")].clone()
}

async fn unprepare(d: &Daemon, name: &str) -> String {
    let mut c = client(d).await;
    let resp = c
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim_ref(name)],
        })
        .await
        .unwrap()
        .into_inner();
    resp.claims[&format!("uid-{name}")].error.clone()
}

/// The CDI spec of a prepared claim, validated: its env and device nodes.
fn edits(
    root: &Path,
    name: &str,
    r: &v1::NodePrepareResourceResponse,
) -> (Vec<String>, Vec<String>) {
    let spec = cdi_spec(
        &root.join(format!("var/run/cdi/gpu_hybridlet_io-uid-{name}.json")),
        &r.devices[0].cdi_device_ids,
    );
    let e = &spec["devices"][0]["containerEdits"];
    let strings = |v: &Value, key: Option<&str>| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| key.map_or(x, |k| &x[k]).as_str().unwrap().to_string())
            .collect()
    };
    (
        strings(&e["env"], None),
        strings(&e["deviceNodes"], Some("path")),
    )
}

async fn slices(api: &FakeApiServer, count: usize) -> Vec<Value> {
    wait_until("the ResourceSlices", || api.list(SLICES).len() == count).await;
    let mut s = api.list(SLICES);
    s.sort_by_key(|s| s["metadata"]["name"].as_str().unwrap().to_string());
    s
}

fn device<'a>(slices: &'a [Value], name: &str) -> &'a Value {
    slices
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().into_iter().flatten())
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn static_mig_devices_are_published_prepared_and_tainted_with_their_gpu() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
            let mut nvml =
                hybridlet_fixtures::enable_mig(root, 0, &[(19, 0), (19, 1), (9, 4)]).unwrap();
            // GPU 0 reports a double-bit ECC error: all its MIG devices are unhealthy.
            nvml["xids"]
                .as_array_mut()
                .unwrap()
                .push(json!({"uuid": GPU0, "xid": 48}));
            std::fs::write(root.join("fake-nvml.json"), nvml.to_string()).unwrap();
        },
        gpu_config(false),
        nvml_args,
    )
    .await;
    let root = d.root.path();
    let s = slices(&d.api, 1).await;
    let names: Vec<&str> = s[0]["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"gpu-0"),
        "a GPU in MIG mode is offered as its MIG devices: {names:?}"
    );
    for n in [
        "gpu-0-mig-1g18gb-0",
        "gpu-0-mig-1g18gb-1",
        "gpu-0-mig-3g71gb-4",
        "gpu-1",
        "gpu-7",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    assert!(s[0]["spec"].get("sharedCounters").is_none());
    let mig = device(&s, "gpu-0-mig-1g18gb-1");
    let a = &mig["attributes"];
    assert_eq!(a["type"]["string"], "mig");
    assert_eq!(a["profile"]["string"], "1g.18gb");
    assert_eq!(a["parentUUID"]["string"], GPU0);
    assert_eq!(a["gpuInstanceID"]["int"], 2);
    assert_eq!(a["placementStart"]["int"], 1);
    assert_eq!(a["resource.kubernetes.io/pcieRoot"]["string"], "pci0000:15");
    assert!(a["uuid"]["string"].as_str().unwrap().starts_with("MIG-"));
    assert_eq!(
        mig["capacity"]["memory"]["value"],
        (16u64 << 30).to_string()
    );
    assert_eq!(mig["capacity"]["multiprocessors"]["value"], "16");
    // The parent's XID taints every MIG device of it, and only those.
    wait_until("the MIG devices tainted", || {
        let s = d.api.list(SLICES);
        [
            "gpu-0-mig-1g18gb-0",
            "gpu-0-mig-1g18gb-1",
            "gpu-0-mig-3g71gb-4",
        ]
        .iter()
        .all(|n| device(&s, n)["taints"][0]["value"] == "48")
    })
    .await;
    assert!(device(&d.api.list(SLICES), "gpu-1").get("taints").is_none());

    claim(&d.api, "small", "gpu-0-mig-1g18gb-1");
    let r = prepare(&d, "small").await;
    assert_eq!(r.error, "");
    let (env, nodes) = edits(root, "small", &r);
    assert_eq!(
        env,
        [format!(
            "NVIDIA_VISIBLE_DEVICES={}",
            a["uuid"]["string"].as_str().unwrap()
        )]
    );
    // The parent's nodes, then the GPU instance's and compute instance's capabilities as
    // the driver lists them (gpu0/mig/gi2: DeviceFileMinor 21, ci0: 22).
    assert_eq!(
        nodes,
        [
            "/dev/nvidia0",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-caps/nvidia-cap21",
            "/dev/nvidia-caps/nvidia-cap22"
        ]
    );
    assert_eq!(unprepare(&d, "small").await, "");
    assert_eq!(
        instances(root).len(),
        3,
        "static MIG never destroys an instance"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamic_mig_creates_at_prepare_destroys_at_unprepare_and_refuses_overlaps() {
    let api = FakeApiServer::start().await.unwrap();
    api.set_minor_version(35);
    let d = Daemon::start_on(
        api,
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
            hybridlet_fixtures::enable_mig(root, 0, &[]).unwrap();
        },
        gpu_config(true),
        nvml_args,
        Vec::new(),
    )
    .await;
    let root = d.root.path();
    // 1.35: the counter set in a slice of its own, the devices in another (the fake server
    // refuses anything else with 422).
    let s = slices(&d.api, 2).await;
    let counters: Vec<&Value> = s
        .iter()
        .filter(|s| s["spec"].get("sharedCounters").is_some())
        .collect();
    assert_eq!(counters.len(), 1);
    assert!(counters[0]["spec"].get("devices").is_none());
    let set = &counters[0]["spec"]["sharedCounters"][0];
    assert_eq!(set["name"], "gpu-0-counter-set");
    assert_eq!(
        set["counters"].as_object().unwrap().len(),
        10,
        "8 memory slices, compute slices, OFA"
    );
    assert_eq!(set["counters"]["compute-slices"]["value"], "7");
    // Every placement of every profile, and the GPU itself: 25 + 1, plus GPUs 1-7.
    let devices: Vec<&Value> = s
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(devices.len(), 26 + 7);
    let g3 = device(&s, "gpu-0-mig-3g71gb-4");
    assert_eq!(g3["consumesCounters"][0]["counterSet"], "gpu-0-counter-set");
    let used: Vec<&String> = g3["consumesCounters"][0]["counters"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        used,
        [
            "compute-slices",
            "memory-slice-4",
            "memory-slice-5",
            "memory-slice-6",
            "memory-slice-7"
        ]
    );
    assert!(g3["attributes"].get("uuid").is_none(), "not created yet");
    assert_eq!(
        device(&s, "gpu-0")["consumesCounters"][0]["counters"]
            .as_object()
            .unwrap()
            .len(),
        10
    );
    assert!(device(&s, "gpu-1").get("consumesCounters").is_none());

    claim(&d.api, "a", "gpu-0-mig-3g71gb-4");
    let r = prepare(&d, "a").await;
    assert_eq!(r.error, "");
    let now = instances(root);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["profileId"], 9);
    assert_eq!(now[0]["placement"], json!({"start": 4, "size": 4}));
    let (env, nodes) = edits(root, "a", &r);
    assert_eq!(
        env,
        [format!(
            "NVIDIA_VISIBLE_DEVICES={}",
            now[0]["uuid"].as_str().unwrap()
        )]
    );
    assert_eq!(
        nodes
            .iter()
            .filter(|n| n.starts_with("/dev/nvidia-caps/"))
            .count(),
        2
    );
    // What 3g.71gb at 4 leaves of the counters: the 11 devices that need its memory slices
    // (1g ×3, 1g+me ×3, 1g.35gb ×2, 2g at 4, 7g, the whole GPU) are blocked, not free.
    let gauge = |state: &str, text: &str| -> Option<f64> {
        let prefix =
            format!("hybridlet_dra_devices{{driver=\"gpu.hybridlet.io\",state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().unwrap())
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = d.scrape().await;
        if gauge("blocked", &text) == Some(11.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gauge("blocked", &text), Some(11.0), "{text}");
    assert_eq!(gauge("allocated", &text), Some(1.0));
    assert_eq!(gauge("free", &text), Some(33.0 - 12.0));

    // A stale allocation of an overlapping placement: NVML refuses, naming the occupant.
    claim(&d.api, "b", "gpu-0-mig-1g18gb-5");
    let r = prepare(&d, "b").await;
    assert!(
        r.error.contains("INSUFFICIENT_RESOURCES")
            && r.error.contains(now[0]["uuid"].as_str().unwrap()),
        "{}",
        r.error
    );
    // The whole GPU shares everything with its MIG devices.
    claim(&d.api, "w", "gpu-0");
    let r = prepare(&d, "w").await;
    assert!(r.error.contains("MIG device(s) in use"), "{}", r.error);
    // 4g beside 3g: the GPU's 7 compute slices, all 8 memory slices.
    claim(&d.api, "c", "gpu-0-mig-4g71gb-0");
    assert_eq!(prepare(&d, "c").await.error, "");
    assert_eq!(instances(root).len(), 2);
    // A GPU that is not in MIG mode has no MIG devices: refused by name.
    claim(&d.api, "n", "gpu-1-mig-1g18gb-0");
    let r = prepare(&d, "n").await;
    assert!(
        r.error.contains("no device gpu-1-mig-1g18gb-0"),
        "{}",
        r.error
    );

    assert_eq!(unprepare(&d, "a").await, "");
    let left = instances(root);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["profileId"], 5);
    assert!(
        !root
            .join("proc/driver/nvidia/capabilities/gpu0/mig/gi1")
            .exists()
            || left[0]["gpuInstanceId"] == 1
    );
    assert_eq!(unprepare(&d, "c").await, "");
    assert!(instances(root).is_empty());
    // Unprepare again: nothing left to destroy, still fine.
    assert_eq!(unprepare(&d, "c").await, "");
    // The whole GPU, now free; while it is prepared no MIG device is created.
    assert_eq!(prepare(&d, "w").await.error, "");
    let r = prepare(&d, "a").await;
    assert!(r.error.contains("whole GPU 0 is prepared"), "{}", r.error);
    assert!(instances(root).is_empty());
    assert_eq!(unprepare(&d, "w").await, "");
    assert_eq!(prepare(&d, "a").await.error, "");
    assert_eq!(unprepare(&d, "a").await, "");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_34_api_server_gets_each_counter_set_with_its_devices() {
    let api = FakeApiServer::start().await.unwrap();
    api.set_minor_version(34);
    let d = Daemon::start_on(
        api,
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
            hybridlet_fixtures::enable_mig(root, 0, &[]).unwrap();
            hybridlet_fixtures::enable_mig(root, 1, &[]).unwrap();
        },
        gpu_config(true),
        nvml_args,
        Vec::new(),
    )
    .await;
    // One slice per GPU in MIG mode (its counter set and its 26 devices), one for the rest.
    let s = slices(&d.api, 3).await;
    for (i, slice) in s.iter().take(2).enumerate() {
        let spec = &slice["spec"];
        assert_eq!(spec["sharedCounters"].as_array().unwrap().len(), 1);
        assert_eq!(
            spec["sharedCounters"][0]["name"],
            format!("gpu-{i}-counter-set")
        );
        let devices = spec["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 26);
        assert!(
            devices.iter().all(
                |d| d["consumesCounters"][0]["counterSet"] == spec["sharedCounters"][0]["name"]
            )
        );
    }
    assert_eq!(s[2]["spec"]["devices"].as_array().unwrap().len(), 6);
    assert!(s[2]["spec"].get("sharedCounters").is_none());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_midway_is_undone_a_prepared_instance_adopted_and_a_stray_one_destroyed() {
    let mut d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
            let mut nvml = hybridlet_fixtures::enable_mig(root, 0, &[]).unwrap();
            // The fake aborts the process right after NVML created the instance.
            nvml["abortAfterCreate"] = json!(true);
            std::fs::write(root.join("fake-nvml.json"), nvml.to_string()).unwrap();
        },
        gpu_config(true),
        nvml_args,
    )
    .await;
    let root = d.root.path().to_path_buf();
    claim(&d.api, "job", "gpu-0-mig-2g35gb-2");
    let mut c = client(&d).await;
    let crashed = c
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim_ref("job")],
        })
        .await;
    assert!(crashed.is_err(), "the daemon died during the prepare");
    d.agent.wait_exit(Duration::from_secs(10));
    let left = instances(&root);
    assert_eq!(left.len(), 1, "NVML's change outlived the process");
    // Restart: the intent record names the device, and its instance is destroyed.
    d.crash_and_restart();
    d.wait_log("released the devices of a prepare interrupted by a crash")
        .await;
    assert!(instances(&root).is_empty());

    // The kubelet asks again: created and prepared.
    let r = prepare(&d, "job").await;
    assert_eq!(r.error, "");
    let made = instances(&root);
    assert_eq!(made.len(), 1);
    // A crash after the prepare: the instance stays, and one nobody holds is planted.
    let mut nvml: Value =
        serde_json::from_slice(&std::fs::read(root.join("fake-nvml.json")).unwrap()).unwrap();
    let stray = hybridlet_fixtures::h200_mig(&[(19, 7 - 1)])["instances"][0].clone();
    let mut stray = stray;
    stray["gpuInstanceId"] = json!(9);
    nvml["gpus"][0]["mig"]["instances"]
        .as_array_mut()
        .unwrap()
        .push(stray.clone());
    std::fs::write(root.join("fake-nvml.json"), nvml.to_string()).unwrap();
    d.crash_and_restart();
    d.wait_log("destroyed a MIG instance no prepared claim holds")
        .await;
    assert_eq!(
        instances(&root),
        made,
        "the prepared claim's instance is kept, the stray one gone"
    );
    // The kubelet prepares again after the plugin re-registers: the same instance, adopted.
    let again = prepare(&d, "job").await;
    assert_eq!(again.error, "");
    assert_eq!(again.devices[0].cdi_device_ids, r.devices[0].cdi_device_ids);
    assert_eq!(instances(&root), made);
    d.wait_log("MIG instance already there: adopted").await;
    let (env, _) = edits(&root, "job", &again);
    assert_eq!(
        env,
        [format!(
            "NVIDIA_VISIBLE_DEVICES={}",
            made[0]["uuid"].as_str().unwrap()
        )]
    );
    assert_eq!(unprepare(&d, "job").await, "");
    assert!(instances(&root).is_empty());
    d.stop().await;
}
