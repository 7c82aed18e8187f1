//! What rendering starts from besides the configuration: the cluster's coordinates and
//! the node's identity; and why rendering can fail.

/// What the cluster looks like (from the config, or from DescribeCluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCoordinates {
    /// Cluster name.
    pub name: String,
    /// Region.
    pub region: String,
    /// API server URL.
    pub endpoint: String,
    /// Base64 PEM CA bundle.
    pub certificate_authority: String,
    /// Service CIDR.
    pub service_cidr: String,
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Kubernetes node name (IAM-RA `nodeName`, or the SSM managed instance ID).
    pub node_name: String,
    /// `ssm` or `iam-ra`.
    pub credential_provider: String,
    /// Extra environment for the exec credential plugin (IAM-RA: the AWS config file).
    pub aws_config_file: Option<String>,
    /// The SSM agent's systemd unit (SSM only): it gets the proxy drop-in too.
    pub ssm_agent_unit: Option<String>,
    /// The host has [`ECR_CREDENTIAL_PROVIDER`] (`install` puts it there): the kubelet
    /// pulls ECR images (the pause image among them) with it. Without the program the
    /// kubelet would refuse to start with the flags, so they come only with it.
    pub ecr_credential_provider: bool,
}

/// The containerd the node runs, as far as its configuration file depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdTarget {
    /// The pod sandbox (pause) image.
    pub sandbox_image: String,
    /// The config version the installed containerd reads natively: 2 for 1.x, 3 for 2.x
    /// (where the CRI plugin is split into `io.containerd.cri.v1.images` and
    /// `io.containerd.cri.v1.runtime` and the sandbox image is `pinned_images.sandbox`).
    pub config_version: u8,
}

impl ContainerdTarget {
    /// The config version for containerd `major` (unknown: 2, which 2.x also migrates).
    pub fn for_major(sandbox_image: &str, major: Option<u32>) -> Self {
        Self {
            sandbox_image: sandbox_image.to_string(),
            config_version: if major.is_some_and(|m| m >= 2) { 3 } else { 2 },
        }
    }
}

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The service CIDR cannot give a cluster DNS address.
    #[error("spec.cluster.cidr: {0}")]
    Cidr(String),
    /// The CA is not base64.
    #[error("spec.cluster.certificateAuthority: {0}")]
    CertificateAuthority(String),
}
