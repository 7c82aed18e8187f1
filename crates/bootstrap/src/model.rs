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
