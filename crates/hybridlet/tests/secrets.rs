//! Secrets planted in the configuration — a proxy password, an SSM activation code,
//! registry credentials in the inline containerd TOML — never appear in anything `check`,
//! `init`, `install` or `uninstall` print, in any mode, on stdout or stderr; and the
//! files that must hold them are readable by root only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const PROXY_PASSWORD: &str = "pr0xy-Pa55";
const PROXY_PASSWORD_ENCODED: &str = "pr0xy%2DPa55";
const ACTIVATION_CODE: &str = "SsmActivationSecretCode+Q1/xyz";
const REGISTRY_PASSWORD: &str = "registry-hunter2-Zq";

fn secrets() -> [&'static str; 4] {
    [
        PROXY_PASSWORD,
        PROXY_PASSWORD_ENCODED,
        ACTIVATION_CODE,
        REGISTRY_PASSWORD,
    ]
}

/// Cluster coordinates given in full (no DescribeCluster), the API server on a closed
/// loopback port (nothing leaves the machine).
const CLUSTER: &str = "  cluster:\n    name: prod-hybrid\n    region: us-west-2\n    apiServerEndpoint: https://127.0.0.1:1\n    certificateAuthority: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=\n    cidr: 10.100.0.0/16\n";

fn agent() -> String {
    format!(
        "---\napiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  proxy:\n    httpsProxy: http://svc:{PROXY_PASSWORD_ENCODED}@127.0.0.1:3128\n    httpProxy: http://svc:{PROXY_PASSWORD}@127.0.0.1:3128\n    noProxy: [localhost]\n"
    )
}

fn containerd() -> String {
    format!(
        "  containerd:\n    config: |\n      [plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"harbor.example\".auth]\n      username = \"robot\"\n      password = \"{REGISTRY_PASSWORD}\"\n"
    )
}

fn ssm_config() -> String {
    format!(
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n{CLUSTER}{}  hybrid:\n    ssm:\n      activationCode: \"{ACTIVATION_CODE}\"\n      activationId: \"8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d\"\n{}",
        containerd(),
        agent()
    )
}

fn iam_ra_config() -> String {
    format!(
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n{CLUSTER}{}  hybrid:\n    iamRolesAnywhere:\n      nodeName: fra1-r12-n07\n      trustAnchorArn: arn:aws:rolesanywhere:us-west-2:111122223333:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001\n      profileArn: arn:aws:rolesanywhere:us-west-2:111122223333:profile/0a1b2c3d-0000-4000-8000-000000000002\n      roleArn: arn:aws:iam::111122223333:role/AmazonEKSHybridNodesRole\n{}",
        containerd(),
        agent()
    )
}

fn run(root: &Path, config: &Path, args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
    cmd.arg("--root")
        .arg(root)
        .arg("--config")
        .arg(config)
        .args(args);
    common::offline_aws(&mut cmd, home.path());
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "aws-secret-key-not-shown");
    cmd.output().unwrap()
}

#[test]
fn no_command_prints_a_planted_secret_in_any_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, config) in [("ssm", ssm_config()), ("iam-ra", iam_ra_config())] {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        hybridlet_fixtures::place_iam_ra_pki(&root, "fra1-r12-n07").unwrap();
        // The SSM agent, present (a stand-in: under --root nothing is registered).
        let agent = root.join("usr/bin/amazon-ssm-agent");
        std::fs::create_dir_all(agent.parent().unwrap()).unwrap();
        std::fs::write(&agent, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &config).unwrap();
        let runs: &[&[&str]] = &[
            &["check", "--config-only"],
            &["check", "--config-only", "-o", "json"],
            &["check", "--offline"],
            &["check", "--offline", "-o", "json"],
            &["init", "--dry-run"],
            &["init", "--no-start"],
            &["init", "--dry-run"],
            &["init"],
            &[
                "install",
                "1.31",
                "--dry-run",
                "--manifest",
                "http://127.0.0.1:1/manifest.yaml",
            ],
            &[
                "install",
                "1.31",
                "--manifest",
                "http://127.0.0.1:1/manifest.yaml",
            ],
            &["uninstall"],
        ];
        for args in runs {
            let out = run(&root, &file, args);
            for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                let text = String::from_utf8_lossy(bytes);
                for secret in secrets() {
                    assert!(
                        !text.contains(secret),
                        "{name}: `hybridlet {}` printed {secret:?} on {stream}:\n{text}",
                        args.join(" ")
                    );
                }
            }
            checked += 1;
        }
        // The dry run shows the secret files as withheld, not as missing.
        let out = run(&root, &file, &["uninstall"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(&root, &file, &["init", "--dry-run"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("--- /etc/hybridlet/proxy.env ---\n<")
                && text.contains("may hold credentials, not shown>"),
            "{text}"
        );
    }
    assert_eq!(checked, 22);
}

#[test]
fn files_that_hold_secrets_are_root_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    hybridlet_fixtures::place_iam_ra_pki(&root, "fra1-r12-n07").unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, iam_ra_config()).unwrap();
    let out = run(&root, &file, &["init"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut holders = 0;
    for entry in walk(&root) {
        let text = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        if secrets().iter().any(|s| text.contains(s)) {
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} holds a secret with mode {mode:o}",
                entry.display()
            );
            holders += 1;
        }
    }
    // proxy.env, 00-nodeadm.toml (and its backups, if any).
    assert!(holders >= 2, "{holders}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.extend(walk(&p));
        } else if meta.is_file() {
            out.push(p);
        }
    }
    out
}
