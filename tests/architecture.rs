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
    // 3 also: containerd over the generated CRI and containerd protos
    ("hybridlet-cri", 3),
    // 4 the DRA framework (driver core, checkpoint, slices, health stream)
    ("hybridlet-dra", 4),
    // 5 domains: never depend on each other
    ("hybridlet-bootstrap", 5),
    ("hybridlet-csi", 5),
    ("hybridlet-gpu", 5),
    ("hybridlet-sriov", 5),
    ("hybridlet-pci", 5),
    ("hybridlet-images", 5),
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

/// Where `unsafe` may be, each with why: nowhere else (the workspace denies it).
const UNSAFE_ALLOWED: &[(&str, &str)] = &[(
    "crates/sys/src/nvml_mig.rs",
    "NVML's MIG calls through FFI: nvml-wrapper does not wrap them",
)];

#[test]
fn every_crate_uses_workspace_lints_and_unsafe_is_only_where_listed() {
    let root = workspace_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("unsafe_code = \"deny\""),
        "workspace lints must deny unsafe_code"
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
        let rel = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let has_unsafe = text.contains("allow(unsafe_code)") || text.contains("unsafe {");
        if has_unsafe && !UNSAFE_ALLOWED.iter().any(|(f, _)| *f == rel) {
            offenders.push(format!("{rel}: unsafe outside the allowed files"));
        }
        // Every unsafe block says why it is sound, on the lines just before it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.contains("unsafe {") {
                continue;
            }
            let said = lines[i.saturating_sub(3)..i]
                .iter()
                .chain(std::iter::once(line))
                .any(|l| l.contains("// SAFETY:"));
            if !said {
                offenders.push(format!(
                    "{rel}:{}: unsafe block without a // SAFETY: comment",
                    i + 1
                ));
            }
        }
    });
    assert!(offenders.is_empty(), "unsafe code: {offenders:#?}");
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

/// The module a source file is, as a path under its crate (`node::nfs` for
/// `src/node/nfs.rs`; empty for `lib.rs`/`main.rs`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Module paths a file names through `crate::` (`crate::a::b::Item`, `crate::{a, b::c}`):
/// the lower-case segments, which are modules.
fn crate_references(text: &str) -> Vec<Vec<String>> {
    fn path_at(s: &str) -> Vec<String> {
        s.split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|seg| {
                !seg.is_empty() && seg.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            })
            .collect()
    }
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or_default();
                for item in inner.split(',') {
                    let p = path_at(item.trim());
                    if !p.is_empty() {
                        out.push(p);
                    }
                }
            } else {
                let p = path_at(rest);
                if !p.is_empty() {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Cycles between a crate's modules that are allowed, each with why. Empty: none is.
const ALLOWED_MODULE_CYCLES: &[(&str, &str, &str)] = &[];

/// No two modules of one crate use each other, directly or through others: a module
/// is read after what it uses. Parent and child are exempt (a parent declares its
/// children; a child may use its parent's types).
#[test]
fn modules_of_a_crate_do_not_use_each_other_in_a_cycle() {
    let root = workspace_root();
    let mut cycles = Vec::new();
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        scan(&src, &mut |file, text| {
            files.push((module_of(&src, file), text.to_string()));
        });
        let modules: std::collections::BTreeSet<Vec<String>> =
            files.iter().map(|(m, _)| m.clone()).collect();
        let related = |a: &[String], b: &[String]| a.starts_with(b) || b.starts_with(a);
        let mut edges: BTreeMap<Vec<String>, std::collections::BTreeSet<Vec<String>>> =
            BTreeMap::new();
        for (module, text) in &files {
            for reference in crate_references(text) {
                // The longest module the path names.
                let Some(target) = (1..=reference.len())
                    .rev()
                    .map(|n| reference[..n].to_vec())
                    .find(|p| modules.contains(p))
                else {
                    continue;
                };
                if !related(module, &target) {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
        // Every module that reaches itself again.
        for start in edges.keys() {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            let mut seen = std::collections::BTreeSet::new();
            while let Some((at, path)) = stack.pop() {
                for next in edges.get(&at).into_iter().flatten() {
                    if next == start {
                        let names: Vec<String> = path.iter().map(|m| m.join("::")).collect();
                        let crate_name = src
                            .parent()
                            .unwrap()
                            .file_name()
                            .unwrap()
                            .to_string_lossy()
                            .to_string();
                        let allowed = ALLOWED_MODULE_CYCLES.iter().any(|(c, a, b)| {
                            *c == crate_name
                                && names.contains(&a.to_string())
                                && names.contains(&b.to_string())
                        });
                        if !allowed && names.first() <= names.last() {
                            cycles.push(format!(
                                "{crate_name}: {} -> {}",
                                names.join(" -> "),
                                start.join("::")
                            ));
                        }
                    } else if seen.insert(next.clone()) {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
    cycles.sort();
    cycles.dedup();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

/// The binary stays a thin entry point: command-line parsing, the daemon's wiring, exit
/// codes and logging. What does work belongs in the crates below it.
#[test]
fn the_binary_stays_thin() {
    const BUDGET: usize = 2_000;
    let src = workspace_root().join("crates/hybridlet/src");
    let mut lines = 0;
    scan(&src, &mut |_, text| lines += text.lines().count());
    assert!(
        lines <= BUDGET,
        "crates/hybridlet/src has {lines} lines, over its budget of {BUDGET}: move the work into a crate below it"
    );
}

/// The part of a source file before its `#[cfg(test)]` module (tests may do anything).
fn product_code(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// What only `hybridlet-sys` does to the host (ARCHITECTURE.md, "Host access"): it runs
/// programs, and it writes files (atomically, or as a file set with backups). Elsewhere,
/// product code reads what it needs and writes through `hybridlet-sys`; the exceptions
/// are listed with their reason.
#[test]
fn programs_run_and_files_are_written_only_through_sys() {
    const WRITES_ALLOWED: &[(&str, &str)] = &[
        (
            "crates/artifacts/src/fetch.rs",
            "a download's partial file, appended to as bytes arrive (resumable); placed with atomic_write",
        ),
        (
            "crates/csi/src/node/work.rs",
            "the kubelet's publish target: created with create_new (never truncating) before the bind mount",
        ),
    ];
    let root = workspace_root();
    let mut offenders = Vec::new();
    scan(&root.join("crates"), &mut |file, text| {
        let rel = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel.starts_with("crates/sys/")
            || rel.starts_with("crates/fixtures/")
            || rel.contains("/tests/")
            || rel.contains("/benches/")
            || rel.contains("/examples/")
            // Build scripts run on the build machine (git for the commit), never on a node.
            || rel.ends_with("/build.rs")
        {
            return;
        }
        let code = product_code(text);
        if code.contains("Command::new") || code.contains("process::Command") {
            offenders.push(format!(
                "{rel}: runs a program (use hybridlet_sys::process)"
            ));
        }
        let writes = ["fs::write(", "OpenOptions::new()", "File::create("];
        if writes.iter().any(|w| code.contains(w)) && !WRITES_ALLOWED.iter().any(|(f, _)| *f == rel)
        {
            offenders.push(format!(
                "{rel}: writes a file directly (use hybridlet_sys::atomic_write or fileset)"
            ));
        }
    });
    assert!(
        offenders.is_empty(),
        "host access outside hybridlet-sys:\n{}",
        offenders.join("\n")
    );
}
