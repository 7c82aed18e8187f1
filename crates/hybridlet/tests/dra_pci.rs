//! `hybridlet run` with the PCI DRA driver on the FPGA fixture, against the in-process
//! fake API server: only allowlisted functions are published (never the GPU, the VFs or
//! the switch ports), with their IDs, IOMMU group, placement and FPGA facts; a claim in
//! mode "driver" is prepared into a CDI spec with the vendor driver's device nodes; a
//! claim whose IOMMU group holds a function no rule allows is refused naming it, and
//! nothing on the host changes; AER errors and a down-trained link taint the device in the
//! slice, and the PCI families carry the functions' series.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use common::{Daemon, is_socket, wait_until};
use hybridlet_proto::dra::v1;
use serde_json::json;

const CONFIG: &str = "    pci:
      enabled: true
      allow:
        - {vendor: \"0x10ee\", deviceClass: fpga}
        - {vendor: \"0x8086\", device: \"0x0b30\", deviceClass: fpga}
        - {class: \"0x1200\"}
        - {vendor: \"0x10de\"}";

fn devices(api: &hybridlet_fixtures::apiserver::FakeApiServer) -> Vec<serde_json::Value> {
    api.list("/apis/resource.k8s.io/v1/resourceslices")
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pci_dra_publishes_allowlisted_functions_prepares_and_reports_health() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::fpga_server(root).unwrap();
            for node in ["dfl-fme.0", "dfl-port.0"] {
                let dev = root.join("dev");
                std::fs::create_dir_all(&dev).unwrap();
                std::fs::write(dev.join(node), "").unwrap();
            }
        },
        |config| {
            let config = config.replace("    gpu:\n      driverName: gpu.example.com", CONFIG);
            assert!(
                config.contains("pci:\n      enabled: true"),
                "fixture changed"
            );
            config
        },
        |_| vec!["--device-sample-interval".into(), "200ms".into()],
    )
    .await;
    let (api, root, kubelet) = (&d.api, &d.root, &d.kubelet);
    let dra = kubelet.join("plugins/pci.hybridlet.io/dra.sock");
    wait_until("the PCI DRA socket", || is_socket(&dra)).await;
    wait_until("the ResourceSlice", || !devices(api).is_empty()).await;
    let slices = api.list("/apis/resource.k8s.io/v1/resourceslices");
    assert_eq!(slices[0]["spec"]["driver"], "pci.hybridlet.io");
    let published = devices(api);
    let mut names: Vec<&str> = published
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "pci-0000-03-00-0",
            "pci-0000-03-00-1",
            "pci-0000-04-00-0",
            "pci-0000-05-00-0"
        ]
    );
    let alveo = published
        .iter()
        .find(|d| d["name"] == "pci-0000-03-00-0")
        .unwrap();
    let a = &alveo["attributes"];
    assert_eq!(a["deviceClass"]["string"], "fpga");
    assert_eq!(a["vendor"]["string"], "0x10ee");
    assert_eq!(a["device"]["string"], "0x505c");
    assert_eq!(a["subsystemDevice"]["string"], "0x000e");
    assert_eq!(a["driver"]["string"], "xclmgmt");
    assert_eq!(a["xrtShell"]["string"], "xilinx_u55c_gen3x16_xdma_base_3");
    assert_eq!(
        a["resource.kubernetes.io/pciBusID"]["string"],
        "0000:03:00.0"
    );
    assert_eq!(a["resource.kubernetes.io/pcieRoot"]["string"], "pci0000:00");
    assert_eq!(a["hybridlet.io/pcieSwitch"]["string"], "0000:01:00.0");
    assert!(a["iommuGroup"]["int"].is_i64(), "{a}");
    assert_eq!(alveo["capacity"]["bar2"]["value"], "536870912", "{alveo}");
    let dfl = published
        .iter()
        .find(|d| d["name"] == "pci-0000-04-00-0")
        .unwrap();
    assert_eq!(
        dfl["attributes"]["dflBitstreamId"]["string"],
        "0x23000410010309"
    );
    // Its link already runs at x8 of x16: tainted from the first sample.
    assert_eq!(
        dfl["taints"][0],
        json!({"key": "pci.hybridlet.io/link-degraded", "value": "x8-8.0GTs", "effect": "NoSchedule"})
    );
    let log = d.log().join("\n");
    assert!(
        log.contains("0000:07:00.0") && log.contains("GPU driver"),
        "the GPU the rules matched is not named as left alone"
    );

    for (name, device, config) in [
        ("dfl", "pci-0000-04-00-0", Some(json!({"mode": "driver"}))),
        ("mixed", "pci-0000-05-00-0", None),
    ] {
        let mut allocation = json!({"devices": {"results": [
            {"request": "fpga", "driver": "pci.hybridlet.io", "pool": "fra1-r12-n07", "device": device}]}});
        if let Some(parameters) = config {
            allocation["devices"]["config"] = json!([{"source": "FromClaim", "requests": [],
                "opaque": {"driver": "pci.hybridlet.io", "parameters": parameters}}]);
        }
        api.put(
            &format!("/apis/resource.k8s.io/v1/namespaces/fpga/resourceclaims/{name}"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                   "metadata": {"name": name, "namespace": "fpga", "uid": format!("uid-{name}")},
                   "spec": {}, "status": {"allocation": allocation}}),
        );
    }
    let mut client = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&dra).await.unwrap(),
    );
    let claim = |name: &str| v1::Claim {
        namespace: "fpga".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    };
    let resp = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim("dfl"), claim("mixed")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.claims["uid-dfl"].error, "");
    let path = root
        .path()
        .join("var/run/cdi/pci_hybridlet_io-uid-dfl.json");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    hybridlet_fixtures::cdi::validate(&spec).unwrap();
    for id in &resp.claims["uid-dfl"].devices[0].cdi_device_ids {
        assert!(
            hybridlet_fixtures::cdi::resolve(&spec, id).is_some(),
            "{id}"
        );
    }
    let text = spec.to_string();
    assert!(
        text.contains("/dev/dfl-fme.0") && text.contains("/dev/dfl-port.0"),
        "{text}"
    );
    let err = &resp.claims["uid-mixed"].error;
    assert!(
        err.contains("0000:05:00.1") && err.contains("does not allow"),
        "{err}"
    );
    let nic = root.path().join("sys/bus/pci/devices/0000:05:00.1");
    assert_eq!(
        std::fs::read_to_string(nic.join("driver_override")).unwrap(),
        "(null)\n",
        "the refused group was written to"
    );
    client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim("dfl")],
        })
        .await
        .unwrap();
    assert!(!path.exists());

    // An AER fatal error on the Alveo user function: tainted in the slice.
    std::fs::write(
        root.path()
            .join("sys/bus/pci/devices/0000:03:00.1/aer_dev_fatal"),
        "DLP 1\nTOTAL_ERR_FATAL 1\n",
    )
    .unwrap();
    wait_until("the AER taint", || {
        devices(api).iter().any(|d| {
            d["name"] == "pci-0000-03-00-1" && d["taints"][0]["key"] == "pci.hybridlet.io/aer-fatal"
        })
    })
    .await;
    let metrics = d.scrape().await;
    for line in [
        "hybridlet_pci_aer_errors_total{driver=\"pci.hybridlet.io\",device=\"pci-0000-03-00-1\",pci_bus_id=\"0000:03:00.1\",aer_severity=\"fatal\"} 1",
        "hybridlet_pci_link_width{driver=\"pci.hybridlet.io\",device=\"pci-0000-04-00-0\",pci_bus_id=\"0000:04:00.0\",link=\"current\"} 8",
        "hybridlet_pci_device_present{driver=\"pci.hybridlet.io\",device=\"pci-0000-05-00-0\",pci_bus_id=\"0000:05:00.0\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("hybridlet_pci_device_info{"), "{metrics}");

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}
