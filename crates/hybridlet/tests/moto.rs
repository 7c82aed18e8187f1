//! The join against moto, the AWS API emulator (PyPI `moto[server]`), on 127.0.0.1: init
//! resolves the cluster with the real SDK's EKS DescribeCluster (endpoint, service CIDR,
//! remote node networks) and refuses a node IP outside those networks; `hybridlet token`'s
//! presigned GetCallerIdentity is answered by moto's STS.
//!
//! moto is found through `HYBRIDLET_MOTO_SERVER` (which `.ci/run` sets after installing
//! it) or `moto_server` on the PATH; without it these tests fail and say how to get it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::moto::{Moto, moto, request};

const REGION: &str = "us-west-2";

/// moto picks the service from the SigV4 credential scope; it does not check signatures.
fn scope(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0"
    )
}

fn create_cluster(moto: &Moto, name: &str, node_cidr: &str) {
    let body = serde_json::json!({
        "name": name,
        "roleArn": "arn:aws:iam::123456789012:role/eks",
        "resourcesVpcConfig": {"subnetIds": ["subnet-1"]},
        "kubernetesNetworkConfig": {"serviceIpv4Cidr": "172.20.0.0/16"},
        "remoteNetworkConfig": {
            "remoteNodeNetworks": [{"cidrs": [node_cidr]}],
            "remotePodNetworks": [{"cidrs": ["10.90.0.0/16"]}]
        }
    })
    .to_string();
    let (status, answer) = request(
        &moto.url,
        "POST",
        "/clusters",
        Some(&body),
        &[
            ("Authorization", &scope("eks")),
            ("Content-Type", "application/json"),
        ],
    )
    .expect("moto answers");
    assert_eq!(status, 200, "CreateCluster: {answer}");
}

fn hybridlet(root: &Path, args: &[&str], moto: &Moto) -> Output {
    hybridlet_fixtures::place_iam_ra_pki(root, "fra1-r12-n07").unwrap();
    Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("AWS_ENDPOINT_URL", &moto.url)
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
        .env_remove("AWS_PROFILE")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
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

/// The IAM Roles Anywhere fixture (node IP 10.80.4.21) with `cluster` in us-west-2 and
/// neither endpoint nor service CIDR, so init must ask EKS; the CA stays (moto's is not a
/// certificate).
fn config(dir: &Path, cluster: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
    )
    .unwrap();
    let out: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("apiServerEndpoint:") && !t.starts_with("cidr:")
        })
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("name: prod-hybrid") {
                l.replace("prod-hybrid", cluster)
            } else if t.starts_with("region: eu-west-1") {
                l.replace("eu-west-1", REGION)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join(format!("{cluster}.yaml"));
    std::fs::write(&path, out + "\n").unwrap();
    path
}

#[test]
fn init_resolves_the_cluster_with_describe_cluster_against_moto() {
    let moto = moto();
    create_cluster(&moto, "site-a", "10.80.0.0/16");
    create_cluster(&moto, "site-b", "10.99.0.0/16");
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();

    let o = hybridlet(
        root.path(),
        &[
            "init",
            "--dry-run",
            "--config",
            config(dir.path(), "site-a").to_str().unwrap(),
        ],
        &moto,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("cluster site-a (us-west-2), API server https://"),
        "{t}"
    );
    assert!(
        t.contains(".us-west-2.eks.amazonaws.com"),
        "the endpoint moto made up: {t}"
    );
    assert!(
        t.contains("\"172.20.0.10\""),
        "cluster DNS from the service CIDR: {t}"
    );
    assert!(
        t.contains("eks-hybrid:///us-west-2/site-a/fra1-r12-n07"),
        "{t}"
    );

    // The same node against a cluster whose remote node network does not hold it.
    let o = hybridlet(
        root.path(),
        &[
            "init",
            "--dry-run",
            "--config",
            config(dir.path(), "site-b").to_str().unwrap(),
        ],
        &moto,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("this node's IP 10.80.4.21 (--node-ip in spec.kubelet.flags) is not in the cluster's remote node networks (10.99.0.0/16; DescribeCluster)"),
        "{}",
        text(&o)
    );

    // A cluster that does not exist: EKS's own error, and what to do.
    let o = hybridlet(
        root.path(),
        &[
            "init",
            "--dry-run",
            "--config",
            config(dir.path(), "nowhere").to_str().unwrap(),
        ],
        &moto,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("nowhere"), "{}", text(&o));
    // Only the certificate the test placed.
    let written: Vec<_> = std::fs::read_dir(root.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(written, ["iam"], "a dry run wrote something");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
}

#[test]
fn the_token_is_a_get_caller_identity_that_moto_sts_answers() {
    let moto = moto();
    let root = tempfile::tempdir().unwrap();
    let o = hybridlet(
        root.path(),
        &["token", "--cluster-id", "site-a", "--region", REGION],
        &moto,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cred: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cred["kind"], "ExecCredential");
    let token = cred["status"]["token"].as_str().unwrap();
    let b64 = token
        .strip_prefix("k8s-aws-v1.")
        .expect("the EKS token prefix");
    use base64::Engine as _;
    let url = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    let query = url
        .strip_prefix(&format!("https://sts.{REGION}.amazonaws.com/?"))
        .unwrap_or_else(|| panic!("not a regional STS URL: {url}"));
    for part in [
        "Action=GetCallerIdentity",
        "Version=2011-06-15",
        "X-Amz-Algorithm=AWS4-HMAC-SHA256",
        "X-Amz-Expires=60",
        "X-Amz-SignedHeaders=host%3Bx-k8s-aws-id",
    ] {
        assert!(
            query.split('&').any(|p| p == part),
            "{part} missing in {url}"
        );
    }
    // The credential scope the token was signed for: this region's STS.
    let credential = query
        .split('&')
        .find_map(|p| p.strip_prefix("X-Amz-Credential="))
        .unwrap()
        .replace("%2F", "/");
    let scope_parts: Vec<&str> = credential.split('/').collect();
    assert_eq!(
        scope_parts[2..],
        [REGION, "sts", "aws4_request"],
        "{credential}"
    );
    // moto picks the service from an Authorization header's scope (it checks no
    // signature), so the call carries the token's own scope there; the parameters are the
    // presigned ones, as a form body (STS takes query parameters either way).
    let routing = format!(
        "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders=host;x-k8s-aws-id, Signature=0"
    );
    let (status, answer) = request(
        &moto.url,
        "POST",
        "/",
        Some(query),
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("x-k8s-aws-id", "site-a"),
            ("Authorization", &routing),
        ],
    )
    .expect("moto answers");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("<GetCallerIdentityResult>"), "{answer}");
    assert!(answer.contains("<Arn>arn:aws:sts::"), "{answer}");
}

#[test]
fn check_asks_sts_who_the_node_is() {
    let moto = moto();
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // The API server steps fail fast on a closed loopback port; the credentials step is
    // what this test reads.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text_cfg = std::fs::read_to_string(config(dir.path(), "site-a")).unwrap();
    let cfg = dir.path().join("check.yaml");
    std::fs::write(
        &cfg,
        text_cfg.replacen(
            "  cluster:\n",
            &format!("  cluster:\n    apiServerEndpoint: https://{closed}\n"),
            1,
        ),
    )
    .unwrap();
    // No such cluster yet: the remote networks are not checked, and the warning says why
    // in AWS's words, not the SDK's debug dump.
    let o = hybridlet(
        root.path(),
        &["check", "--config", cfg.to_str().unwrap()],
        &moto,
    );
    let t = text(&o);
    assert!(
        t.contains("warning: remote node network: not checked: DescribeCluster site-a did not answer (eks:DescribeCluster site-a: service error: ResourceNotFoundException: No cluster found for name: site-a.)"),
        "{t}"
    );
    assert!(!t.contains("ErrorMetadata"), "{t}");

    create_cluster(&moto, "site-a", "10.80.0.0/16");
    let o = hybridlet(
        root.path(),
        &["check", "--config", cfg.to_str().unwrap()],
        &moto,
    );
    assert!(
        text(&o).contains(
            "ok: AWS credentials: STS says this node is arn:aws:sts::123456789012:user/moto"
        ),
        "{}",
        text(&o)
    );
    // The node IP against the remote node networks moto's DescribeCluster returns.
    assert!(
        text(&o).contains(
            "ok: remote node network: 10.80.4.21 (--node-ip in spec.kubelet.flags) is in 10.80.0.0/16 (DescribeCluster)"
        ),
        "{}",
        text(&o)
    );

    // No credentials at all: a failure that says where they come from.
    let o = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--root")
        .arg(root.path())
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env("AWS_ENDPOINT_URL", &moto.url)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("FAIL: AWS credentials:"), "{t}");
    assert!(t.contains("SSM: register the agent"), "{t}");
    assert!(
        t.contains(
            "warning: remote node network: not checked: DescribeCluster site-a did not answer"
        ),
        "{t}"
    );
}
