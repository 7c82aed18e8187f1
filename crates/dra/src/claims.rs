use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::resource::v1::ResourceClaim;

/// One allocated device of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The claim request it satisfies.
    pub request: String,
    /// The DRA driver it belongs to.
    pub driver: String,
    /// The pool (node) it comes from.
    pub pool: String,
    /// The device name.
    pub device: String,
}

/// Opaque driver parameters from the allocation (`status.allocation.devices.config`):
/// the DeviceClass's first, then the claim's, so a later entry wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaqueConfig {
    /// The requests it applies to; empty: all of them.
    pub requests: Vec<String>,
    /// The driver it is for.
    pub driver: String,
    /// Its parameters (a driver-defined JSON object).
    pub parameters: serde_json::Value,
}

/// The parameters for `driver` that apply to `request`: the last matching entry.
pub fn config_for<'a>(
    configs: &'a [OpaqueConfig],
    driver: &str,
    request: &str,
) -> Option<&'a serde_json::Value> {
    configs
        .iter()
        .rev()
        .find(|c| {
            c.driver == driver && (c.requests.is_empty() || c.requests.iter().any(|r| r == request))
        })
        .map(|c| &c.parameters)
}

/// What prepare needs of a ResourceClaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedClaim {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Allocated devices (all drivers).
    pub allocations: Vec<Allocation>,
    /// Pods the claim is reserved for (`status.reservedFor`), for metrics labels.
    pub pods: Vec<String>,
    /// Opaque device configuration of the allocation, class entries first.
    pub configs: Vec<OpaqueConfig>,
}

impl AllocatedClaim {
    /// From the API object.
    pub fn from_resource_claim(claim: &ResourceClaim) -> Self {
        let allocations = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .and_then(|a| a.devices.as_ref())
            .and_then(|d| d.results.as_ref())
            .map(|results| {
                results
                    .iter()
                    .map(|r| Allocation {
                        request: r.request.clone(),
                        driver: r.driver.clone(),
                        pool: r.pool.clone(),
                        device: r.device.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pods = claim
            .status
            .as_ref()
            .and_then(|s| s.reserved_for.as_ref())
            .map(|consumers| {
                consumers
                    .iter()
                    .filter(|c| {
                        c.resource == "pods" && c.api_group.as_deref().unwrap_or("").is_empty()
                    })
                    .map(|c| c.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        let configs = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .and_then(|a| a.devices.as_ref())
            .and_then(|d| d.config.as_ref())
            .map(|configs| {
                configs
                    .iter()
                    .filter_map(|c| {
                        let opaque = c.opaque.as_ref()?;
                        Some(OpaqueConfig {
                            requests: c.requests.clone().unwrap_or_default(),
                            driver: opaque.driver.clone(),
                            parameters: opaque.parameters.0.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            namespace: claim.metadata.namespace.clone().unwrap_or_default(),
            name: claim.metadata.name.clone().unwrap_or_default(),
            uid: claim.metadata.uid.clone().unwrap_or_default(),
            allocations,
            pods,
            configs,
        }
    }
}

/// Why a claim could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    /// The claim does not exist.
    #[error("ResourceClaim {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The API server could not be asked; the kubelet retries.
    #[error("fetching ResourceClaim {namespace}/{name}: {message} (retryable)")]
    Unavailable {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        message: String,
    },
}

/// A pod bound to this node, as far as claims are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePod {
    /// Its name.
    pub name: String,
    /// The ResourceClaims it names (`status.resourceClaimStatuses`, and claims named
    /// directly in `spec.resourceClaims`).
    pub claims: Vec<String>,
    /// Succeeded or Failed: it will not use a device again.
    pub finished: bool,
}

/// Where claims come from.
#[tonic::async_trait]
pub trait ClaimSource: Send + Sync + std::fmt::Debug + 'static {
    /// Fetch one claim.
    async fn get(&self, namespace: &str, name: &str) -> Result<AllocatedClaim, ClaimError>;
    /// The pods bound to this node in `namespace`.
    async fn pods(&self, namespace: &str) -> Result<Vec<NodePod>, ClaimError>;
}

/// Claims from the API server (`resource.k8s.io/v1`), and the pods of `node` (listed with
/// the field selector `spec.nodeName=<node>`, which the Node authorizer grants a node).
#[derive(Clone)]
pub struct KubeClaims {
    client: kube::Client,
    node: String,
}

impl std::fmt::Debug for KubeClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClaims")
    }
}

impl KubeClaims {
    /// Over a client, for the pods of `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_string(),
        }
    }
}

#[tonic::async_trait]
impl ClaimSource for KubeClaims {
    async fn get(&self, namespace: &str, name: &str) -> Result<AllocatedClaim, ClaimError> {
        let api: kube::Api<ResourceClaim> = kube::Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(claim)) => Ok(AllocatedClaim::from_resource_claim(&claim)),
            Ok(None) => Err(ClaimError::NotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            Err(e) => Err(ClaimError::Unavailable {
                namespace: namespace.to_string(),
                name: name.to_string(),
                message: e.to_string(),
            }),
        }
    }

    async fn pods(&self, namespace: &str) -> Result<Vec<NodePod>, ClaimError> {
        use k8s_openapi::api::core::v1::Pod;
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={}", self.node)))
            .await
            .map_err(|e| ClaimError::Unavailable {
                namespace: namespace.to_string(),
                name: "(pods of this node)".into(),
                message: e.to_string(),
            })?;
        Ok(list
            .items
            .into_iter()
            .map(|pod| {
                let mut claims: Vec<String> = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.resource_claim_statuses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.resource_claim_name.clone())
                    .collect();
                claims.extend(
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.resource_claims.as_ref())
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.resource_claim_name.clone()),
                );
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                NodePod {
                    name: pod.metadata.name.unwrap_or_default(),
                    claims,
                    finished: matches!(phase, Some("Succeeded" | "Failed")),
                }
            })
            .collect())
    }
}

/// Claims held in memory, for tests.
#[derive(Debug, Default)]
pub struct FakeClaims {
    claims: Mutex<HashMap<(String, String), AllocatedClaim>>,
    pods: Mutex<HashMap<String, Vec<NodePod>>>,
    unavailable: Mutex<bool>,
}

impl FakeClaims {
    /// Add or replace a claim.
    pub fn put(&self, claim: AllocatedClaim) {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((claim.namespace.clone(), claim.name.clone()), claim);
    }

    /// Remove a claim (deleted, or force-deleted while prepared).
    pub fn remove(&self, namespace: &str, name: &str) {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// The pods bound to this node in `namespace`.
    pub fn set_pods(&self, namespace: &str, pods: Vec<NodePod>) {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(namespace.to_string(), pods);
    }

    /// Simulate an API server outage.
    pub fn set_unavailable(&self, down: bool) {
        *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = down;
    }
}

#[tonic::async_trait]
impl ClaimSource for FakeClaims {
    async fn get(&self, namespace: &str, name: &str) -> Result<AllocatedClaim, ClaimError> {
        if *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return Err(ClaimError::Unavailable {
                namespace: namespace.to_string(),
                name: name.to_string(),
                message: "API server unreachable".into(),
            });
        }
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ClaimError::NotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
    }

    async fn pods(&self, namespace: &str) -> Result<Vec<NodePod>, ClaimError> {
        if *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return Err(ClaimError::Unavailable {
                namespace: namespace.to_string(),
                name: "(pods of this node)".into(),
                message: "API server unreachable".into(),
            });
        }
        Ok(self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(namespace)
            .cloned()
            .unwrap_or_default())
    }
}
