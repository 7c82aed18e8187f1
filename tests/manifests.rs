//! Every manifest under deploy/ parses as Kubernetes objects (apiVersion, kind,
//! metadata.name in each document), and the DRA set fits together: the DeviceClasses
//! select our drivers, no RBAC widens what nodes may do, and the admission policy that
//! keeps each node to its own ResourceSlices is bound and checks spec.nodeName against the
//! node's identity on create, update and delete.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::path::{Path, PathBuf};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn docs(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn every_manifest_is_a_kubernetes_object() {
    let mut files = Vec::new();
    for dir in ["csi", "dra", "prometheus"] {
        yaml_files(&deploy().join(dir), &mut files);
    }
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        for d in docs(f) {
            if f.ends_with("prometheus/alerts.yaml") {
                assert!(d["groups"].is_array(), "{}", f.display());
                continue;
            }
            for field in ["apiVersion", "kind"] {
                assert!(d[field].is_string(), "{}: no {field} in {d}", f.display());
            }
            assert!(
                d["metadata"]["name"].is_string(),
                "{}: unnamed {d}",
                f.display()
            );
        }
    }
}

#[test]
fn dra_manifests_fit_together() {
    let dra = deploy().join("dra");
    let classes: Vec<serde_json::Value> = ["deviceclass-gpu.yaml", "deviceclass-sriov.yaml"]
        .iter()
        .flat_map(|f| docs(&dra.join(f)))
        .collect();
    for (class, driver) in classes
        .iter()
        .zip(["gpu.hybridlet.io", "sriov.hybridlet.io"])
    {
        assert_eq!(class["kind"], "DeviceClass");
        let selectors = class["spec"]["selectors"].to_string();
        assert!(
            selectors.contains(&format!("device.driver == '{driver}'"))
                || selectors.contains(&format!("device.driver == \\\"{driver}\\\"")),
            "{class}"
        );
    }

    // The netdev class carries the mode the SR-IOV driver reads from the allocation.
    let netdev = &docs(&dra.join("deviceclass-sriov-netdev.yaml"))[0];
    assert_eq!(netdev["kind"], "DeviceClass");
    let opaque = &netdev["spec"]["config"][0]["opaque"];
    assert_eq!(opaque["driver"], "sriov.hybridlet.io");
    assert_eq!(opaque["parameters"]["mode"], "netdev");

    // The node's own identity is enough (docs/dra.md "Identity", checked against the
    // requests the daemon makes in crates/hybridlet/tests/authorization.rs): nothing under
    // deploy/ grants the nodes more.
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    for f in files
        .iter()
        .filter(|f| !f.ends_with("prometheus/alerts.yaml"))
    {
        for d in docs(f) {
            let kind = d["kind"].as_str().unwrap_or_default();
            assert!(
                !kind.ends_with("Role") && !kind.ends_with("RoleBinding"),
                "{}: a {kind} widens what nodes may do",
                f.display()
            );
        }
    }

    let policy = docs(&dra.join("node-slices-policy.yaml"));
    let (vap, binding) = (&policy[0], &policy[1]);
    assert_eq!(vap["kind"], "ValidatingAdmissionPolicy");
    assert_eq!(binding["kind"], "ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"][0], "Deny");
    let rule = &vap["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(rule["resources"][0], "resourceslices");
    assert_eq!(
        rule["operations"],
        serde_json::json!(["CREATE", "UPDATE", "DELETE"])
    );
    assert!(
        vap["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("system:node:")
    );
    let checks = vap["spec"]["validations"].to_string();
    assert!(
        checks.contains("spec.nodeName == variables.node"),
        "{checks}"
    );
    assert!(checks.contains("oldObject.spec.nodeName"), "{checks}");
}

/// The clauses of a DeviceClass selector in the subset our manifests use:
/// `device.driver == "D"` and `device.attributes["D"].NAME == "V"`, joined by `&&`.
/// Anything else fails the test, so a manifest cannot outgrow what is checked here.
fn clauses(expression: &str) -> Vec<(String, String)> {
    expression
        .split("&&")
        .map(|c| {
            let (left, right) = c
                .split_once("==")
                .unwrap_or_else(|| panic!("unsupported clause {c:?}"));
            let value = right.trim().trim_matches('"').to_string();
            let left = left.trim();
            if left == "device.driver" {
                return ("driver".to_string(), value);
            }
            let name = left
                .strip_prefix("device.attributes[\"pci.hybridlet.io\"].")
                .unwrap_or_else(|| panic!("unsupported clause {c:?}"));
            (name.to_string(), value)
        })
        .collect()
}

/// The PCI DeviceClasses select what the PCI driver publishes: each selector's clauses,
/// evaluated against the devices the driver builds for the FPGA fixture (an Alveo U55C
/// pair, an Intel DFL card, an accelerator), match the devices the class is for.
#[test]
fn pci_device_classes_select_what_the_pci_driver_publishes() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::fpga_server(dir.path()).unwrap();
    let sysfs = hybridlet_sys::Sysfs::new(&hybridlet_sys::HostRoot::new(dir.path()));
    let (pci, _) = sysfs.pci_devices().unwrap();
    let rule = |vendor: u16, class: &str| hybridlet_pci::Rule {
        vendor: Some(vendor),
        device_class: class.to_string(),
        ..Default::default()
    };
    let intel_pac = hybridlet_pci::Rule {
        device: Some(0x0b30),
        ..rule(0x8086, "fpga")
    };
    let rules = [rule(0x10ee, "fpga"), intel_pac, rule(0x1d0f, "accelerator")];
    let inventory = hybridlet_pci::discover(&sysfs, &pci, &rules);
    let devices: Vec<_> = inventory
        .functions
        .iter()
        .map(hybridlet_pci::dra::slice_device)
        .collect();
    let selected = |file: &str| -> Vec<String> {
        let class = &docs(&deploy().join("dra").join(file))[0];
        assert_eq!(class["kind"], "DeviceClass");
        let expression = class["spec"]["selectors"][0]["cel"]["expression"]
            .as_str()
            .unwrap();
        let clauses = clauses(expression);
        devices
            .iter()
            .filter(|d| {
                clauses.iter().all(|(name, value)| {
                    if name == "driver" {
                        return value == "pci.hybridlet.io";
                    }
                    matches!(d.attributes.get(name), Some(hybridlet_dra::Attr::String(v)) if v == value)
                })
            })
            .map(|d| d.name.clone())
            .collect()
    };
    assert_eq!(
        selected("deviceclass-pci-fpga.yaml"),
        ["pci-0000-03-00-0", "pci-0000-03-00-1", "pci-0000-04-00-0"]
    );
    assert_eq!(
        selected("deviceclass-pci-alveo-u55c.yaml"),
        ["pci-0000-03-00-1"]
    );
    let alveo = &docs(&deploy().join("dra/deviceclass-pci-alveo-u55c.yaml"))[0];
    assert_eq!(
        alveo["spec"]["config"][0]["opaque"]["parameters"]["mode"],
        "driver"
    );
    let template = &docs(&deploy().join("dra/claim-template-fpga-vf-same-switch.yaml"))[0];
    assert_eq!(
        template["spec"]["spec"]["devices"]["constraints"][0]["matchAttribute"],
        "hybridlet.io/pcieSwitch"
    );
    for d in &devices {
        if d.name.starts_with("pci-0000-03") {
            assert!(
                d.attributes.contains_key("hybridlet.io/pcieSwitch"),
                "{d:?}"
            );
        }
    }
}
