use std::sync::Arc;

use hybridlet_proto::csi::v1::identity_server::Identity;
use hybridlet_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::{CsiError, CsiSettings, Host};

/// The CSI Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    settings: Arc<CsiSettings>,
    host: Host,
}

impl IdentityService {
    pub(crate) fn new(settings: Arc<CsiSettings>, host: Host) -> Self {
        Self { settings, host }
    }

    /// Whether the node can serve what is enabled; the reason when it cannot.
    pub fn health(&self) -> Result<(), CsiError> {
        if self.settings.iscsi_enabled && !self.host.initiator.available() {
            return Err(CsiError::FailedPrecondition(
                "iSCSI is enabled but iscsiadm is not installed; install open-iscsi (Debian, Ubuntu) or iscsi-initiator-utils (RHEL) and start iscsid"
                    .to_string(),
            ));
        }
        if self.settings.nfs_enabled && !self.host.mounter.can_mount("nfs") {
            return Err(CsiError::FailedPrecondition(
                "NFS is enabled but mount.nfs is not installed; install nfs-common (Debian, Ubuntu) or nfs-utils (RHEL)"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.settings.driver_name.clone(),
            vendor_version: self.settings.vendor_version.clone(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // A node-only plugin: no controller service, no topology constraints.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        self.health().map_err(CsiError::into_status)?;
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
