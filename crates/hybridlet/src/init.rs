//! `hybridlet init --dry-run`: resolve the cluster's coordinates and the node's identity,
//! render every file a join writes (hybridlet-bootstrap), and show each as new, changed or
//! unchanged against the host (under `--root`). Writing the files, registering
//! credentials and starting containerd and the kubelet are not in this build, and `init`
//! without `--dry-run` says so instead of doing half a join.

use std::time::Duration;

use anyhow::Context as _;
use hybridlet_aws::{AwsSettings, describe_cluster, eks_client, resolve_credentials, sdk_config};
use hybridlet_bootstrap::{ClusterCoordinates, DEFAULT_SANDBOX_IMAGE, NodeIdentity, render};
use hybridlet_config::{Config, CredentialProvider, NodeConfig};
use hybridlet_sys::HostRoot;

use crate::cli::{Cli, InitArgs};
use crate::exit::Failure;

const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

fn node_config(config: &Config) -> Result<&NodeConfig, Failure> {
    config.node.as_ref().ok_or_else(|| Failure::Unsupported {
        field: "apiVersion",
        message: "init needs nodeadm's NodeConfig (apiVersion: node.eks.aws/v1alpha1, kind: NodeConfig) in the configuration".into(),
    })
}

/// The cluster from the configuration when it has endpoint, CA and CIDR; otherwise from
/// DescribeCluster, with configured values taking precedence.
fn coordinates(node: &NodeConfig) -> Result<ClusterCoordinates, Failure> {
    let c = &node.spec.cluster;
    if let (Some(endpoint), Some(ca), Some(cidr)) =
        (&c.api_server_endpoint, &c.certificate_authority, &c.cidr)
    {
        return Ok(ClusterCoordinates {
            name: c.name.clone(),
            region: c.region.clone(),
            endpoint: endpoint.clone(),
            certificate_authority: ca.clone(),
            service_cidr: cidr.clone(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let info = runtime
        .block_on(async {
            let sdk = sdk_config(&AwsSettings {
                region: c.region.clone(),
                ..AwsSettings::default()
            })
            .await;
            if let Err(e) = resolve_credentials(&sdk).await {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "spec.cluster.apiServerEndpoint, certificateAuthority or cidr is not set, so init asks EKS (DescribeCluster), but there are no AWS credentials: {e}. Set the three fields, or provide credentials (SSM: register the agent; IAM Roles Anywhere: AWS_CONFIG_FILE with its credential_process)"
                )));
            }
            Ok(describe_cluster(&eks_client(&sdk), &c.name, DESCRIBE_TIMEOUT).await)
        })?
        .map_err(|e| {
            Failure::Runtime(anyhow::anyhow!(
                "{e}. Either give the node eks:DescribeCluster, or set spec.cluster.apiServerEndpoint, certificateAuthority and cidr"
            ))
        })?;
    if info.status != "ACTIVE" {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "cluster {} is {}, not ACTIVE; wait for it before joining nodes",
            info.name,
            info.status
        )));
    }
    if info.remote_node_cidrs.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "cluster {} has no remote node networks (remoteNetworkConfig); hybrid nodes cannot join it. Add the on-premises node CIDRs to the cluster first",
            info.name
        )));
    }
    let missing = |what: &str| {
        Failure::Runtime(anyhow::anyhow!(
            "DescribeCluster returned no {what} for {}",
            c.name
        ))
    };
    Ok(ClusterCoordinates {
        name: c.name.clone(),
        region: c.region.clone(),
        endpoint: c
            .api_server_endpoint
            .clone()
            .or(info.endpoint)
            .ok_or_else(|| missing("endpoint"))?,
        certificate_authority: c
            .certificate_authority
            .clone()
            .or(info.certificate_authority)
            .ok_or_else(|| missing("certificate authority"))?,
        service_cidr: c
            .cidr
            .clone()
            .or(info.service_ipv4_cidr)
            .ok_or_else(|| missing("service CIDR"))?,
    })
}

fn identity(node: &NodeConfig, root: &HostRoot) -> Result<NodeIdentity, Failure> {
    let hybrid = node
        .spec
        .hybrid
        .as_ref()
        .ok_or_else(|| Failure::Unsupported {
            field: "spec.hybrid",
            message: "required".into(),
        })?;
    match hybrid.credential_provider() {
        Some(CredentialProvider::IamRolesAnywhere) => {
            let ra = hybrid
                .iam_roles_anywhere
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("unreachable"))?;
            Ok(NodeIdentity {
                node_name: ra.node_name.clone(),
                credential_provider: "iam-ra".into(),
                aws_config_file: Some(ra.aws_config_path.clone()),
            })
        }
        Some(CredentialProvider::Ssm) => {
            let path = root
                .resolve("/var/lib/amazon/ssm/registration")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = std::fs::read_to_string(&path).map_err(|_| {
                Failure::Runtime(anyhow::anyhow!(
                    "the SSM agent is not registered yet ({} is missing), so the node name (its managed instance ID) is unknown; registering it is not in this build: run `amazon-ssm-agent -register -code ... -id ... -region ...` first",
                    path.display()
                ))
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let id = v["ManagedInstanceID"]
                .as_str()
                .filter(|id| id.starts_with("mi-"))
                .ok_or_else(|| {
                    anyhow::anyhow!("{} has no ManagedInstanceID (mi-...)", path.display())
                })?;
            Ok(NodeIdentity {
                node_name: id.to_string(),
                credential_provider: "ssm".into(),
                aws_config_file: None,
            })
        }
        None => Err(Failure::Unsupported {
            field: "spec.hybrid",
            message: "set exactly one of ssm or iamRolesAnywhere".into(),
        }),
    }
}

pub fn init(cli: &Cli, args: &InitArgs) -> Result<(), Failure> {
    if !args.dry_run {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "`hybridlet init` is not implemented yet beyond --dry-run (writing the files, registering credentials and starting containerd and the kubelet); nothing was changed on this host. Run `hybridlet init --dry-run` to see what it would write"
        )));
    }
    let loaded = cli.load_config()?;
    let node = node_config(&loaded.config)?;
    let root = cli.host_root();
    let who = identity(node, &root)?;
    let cluster = coordinates(node)?;
    let files = render(&loaded.config, &cluster, &who, DEFAULT_SANDBOX_IMAGE)
        .map_err(|e| Failure::Runtime(e.into()))?;
    outln!(
        "cluster {} ({}), API server {}, node {} ({} credentials)",
        cluster.name,
        cluster.region,
        cluster.endpoint,
        who.node_name,
        who.credential_provider
    );
    let mut changes = 0;
    for f in &files {
        let path = root.resolve(&f.path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let state = match std::fs::read_to_string(&path) {
            Ok(existing) if existing == f.contents => "unchanged",
            Ok(_) => "changed",
            Err(_) => "new",
        };
        if state != "unchanged" {
            changes += 1;
        }
        outln!("{state:>9}  {:o}  {}", f.mode, f.path);
    }
    for f in files
        .iter()
        .filter(|f| !f.path.ends_with("00-nodeadm.toml"))
    {
        outln!("\n--- {} ---\n{}", f.path, f.contents.trim_end());
    }
    outln!(
        "\ndry run: {} files, {changes} would be written; nothing was changed",
        files.len()
    );
    Ok(())
}
