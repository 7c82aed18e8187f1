//! `hybridlet devices` on the generated fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::process::{Command, Output};

fn devices(root: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .args(["--root", root.to_str().unwrap(), "devices"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn dgx_json_has_gpus_and_nics_with_topology() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 16).unwrap();
    let fixture = dir.path().join("fake-nvml.json");
    let out = devices(
        dir.path(),
        &["--nvml-fixture", fixture.to_str().unwrap(), "-o", "json"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gpuSource"], "fake");
    assert_eq!(v["gpus"].as_array().unwrap().len(), 8);
    let gpu3 = &v["gpus"][3];
    assert_eq!(gpu3["pciAddress"], "0000:63:00.0");
    assert_eq!(gpu3["pcieRoot"], "pci0000:60");
    assert_eq!(gpu3["pcieSwitch"], "0000:61:00.0");
    assert_eq!(gpu3["numaNode"], 0);
    assert_eq!(gpu3["uuid"], "GPU-5a0b0003-1c2d-4e5f-8a9b-0000dead0003");
    let pfs = v["physicalFunctions"].as_array().unwrap();
    assert_eq!(pfs.len(), 10);
    let rail3 = pfs
        .iter()
        .find(|p| p["pciAddress"] == "0000:64:00.0")
        .unwrap();
    assert_eq!(rail3["pcieSwitch"], gpu3["pcieSwitch"]);
    assert_eq!(rail3["vendorId"], "0x15b3");
    assert_eq!(rail3["deviceId"], "0x1021");
    assert_eq!(rail3["netdev"], "enp100s0np0");
    assert_eq!(rail3["linkSpeedMbps"], 400_000);
    assert_eq!(rail3["numVfs"], 16);
    let vf = &rail3["vfs"][9];
    assert_eq!(vf["index"], 9);
    assert_eq!(vf["pciAddress"], "0000:64:01.3");
    assert_eq!(vf["deviceId"], "0x101e");
    assert_eq!(vf["driver"], "mlx5_core");
    assert_eq!(vf["netdev"], "enp100s0v9");
    assert_eq!(vf["pcieSwitch"], "0000:61:00.0");
    assert!(vf["iommuGroup"].as_u64().is_some());
    assert!(v["skipped"].as_array().unwrap().is_empty());
}

#[test]
fn table_groups_by_numa_and_switch() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 2).unwrap();
    let fixture = dir.path().join("fake-nvml.json");
    let out = devices(dir.path(), &["--nvml-fixture", fixture.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "pci0000:bf switch 0000:c0:00.0")
        .unwrap();
    assert!(
        lines[at + 1]
            .trim()
            .starts_with("GPU 5  0000:c2:00.0  NVIDIA H200"),
        "{text}"
    );
    assert!(
        lines[at + 2]
            .trim()
            .starts_with("NIC    0000:c3:00.0  15b3:1021 mlx5_core enp195s0np0 400 Gb/s  VFs 2/16"),
        "{text}"
    );
    assert!(lines.iter().position(|l| *l == "NUMA node 1").unwrap() < at);
    assert!(
        text.contains("8 GPUs (fake), 10 SR-IOV PFs, 16 VFs"),
        "{text}"
    );
}

#[test]
fn e810_yaml_and_no_gpu_library() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::e810_server(dir.path()).unwrap();
    let out = devices(dir.path(), &["-o", "yaml"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    // No libnvidia-ml here: zero GPUs, not an error.
    assert!(text.starts_with("gpuSource: none\ngpus: []\n"), "{text}");
    assert!(text.contains("driver: vfio-pci"));
    assert!(text.contains("netdev: ens2f0v59"));
}

#[test]
fn broken_tree_still_answers_and_names_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::broken(dir.path()).unwrap();
    let out = devices(dir.path(), &["-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["physicalFunctions"].as_array().unwrap().len(), 2);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 4);
    assert!(
        v["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("0000:3c:00.0")
    );
    assert_eq!(v["warnings"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_nvml_fixture_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = devices(dir.path(), &["--nvml-fixture", "/nonexistent/nvml.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nvml.json"));
}

/// A GPU in MIG mode: the table names its MIG devices by profile and placement, the JSON
/// carries its profiles and instances as NVML reports them.
#[test]
fn a_gpu_in_mig_mode_shows_its_mig_devices() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 0).unwrap();
    hybridlet_fixtures::enable_mig(dir.path(), 2, &[(19, 0), (19, 1), (9, 4)]).unwrap();
    hybridlet_fixtures::enable_mig(dir.path(), 3, &[]).unwrap();
    let fixture = dir.path().join("fake-nvml.json");
    let out = devices(dir.path(), &["--nvml-fixture", fixture.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |gpu: &str| {
        text.lines()
            .find(|l| l.trim().starts_with(gpu))
            .unwrap()
            .to_string()
    };
    assert!(
        line("GPU 2 ").ends_with("MIG: 1g.18gb@0 1g.18gb@1 3g.71gb@4"),
        "{text}"
    );
    assert!(line("GPU 3 ").ends_with("MIG: no instances"), "{text}");
    assert!(!line("GPU 4 ").contains("MIG"), "{text}");
    let out = devices(
        dir.path(),
        &["--nvml-fixture", fixture.to_str().unwrap(), "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mig = &v["gpus"][2]["mig"];
    assert_eq!(mig["memorySlices"], 8);
    assert_eq!(mig["profiles"].as_array().unwrap().len(), 7);
    assert_eq!(
        mig["instances"][2]["placement"],
        serde_json::json!({"start": 4, "size": 4})
    );
    assert!(v["gpus"][4].get("mig").is_none());
}
