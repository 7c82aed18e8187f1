//! The kubelet: its KubeletConfiguration (the user's values merged over ours), its
//! environment file of flags, and the image credential provider configuration.

use serde_json::{Map, Value, json};

use crate::model::{ClusterCoordinates, NodeIdentity, RenderError};

/// Where the kubelet finds image credential provider programs.
pub const IMAGE_CREDENTIAL_PROVIDER_DIR: &str = "/etc/eks/image-credential-provider";
/// hybridlet's credential provider (a two-line program that runs `hybridlet
/// credential-provider`): the kubelet runs programs from its bin dir by name.
pub const HYBRIDLET_CREDENTIAL_PROVIDER: &str =
    "/etc/eks/image-credential-provider/hybridlet-credential-provider";
/// The ECR credential provider program.
pub const ECR_CREDENTIAL_PROVIDER: &str =
    "/etc/eks/image-credential-provider/ecr-credential-provider";
pub(crate) const IMAGE_CREDENTIAL_PROVIDER_CONFIG: &str =
    "/etc/eks/image-credential-provider/config.json";

/// The cluster DNS address of a service CIDR: `.10` for IPv4, `::a` for IPv6 (as the EKS
/// CoreDNS service is placed).
pub fn cluster_dns(service_cidr: &str) -> Result<String, RenderError> {
    let net: ipnet::IpNet = service_cidr
        .parse()
        .map_err(|_| RenderError::Cidr(format!("{service_cidr:?} is not a CIDR")))?;
    Ok(match net {
        ipnet::IpNet::V4(v4) => {
            let base = u32::from(v4.network());
            std::net::Ipv4Addr::from(base + 10).to_string()
        }
        ipnet::IpNet::V6(v6) => {
            let base = u128::from(v6.network());
            std::net::Ipv6Addr::from(base + 10).to_string()
        }
    })
}

/// Merge `overlay` into `base`; overlay (the user's) wins, objects merge recursively.
pub(crate) fn merge_user(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => merge_user(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

pub(crate) fn kubelet_config(
    cluster: &ClusterCoordinates,
    node: &NodeIdentity,
    user: &Map<String, Value>,
) -> Result<String, RenderError> {
    let mut cfg = json!({
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "address": "0.0.0.0",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true, "cacheTTL": "2m0s"},
            "x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}
        },
        "authorization": {
            "mode": "Webhook",
            "webhook": {"cacheAuthorizedTTL": "5m0s", "cacheUnauthorizedTTL": "30s"}
        },
        "cgroupDriver": "systemd",
        "cgroupRoot": "/",
        "clusterDNS": [cluster_dns(&cluster.service_cidr)?],
        "clusterDomain": "cluster.local",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "10%", "nodefs.inodesFree": "5%"},
        "featureGates": {"RotateKubeletServerCertificate": true},
        "hairpinMode": "hairpin-veth",
        "kubeReservedCgroup": "/runtime",
        "systemReservedCgroup": "/system",
        "logging": {"verbosity": 2},
        "protectKernelDefaults": true,
        "providerID": format!("eks-hybrid:///{}/{}/{}", cluster.region, cluster.name, node.node_name),
        "readOnlyPort": 0,
        "serializeImagePulls": false,
        "serverTLSBootstrap": true,
        "tlsCipherSuites": [
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_RSA_WITH_AES_128_GCM_SHA256"
        ]
    });
    merge_user(&mut cfg, &Value::Object(user.clone()));
    // serde_json without preserve_order sorts keys: stable output, stable diffs.
    Ok(serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n")
}

/// The kubelet's environment file; `credential_providers`: the credential provider flags
/// (only when a provider program is there: the kubelet refuses to start without it).
pub(crate) fn kubelet_env(
    node: &NodeIdentity,
    user_flags: &[String],
    credential_providers: bool,
) -> String {
    // The kubelet keeps only the last --node-labels flag, so the user's labels are merged
    // into ours (theirs win per key) instead of replacing the hybrid labels that EKS needs to
    // approve the node's serving certificates.
    let mut labels: Vec<(String, String)> = vec![
        ("eks.amazonaws.com/compute-type".into(), "hybrid".into()),
        (
            "eks.amazonaws.com/hybrid-credential-provider".into(),
            node.credential_provider.clone(),
        ),
    ];
    let mut rest = Vec::new();
    for flag in user_flags {
        match flag.strip_prefix("--node-labels=") {
            Some(list) => {
                for pair in list.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    match labels.iter_mut().find(|(key, _)| key == k) {
                        Some(existing) => existing.1 = v.to_string(),
                        None => labels.push((k.to_string(), v.to_string())),
                    }
                }
            }
            None => rest.push(flag.clone()),
        }
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec![
        "--cloud-provider=".to_string(),
        format!("--hostname-override={}", node.node_name),
        format!("--node-labels={}", labels.join(",")),
        "--config=/etc/kubernetes/kubelet/config.json".to_string(),
        "--kubeconfig=/var/lib/kubelet/kubeconfig".to_string(),
    ];
    if credential_providers {
        args.push(format!(
            "--image-credential-provider-bin-dir={IMAGE_CREDENTIAL_PROVIDER_DIR}"
        ));
        args.push(format!(
            "--image-credential-provider-config={IMAGE_CREDENTIAL_PROVIDER_CONFIG}"
        ));
    }
    // The user's other flags come last so that they win.
    args.extend(rest);
    let quoted: Vec<String> = args
        .iter()
        .map(|a| a.replace('\\', "\\\\").replace('"', "\\\""))
        .collect();
    format!("NODEADM_KUBELET_ARGS=\"{}\"\n", quoted.join(" "))
}

/// The program the kubelet runs as `hybridlet-credential-provider`.
pub(crate) fn hybridlet_credential_provider_program() -> String {
    "#!/bin/sh\n\
     # Written by hybridlet init: the kubelet runs this for images of the registries in\n\
     # spec.images.credentials (CredentialProviderRequest on stdin, the login on stdout).\n\
     exec /usr/bin/hybridlet credential-provider \"$@\"\n"
        .to_string()
}

/// The kubelet's CredentialProviderConfig: the ECR credential provider (when the host has
/// it) for every ECR registry host pattern (commercial, China, FIPS, the isolated
/// partitions), a 12 h cache, and with IAM Roles Anywhere the AWS config file whose
/// `credential_process` signs for the node; hybridlet's own provider for the registries
/// of `spec.images.credentials`.
pub(crate) fn image_credential_provider_config(
    node: &NodeIdentity,
    images: &hybridlet_config::ImagesSpec,
) -> String {
    let mut providers = Vec::new();
    if node.ecr_credential_provider {
        providers.push(ecr_provider(node));
    }
    if !images.credentials.is_empty() {
        let registries: Vec<&str> = images
            .credentials
            .iter()
            .map(|c| c.registry.as_str())
            .collect();
        let cache = images
            .credentials
            .iter()
            .map(|c| c.cache_duration.0)
            .min()
            .unwrap_or_default();
        providers.push(json!({
            "name": "hybridlet-credential-provider",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "matchImages": registries,
            "defaultCacheDuration": format!("{}s", cache.as_secs()),
            "args": ["credential-provider"],
        }));
    }
    let config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": providers,
    });
    // A Value of strings always serializes.
    let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
    text.push('\n');
    text
}

fn ecr_provider(node: &NodeIdentity) -> serde_json::Value {
    let mut provider = json!({
        "name": "ecr-credential-provider",
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "matchImages": [
            "*.dkr.ecr.*.amazonaws.com",
            "*.dkr.ecr.*.amazonaws.com.cn",
            "*.dkr.ecr-fips.*.amazonaws.com",
            "*.dkr.ecr.*.c2s.ic.gov",
            "*.dkr.ecr.*.sc2s.sgov.gov"
        ],
        "defaultCacheDuration": "12h",
    });
    if let Some(file) = &node.aws_config_file {
        provider["env"] = json!([
            {"name": "AWS_CONFIG_FILE", "value": file},
            {"name": "AWS_PROFILE", "value": "default"}
        ]);
    }
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_dns_addresses() {
        assert_eq!(cluster_dns("172.16.0.0/16").unwrap(), "172.16.0.10");
        assert_eq!(cluster_dns("10.100.0.0/16").unwrap(), "10.100.0.10");
        assert_eq!(cluster_dns("fd00:10:96::/108").unwrap(), "fd00:10:96::a");
        assert!(cluster_dns("nope").is_err());
    }

    #[test]
    fn user_values_win_and_objects_merge() {
        let mut base = json!({"a": 1, "evictionHard": {"memory.available": "100Mi", "nodefs.available": "10%"}});
        merge_user(
            &mut base,
            &json!({"a": 2, "evictionHard": {"memory.available": "500Mi"}, "maxPods": 250}),
        );
        assert_eq!(
            base,
            json!({"a": 2, "evictionHard": {"memory.available": "500Mi", "nodefs.available": "10%"}, "maxPods": 250})
        );
    }
}
