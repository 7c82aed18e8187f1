//! Rendered files against golden copies in tests/golden/<case>/ (path separators become
//! `__`). `HYBRIDLET_REGENERATE=1 cargo test -p hybridlet-bootstrap` rewrites them; review the
//! diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::{Path, PathBuf};

use hybridlet_bootstrap::{ClusterCoordinates, DEFAULT_SANDBOX_IMAGE, NodeIdentity, render};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/config/good")
        .join(name)
}

fn check(case: &str, config_file: &str, cluster: ClusterCoordinates, node: NodeIdentity) {
    let loaded = hybridlet_config::load(&hybridlet_config::ConfigSources {
        file: fixture(config_file),
        file_required: true,
        drop_in_dir: None,
    })
    .unwrap();
    let files = render(&loaded.config, &cluster, &node, DEFAULT_SANDBOX_IMAGE).unwrap();
    compare(case, &files);
}

fn compare(case: &str, files: &[hybridlet_bootstrap::RenderedFile]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case);
    let regenerate = std::env::var_os("HYBRIDLET_REGENERATE").is_some();
    if regenerate {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut names = Vec::new();
    for f in files {
        let name = f.path.trim_start_matches('/').replace('/', "__");
        let golden = dir.join(&name);
        let text = format!("# mode {:o}\n{}", f.mode, f.contents);
        if regenerate {
            std::fs::write(&golden, &text).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden)
                .unwrap_or_else(|_| panic!("{} has no golden file {}", f.path, golden.display()));
            assert_eq!(text, want, "{} differs from {}", f.path, golden.display());
        }
        names.push(name);
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    names.sort();
    assert_eq!(
        on_disk, names,
        "golden files without a rendered file (or the reverse)"
    );
}

#[test]
fn iam_roles_anywhere_with_mirrors_proxy_and_overrides() {
    check(
        "iam-ra",
        "iam-ra-with-agent.yaml",
        ClusterCoordinates {
            name: "prod-hybrid".into(),
            region: "eu-west-1".into(),
            endpoint: "https://ABCDEF0123456789.gr7.eu-west-1.eks.amazonaws.com".into(),
            certificate_authority: "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJzekNDQVZtZ0F3SUJBZ0lVWG05amEwTkJabTl5U0hsaWNtbGtiR1YwVkdWemRITXdDZ1lJS29aSXpqMEUKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=".into(),
            service_cidr: "172.16.0.0/16".into(),
        },
        NodeIdentity {
            node_name: "fra1-r12-n07".into(),
            credential_provider: "iam-ra".into(),
            aws_config_file: Some("/etc/aws/hybrid/config".into()),
            ssm_agent_unit: None,
            ecr_credential_provider: true,
        },
    );
}

/// The SSM cases' cluster (as DescribeCluster would give it) and node (a managed
/// instance), with the agent's unit and whether the ECR provider is installed.
fn ssm_case(case: &str, config_file: &str, agent_unit: &str, ecr_credential_provider: bool) {
    check(
        case,
        config_file,
        ClusterCoordinates {
            name: "prod-hybrid".into(),
            region: "us-west-2".into(),
            endpoint: "https://0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com".into(),
            certificate_authority:
                "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
                    .into(),
            service_cidr: "10.100.0.0/16".into(),
        },
        NodeIdentity {
            node_name: "mi-0123456789abcdef0".into(),
            credential_provider: "ssm".into(),
            aws_config_file: None,
            ssm_agent_unit: Some(agent_unit.into()),
            ecr_credential_provider,
        },
    );
}

#[test]
fn ssm_with_defaults() {
    ssm_case("ssm", "ssm.yaml", "amazon-ssm-agent.service", false);
}

#[test]
fn ssm_behind_a_proxy() {
    ssm_case(
        "ssm-proxy",
        "ssm-proxy.yaml",
        "snap.amazon-ssm-agent.amazon-ssm-agent.service",
        true,
    );
}

#[test]
fn kubelet_unit_for_install() {
    compare("install", &[hybridlet_bootstrap::kubelet_unit()]);
}
