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
    for dir in ["bursting", "csi", "dra", "prometheus"] {
        yaml_files(&deploy().join(dir), &mut files);
    }
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        for d in docs(f) {
            if f.ends_with("prometheus/alerts.yaml") || f.ends_with("recording-rules.yaml") {
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
        .filter(|f| !f.ends_with("prometheus/alerts.yaml") && !f.ends_with("recording-rules.yaml"))
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
fn clauses(expression: &str, domain: &str) -> Vec<(String, String)> {
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
                .strip_prefix(&format!("device.attributes[\"{domain}\"]."))
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
        let clauses = clauses(expression, "pci.hybridlet.io");
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

/// The GPU DeviceClasses and the MIG claim template select what the GPU driver publishes
/// for a DGX H200 whose GPU 0 is in MIG mode: whole GPUs, and MIG devices (existing ones,
/// or every placement with dynamic MIG), the template the `1g.18gb` ones.
#[test]
fn gpu_device_classes_select_whole_gpus_and_mig_devices() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 0).unwrap();
    hybridlet_fixtures::enable_mig(dir.path(), 0, &[(19, 0), (9, 4)]).unwrap();
    let source = hybridlet_gpu::FakeSource::from_file(&dir.path().join("fake-nvml.json")).unwrap();
    let (gpus, _) = hybridlet_gpu::discover(&source, &[]).unwrap();
    let select = |file: &str, dynamic: bool| -> Vec<String> {
        let parts = hybridlet_gpu::dra::parts(
            "gpu.hybridlet.io",
            "n",
            gpus.clone(),
            dir.path().join("dev"),
            hybridlet_gpu::dra::GpuOptions {
                dynamic_mig: dynamic,
                ..Default::default()
            },
        );
        let doc = &docs(&deploy().join("dra").join(file))[0];
        let spec = if doc["kind"] == "DeviceClass" {
            &doc["spec"]
        } else {
            &doc["spec"]["spec"]["devices"]["requests"][0]["exactly"]
        };
        let clauses = clauses(
            spec["selectors"][0]["cel"]["expression"].as_str().unwrap(),
            "gpu.hybridlet.io",
        );
        parts
            .devices
            .iter()
            .filter(|d| {
                clauses.iter().all(|(name, value)| {
                    name == "driver" && value == "gpu.hybridlet.io"
                        || matches!(d.attributes.get(name), Some(hybridlet_dra::Attr::String(v)) if v == value)
                })
            })
            .map(|d| d.name.clone())
            .collect()
    };
    let whole: Vec<String> = (1..8).map(|i| format!("gpu-{i}")).collect();
    assert_eq!(select("deviceclass-gpu.yaml", false), whole);
    assert_eq!(
        select("deviceclass-gpu-mig.yaml", false),
        ["gpu-0-mig-1g18gb-0", "gpu-0-mig-3g71gb-4"]
    );
    assert_eq!(select("deviceclass-gpu-mig.yaml", true).len(), 25);
    assert_eq!(
        select("deviceclass-gpu.yaml", true).len(),
        8,
        "the parent too"
    );
    let template = &docs(&deploy().join("dra/claim-template-gpu-mig-1g.yaml"))[0];
    assert_eq!(
        template["spec"]["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"],
        "mig.gpu.hybridlet.io"
    );
    assert_eq!(
        select("claim-template-gpu-mig-1g.yaml", true),
        (0..7)
            .map(|s| format!("gpu-0-mig-1g18gb-{s}"))
            .collect::<Vec<_>>()
    );
}

/// Keys of `v` (an object) outside `known`, and `required` keys it lacks, at `at`.
fn shape(v: &serde_json::Value, at: &str, known: &[&str], required: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(object) = v.as_object() else {
        return vec![format!("{at}: not an object")];
    };
    for key in object.keys() {
        if !known.contains(&key.as_str()) {
            problems.push(format!("{at}.{key}: unknown field (known: {known:?})"));
        }
    }
    for key in required {
        if !object.contains_key(*key) {
            problems.push(format!("{at}.{key}: required"));
        }
    }
    problems
}

fn one_of(v: &serde_json::Value, at: &str, allowed: &[&str]) -> Vec<String> {
    match v.as_str() {
        Some(s) if allowed.contains(&s) => Vec::new(),
        _ => vec![format!("{at}: {v} is not one of {allowed:?}")],
    }
}

fn items(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A Go duration as Karpenter reads it (`720h`, `10m`, `1h30m`), or `Never`.
fn karpenter_duration(v: &serde_json::Value, at: &str) -> Vec<String> {
    let text = v.as_str().unwrap_or_default();
    let mut rest = text;
    let mut ok = !rest.is_empty();
    while ok && !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        ok = digits > 0 && matches!(&rest[digits..unit_end], "h" | "m" | "s");
        rest = &rest[unit_end..];
    }
    if ok || text == "Never" {
        Vec::new()
    } else {
        vec![format!("{at}: {v} is not a duration")]
    }
}

/// The Karpenter v1 NodePool fields the kit uses, as karpenter.sh/v1's CRD defines them.
fn nodepool(d: &serde_json::Value) -> Vec<String> {
    let mut p = Vec::new();
    let spec = &d["spec"];
    p.extend(shape(
        spec,
        "spec",
        &["template", "disruption", "limits", "weight"],
        &["template"],
    ));
    p.extend(shape(
        &spec["template"],
        "spec.template",
        &["metadata", "spec"],
        &["spec"],
    ));
    let t = &spec["template"]["spec"];
    p.extend(shape(
        t,
        "spec.template.spec",
        &[
            "nodeClassRef",
            "requirements",
            "taints",
            "startupTaints",
            "expireAfter",
            "terminationGracePeriod",
        ],
        &["nodeClassRef", "requirements"],
    ));
    p.extend(shape(
        &t["nodeClassRef"],
        "nodeClassRef",
        &["group", "kind", "name"],
        &["group", "kind", "name"],
    ));
    for (i, r) in items(&t["requirements"]).iter().enumerate() {
        let at = format!("requirements[{i}]");
        p.extend(shape(
            r,
            &at,
            &["key", "operator", "values", "minValues"],
            &["key", "operator"],
        ));
        p.extend(one_of(
            &r["operator"],
            &at,
            &["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"],
        ));
        if matches!(r["operator"].as_str(), Some("In" | "NotIn")) && items(&r["values"]).is_empty()
        {
            p.push(format!("{at}.values: required for In/NotIn"));
        }
    }
    for (i, t) in items(&t["taints"]).iter().enumerate() {
        let at = format!("taints[{i}]");
        p.extend(shape(
            t,
            &at,
            &["key", "value", "effect"],
            &["key", "effect"],
        ));
        p.extend(one_of(
            &t["effect"],
            &at,
            &["NoSchedule", "PreferNoSchedule", "NoExecute"],
        ));
    }
    if !t["expireAfter"].is_null() {
        p.extend(karpenter_duration(&t["expireAfter"], "expireAfter"));
    }
    let dis = &spec["disruption"];
    p.extend(shape(
        dis,
        "spec.disruption",
        &["consolidationPolicy", "consolidateAfter", "budgets"],
        &[],
    ));
    p.extend(one_of(
        &dis["consolidationPolicy"],
        "consolidationPolicy",
        &["WhenEmpty", "WhenEmptyOrUnderutilized"],
    ));
    p.extend(karpenter_duration(
        &dis["consolidateAfter"],
        "consolidateAfter",
    ));
    p
}

/// The EC2NodeClass fields the kit uses, as karpenter.k8s.aws/v1's CRD defines them.
fn ec2nodeclass(d: &serde_json::Value) -> Vec<String> {
    let mut p = Vec::new();
    let spec = &d["spec"];
    p.extend(shape(
        spec,
        "spec",
        &[
            "role",
            "instanceProfile",
            "amiSelectorTerms",
            "amiFamily",
            "subnetSelectorTerms",
            "securityGroupSelectorTerms",
            "capacityReservationSelectorTerms",
            "blockDeviceMappings",
            "userData",
            "tags",
            "kubelet",
            "metadataOptions",
            "detailedMonitoring",
            "associatePublicIPAddress",
            "instanceStorePolicy",
            "context",
        ],
        &[
            "amiSelectorTerms",
            "subnetSelectorTerms",
            "securityGroupSelectorTerms",
        ],
    ));
    if spec["role"].is_null() == spec["instanceProfile"].is_null() {
        p.push("spec: exactly one of role and instanceProfile".into());
    }
    for (i, t) in items(&spec["amiSelectorTerms"]).iter().enumerate() {
        let at = format!("amiSelectorTerms[{i}]");
        p.extend(shape(
            t,
            &at,
            &["alias", "id", "name", "owner", "tags", "ssmParameter"],
            &[],
        ));
        if let Some(alias) = t["alias"].as_str() {
            let family = alias.split_once('@').map(|(f, _)| f);
            if !matches!(
                family,
                Some("al2" | "al2023" | "bottlerocket" | "windows2019" | "windows2022")
            ) {
                p.push(format!("{at}.alias: {alias:?} is not <family>@<version>"));
            }
        }
    }
    for field in ["subnetSelectorTerms", "securityGroupSelectorTerms"] {
        if items(&spec[field]).is_empty() {
            p.push(format!("spec.{field}: at least one term"));
        }
    }
    for (i, b) in items(&spec["blockDeviceMappings"]).iter().enumerate() {
        let at = format!("blockDeviceMappings[{i}]");
        p.extend(shape(b, &at, &["deviceName", "ebs", "rootVolume"], &[]));
        p.extend(shape(
            &b["ebs"],
            &format!("{at}.ebs"),
            &[
                "volumeSize",
                "volumeType",
                "iops",
                "throughput",
                "encrypted",
                "kmsKeyID",
                "deleteOnTermination",
                "snapshotID",
                "volumeInitializationRate",
            ],
            &[],
        ));
        p.extend(one_of(
            &b["ebs"]["volumeType"],
            &at,
            &["standard", "io1", "io2", "gp2", "sc1", "st1", "gp3"],
        ));
    }
    p
}

/// The KEDA ScaledObject fields the kit uses (keda.sh/v1alpha1), with the Prometheus
/// scaler's required metadata.
fn scaledobject(d: &serde_json::Value) -> Vec<String> {
    let mut p = Vec::new();
    let spec = &d["spec"];
    p.extend(shape(
        spec,
        "spec",
        &[
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "initialCooldownPeriod",
            "idleReplicaCount",
            "minReplicaCount",
            "maxReplicaCount",
            "fallback",
            "advanced",
            "triggers",
        ],
        &["scaleTargetRef", "triggers"],
    ));
    p.extend(shape(
        &spec["scaleTargetRef"],
        "scaleTargetRef",
        &["name", "apiVersion", "kind", "envSourceContainerName"],
        &["name"],
    ));
    for (i, t) in items(&spec["triggers"]).iter().enumerate() {
        let at = format!("triggers[{i}]");
        p.extend(shape(
            t,
            &at,
            &[
                "type",
                "metadata",
                "name",
                "authenticationRef",
                "metricType",
                "useCachedMetrics",
            ],
            &["type", "metadata"],
        ));
        if t["type"] == "prometheus" {
            for key in ["serverAddress", "query", "threshold"] {
                if !t["metadata"][key].is_string() {
                    p.push(format!("{at}.metadata.{key}: required, a string"));
                }
            }
        }
    }
    p
}

/// deploy/bursting works as written: each object matches the schema facts of its kind
/// (Karpenter v1 NodePool and EC2NodeClass, KEDA ScaledObject), and the pieces refer to
/// each other correctly — the NodePool's class exists, the burst pods tolerate the
/// NodePool's taints and select it, the on-prem pods ask for hybrid nodes and a
/// ResourceClaimTemplate of the kit whose class hybridlet publishes, the ScaledObject
/// scales a Deployment of the kit on a recording rule the kit defines, the Service selects
/// both Deployments.
#[test]
fn bursting_kit_matches_its_schemas_and_fits_together() {
    let dir = deploy().join("bursting");
    let mut all = Vec::new();
    for f in [
        "nodepool.yaml",
        "ec2nodeclass.yaml",
        "workload.yaml",
        "keda-scaledobject.yaml",
    ] {
        all.extend(docs(&dir.join(f)));
    }
    let find = |kind: &str, name: &str| {
        all.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/bursting"))
            .clone()
    };
    let mut problems = Vec::new();
    for d in &all {
        let kind = d["kind"].as_str().unwrap();
        let found = match (d["apiVersion"].as_str().unwrap(), kind) {
            ("karpenter.sh/v1", "NodePool") => nodepool(d),
            ("karpenter.k8s.aws/v1", "EC2NodeClass") => ec2nodeclass(d),
            ("keda.sh/v1alpha1", "ScaledObject") => scaledobject(d),
            ("apps/v1", "Deployment")
            | ("v1", "Service")
            | ("resource.k8s.io/v1", "ResourceClaimTemplate") => Vec::new(),
            other => vec![format!("unexpected object {other:?}")],
        };
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{kind} {}: {p}", d["metadata"]["name"])),
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");

    let pool = find("NodePool", "gpu-burst");
    let class_ref = &pool["spec"]["template"]["spec"]["nodeClassRef"];
    assert_eq!(class_ref["kind"], "EC2NodeClass");
    assert_eq!(class_ref["group"], "karpenter.k8s.aws");
    find("EC2NodeClass", class_ref["name"].as_str().unwrap());

    let burst = find("Deployment", "inference-burst");
    let pod = &burst["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["karpenter.sh/nodepool"], "gpu-burst");
    for taint in items(&pool["spec"]["template"]["spec"]["taints"]) {
        assert!(
            items(&pod["tolerations"])
                .iter()
                .any(|t| t["key"] == taint["key"]
                    && (t["operator"] == "Exists" || t["value"] == taint["value"])
                    && (t["effect"].is_null() || t["effect"] == taint["effect"])),
            "the burst pods do not tolerate {taint}"
        );
    }
    assert!(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"].is_string());

    let onprem = find("Deployment", "inference-onprem");
    let pod = &onprem["spec"]["template"]["spec"];
    assert_eq!(
        pod["nodeSelector"]["eks.amazonaws.com/compute-type"],
        "hybrid"
    );
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "hybridlet.io/site"
    );
    let claims: Vec<&str> = items(&pod["resourceClaims"])
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in items(&pod["resourceClaims"]) {
        let template = find(
            "ResourceClaimTemplate",
            c["resourceClaimTemplateName"].as_str().unwrap(),
        );
        assert_eq!(
            template["spec"]["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"],
            "gpu.hybridlet.io"
        );
    }
    for container in items(&pod["containers"]) {
        for c in items(&container["resources"]["claims"]) {
            assert!(
                claims.contains(&c["name"].as_str().unwrap()),
                "{c} is not a pod resourceClaim"
            );
        }
    }
    for d in [&burst, &onprem] {
        let selector = d["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector {
            assert_eq!(
                &labels[k], v,
                "{} selector does not match its template",
                d["metadata"]["name"]
            );
        }
        let service = find("Service", "inference");
        for (k, v) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &labels[k], v,
                "the Service does not select {}",
                d["metadata"]["name"]
            );
        }
    }

    let scaled = find("ScaledObject", "inference-burst");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "inference-burst");
    assert_eq!(
        scaled["metadata"]["namespace"],
        burst["metadata"]["namespace"]
    );
    let query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    let rules = docs(&dir.join("recording-rules.yaml"));
    let recorded: Vec<String> = items(&rules[0]["groups"])
        .iter()
        .flat_map(|g| items(&g["rules"]))
        .filter_map(|r| r["record"].as_str().map(str::to_string))
        .collect();
    assert!(
        recorded.iter().any(|r| query.contains(r.as_str())),
        "{query} uses no rule of {recorded:?}"
    );
}

/// The schema checks catch what they claim to: a typo'd field, a wrong enum, a missing
/// required field.
#[test]
fn the_bursting_schema_checks_refuse_broken_objects() {
    let pool = docs(&deploy().join("bursting/nodepool.yaml"))[0].clone();
    assert!(nodepool(&pool).is_empty());
    let mut typo = pool.clone();
    typo["spec"]["disruption"]["consolidationPolicy"] = serde_json::json!("WhenUnderutilized");
    assert!(nodepool(&typo)[0].contains("WhenUnderutilized"));
    let mut extra = pool.clone();
    extra["spec"]["template"]["spec"]["kubelet"] = serde_json::json!({});
    assert!(nodepool(&extra)[0].contains("kubelet: unknown field"));
    let class = docs(&deploy().join("bursting/ec2nodeclass.yaml"))[0].clone();
    assert!(ec2nodeclass(&class).is_empty());
    let mut both = class.clone();
    both["spec"]["instanceProfile"] = serde_json::json!("p");
    assert!(ec2nodeclass(&both)[0].contains("exactly one of role"));
    let scaled = docs(&deploy().join("bursting/keda-scaledobject.yaml"))[0].clone();
    let mut number = scaled.clone();
    number["spec"]["triggers"][0]["metadata"]["threshold"] = serde_json::json!(1);
    assert!(scaledobject(&number)[0].contains("threshold"));
}
