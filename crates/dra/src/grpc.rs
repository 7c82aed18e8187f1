//! The kubelet's DRA gRPC services (v1 and v1beta1) over one [`Driver`]. Every claim in a
//! request gets an entry in the response; one failing claim never fails the call.

use std::sync::Arc;

use hybridlet_proto::dra::{v1, v1beta1};
use tonic::{Request, Response, Status};

use crate::Driver;

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`.
#[derive(Debug, Clone)]
pub struct V1Service(pub Arc<Driver>);

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`.
#[derive(Debug, Clone)]
pub struct V1beta1Service(pub Arc<Driver>);

macro_rules! dra_service {
    ($service:ty, $api:ident) => {
        // v1's Device has one more field (share_id) than v1beta1's: the `..Default` that
        // fills it there has nothing to do here.
        #[allow(clippy::needless_update)]
        #[tonic::async_trait]
        impl $api::dra_plugin_server::DraPlugin for $service {
            async fn node_prepare_resources(
                &self,
                request: Request<$api::NodePrepareResourcesRequest>,
            ) -> Result<Response<$api::NodePrepareResourcesResponse>, Status> {
                let mut out = $api::NodePrepareResourcesResponse::default();
                for claim in request.into_inner().claims {
                    let started = std::time::Instant::now();
                    let result = self.0.prepare(&claim.namespace, &claim.name, &claim.uid).await;
                    self.0.observe("prepare", result.is_ok(), started.elapsed());
                    let entry = match result {
                        Ok(devices) => $api::NodePrepareResourceResponse {
                            devices: devices
                                .into_iter()
                                .map(|d| $api::Device {
                                    request_names: d.request_names,
                                    pool_name: d.pool,
                                    device_name: d.device,
                                    cdi_device_ids: d.cdi_device_ids,
                                    ..$api::Device::default()
                                })
                                .collect(),
                            error: String::new(),
                        },
                        Err(error) => {
                            tracing::warn!(claim_uid = %claim.uid, "prepare failed: {error}");
                            $api::NodePrepareResourceResponse {
                                devices: Vec::new(),
                                error: claim_error(&error),
                            }
                        }
                    };
                    out.claims.insert(claim.uid, entry);
                }
                Ok(Response::new(out))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$api::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$api::NodeUnprepareResourcesResponse>, Status> {
                let mut out = $api::NodeUnprepareResourcesResponse::default();
                for claim in request.into_inner().claims {
                    let started = std::time::Instant::now();
                    let result = self.0.unprepare(&claim.uid).await;
                    self.0.observe("unprepare", result.is_ok(), started.elapsed());
                    let error = result.err().map(|e| claim_error(&e)).unwrap_or_default();
                    out.claims.insert(claim.uid, $api::NodeUnprepareResourceResponse { error });
                }
                Ok(Response::new(out))
            }
        }
    };
}

/// The per-claim error the kubelet records (KEP-4381: a claim's failure goes in its own
/// entry, never as the call's gRPC status, so the other claims of the call still count):
/// the failure and its sources, one line.
fn claim_error(e: &crate::ClaimFailure) -> String {
    hybridlet_runtime::error_chain(e)
}

dra_service!(V1Service, v1);
dra_service!(V1beta1Service, v1beta1);
