//! `render`: every file a join writes, from the configuration, the cluster's coordinates
//! and the node's identity.

use hybridlet_config::Config;

use crate::containerd::{containerd_config, registry_mirror_files};
use crate::iam_ra::{SIGNING_HELPER_UPDATE_UNIT, iam_ra_aws_config, signing_helper_update_unit};
use crate::kernel::{MODULES_LOAD, MODULES_LOAD_PATH, SYSCTL, SYSCTL_PATH};
use crate::kubeconfig::kubeconfig;
use crate::kubelet::{
    HYBRIDLET_CREDENTIAL_PROVIDER, IMAGE_CREDENTIAL_PROVIDER_CONFIG,
    hybridlet_credential_provider_program, image_credential_provider_config, kubelet_config,
    kubelet_env,
};
use crate::model::{ClusterCoordinates, ContainerdTarget, NodeIdentity, RenderError};
use crate::proxy::{proxy_dropin_for, proxy_env_file};
use crate::{CONTAINERD_UNIT, KUBELET_UNIT, RenderedFile};

/// Every file `init` writes for this configuration, cluster and node, sorted by path.
pub fn render(
    config: &Config,
    cluster: &ClusterCoordinates,
    node: &NodeIdentity,
    containerd: &ContainerdTarget,
) -> Result<Vec<RenderedFile>, RenderError> {
    let own_provider = !config.agent.images.credentials.is_empty();
    let spec = config.node.as_ref().map(|n| &n.spec);
    let user_kubelet = spec.map(|s| s.kubelet.config.clone()).unwrap_or_default();
    let user_flags = spec.map(|s| s.kubelet.flags.clone()).unwrap_or_default();
    let ca = hybridlet_config::decode_certificate_authority(&cluster.certificate_authority)
        .map_err(|e| RenderError::CertificateAuthority(format!("not valid base64: {e}")))?;
    let mut files = vec![
        RenderedFile::new(
            "/etc/containerd/config.toml",
            0o644,
            containerd_config(containerd),
        )
        .owned_by(CONTAINERD_UNIT),
        RenderedFile::new(
            "/etc/kubernetes/pki/ca.crt",
            0o644,
            String::from_utf8_lossy(&ca).into_owned(),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/etc/kubernetes/kubelet/config.json",
            0o644,
            kubelet_config(cluster, node, &user_kubelet)?,
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/var/lib/kubelet/kubeconfig",
            0o644,
            kubeconfig(cluster, node),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/etc/eks/kubelet/environment",
            0o644,
            kubelet_env(
                node,
                &user_flags,
                node.ecr_credential_provider || own_provider,
            ),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(MODULES_LOAD_PATH, 0o644, MODULES_LOAD),
        RenderedFile::new(SYSCTL_PATH, 0o644, SYSCTL),
    ];
    if let Some(user_toml) = spec.map(|s| &s.containerd.config).filter(|c| !c.is_empty()) {
        // The user's TOML may hold registry credentials.
        files.push(
            RenderedFile::new(
                "/etc/containerd/config.d/00-nodeadm.toml",
                0o600,
                user_toml.clone(),
            )
            .owned_by(CONTAINERD_UNIT)
            .secret(),
        );
    }
    files.extend(registry_mirror_files(config));
    if node.ecr_credential_provider || own_provider {
        // The kubelet reads its credential provider configuration at start.
        files.push(
            RenderedFile::new(
                IMAGE_CREDENTIAL_PROVIDER_CONFIG,
                0o644,
                image_credential_provider_config(node, &config.agent.images),
            )
            .owned_by(KUBELET_UNIT),
        );
    }
    if own_provider {
        files.push(
            RenderedFile::new(
                HYBRIDLET_CREDENTIAL_PROVIDER,
                0o755,
                hybridlet_credential_provider_program(),
            )
            .owned_by(KUBELET_UNIT),
        );
    }
    let mut units = vec!["containerd.service", "kubelet.service"];
    // The agent fetches the node's credentials: behind a proxy it needs it as well.
    units.extend(node.ssm_agent_unit.as_deref());
    let dropins: Vec<RenderedFile> = units
        .iter()
        .filter_map(|u| proxy_dropin_for(config, u))
        .collect();
    // The root-only proxy environment file belongs to every unit whose drop-in reads it.
    if let Some(mut env) = proxy_env_file(config) {
        for d in &dropins {
            env.owners.extend(d.owners.iter().cloned());
        }
        files.push(env);
    }
    files.extend(dropins);
    if let Some(ra) = spec
        .and_then(|s| s.hybrid.as_ref())
        .and_then(|h| h.iam_roles_anywhere.as_ref())
    {
        let with_proxy = config.agent.proxy.https_proxy.is_some();
        files.push(RenderedFile::new(
            ra.aws_config_path.clone(),
            0o644,
            iam_ra_aws_config(ra, &cluster.region, with_proxy),
        ));
        if spec
            .and_then(|s| s.hybrid.as_ref())
            .is_some_and(|h| h.enable_credentials_file)
        {
            files.push(
                RenderedFile::new(
                    format!("/etc/systemd/system/{SIGNING_HELPER_UPDATE_UNIT}"),
                    0o644,
                    signing_helper_update_unit(ra, &cluster.region, with_proxy),
                )
                .owned_by(SIGNING_HELPER_UPDATE_UNIT),
            );
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}
