//! The command line as an operator uses it: exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hybridlet(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
    cmd.args(args)
        .env_remove("HYBRIDLET_CONFIG")
        .env_remove("HYBRIDLET_CONFIG_DIR")
        .env_remove("HYBRIDLET_ROOT")
        .env_remove("JOURNAL_STREAM");
    common::offline_aws(&mut cmd, home.path());
    cmd.output().expect("run hybridlet")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/config")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_rejects_each_kind_of_bad_config_with_78_and_the_field_path() {
    let mut kinds = 0;
    for entry in std::fs::read_dir(fixtures().join("bad")).unwrap() {
        let path = entry.unwrap().path();
        let first = std::fs::read_to_string(&path).unwrap();
        let expect = first
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .unwrap()
            .to_string();
        let out = hybridlet(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{}: {}",
            path.display(),
            text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{expect}: ")),
            "{}: stderr does not name {expect}:\n{stderr}",
            path.display()
        );
        kinds += 1;
    }
    assert!(kinds >= 10);
}

#[test]
fn check_accepts_good_configs() {
    let out = hybridlet(&[
        "check",
        "--config-only",
        "--config",
        fixtures().join("good/ssm.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mode: joined (cluster prod-hybrid in us-west-2, credentials ssm)"),
        "{stdout}"
    );
    // The activation code is a secret and never printed.
    assert!(!text(&out).contains("AbCdEfGhIjKlMnOpQrStUv"));
}

#[test]
fn check_on_an_empty_root_is_standalone_and_passes() {
    let root = tempfile::tempdir().unwrap();
    let out = hybridlet(&["--root", root.path().to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("embedded standalone defaults"));
}

/// With the PCI driver on, `check` says what the allow rules match on the host (and what
/// they match but the driver leaves alone), whether the IOMMU is on and vfio-pci loaded.
#[test]
fn check_reports_what_the_pci_allowlist_matches_and_vfio_readiness() {
    let root = tempfile::tempdir().unwrap();
    hybridlet_fixtures::fpga_server(root.path()).unwrap();
    let etc = root.path().join("etc/hybridlet");
    std::fs::create_dir_all(&etc).unwrap();
    let config = |allow: &str| {
        std::fs::write(
            etc.join("config.yaml"),
            format!("apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  dra:\n    pci:\n      enabled: true\n      allow: [{allow}]\n"),
        )
        .unwrap();
        let out = hybridlet(&["--root", root.path().to_str().unwrap(), "check"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    };
    let out = config(r#"{vendor: "0x10ee", deviceClass: fpga}, {vendor: "0x10de"}"#);
    assert!(out.contains("ok: IOMMU: on ("), "{out}");
    assert!(out.contains("ok: vfio-pci: vfio-pci loaded"), "{out}");
    assert!(
        out.contains("warning: PCI allowlist: 2 function(s): 0000:03:00.0 (10ee:505c, xclmgmt), 0000:03:00.1 (10ee:505d, xocl)")
            && out.contains("0000:07:00.0 (10de:2335) matches spec.dra.pci.allow but is left alone: NVIDIA GPUs belong to the GPU driver"),
        "{out}"
    );
    let out = config(r#"{vendor: "0xabcd"}"#);
    assert!(
        out.contains("warning: PCI allowlist: spec.dra.pci.allow matches no PCI function"),
        "{out}"
    );
    std::fs::remove_dir_all(root.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    std::fs::remove_dir_all(root.path().join("sys/kernel/iommu_groups")).unwrap();
    let out = config(r#"{vendor: "0x10ee"}"#);
    assert!(
        out.contains("warning: IOMMU: off") && out.contains("intel_iommu=on"),
        "{out}"
    );
    assert!(
        out.contains("warning: vfio-pci: vfio-pci is not loaded")
            && out.contains("modprobe vfio-pci"),
        "{out}"
    );
}

#[test]
fn check_uses_config_and_drop_ins_under_root() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/hybridlet");
    std::fs::create_dir_all(etc.join("config.d")).unwrap();
    std::fs::copy(fixtures().join("good/ssm.yaml"), etc.join("config.yaml")).unwrap();
    std::fs::write(
        etc.join("config.d/90-bad.yaml"),
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  kubelet:\n    flags: [--hostname-override=x]\n",
    )
    .unwrap();
    let out = hybridlet(&["--root", root.path().to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("spec.kubelet.flags[0]: --hostname-override is not allowed"),
        "{}",
        text(&out)
    );
}

#[test]
fn host_check_failures_exit_1() {
    let root = tempfile::tempdir().unwrap();
    let check = |extra: &[&str]| {
        let config = fixtures().join("good/iam-ra-with-agent.yaml");
        let mut args = vec![
            "--root",
            root.path().to_str().unwrap(),
            "check",
            // The fixture's endpoint is not on loopback: no network checks here.
            "--offline",
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        hybridlet(&args)
    };
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("FAIL: IAM Roles Anywhere certificate"));
    assert!(
        text(&out).contains("FAIL: kernel module: br_netfilter is not loaded"),
        "{}",
        text(&out)
    );

    // Not a certificate: named as such.
    std::fs::create_dir_all(root.path().join("etc/iam/pki")).unwrap();
    std::fs::write(root.path().join("etc/iam/pki/server.pem"), "x").unwrap();
    std::fs::write(root.path().join("etc/iam/pki/server.key"), "x").unwrap();
    assert!(
        text(&check(&[])).contains("is not a PEM X.509 certificate"),
        "{}",
        text(&check(&[]))
    );
    // Another node's certificate: its CN is not this node's name.
    hybridlet_fixtures::place_iam_ra_pki(root.path(), "other-node").unwrap();
    assert!(
        text(&check(&[])).contains("CN is \"other-node\" but nodeName is \"fra1-r12-n07\""),
        "{}",
        text(&check(&[]))
    );
    hybridlet_fixtures::place_iam_ra_pki(root.path(), "fra1-r12-n07").unwrap();
    for (path, text) in [
        ("proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n"),
        ("proc/sys/net/ipv4/ip_forward", "1\n"),
        ("sys/fs/cgroup/cgroup.controllers", "cpu io memory pids\n"),
        ("sys/module/overlay/refcnt", "3\n"),
        ("sys/module/br_netfilter/refcnt", "0\n"),
    ] {
        let p = root.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ok: swap: off"), "{}", text(&out));

    // The same as JSON for automation.
    let out = check(&["-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["ok"], true);
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "IP forwarding" && c["status"] == "ok")
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn missing_named_config_is_a_config_error() {
    let out = hybridlet(&["check", "--config", "/nonexistent/hybridlet.yaml"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent/hybridlet.yaml"));
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for args in [
        &["frobnicate"][..],
        &["check", "--bogus"],
        &["install"],
        &[],
    ] {
        let out = hybridlet(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
    }
    let out = hybridlet(&["--log-level", "info,=[bad", "version"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = hybridlet(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: hybridlet"));
}

#[test]
fn upgrade_without_an_install_says_what_to_do_first() {
    let root = tempfile::tempdir().unwrap();
    let out = hybridlet(&["--root", root.path().to_str().unwrap(), "upgrade", "1.34"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("run `hybridlet install <version>` first"),
        "{}",
        text(&out)
    );
    let out = hybridlet(&["upgrade"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = hybridlet(&["upgrade", "1.34", "--rollback"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}

#[test]
fn init_without_a_node_config_is_a_config_error() {
    let root = tempfile::tempdir().unwrap();
    let out = hybridlet(&["--root", root.path().to_str().unwrap(), "init"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("NodeConfig"), "{}", text(&out));
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
}

/// TLS files that do not exist or do not pair: `run` stops with 78 naming spec.admin.tls.
#[test]
fn unusable_admin_tls_files_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  admin:\n    listenAddress: 127.0.0.1:0\n    tls:\n      certFile: /nonexistent/cert.pem\n      keyFile: /nonexistent/key.pem\n",
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = hybridlet(&[
        "--root",
        root.path().to_str().unwrap(),
        "run",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("spec.admin.tls: certFile"),
        "{}",
        text(&out)
    );
}

#[test]
fn version_prints_text_and_json() {
    let out = hybridlet(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with(&format!("hybridlet {}", env!("CARGO_PKG_VERSION")))
    );
    let out = hybridlet(&["version", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // The build embeds the checkout's commit and that commit's date (UTC), as git says
    // them (the tests run from a git checkout; CI's is a clean clone).
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .env("TZ", "UTC")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        v["commit"],
        git(&["rev-parse", "--short=12", "HEAD"]),
        "{v}"
    );
    assert_eq!(
        v["buildDate"],
        git(&[
            "show",
            "-s",
            "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
            "--format=%cd",
            "HEAD"
        ]),
        "{v}"
    );
}

#[test]
fn check_verifies_configured_pfs_on_the_host() {
    let root = tempfile::tempdir().unwrap();
    hybridlet_fixtures::e810_server(root.path()).unwrap();
    let cfg = root.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  sriov:\n    physicalFunctions:\n      - {interface: ens2f0, numVfs: 32}\n",
    )
    .unwrap();
    let args = [
        "--root",
        root.path().to_str().unwrap(),
        "check",
        "--config",
        cfg.to_str().unwrap(),
    ];
    let out = hybridlet(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(
            "ok: SR-IOV PF: interface ens2f0 (0000:81:00.0): 64 VFs now, 32 configured, at most 128"
        ),
        "{}",
        text(&out)
    );
    std::fs::write(
        &cfg,
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  sriov:\n    physicalFunctions:\n      - {interface: ens9f9, numVfs: 4}\n",
    )
    .unwrap();
    let out = hybridlet(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("FAIL: SR-IOV PF: interface ens9f9"),
        "{}",
        text(&out)
    );
}

fn token_cmd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
    cmd.args(args);
    common::offline_aws(&mut cmd, home.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn token_prints_an_exec_credential() {
    let creds = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
    ];
    let token_of = |out: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["status"]["token"].as_str().unwrap().to_string()
    };
    use hybridlet_fixtures::eks_token::verify;
    let out = token_cmd(
        &[
            "token",
            "--cluster-id",
            "prod-hybrid",
            "--region",
            "eu-west-1",
        ],
        &creds,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "ExecCredential");
    assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1beta1");
    let token = v["status"]["token"].as_str().unwrap();
    // Signed for this cluster and region, as the API server's authenticator checks it.
    assert_eq!(verify(token, "secret", "prod-hybrid").unwrap(), "eu-west-1");
    assert!(verify(token, "secret", "another-cluster").is_err());
    let ts = v["status"]["expirationTimestamp"].as_str().unwrap();
    assert_eq!(ts.len(), 20, "{ts}");
    assert!(ts.ends_with('Z'));

    // Cluster and region from the NodeConfig.
    let out = token_cmd(
        &[
            "token",
            "--config",
            fixtures().join("good/ssm.yaml").to_str().unwrap(),
        ],
        &creds,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        verify(&token_of(&out), "secret", "prod-hybrid").unwrap(),
        "us-west-2",
        "the NodeConfig's cluster name and region"
    );

    // No credentials anywhere: a clear failure, not a hang on instance metadata.
    let out = token_cmd(
        &["token", "--cluster-id", "c", "--region", "us-west-2"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no AWS credentials"), "{}", text(&out));

    // No cluster known: usage error.
    let root = tempfile::tempdir().unwrap();
    let out = token_cmd(&["--root", root.path().to_str().unwrap(), "token"], &creds);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}
