use std::time::Duration;

/// What hybridlet needs from EKS DescribeCluster to join a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Cluster name.
    pub name: String,
    /// `ACTIVE`, `CREATING`, ...
    pub status: String,
    /// API server URL.
    pub endpoint: Option<String>,
    /// Base64 CA bundle.
    pub certificate_authority: Option<String>,
    /// Service IPv4 CIDR.
    pub service_ipv4_cidr: Option<String>,
    /// Remote node CIDRs (hybrid nodes' addresses must lie in one of them).
    pub remote_node_cidrs: Vec<String>,
    /// Remote pod CIDRs.
    pub remote_pod_cidrs: Vec<String>,
    /// Kubernetes version, e.g. `1.34`.
    pub version: Option<String>,
}

/// Errors from EKS calls.
#[derive(Debug, thiserror::Error)]
pub enum EksError {
    /// The call failed (network, credentials, permissions, not found).
    #[error("eks:DescribeCluster {cluster}: {message}")]
    DescribeCluster {
        /// The cluster asked for.
        cluster: String,
        /// The SDK's error with its context.
        message: String,
    },
    /// The call did not finish in time.
    #[error("eks:DescribeCluster {cluster}: no answer within {timeout:?}")]
    Timeout {
        /// The cluster asked for.
        cluster: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer had no cluster in it.
    #[error("eks:DescribeCluster {cluster}: the response holds no cluster")]
    Empty {
        /// The cluster asked for.
        cluster: String,
    },
}

/// Call DescribeCluster with a time limit and keep the fields a join needs.
pub async fn describe_cluster(
    client: &aws_sdk_eks::Client,
    cluster: &str,
    timeout: Duration,
) -> Result<ClusterInfo, EksError> {
    let call = client.describe_cluster().name(cluster).send();
    // The SDK's own timeouts are per attempt; this bounds the whole call with retries.
    let output = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| EksError::Timeout {
            cluster: cluster.to_string(),
            timeout,
        })?
        .map_err(|e| EksError::DescribeCluster {
            cluster: cluster.to_string(),
            // The chain's texts, not DisplayErrorContext: that ends with the raw response's Debug.
            message: hybridlet_runtime::error_chain(&e),
        })?;
    let c = output.cluster.ok_or_else(|| EksError::Empty {
        cluster: cluster.to_string(),
    })?;
    let (mut remote_node_cidrs, mut remote_pod_cidrs) = (Vec::new(), Vec::new());
    if let Some(remote) = &c.remote_network_config {
        for net in remote.remote_node_networks() {
            remote_node_cidrs.extend(net.cidrs().iter().cloned());
        }
        for net in remote.remote_pod_networks() {
            remote_pod_cidrs.extend(net.cidrs().iter().cloned());
        }
    }
    Ok(ClusterInfo {
        name: c.name.unwrap_or_else(|| cluster.to_string()),
        status: c.status.map(|s| s.as_str().to_string()).unwrap_or_default(),
        endpoint: c.endpoint,
        certificate_authority: c.certificate_authority.and_then(|ca| ca.data),
        service_ipv4_cidr: c
            .kubernetes_network_config
            .and_then(|n| n.service_ipv4_cidr),
        remote_node_cidrs,
        remote_pod_cidrs,
        version: c.version,
    })
}
