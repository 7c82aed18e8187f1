//! Rendered files against golden copies in tests/golden/<case>/ (path separators become
//! `__`), and each file parsed the way its consumer reads it (TOML for containerd, JSON
//! for the kubelet, YAML for the kubeconfig, key=value for systemd, sysctl and env files)
//! with its key fields checked: a golden that was regenerated wrong still fails here.
//! `HYBRIDLET_REGENERATE=1` (exactly) rewrites the goldens; review the diff like code
//! (`.ci/run` fails when the tests leave the tree dirty).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::{Path, PathBuf};

use hybridlet_bootstrap::{
    ClusterCoordinates, ContainerdTarget, DEFAULT_SANDBOX_IMAGE, NodeIdentity, render,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/config/good")
        .join(name)
}

fn check(
    case: &str,
    config_file: &str,
    containerd_major: u32,
    cluster: ClusterCoordinates,
    node: NodeIdentity,
) {
    let loaded = hybridlet_config::load(&hybridlet_config::ConfigSources {
        file: fixture(config_file),
        file_required: true,
        drop_in_dir: None,
    })
    .unwrap();
    let target = ContainerdTarget::for_major(DEFAULT_SANDBOX_IMAGE, Some(containerd_major));
    let files = render(&loaded.config, &cluster, &node, &target).unwrap();
    for f in &files {
        consumers_read(f, &cluster, &node);
    }
    compare(case, &files);
}

fn toml_of(f: &hybridlet_bootstrap::RenderedFile) -> toml::Table {
    toml::from_str(&f.contents).unwrap_or_else(|e| panic!("{} is not TOML: {e}", f.path))
}

/// `KEY=VALUE` lines (comments and blank lines aside) of an env or sysctl file.
fn key_values(f: &hybridlet_bootstrap::RenderedFile) -> Vec<(String, String)> {
    f.contents
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: {l:?} is not KEY=VALUE", f.path));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// Parse `f` as its consumer does and check the fields that consumer depends on.
fn consumers_read(
    f: &hybridlet_bootstrap::RenderedFile,
    cluster: &ClusterCoordinates,
    node: &NodeIdentity,
) {
    let path = f.path.as_str();
    match path {
        "/etc/containerd/config.toml" => {
            let t = toml_of(f);
            // containerd 1.x reads version 2; 2.x reads version 3, where the CRI plugin is
            // split in two and the sandbox image is pinned_images.sandbox (the key nodeadm
            // reads back from `containerd config dump`).
            let (sandbox, registry, runtime) = match t["version"].as_integer() {
                Some(2) => {
                    let cri = &t["plugins"]["io.containerd.grpc.v1.cri"];
                    (&cri["sandbox_image"], &cri["registry"], cri)
                }
                Some(3) => {
                    let images = &t["plugins"]["io.containerd.cri.v1.images"];
                    let runtime = &t["plugins"]["io.containerd.cri.v1.runtime"];
                    (
                        &images["pinned_images"]["sandbox"],
                        &images["registry"],
                        runtime,
                    )
                }
                other => panic!("{path}: version {other:?}"),
            };
            assert_eq!(sandbox.as_str(), Some(DEFAULT_SANDBOX_IMAGE));
            assert_eq!(runtime["enable_cdi"].as_bool(), Some(true));
            assert!(
                registry["config_path"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .any(|p| p == "/etc/containerd/certs.d")
            );
            let runc = &runtime["containerd"]["runtimes"]["runc"];
            assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
            assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(true));
            assert_eq!(
                t["grpc"]["address"].as_str(),
                Some("/run/containerd/containerd.sock")
            );
        }
        p if p.starts_with("/etc/containerd/certs.d/") && p.ends_with("/hosts.toml") => {
            let t = toml_of(f);
            assert!(t["server"].as_str().unwrap().starts_with("https://"), "{p}");
            let hosts = t["host"].as_table().unwrap();
            assert!(!hosts.is_empty(), "{p}: no mirror");
            for (url, h) in hosts {
                assert!(url.starts_with("http"), "{p}: {url}");
                let caps: Vec<&str> = h["capabilities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap())
                    .collect();
                assert!(caps.contains(&"pull") && caps.contains(&"resolve"), "{p}");
            }
        }
        p if p.starts_with("/etc/containerd/config.d/") => {
            toml_of(f);
            assert_eq!(
                f.mode, 0o600,
                "{p}: the user's TOML may hold registry credentials"
            );
        }
        "/etc/kubernetes/kubelet/config.json" => {
            let v: serde_json::Value = serde_json::from_str(&f.contents).unwrap();
            assert_eq!(v["kind"], "KubeletConfiguration");
            assert_eq!(v["apiVersion"], "kubelet.config.k8s.io/v1beta1");
            let net: ipnet::Ipv4Net = cluster.service_cidr.parse().unwrap();
            let dns = std::net::Ipv4Addr::from(u32::from(net.network()) + 10);
            assert_eq!(v["clusterDNS"], serde_json::json!([dns.to_string()]));
            assert_eq!(
                v["authentication"]["x509"]["clientCAFile"],
                "/etc/kubernetes/pki/ca.crt"
            );
            assert_eq!(
                v["containerRuntimeEndpoint"],
                "unix:///run/containerd/containerd.sock"
            );
            assert_eq!(v["cgroupDriver"], "systemd");
        }
        "/var/lib/kubelet/kubeconfig" => {
            let v: serde_json::Value = serde_saphyr::from_str(&f.contents).unwrap();
            let c = &v["clusters"][0]["cluster"];
            assert_eq!(c["server"], cluster.endpoint.as_str());
            assert_eq!(c["certificate-authority"], "/etc/kubernetes/pki/ca.crt");
            assert_eq!(v["current-context"], "kubelet");
            let exec = &v["users"][0]["user"]["exec"];
            assert_eq!(exec["command"], "/usr/bin/hybridlet");
            assert_eq!(
                exec["args"],
                serde_json::json!([
                    "token",
                    "--cluster-id",
                    cluster.name,
                    "--region",
                    cluster.region
                ])
            );
            assert_eq!(exec["apiVersion"], "client.authentication.k8s.io/v1beta1");
        }
        "/etc/kubernetes/pki/ca.crt" => {
            assert!(f.contents.starts_with("-----BEGIN CERTIFICATE-----\n"));
            assert!(f.contents.trim_end().ends_with("-----END CERTIFICATE-----"));
        }
        "/etc/eks/kubelet/environment" => {
            let kv = key_values(f);
            assert_eq!(kv.len(), 1, "{path}: {kv:?}");
            assert_eq!(kv[0].0, "NODEADM_KUBELET_ARGS");
            let args: Vec<&str> = kv[0].1.trim_matches('"').split(' ').collect();
            for want in [
                format!("--hostname-override={}", node.node_name),
                "--config=/etc/kubernetes/kubelet/config.json".to_string(),
                "--kubeconfig=/var/lib/kubelet/kubeconfig".to_string(),
            ] {
                assert!(
                    args.contains(&want.as_str()),
                    "{path}: no {want} in {args:?}"
                );
            }
            let labels = args
                .iter()
                .find_map(|a| a.strip_prefix("--node-labels="))
                .unwrap();
            assert!(
                labels
                    .split(',')
                    .any(|l| l == "eks.amazonaws.com/compute-type=hybrid")
            );
            assert!(labels.split(',').any(|l| l
                == format!(
                    "eks.amazonaws.com/hybrid-credential-provider={}",
                    node.credential_provider
                )));
        }
        "/etc/eks/image-credential-provider/config.json" => {
            let v: serde_json::Value = serde_json::from_str(&f.contents).unwrap();
            assert_eq!(v["kind"], "CredentialProviderConfig");
            let providers = v["providers"].as_array().unwrap();
            assert!(!providers.is_empty());
            for p in providers {
                // What the kubelet validates (pkg/credentialprovider/plugin/config.go):
                // name, apiVersion, matchImages and defaultCacheDuration are required.
                assert_eq!(p["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
                assert!(!p["matchImages"].as_array().unwrap().is_empty());
                assert!(
                    p["defaultCacheDuration"]
                        .as_str()
                        .unwrap()
                        .ends_with(['s', 'h'])
                );
                let name = p["name"].as_str().unwrap();
                assert!(!name.contains('/') && name != "." && name != "..");
            }
            assert_eq!(
                node.ecr_credential_provider,
                providers
                    .iter()
                    .any(|p| p["name"] == "ecr-credential-provider")
            );
        }
        "/etc/eks/image-credential-provider/hybridlet-credential-provider" => {
            assert_eq!(f.mode, 0o755);
            assert!(f.contents.starts_with("#!/bin/sh\n"));
            assert!(
                f.contents
                    .contains("exec /usr/bin/hybridlet credential-provider")
            );
        }
        "/etc/sysctl.d/99-hybridlet.conf" => {
            let kv = key_values(f);
            assert!(
                kv.contains(&("net.ipv4.ip_forward".into(), "1".into())),
                "{kv:?}"
            );
        }
        "/etc/modules-load.d/hybridlet.conf" => {
            let modules: Vec<&str> = f
                .contents
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .collect();
            assert_eq!(modules, ["overlay", "br_netfilter"]);
        }
        "/etc/hybridlet/proxy.env" => {
            assert_eq!(f.mode, 0o600, "{path} holds proxy credentials");
            assert!(key_values(f).iter().any(|(k, _)| k == "HTTPS_PROXY"));
        }
        "/etc/aws/hybrid/config" => {
            let text = &f.contents;
            assert!(text.contains("\n[default]\n") && text.contains("\n[profile hybrid]\n"));
            assert!(text.contains(&format!("--role-session-name {}", node.node_name)));
        }
        p if p.starts_with("/etc/systemd/system/") => {
            // systemd's unit syntax: sections, then KEY=VALUE; a drop-in is [Service] only.
            let mut section = None;
            for line in f.contents.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if line.starts_with('[') && line.ends_with(']') {
                    section = Some(line.to_string());
                    continue;
                }
                assert!(section.is_some() && line.contains('='), "{p}: {line:?}");
            }
            if p.contains(".service.d/") {
                assert_eq!(section.as_deref(), Some("[Service]"), "{p}");
            }
        }
        other => panic!("{other}: no check says how its consumer reads it; add one"),
    }
}

fn compare(case: &str, files: &[hybridlet_bootstrap::RenderedFile]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case);
    let regenerate = std::env::var("HYBRIDLET_REGENERATE").as_deref() == Ok("1");
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
        1,
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
fn ssm_case(
    case: &str,
    config_file: &str,
    agent_unit: &str,
    ecr_credential_provider: bool,
    containerd_major: u32,
) {
    check(
        case,
        config_file,
        containerd_major,
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
    ssm_case("ssm", "ssm.yaml", "amazon-ssm-agent.service", false, 1);
}

/// containerd 2.x (config version 3) and Harbor: the ECR proxy cache as the mirror, a
/// robot account served to the kubelet by hybridlet's credential provider.
#[test]
fn ssm_on_containerd_2_with_harbor() {
    ssm_case(
        "ssm-containerd2-harbor",
        "ssm-containerd2-harbor.yaml",
        "amazon-ssm-agent.service",
        true,
        2,
    );
}

#[test]
fn ssm_behind_a_proxy() {
    ssm_case(
        "ssm-proxy",
        "ssm-proxy.yaml",
        "snap.amazon-ssm-agent.amazon-ssm-agent.service",
        true,
        1,
    );
}

#[test]
fn kubelet_unit_for_install() {
    let unit = hybridlet_bootstrap::kubelet_unit();
    assert!(
        unit.contents
            .contains("\nExecStart=/usr/bin/kubelet $NODEADM_KUBELET_ARGS\n")
    );
    assert!(
        unit.contents
            .contains("\nEnvironmentFile=/etc/eks/kubelet/environment\n")
    );
    compare("install", &[unit]);
}
