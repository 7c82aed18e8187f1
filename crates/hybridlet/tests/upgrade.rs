//! `hybridlet upgrade` under a temporary root, against a release mirror and a fake API
//! server on 127.0.0.1: the version-skew and drain checks refuse with exit 75 and change
//! nothing; a dry run changes nothing; a real upgrade swaps verified binaries and keeps
//! the old ones; `--rollback` restores them; an unreachable API server refuses unless
//! `--force`; uninstall removes what upgrade kept, and with `--delete-node` the Node object
//! (refusing, with nothing changed, while the API server is down).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::Path;
use std::process::{Command, Output};

use hybridlet_fixtures::apiserver::FakeApiServer;
use hybridlet_fixtures::files::release_mirror;
use serde_json::json;

const NODE: &str = "fra1-r12-n07";

fn kubelet(version: &str) -> Vec<u8> {
    format!("#!/bin/sh\necho kubelet {version}\n").into_bytes()
}

fn mirror() -> String {
    let release = |v: &'static str| {
        (
            v,
            vec![
                ("kubelet", kubelet(v)),
                (
                    "kubectl",
                    format!("#!/bin/sh\necho kubectl {v}\n").into_bytes(),
                ),
            ],
        )
    };
    release_mirror(&[
        release("1.31.3"),
        release("1.32.1"),
        release("1.33.0"),
        release("1.34.0"),
    ])
    .url("/manifest.yaml")
}

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("HYBRIDLET_MANIFEST")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pod(namespace: &str, name: &str, owner: Option<&str>, phase: &str) -> serde_json::Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": phase}});
    if let Some(kind) = owner {
        p["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": kind, "name": "o", "uid": "u"}]);
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_checks_swaps_keeps_and_rolls_back() {
    let api = FakeApiServer::start().await.unwrap();
    api.put(
        "/version",
        json!({"major": "1", "minor": "33", "gitVersion": "v1.33.2-eks-113cf36", "gitCommit": "x",
               "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
               "compiler": "gc", "platform": "linux/amd64"}),
    );
    let node = |unschedulable: bool| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"unschedulable": unschedulable}})
    };
    api.put(&format!("/api/v1/nodes/{NODE}"), node(false));
    api.put(
        "/api/v1/namespaces/ml/pods/train-0",
        pod("ml", "train-0", Some("ReplicaSet"), "Running"),
    );
    api.put(
        "/api/v1/namespaces/kube-system/pods/cilium-x",
        pod("kube-system", "cilium-x", Some("DaemonSet"), "Running"),
    );
    api.put(
        "/api/v1/namespaces/ml/pods/done",
        pod("ml", "done", None, "Succeeded"),
    );

    let manifest = mirror();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let etc = r.join("etc/hybridlet");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
        etc.join("config.yaml"),
    )
    .unwrap();
    let kubelet_dir = r.join("var/lib/kubelet");
    std::fs::create_dir_all(&kubelet_dir).unwrap();
    std::fs::write(
        kubelet_dir.join("kubeconfig"),
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\ncurrent-context: k\nusers:\n- name: u\n  user:\n    token: node-token\n", api.url()),
    )
    .unwrap();
    let bin = r.join("usr/bin/kubelet");
    let record = r.join("var/lib/hybridlet/install.json");
    let read_record = || {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&record).unwrap())
            .unwrap()
    };
    let m = ["--manifest", manifest.as_str()];
    let upgrade = |args: &[&str]| {
        let mut all = vec!["upgrade"];
        all.extend_from_slice(args);
        all.extend_from_slice(&m);
        run(r, &all)
    };

    let o = run(
        r,
        &[
            "install",
            "1.31",
            "--credential-provider",
            "ssm",
            "--manifest",
            &manifest,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.31.3"));

    // Newer than the control plane, and not cordoned: both reasons, nothing changed.
    let o = upgrade(&["1.34"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("newer than the control plane: 1.34.0 > 1.33.2"),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "node {NODE} is not cordoned; run `kubectl drain {NODE}"
        )),
        "{t}"
    );
    assert!(t.contains("nothing was changed"), "{t}");
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.31.3"));

    // Cordoned but a ReplicaSet pod still runs (DaemonSet and finished pods do not count).
    api.put(&format!("/api/v1/nodes/{NODE}"), node(true));
    let o = upgrade(&["1.32"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(
        text(&o).contains("not drained: 1 pod(s) still run there (ml/train-0)"),
        "{}",
        text(&o)
    );

    api.remove("/api/v1/namespaces/ml/pods/train-0");
    let o = upgrade(&["1.32", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("would replace /usr/bin/kubelet with kubelet 1.32.1"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.31.3"));

    let o = upgrade(&["1.32"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cordoned and drained"), "{}", text(&o));
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.32.1"));
    let kept = r.join("var/lib/hybridlet/rollback/1.31.3");
    assert_eq!(
        std::fs::read(kept.join("usr_bin_kubelet")).unwrap(),
        kubelet("1.31.3")
    );
    let rec = read_record();
    assert_eq!(rec["version"], "1.32.1");
    assert_eq!(rec["previous"]["version"], "1.31.3");
    assert!(!r.join("usr/bin/.kubelet.hybridlet-upgrade").exists());

    let o = upgrade(&["1.32"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("already installed; nothing to do"),
        "{}",
        text(&o)
    );

    let o = upgrade(&["1.31"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(
        text(&o).contains("older than the installed 1.32.1"),
        "{}",
        text(&o)
    );

    // A second upgrade keeps one generation: 1.32.1's copy, not 1.31.3's any more.
    let o = upgrade(&["1.33"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.33.0"));
    assert!(!kept.exists());
    let kept = r.join("var/lib/hybridlet/rollback/1.32.1");
    assert_eq!(
        std::fs::read(kept.join("usr_bin_kubelet")).unwrap(),
        kubelet("1.32.1")
    );

    let o = run(r, &["upgrade", "--rollback"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.32.1"));
    assert_eq!(
        std::fs::read(r.join("usr/local/bin/kubectl")).unwrap(),
        b"#!/bin/sh\necho kubectl 1.32.1\n"
    );
    let rec = read_record();
    assert_eq!(rec["version"], "1.32.1");
    assert!(rec.get("previous").is_none(), "{rec}");
    assert!(!kept.exists());
    let o = run(r, &["upgrade", "--rollback"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(text(&o).contains("nothing to roll back to"), "{}", text(&o));

    // The API server is down: refused, unless forced (then said aloud).
    api.set_down(true);
    let o = upgrade(&["1.33"]);
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(text(&o).contains("cannot be read with"), "{}", text(&o));
    let o = upgrade(&["1.33", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("warning (--force)"), "{}", text(&o));
    assert_eq!(std::fs::read(&bin).unwrap(), kubelet("1.33.0"));

    // Uninstall with --delete-node while the API server is down: refused, nothing changed.
    let o = run(r, &["uninstall", "--delete-node"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("deleting Node {NODE} failed")),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("Nothing was changed"), "{}", text(&o));
    assert!(bin.exists() && kubelet_dir.join("kubeconfig").exists());

    // With it back: the Node goes first, then everything install and upgrade placed.
    api.set_down(false);
    let o = run(r, &["uninstall", "--delete-node"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("Node {NODE}: deleted from the cluster")),
        "{}",
        text(&o)
    );
    assert!(api.list("/api/v1/nodes").is_empty());
    assert!(!bin.exists());
    assert!(!r.join("var/lib/hybridlet/rollback").exists());
}
