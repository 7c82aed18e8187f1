//! Enforces the layering written in ARCHITECTURE.md: a crate depends only on crates in
//! lower layers (so domain crates never depend on each other), and every workspace crate
//! is assigned a layer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Layer of each workspace crate, lowest first. Keep in sync with ARCHITECTURE.md.
const LAYERS: &[(&str, u8)] = &[
    // 1 foundation
    ("hybridlet-sys", 1),
    ("hybridlet-config", 1),
    ("hybridlet-runtime", 1),
    // test support (dev-dependency and demo tool only), depends on nothing of ours
    ("hybridlet-fixtures", 0),
    // 2 adapters
    ("hybridlet-aws", 2),
    ("hybridlet-artifacts", 2),
    ("hybridlet-kube", 2),
    ("hybridlet-proto", 2),
    ("hybridlet-metrics", 2),
    // 3 plugin framework
    ("hybridlet-kubelet-plugin", 3),
    // 4 the DRA framework (driver core, checkpoint, slices, health stream)
    ("hybridlet-dra", 4),
    // 5 domains: never depend on each other
    ("hybridlet-bootstrap", 5),
    ("hybridlet-csi", 5),
    ("hybridlet-gpu", 5),
    ("hybridlet-sriov", 5),
    // 6 applications: what the commands do, over the domains
    ("hybridlet-join", 6),
    ("hybridlet-devices", 6),
    // 7 top: the binary
    ("hybridlet", 7),
    // workspace-wide tests may use anything
    ("hybridlet-tests", 8),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dependencies_point_down_the_layers() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let meta = metadata();
    let members: Vec<&serde_json::Value> = meta["packages"].as_array().unwrap().iter().collect();
    let mut problems = Vec::new();
    for pkg in &members {
        let name = pkg["name"].as_str().unwrap();
        let Some(&layer) = layers.get(name) else {
            problems.push(format!(
                "{name} has no layer: add it to ARCHITECTURE.md and LAYERS"
            ));
            continue;
        };
        for dep in pkg["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if !dep_name.starts_with("hybridlet") {
                continue;
            }
            let kind = dep["kind"].as_str().unwrap_or("normal");
            match layers.get(dep_name) {
                None => problems.push(format!("{name} depends on {dep_name}, which has no layer")),
                Some(&dep_layer) if dep_layer >= layer => problems.push(format!(
                    "{name} (layer {layer}) depends on {dep_name} (layer {dep_layer}) as a {kind} dependency; \
                     crates may only use crates in lower layers"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_crate_uses_workspace_lints_and_only_sys_may_allow_unsafe() {
    let root = workspace_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("unsafe_code = \"forbid\""),
        "workspace lints must forbid unsafe_code"
    );
    let meta = metadata();
    for pkg in meta["packages"].as_array().unwrap() {
        let path = PathBuf::from(pkg["manifest_path"].as_str().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{} does not inherit the workspace lints",
            path.display()
        );
    }
    let mut offenders = Vec::new();
    scan(&root.join("crates"), &mut |file, text| {
        let in_sys = file.starts_with(root.join("crates/sys"));
        if !in_sys && (text.contains("allow(unsafe_code)") || text.contains("unsafe {")) {
            offenders.push(file.display().to_string());
        }
    });
    assert!(
        offenders.is_empty(),
        "unsafe outside hybridlet-sys: {offenders:?}"
    );
}

fn scan(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, f);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            f(&path, &text);
        }
    }
}
