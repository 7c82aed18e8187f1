//! Kubernetes adapter.
//!
//! Builds `kube` clients on hybridlet's one TLS stack (rustls with the *ring* provider,
//! the same as the AWS adapter), from the kubelet's kubeconfig on a joined node or from
//! explicit parts. Resource-specific access (Node, ResourceSlice, ResourceClaim) is added
//! here behind traits by the issues that need it, so domain crates never touch `kube`
//! directly.
//!
//! Clients are built without kube's default retry layer, which retries 503s with backoff for
//! minutes inside a single call: a DRA prepare has seconds, and the callers back off with
//! jitter themselves (hybridlet-runtime's `Backoff`).
//!
//! What this crate must never do: read AWS credentials, touch the host filesystem beyond
//! the kubeconfig it is pointed at, or log bearer tokens.

mod metrics;

use std::path::{Path, PathBuf};

pub use metrics::register as register_metrics;

use base64::Engine as _;

pub use kube::Client;

/// Errors building a client or reaching the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig could not be read or understood.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The API server URL is not valid.
    #[error("API server URL {url:?}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The client could not be built (TLS setup).
    #[error("building the Kubernetes client: {0}")]
    Build(String),
    /// A request failed.
    #[error("{what}: {message}")]
    Request {
        /// The request.
        what: &'static str,
        /// The error.
        message: String,
    },
}

/// A client from a kubeconfig file (the kubelet's `/var/lib/kubelet/kubeconfig` on a
/// joined node), using its current context.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, KubeError> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let options = kube::config::KubeConfigOptions::default();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| KubeError::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    config.default_retry = false;
    build(config)
}

/// The client for `config`, observed when [`register_metrics`] was called.
fn build(config: kube::Config) -> Result<Client, KubeError> {
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| KubeError::Build(e.to_string()))?;
    Ok(match metrics::installed() {
        Some(m) => builder.with_layer(&metrics::ObserveLayer(m)).build(),
        None => builder.build(),
    })
}

/// A client for `server` trusting the PEM `ca_pem` bundle (when given), with no
/// credentials. Used for reachability checks and by tests against a local fake.
pub fn client_for(server: &str, ca_pem: Option<&[u8]>) -> Result<Client, KubeError> {
    let uri: http::Uri = server
        .parse()
        .map_err(|e: http::uri::InvalidUri| KubeError::Url {
            url: server.to_string(),
            message: e.to_string(),
        })?;
    let mut config = kube::Config::new(uri);
    config.default_retry = false;
    if let Some(pem) = ca_pem {
        config.root_cert = Some(pem_certificates(pem));
    }
    build(config)
}

/// DER bodies of the CERTIFICATE blocks in a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            body = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            if let Some(b) = body.take()
                && let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b.as_bytes())
            {
                out.push(der);
            }
        } else if let Some(b) = body.as_mut() {
            b.push_str(line);
        }
    }
    out
}

/// The API server's version (`GET /version`): a cheap reachability check.
pub async fn server_version(client: &Client) -> Result<String, KubeError> {
    client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .map_err(|e| KubeError::Request {
            what: "GET /version",
            message: e.to_string(),
        })
}

/// How far an API server probe got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStage {
    /// The host name did not resolve.
    Dns,
    /// No TCP connection.
    Tcp,
    /// TLS or HTTP failed (a CA that does not verify the server, a server that is not
    /// Kubernetes).
    Https,
}

/// What an unauthenticated `GET /healthz` learned about an API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The addresses the host name resolved to.
    pub addresses: Vec<std::net::SocketAddr>,
    /// The HTTP status (200, or 401/403 for an anonymous request: both prove TLS works).
    pub status: u16,
    /// The server's `Date` header, for clock-skew checks.
    pub date: Option<std::time::SystemTime>,
}

/// Probe `server` (`https://host[:port]`) step by step — DNS, TCP, then HTTPS with
/// `ca_pem` — so a failure names the step that failed. Each step has `timeout`.
pub async fn probe(
    server: &str,
    ca_pem: Option<&[u8]>,
    timeout: std::time::Duration,
) -> Result<Probe, (ProbeStage, String)> {
    let uri: http::Uri = server
        .parse()
        .map_err(|e: http::uri::InvalidUri| (ProbeStage::Dns, format!("{server:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or((ProbeStage::Dns, format!("{server:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let addresses: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return Err((ProbeStage::Dns, format!("{host}: {e}"))),
            Err(_) => {
                return Err((
                    ProbeStage::Dns,
                    format!("{host}: no answer within {timeout:?}"),
                ));
            }
        };
    let mut connected = false;
    let mut last = String::from("no addresses");
    for a in &addresses {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => {
                connected = true;
                break;
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within {timeout:?}"),
        }
    }
    if !connected {
        return Err((ProbeStage::Tcp, last));
    }
    let client = client_for(server, ca_pem).map_err(|e| (ProbeStage::Https, e.to_string()))?;
    let request = http::Request::get("/healthz")
        .body(kube::client::Body::empty())
        .map_err(|e| (ProbeStage::Https, e.to_string()))?;
    let response = tokio::time::timeout(timeout, client.send(request))
        .await
        .map_err(|_| (ProbeStage::Https, format!("no answer within {timeout:?}")))?
        .map_err(|e| (ProbeStage::Https, e.to_string()))?;
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    Ok(Probe {
        addresses,
        status: response.status().as_u16(),
        date,
    })
}

/// Where a Node stands, for `init --wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// No Node object yet (the kubelet has not registered).
    Missing,
    /// Registered but not Ready: the Ready condition's reason and message.
    NotReady(String),
    /// Ready.
    Ready,
}

/// Read the Node `name` and its Ready condition.
pub async fn node_state(client: &Client, name: &str) -> Result<NodeState, KubeError> {
    use k8s_openapi::api::core::v1::Node;
    let node = match kube::Api::<Node>::all(client.clone()).get_opt(name).await {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(NodeState::Missing),
        Err(e) => {
            return Err(KubeError::Request {
                what: "GET Node",
                message: e.to_string(),
            });
        }
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    Ok(match ready {
        Some(c) if c.status == "True" => NodeState::Ready,
        Some(c) => NodeState::NotReady(
            [c.reason.as_deref(), c.message.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": "),
        ),
        None => NodeState::NotReady("no Ready condition yet".into()),
    })
}

/// The labels of the Node `name`.
pub async fn node_labels(
    client: &Client,
    name: &str,
) -> Result<std::collections::BTreeMap<String, String>, KubeError> {
    use k8s_openapi::api::core::v1::Node;
    let node = kube::Api::<Node>::all(client.clone())
        .get(name)
        .await
        .map_err(|e| KubeError::Request {
            what: "GET Node",
            message: e.to_string(),
        })?;
    Ok(node.metadata.labels.unwrap_or_default())
}

/// Set (`Some`) or remove (`None`) labels of the Node `name` in one JSON merge patch, as
/// the node itself may (the Node authorizer and NodeRestriction allow a node to change
/// its own labels outside the `kubernetes.io`/`k8s.io` prefixes).
pub async fn patch_node_labels(
    client: &Client,
    name: &str,
    changes: &std::collections::BTreeMap<String, Option<String>>,
) -> Result<(), KubeError> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Patch, PatchParams};
    let patch = serde_json::json!({"metadata": {"labels": changes}});
    kube::Api::<Node>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| KubeError::Request {
            what: "PATCH Node labels",
            message: e.to_string(),
        })
}

/// Delete the Node object `name`; `Ok(false)` when it was already gone.
pub async fn delete_node(client: &Client, name: &str) -> Result<bool, KubeError> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, DeleteParams};
    match Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(KubeError::Request {
            what: "DELETE Node",
            message: e.to_string(),
        }),
    }
}

/// Whether a node is ready for maintenance (an upgrade of its kubelet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainState {
    /// `spec.unschedulable` (cordoned).
    pub cordoned: bool,
    /// `namespace/name` of pods still running there that a drain would evict: not owned
    /// by a DaemonSet, not static (mirror) pods, not finished.
    pub evictable_pods: Vec<String>,
}

/// Read the Node and the pods bound to it.
pub async fn drain_state(client: &Client, node: &str) -> Result<DrainState, KubeError> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{Api, ListParams};
    let n = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(|e| KubeError::Request {
            what: "GET Node",
            message: e.to_string(),
        })?;
    let cordoned = n
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(|e| KubeError::Request {
            what: "LIST Pods on the node",
            message: e.to_string(),
        })?;
    let evictable_pods = pods
        .items
        .iter()
        .filter(|p| {
            let daemon = p
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
            let mirror = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
            let finished = p
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
            !daemon && !mirror && !finished
        })
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    Ok(DrainState {
        cordoned,
        evictable_pods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bundle_is_split_and_decoded() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAEC\nAw==\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n/w==\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_certificates(pem), vec![vec![0, 1, 2, 3], vec![255]]);
    }
}
