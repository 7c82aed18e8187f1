//! `hybridlet install` against a release manifest and artifacts served on 127.0.0.1:
//! version resolution, SHA-256 verification before placement, idempotent reruns, the
//! kubelet unit, the install record, and `uninstall` removing what install placed (but
//! not a binary the operator replaced since).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use hybridlet_fixtures::files::FileServer;

fn sha(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), bytes).unwrap();
    hybridlet_artifacts::sha256_file(&dir.path().join("x")).unwrap()
}

fn arch() -> &'static str {
    if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// The CNI plugins tarball as upstream lays it out: `./` and the programs at the top.
fn cni_tgz() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, body, mode) in [
        ("./bridge", &b"#!/bin/sh\necho bridge\n"[..], 0o755),
        ("./host-local", &b"#!/bin/sh\necho host-local\n"[..], 0o755),
        ("./LICENSE", &b"Apache-2.0\n"[..], 0o644),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A manifest with 1.31.2 and 1.31.3 (latest); `corrupt` publishes a wrong kubelet checksum.
fn server(corrupt: bool) -> FileServer {
    let kubelet = b"#!/bin/sh\necho kubelet 1.31.3\n".to_vec();
    let kubectl = b"#!/bin/sh\necho kubectl\n".to_vec();
    let helper = b"#!/bin/sh\necho signing helper\n".to_vec();
    let kubelet_sum = if corrupt {
        "1".repeat(64)
    } else {
        sha(&kubelet)
    };
    let a = arch();
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    files.insert("/1.31.3/kubelet".into(), kubelet.clone());
    files.insert(
        "/1.31.3/kubelet.sha256".into(),
        format!("{kubelet_sum}  kubelet\n").into_bytes(),
    );
    files.insert("/1.31.3/kubectl".into(), kubectl.clone());
    files.insert("/1.31.3/kubectl.sha256".into(), sha(&kubectl).into_bytes());
    files.insert("/helper".into(), helper.clone());
    files.insert("/helper.sha256".into(), sha(&helper).into_bytes());
    let ecr = b"#!/bin/sh\necho ecr-credential-provider\n".to_vec();
    files.insert("/1.31.3/ecr-credential-provider".into(), ecr.clone());
    files.insert(
        "/1.31.3/ecr-credential-provider.sha256".into(),
        sha(&ecr).into_bytes(),
    );
    let cni = cni_tgz();
    files.insert("/1.31.3/cni-plugins.tgz".into(), cni.clone());
    files.insert(
        "/1.31.3/cni-plugins.tgz.sha256".into(),
        sha(&cni).into_bytes(),
    );
    files.insert("/ssm/amazon-ssm-agent.deb".into(), b"!<arch>\n".to_vec());
    files.insert(
        "/ssm/amazon-ssm-agent.deb.sha256".into(),
        sha(b"!<arch>\n").into_bytes(),
    );
    let pause = b"an image archive".to_vec();
    files.insert("/images/pause.tar".into(), pause.clone());
    files.insert("/images/pause.tar.sha256".into(), sha(&pause).into_bytes());
    let server = FileServer::start(files.clone());
    let b = &server.base;
    let manifest = format!(
        r#"supported_eks_releases:
- major_minor_version: "1.31"
  latest_patch_version: "3"
  patch_releases:
  - version: 1.31.2
    patch_version: "2"
    release_date: "2025-01-01"
    artifacts: []
  - version: 1.31.3
    patch_version: "3"
    release_date: "2025-02-01"
    artifacts:
    - {{name: kubelet, arch: {a}, os: linux, uri: "{b}/1.31.3/kubelet", checksum_uri: "{b}/1.31.3/kubelet.sha256"}}
    - {{name: kubectl, arch: {a}, os: linux, uri: "{b}/1.31.3/kubectl", checksum_uri: "{b}/1.31.3/kubectl.sha256"}}
    - {{name: ecr-credential-provider, arch: {a}, os: linux, uri: "{b}/1.31.3/ecr-credential-provider", checksum_uri: "{b}/1.31.3/ecr-credential-provider.sha256"}}
    - {{name: cni-plugins, arch: {a}, os: linux, uri: "{b}/1.31.3/cni-plugins.tgz", checksum_uri: "{b}/1.31.3/cni-plugins.tgz.sha256"}}
iam_roles_anywhere_releases:
- version: 1.4.0
  artifacts:
  - {{name: aws_signing_helper, arch: {a}, os: linux, uri: "{b}/helper", checksum_uri: "{b}/helper.sha256"}}
ssm_releases:
- version: 3.3.0.0
  artifacts:
  - {{name: amazon-ssm-agent, arch: {a}, os: linux, uri: "{b}/ssm/amazon-ssm-agent.deb", checksum_uri: "{b}/ssm/amazon-ssm-agent.deb.sha256"}}
region_config: {{}}
image_archives:
- {{name: eks-pause, arch: {a}, os: linux, uri: "{b}/images/pause.tar", checksum_uri: "{b}/images/pause.tar.sha256"}}
"#
    );
    // The manifest names the artifact server's URLs, so it is served by a second one
    // (both live as long as the test process).
    let mut with_manifest = files;
    with_manifest.insert("/manifest.yaml".into(), manifest.into_bytes());
    FileServer::start(with_manifest)
}

fn run(root: &Path, args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("HOME", home.path())
        .env_remove("HYBRIDLET_MANIFEST")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn install_verifies_places_records_and_uninstall_removes() {
    let manifest_url = server(false).url("/manifest.yaml");
    let root = tempfile::tempdir().unwrap();
    let o = run(
        root.path(),
        &[
            "install",
            "1.31",
            "--manifest",
            &manifest_url,
            "--credential-provider",
            "iam-ra",
        ],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("Kubernetes 1.31.3 (released 2025-02-01)"),
        "{text}"
    );
    assert!(text.contains("installed  /usr/bin/kubelet"), "{text}");
    assert!(text.contains("SHA-256 verified"), "{text}");
    for (path, body) in [
        ("usr/bin/kubelet", "echo kubelet 1.31.3"),
        ("usr/local/bin/kubectl", "echo kubectl"),
        ("usr/local/bin/aws_signing_helper", "signing helper"),
        (
            "etc/eks/image-credential-provider/ecr-credential-provider",
            "echo ecr-credential-provider",
        ),
        ("opt/cni/bin/bridge", "echo bridge"),
        ("opt/cni/bin/host-local", "echo host-local"),
    ] {
        let p = root.path().join(path);
        assert!(
            std::fs::read_to_string(&p).unwrap().contains(body),
            "{path}"
        );
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755,
            "{path}"
        );
    }
    let unit =
        std::fs::read_to_string(root.path().join("etc/systemd/system/kubelet.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/kubelet $NODEADM_KUBELET_ARGS"),
        "{unit}"
    );
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("var/lib/hybridlet/install.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["version"], "1.31.3");
    // kubelet, kubectl, ECR provider, signing helper, the CNI archive and its 3 files,
    // the mirror's image archive (verified, kept for an import), the unit.
    assert_eq!(record["files"].as_array().unwrap().len(), 10);
    assert_eq!(
        std::fs::read(root.path().join("var/lib/hybridlet/images/eks-pause.tar")).unwrap(),
        b"an image archive"
    );
    assert!(
        text.contains(
            "`hybridlet images import /var/lib/hybridlet/images/eks-pause.tar` once it runs"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "installed  /opt/cni/bin (3 files from the verified cni-plugins archive, 3 written)"
        ),
        "{text}"
    );

    // Again: nothing downloaded.
    let o = run(
        root.path(),
        &[
            "install",
            "1.31",
            "--manifest",
            &manifest_url,
            "--credential-provider",
            "iam-ra",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).contains("unchanged  /usr/bin/kubelet (already this version)"),
        "{}",
        out(&o)
    );

    // An operator replaces kubectl; uninstall keeps that one and removes the rest.
    std::fs::write(root.path().join("usr/local/bin/kubectl"), "mine").unwrap();
    let o = run(root.path(), &["uninstall"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("removed  /usr/bin/kubelet"), "{text}");
    assert!(
        text.contains("kept  /usr/local/bin/kubectl (changed since install"),
        "{text}"
    );
    assert!(!root.path().join("usr/bin/kubelet").exists());
    assert!(
        !root
            .path()
            .join("usr/local/bin/aws_signing_helper")
            .exists()
    );
    assert!(
        !root
            .path()
            .join("etc/systemd/system/kubelet.service")
            .exists()
    );
    assert!(!root.path().join("var/lib/hybridlet/install.json").exists());
    for gone in [
        "opt/cni/bin/bridge",
        "opt/cni/bin/LICENSE",
        "opt/cni/plugins/cni-plugins.tgz",
        "etc/eks/image-credential-provider/ecr-credential-provider",
    ] {
        assert!(!root.path().join(gone).exists(), "{gone} is still there");
    }
    assert_eq!(
        std::fs::read_to_string(root.path().join("usr/local/bin/kubectl")).unwrap(),
        "mine"
    );
}

#[test]
fn a_bad_checksum_an_unknown_version_and_a_dry_run_change_nothing() {
    let s = server(true);
    let root = tempfile::tempdir().unwrap();
    let manifest = s.url("/manifest.yaml");
    let o = run(root.path(), &["install", "1.31", "--manifest", &manifest]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains("does not match the published"),
        "{}",
        out(&o)
    );
    assert!(!root.path().join("usr/bin/kubelet").exists());
    assert!(!root.path().join("var/lib/hybridlet/install.json").exists());

    let o = run(root.path(), &["install", "1.29", "--manifest", &manifest]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("available: 1.31"), "{}", out(&o));

    let good = server(false);
    let fresh = tempfile::tempdir().unwrap();
    let o = run(
        fresh.path(),
        &[
            "install",
            "1.31.3",
            "--dry-run",
            "--manifest",
            &good.url("/manifest.yaml"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).contains("would install kubelet → /usr/bin/kubelet"),
        "{}",
        out(&o)
    );
    assert!(
        std::fs::read_dir(fresh.path()).unwrap().next().is_none(),
        "dry run wrote something"
    );
}

/// SSM: an agent already there is used as it is; else the mirror's package for the
/// host's format is planned (installed only on the machine itself, never under --root);
/// without one the operator is told how to get the agent.
#[test]
fn install_for_ssm_finds_or_plans_the_agent() {
    let manifest_url = server(false).url("/manifest.yaml");
    let root = tempfile::tempdir().unwrap();
    let args = [
        "install",
        "1.31",
        "--manifest",
        &manifest_url,
        "--credential-provider",
        "ssm",
    ];
    // No dpkg or rpm under this root: nothing to install it with.
    let o = run(root.path(), &args);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "warning: ssm: the SSM agent is not installed and this host has neither dpkg nor rpm"
        ),
        "{text}"
    );

    let bin = root.path().join("usr/bin");
    std::fs::write(bin.join("dpkg"), "").unwrap();
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let o = run(root.path(), &dry);
    let text = out(&o);
    assert!(
        text.contains("would install the amazon-ssm-agent deb package (from http://127.0.0.1:"),
        "{text}"
    );
    let o = run(root.path(), &args);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("not installing the amazon-ssm-agent package under --root"),
        "{text}"
    );

    std::fs::remove_file(bin.join("dpkg")).unwrap();
    std::fs::write(bin.join("rpm"), "").unwrap();
    let o = run(root.path(), &args);
    assert!(
        out(&o).contains("the manifest has no rpm package of it"),
        "{}",
        out(&o)
    );

    std::fs::write(bin.join("amazon-ssm-agent"), "").unwrap();
    let o = run(root.path(), &args);
    assert!(
        out(&o).contains("ssm: the SSM agent is installed (/usr/bin/amazon-ssm-agent, amazon-ssm-agent.service); left as it is"),
        "{}",
        out(&o)
    );
}
