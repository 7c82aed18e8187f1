//! `hybridlet run` with the GPU DRA driver on, against the in-process fake API server:
//! the slice is published with the GPUs' attributes, registration advertises v1 before
//! v1beta1 (and the health stream), a claim allocated on this node is prepared into a CDI
//! spec, and unprepared; a GPU with a fatal XID is tainted in the slice and reported
//! unhealthy on the kubelet's health stream, an application XID changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{Daemon, cdi_spec, is_socket, wait_until};

/// The fixture configuration with the SR-IOV DRA driver on instead of the GPU one.
fn sriov_only(config: String) -> String {
    config.replace(
        "    gpu:\n      driverName: gpu.example.com",
        "    sriov:\n      enabled: true",
    )
}
use hybridlet_proto::dra::v1;
use hybridlet_proto::pluginregistration::InfoRequest;
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn gpu_dra_publishes_prepares_and_unprepares() {
    let d = Daemon::start(
        |root| {
            let mut nvml = hybridlet_fixtures::dgx_h200(root, 0).unwrap();
            // GPU 2 falls off the bus (fatal); GPU 5 keeps the fixture's XID 31 (an
            // application's fault, ignored for health).
            nvml["xids"]
                .as_array_mut()
                .unwrap()
                .push(json!({"uuid": "GPU-5a0b0002-1c2d-4e5f-8a9b-0000dead0002", "xid": 79}));
            std::fs::write(root.join("fake-nvml.json"), nvml.to_string()).unwrap();
        },
        |config| config.replace("      driverName: gpu.example.com", "      enabled: true"),
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
            ]
        },
    )
    .await;
    let (api, root, kubelet) = (&d.api, &d.root, &d.kubelet);
    let reg = kubelet.join("plugins_registry/gpu.hybridlet.io-reg.sock");
    let dra = kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    wait_until("the DRA sockets", || is_socket(&reg) && is_socket(&dra)).await;
    wait_until("the ResourceSlice", || {
        !api.list("/apis/resource.k8s.io/v1/resourceslices")
            .is_empty()
    })
    .await;

    let slices = api.list("/apis/resource.k8s.io/v1/resourceslices");
    assert_eq!(slices.len(), 1);

    // The kubelet wipes a node's slices when it restarts: the watch sees the deletion and
    // the slice is back long before the minute-long reconcile would bring it.
    wait_until("the slice watch", || api.watches() >= 1).await;
    let name = slices[0]["metadata"]["name"].as_str().unwrap().to_string();
    api.remove(&format!("/apis/resource.k8s.io/v1/resourceslices/{name}"));
    wait_until("the slice republished", || {
        api.list("/apis/resource.k8s.io/v1/resourceslices").len() == 1
    })
    .await;
    let slices = api.list("/apis/resource.k8s.io/v1/resourceslices");
    let spec = &slices[0]["spec"];
    assert_eq!(spec["driver"], "gpu.hybridlet.io");
    assert_eq!(spec["nodeName"], "fra1-r12-n07");
    assert_eq!(spec["pool"]["name"], "fra1-r12-n07");
    let devices = spec["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 8);
    let gpu3 = devices.iter().find(|d| d["name"] == "gpu-3").unwrap();
    assert_eq!(
        gpu3["attributes"]["uuid"]["string"],
        "GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003"
    );
    assert_eq!(
        gpu3["attributes"]["resource.kubernetes.io/pciBusID"]["string"],
        "0000:63:00.0"
    );
    assert_eq!(
        gpu3["attributes"]["resource.kubernetes.io/pcieRoot"]["string"],
        "pci0000:60"
    );
    assert_eq!(gpu3["attributes"]["pcieSwitch"]["string"], "0000:61:00.0");
    assert_eq!(
        gpu3["attributes"]["hybridlet.io/pcieSwitch"]["string"],
        "0000:61:00.0"
    );
    assert_eq!(gpu3["attributes"]["numaNode"]["int"], 0);
    assert_eq!(
        gpu3["attributes"]["cudaComputeCapability"]["version"],
        "9.0.0"
    );
    assert_eq!(gpu3["capacity"]["memory"]["value"], "150754820096");

    let info = RegistrationClient::new(hybridlet_kubelet_plugin::connect(&reg).await.unwrap())
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth"
        ]
    );

    // The fatal XID taints GPU 2 in the slice (republished on the change) and nothing else.
    wait_until("GPU 2 tainted in the slice", || {
        api.list("/apis/resource.k8s.io/v1/resourceslices")[0]["spec"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "gpu-2" && d.get("taints").is_some())
    })
    .await;
    let slice = &api.list("/apis/resource.k8s.io/v1/resourceslices")[0];
    let tainted: Vec<&serde_json::Value> = slice["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d.get("taints").is_some())
        .collect();
    assert_eq!(tainted.len(), 1, "{slice}");
    assert_eq!(
        tainted[0]["taints"],
        json!([{"key": "gpu.hybridlet.io/xid", "value": "79", "effect": "NoSchedule"}])
    );
    // The kubelet's health stream: the complete list, GPU 2 unhealthy with the reason.
    // The first message of each health-stream version: (device, health, message, timeout).
    macro_rules! first_health_message {
        ($h:path) => {{
            use $h as h;
            let mut c = h::dra_resource_health_client::DraResourceHealthClient::new(
                hybridlet_kubelet_plugin::connect(&dra).await.unwrap(),
            );
            let mut stream = c
                .node_watch_resources(h::NodeWatchResourcesRequest {})
                .await
                .unwrap()
                .into_inner();
            stream
                .message()
                .await
                .unwrap()
                .unwrap()
                .devices
                .into_iter()
                .map(|d| {
                    (
                        d.device.unwrap().device_name,
                        d.health,
                        d.message,
                        d.health_check_timeout_seconds,
                    )
                })
                .collect::<Vec<_>>()
        }};
    }
    for first in [
        first_health_message!(hybridlet_proto::dra_health::v1alpha1),
        first_health_message!(hybridlet_proto::dra_health::v1),
    ] {
        assert_eq!(first.len(), 8);
        for (name, health, message, timeout) in &first {
            assert_eq!(*timeout, 60);
            if name == "gpu-2" {
                assert_eq!(*health, 2, "UNHEALTHY");
                assert!(
                    message.contains("XID 79: GPU has fallen off the bus"),
                    "{message}"
                );
            } else {
                assert_eq!(*health, 1, "{name} HEALTHY");
            }
        }
    }

    api.put(
        "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/train",
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": "train", "namespace": "ml", "uid": "claim-uid-1"},
               "spec": {},
               "status": {"allocation": {"devices": {"results": [
                   {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": "fra1-r12-n07", "device": "gpu-3"}]}},
                          "reservedFor": [{"resource": "pods", "name": "train-0", "uid": "pod-uid"}]}}),
    );
    let mut client = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&dra).await.unwrap(),
    );
    let claim = v1::Claim {
        namespace: "ml".into(),
        name: "train".into(),
        uid: "claim-uid-1".into(),
    };
    let resp = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.claims["claim-uid-1"];
    assert_eq!(r.error, "");
    assert_eq!(
        r.devices[0].cdi_device_ids,
        ["gpu.hybridlet.io/claim=claim-uid-1-gpu-3"]
    );
    let spec_file = root
        .path()
        .join("var/run/cdi/gpu_hybridlet_io-claim-uid-1.json");
    let spec = cdi_spec(&spec_file, &r.devices[0].cdi_device_ids);
    assert_eq!(
        spec["devices"][0]["containerEdits"]["env"][0],
        "NVIDIA_VISIBLE_DEVICES=GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003"
    );
    // Only nodes that exist: the fixture has no /dev/nvidia-uvm-tools.
    let nodes: Vec<&str> = spec["devices"][0]["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"]);
    // The checkpoint records the pod, which labels the GPU's metrics.
    let checkpoint: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            root.path()
                .join("var/lib/hybridlet/dra-gpu.hybridlet.io.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        checkpoint["claims"]["claim-uid-1"]["pods"],
        json!(["train-0"])
    );

    client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim],
        })
        .await
        .unwrap();
    assert!(!spec_file.exists());

    // A GPU whose device node is missing (driver not loaded) fails that claim, saying how
    // to create the node.
    std::fs::remove_file(root.path().join("dev/nvidia5")).unwrap();
    api.put(
        "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/nonode",
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": "nonode", "namespace": "ml", "uid": "claim-uid-2"},
               "spec": {},
               "status": {"allocation": {"devices": {"results": [
                   {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": "fra1-r12-n07", "device": "gpu-5"}]}}}}),
    );
    let resp = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1::Claim {
                namespace: "ml".into(),
                name: "nonode".into(),
                uid: "claim-uid-2".into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let err = &resp.claims["claim-uid-2"].error;
    assert!(
        err.contains("/dev/nvidia5 does not exist") && err.contains("nvidia-modprobe"),
        "{err}"
    );
    assert!(
        !root
            .path()
            .join("var/run/cdi/gpu_hybridlet_io-claim-uid-2.json")
            .exists()
    );

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!dra.exists() && !reg.exists(), "sockets left behind");
}

/// The SR-IOV driver on the E810 fixture: 64 VFs in the slice with their topology; a claim
/// for a VF already on vfio-pci is prepared into a CDI spec with its IOMMU group's device;
/// a claim for a VF the kernel will not move (the fixture has no kernel behind it) fails
/// for that claim only, naming the VF, and its driver override is cleared again.
#[tokio::test(flavor = "multi_thread")]
async fn sriov_dra_publishes_vfs_and_prepares_through_vfio() {
    let d = Daemon::start(
        |root| hybridlet_fixtures::e810_server(root).unwrap(),
        |config| {
            let config = config.replace(
                "    gpu:\n      driverName: gpu.example.com",
                "    sriov:\n      enabled: true",
            );
            assert!(
                config.contains("sriov:\n      enabled: true"),
                "fixture changed"
            );
            config
        },
        |_| vec!["--device-sample-interval".into(), "200ms".into()],
    )
    .await;
    let (api, root, kubelet) = (&d.api, &d.root, &d.kubelet);
    let dra = kubelet.join("plugins/sriov.hybridlet.io/dra.sock");
    wait_until("the SR-IOV DRA socket", || is_socket(&dra)).await;
    wait_until("the ResourceSlice", || {
        !api.list("/apis/resource.k8s.io/v1/resourceslices")
            .is_empty()
    })
    .await;
    let slices = api.list("/apis/resource.k8s.io/v1/resourceslices");
    let spec = &slices[0]["spec"];
    assert_eq!(spec["driver"], "sriov.hybridlet.io");
    let devices = spec["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 64);
    let vf = devices
        .iter()
        .find(|d| d["name"] == "vf-0000-81-08-1")
        .unwrap();
    assert_eq!(vf["attributes"]["pciAddress"]["string"], "0000:81:08.1");
    assert_eq!(vf["attributes"]["pfName"]["string"], "ens2f0");
    assert_eq!(
        vf["attributes"]["resource.kubernetes.io/pcieRoot"]["string"],
        "pci0000:80"
    );
    assert_eq!(vf["attributes"]["numaNode"]["int"], 1);
    assert_eq!(vf["attributes"]["linkSpeedMbps"]["int"], 100000);
    assert_eq!(vf["attributes"]["rdma"]["bool"], false);
    let with_netdev = devices
        .iter()
        .find(|d| d["name"] == "vf-0000-81-00-2")
        .unwrap();
    assert_eq!(with_netdev["attributes"]["netdev"]["string"], "ens2f0v0");

    for (name, uid, device) in [
        ("dpdk", "uid-vfio", "vf-0000-81-08-1"),
        ("moved", "uid-iavf", "vf-0000-81-00-2"),
    ] {
        api.put(
            &format!("/apis/resource.k8s.io/v1/namespaces/net/resourceclaims/{name}"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                   "metadata": {"name": name, "namespace": "net", "uid": uid},
                   "spec": {},
                   "status": {"allocation": {"devices": {"results": [
                       {"request": "vf", "driver": "sriov.hybridlet.io", "pool": "fra1-r12-n07", "device": device}]}}}}),
        );
    }
    let mut client = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&dra).await.unwrap(),
    );
    let claim = |name: &str, uid: &str| v1::Claim {
        namespace: "net".into(),
        name: name.into(),
        uid: uid.into(),
    };
    let resp = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim("dpdk", "uid-vfio"), claim("moved", "uid-iavf")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.claims["uid-vfio"].error, "");
    let spec = cdi_spec(
        &root
            .path()
            .join("var/run/cdi/sriov_hybridlet_io-uid-vfio.json"),
        &resp.claims["uid-vfio"].devices[0].cdi_device_ids,
    );
    let edits = &spec["devices"][0]["containerEdits"];
    assert_eq!(edits["env"][0], "PCIDEVICE_SRIOV_HYBRIDLET_IO=0000:81:08.1");
    assert_eq!(edits["deviceNodes"][0]["path"], "/dev/vfio/vfio");
    assert!(
        edits["deviceNodes"][1]["path"]
            .as_str()
            .unwrap()
            .starts_with("/dev/vfio/")
    );
    let err = &resp.claims["uid-iavf"].error;
    assert!(
        err.contains("0000:81:00.2") && err.contains("still bound to iavf"),
        "{err}"
    );
    let vf_dir = root.path().join("sys/bus/pci/devices/0000:81:00.2");
    assert_eq!(
        std::fs::read_to_string(vf_dir.join("driver_override")).unwrap(),
        "\n",
        "override left behind"
    );

    client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim("dpdk", "uid-vfio")],
        })
        .await
        .unwrap();
    // The PF's link goes down: every VF is tainted (slices of at most 64 then) and comes
    // back untainted when the link does.
    let operstate = root.path().join("sys/class/net/ens2f0/operstate");
    let tainted = || {
        api.list("/apis/resource.k8s.io/v1/resourceslices")
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .filter(|d| {
                d["taints"][0]
                    == json!({"key": "sriov.hybridlet.io/pf-link-down", "value": "ens2f0", "effect": "NoSchedule"})
            })
            .count()
    };
    std::fs::write(&operstate, "down\n").unwrap();
    wait_until("all 64 VFs tainted", || tainted() == 64).await;
    std::fs::write(&operstate, "up\n").unwrap();
    wait_until("the taints removed", || tainted() == 0).await;

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// On disk after a start: every GPU CDI spec belongs to a checkpointed claim and every
/// checkpointed claim has its spec; no temporary file of an interrupted write is left.
fn consistent_after_restart(root: &Path) -> Result<usize, String> {
    let cdi = root.join("var/run/cdi");
    let checkpoint: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("var/lib/hybridlet/dra-gpu.hybridlet.io.json"))
            .map_err(|e| format!("checkpoint: {e}"))?,
    )
    .map_err(|e| format!("checkpoint: {e}"))?;
    let claims: std::collections::BTreeSet<String> = checkpoint["claims"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut specs = std::collections::BTreeSet::new();
    for dir in [cdi.clone(), root.join("var/lib/hybridlet")] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp.") {
                return Err(format!("temporary file left: {}", e.path().display()));
            }
            if dir == cdi
                && let Some(uid) = name
                    .strip_prefix("gpu_hybridlet_io-")
                    .and_then(|n| n.strip_suffix(".json"))
            {
                specs.insert(uid.to_string());
            }
        }
    }
    if specs != claims {
        return Err(format!(
            "CDI specs {specs:?} but checkpointed claims {claims:?}"
        ));
    }
    Ok(claims.len())
}

/// 500 prepare/unprepare cycles with the daemon killed (SIGKILL) at pseudo-random moments,
/// often in the middle of a call. After every restart the disk is consistent (a claim is
/// prepared with its CDI spec, or absent), the kubelet's retry of the interrupted call
/// converges, and at the end nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_points_during_500_cycles_nothing_is_half_done() {
    let mut d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 0).unwrap();
        },
        |config| config.replace("      driverName: gpu.example.com", "      enabled: true"),
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
            ]
        },
    )
    .await;
    let dra = d.kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    for i in 0..8 {
        d.api.put(
            &format!("/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/c{i}"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                   "metadata": {"name": format!("c{i}"), "namespace": "ml", "uid": format!("uid-{i}")},
                   "spec": {},
                   "status": {"allocation": {"devices": {"results": [
                       {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": "fra1-r12-n07", "device": format!("gpu-{i}")}]}}}}),
        );
    }
    // A small linear congruential generator: reproducible, no dependency.
    let mut seed: u64 = 0x5eed_1234;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let (mut kills, mut cycles) = (0, 0);
    let mut client = serving(&dra).await;
    while cycles < 500 {
        let c = &mut client;
        let i = next(8);
        let claim = v1::Claim {
            namespace: "ml".into(),
            name: format!("c{i}"),
            uid: format!("uid-{i}"),
        };
        // One cycle in twelve, a crash a few hundred microseconds later, landing before,
        // inside or after the calls below.
        let crash_in = (next(12) == 0).then(|| Duration::from_micros(next(3000)));
        let pid = d.agent.child.id();
        let killer = crash_in.map(|after| {
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            })
        });
        let prepared = c
            .node_prepare_resources(v1::NodePrepareResourcesRequest {
                claims: vec![claim.clone()],
            })
            .await;
        let unprepared = c
            .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: vec![claim.clone()],
            })
            .await;
        if let Some(k) = killer {
            k.join().unwrap();
            d.crash_and_restart();
            kills += 1;
            client = serving(&dra).await;
            // The restarted daemon has reconciled the disk before it serves.
            let left = consistent_after_restart(d.root.path()).unwrap();
            assert!(left <= 8);
            // The kubelet retries what it did not see finish: here, the unprepare.
            let r = client
                .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                    claims: vec![claim],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.claims[&format!("uid-{i}")].error, "");
        } else {
            let p = prepared.unwrap().into_inner();
            assert_eq!(p.claims[&format!("uid-{i}")].error, "", "cycle {cycles}");
            unprepared.unwrap();
        }
        cycles += 1;
    }
    assert!(kills >= 20, "only {kills} crashes in 500 cycles");
    // Everything was unprepared in the end: no claim, no spec, no temporary file.
    assert_eq!(consistent_after_restart(d.root.path()), Ok(0));
    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// A DRA client once the daemon answers on `socket` (after a start or a restart, the old
/// socket file may still be there for a moment).
async fn serving(
    socket: &Path,
) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = hybridlet_kubelet_plugin::connect(socket).await {
            let mut c = v1::dra_plugin_client::DraPluginClient::new(channel);
            if c.node_unprepare_resources(v1::NodeUnprepareResourcesRequest { claims: vec![] })
                .await
                .is_ok()
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "the DRA socket does not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Netdev mode on the DGX fixture (ConnectX VFs with RoCE netdevs and RDMA devices): the
/// claim's opaque config picks the mode; the VF stays on mlx5_core and the container gets
/// its netdev name, RDMA device and verbs nodes; a mode that does not exist is refused by
/// name.
#[tokio::test(flavor = "multi_thread")]
async fn sriov_netdev_mode_hands_over_the_interface_and_rdma_without_moving_the_vf() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 2).unwrap();
        },
        sriov_only,
        |_| Vec::new(),
    )
    .await;
    let (api, root, kubelet) = (&d.api, &d.root, &d.kubelet);
    let dra = kubelet.join("plugins/sriov.hybridlet.io/dra.sock");
    let mut client = serving(&dra).await;
    let vf = root.path().join("sys/bus/pci/devices/0000:64:00.2");
    let driver_before = std::fs::read_link(vf.join("driver")).unwrap();
    for (name, uid, mode) in [
        ("rdma", "uid-netdev", "netdev"),
        ("typo", "uid-typo", "dpdk"),
    ] {
        api.put(
            &format!("/apis/resource.k8s.io/v1/namespaces/net/resourceclaims/{name}"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                   "metadata": {"name": name, "namespace": "net", "uid": uid},
                   "spec": {},
                   "status": {"allocation": {"devices": {
                       "results": [{"request": "vf", "driver": "sriov.hybridlet.io", "pool": "fra1-r12-n07", "device": "vf-0000-64-00-2"}],
                       "config": [{"source": "FromClaim", "requests": ["vf"],
                                   "opaque": {"driver": "sriov.hybridlet.io", "parameters": {"mode": mode}}}]}}}}),
        );
    }
    let prepare = |name: &str, uid: &str| v1::NodePrepareResourcesRequest {
        claims: vec![v1::Claim {
            namespace: "net".into(),
            name: name.into(),
            uid: uid.into(),
        }],
    };
    let r = client
        .node_prepare_resources(prepare("typo", "uid-typo"))
        .await
        .unwrap()
        .into_inner();
    let err = &r.claims["uid-typo"].error;
    assert!(
        err.contains("mode must be \"vfio\" or \"netdev\", not \"dpdk\""),
        "{err}"
    );

    let r = client
        .node_prepare_resources(prepare("rdma", "uid-netdev"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims["uid-netdev"].error, "");
    let spec = cdi_spec(
        &root
            .path()
            .join("var/run/cdi/sriov_hybridlet_io-uid-netdev.json"),
        &r.claims["uid-netdev"].devices[0].cdi_device_ids,
    );
    let edits = &spec["devices"][0]["containerEdits"];
    let env: Vec<&str> = edits["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"PCIDEVICE_SRIOV_HYBRIDLET_IO=0000:64:00.2"),
        "{env:?}"
    );
    assert!(
        env.contains(&"SRIOV_HYBRIDLET_IO_NETDEV=enp100s0v0"),
        "{env:?}"
    );
    assert!(
        env.iter()
            .any(|e| e.starts_with("SRIOV_HYBRIDLET_IO_RDMA=mlx5_")),
        "{env:?}"
    );
    let nodes: Vec<&str> = edits["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert!(
        nodes
            .iter()
            .any(|n| n.starts_with("/dev/infiniband/uverbs")),
        "{nodes:?}"
    );
    assert!(nodes.contains(&"/dev/infiniband/rdma_cm"), "{nodes:?}");
    assert!(
        !nodes.iter().any(|n| n.starts_with("/dev/vfio")),
        "{nodes:?}"
    );
    assert_eq!(
        std::fs::read_link(vf.join("driver")).unwrap(),
        driver_before,
        "the VF moved"
    );
    // The mode is checkpointed, so a restart rebuilds the same spec.
    let checkpoint = std::fs::read_to_string(
        root.path()
            .join("var/lib/hybridlet/dra-sriov.hybridlet.io.json"),
    )
    .unwrap();
    let checkpoint: serde_json::Value = serde_json::from_str(&checkpoint).unwrap();
    assert_eq!(
        checkpoint["claims"]["uid-netdev"]["devices"][0]["config"]["mode"], "netdev",
        "{checkpoint}"
    );
    let r = client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![v1::Claim {
                namespace: "net".into(),
                name: "rdma".into(),
                uid: "uid-netdev".into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims["uid-netdev"].error, "");
    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// The SR-IOV slice follows the VFs without a timer: the PF's `sriov_numvfs` goes from 64
/// to 4 (the fixtures' kernel stand-in changes the tree) and the real kernel sends a device
/// uevent (a `change` written to `lo`'s uevent file, as root); the daemon walks, sees the
/// SR-IOV devices changed, restarts that driver alone, and the slice holds the 4 VFs — long
/// before the device walk's 10–15 minute timer.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root: writes /sys/class/net/lo/uevent to make the kernel send a uevent"]
async fn a_device_uevent_republishes_the_sriov_slice_without_a_timer() {
    let d = Daemon::start(
        |root| hybridlet_fixtures::e810_server(root).unwrap(),
        sriov_only,
        |_| Vec::new(),
    )
    .await;
    let slices = "/apis/resource.k8s.io/v1/resourceslices";
    let vfs = || -> usize {
        d.api
            .list(slices)
            .iter()
            .map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len))
            .sum()
    };
    wait_until("64 VFs published", || vfs() == 64).await;
    d.wait_log("ready").await;
    let kernel = hybridlet_fixtures::kernel::KernelStandIn::new(d.root.path());
    let numvfs = d
        .root
        .path()
        .join("sys/bus/pci/devices/0000:81:00.0/sriov_numvfs");
    (kernel.writer())(&numvfs, "0").unwrap();
    (kernel.writer())(&numvfs, "4").unwrap();
    let sent = Instant::now();
    std::fs::write("/sys/class/net/lo/uevent", "change").unwrap();
    wait_until("4 VFs published", || vfs() == 4).await;
    // The walk's timer is 10-15 minutes: only the uevent can have brought this. How fast
    // is the daemon bench's to measure (docs/benchmarks.md).
    eprintln!("uevent to the slice with 4 VFs: {:?}", sent.elapsed());
    assert!(
        !d.logged("its devices came or went").is_empty(),
        "{:?}",
        d.log()
    );
    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}
