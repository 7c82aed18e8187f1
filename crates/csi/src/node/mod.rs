//! The CSI Node service: validation and the per-volume guard, then the protocol that owns
//! the volume (NFS, iSCSI: [`Protocol`]) for what differs; publish (a bind mount of the
//! staging path), unpublish, unstage's unmount and the filesystem statistics are the same
//! for every protocol.

mod iscsi;
mod nfs;
mod protocol;
pub(crate) mod work;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_proto::csi::v1::node_server::Node;
use hybridlet_proto::csi::v1::node_service_capability::{Rpc, rpc};
use hybridlet_proto::csi::v1::volume_usage::Unit;
use hybridlet_proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCondition, VolumeUsage,
    node_service_capability,
};
use hybridlet_sys::mount::topmost;
use tonic::{Request, Response, Status};

use crate::guard::VolumeGuard;
use crate::iscsi::Records;
use crate::probe::Probes;
use crate::{CsiError, CsiMetrics, CsiSettings, Host, validate};
use protocol::Protocol;
use work::{
    Shared, TargetKind, blocking, capability, guarded, not_staged, prepare_target, same_volume,
    unmount,
};

/// The CSI Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    shared: Shared,
    /// iSCSI first: its attributes are the more specific.
    protocols: Vec<Arc<dyn Protocol>>,
}

impl NodeService {
    pub(crate) fn new(settings: Arc<CsiSettings>, host: Host, metrics: CsiMetrics) -> Self {
        let records = Records::new(settings.state_dir.join("iscsi"));
        Self {
            shared: Shared {
                settings,
                mounter: host.mounter.clone(),
                host,
                guard: VolumeGuard::default(),
                metrics,
                probes: Probes::default(),
            },
            protocols: vec![Arc::new(iscsi::Iscsi::new(records)), Arc::new(nfs::Nfs)],
        }
    }

    /// Share `guard` with other instances: a node service started after another stopped
    /// (a reload restarting the CSI plugin) answers ABORTED for a volume whose host work
    /// from the old one still runs, instead of running beside it.
    pub fn with_guard(mut self, guard: VolumeGuard) -> Self {
        self.shared.guard = guard;
        self
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let staging = validate::host_path("staging_target_path", &req.staging_target_path)?;
        let cap = capability(req.volume_capability.as_ref())?;
        let protocol = self
            .protocols
            .iter()
            .find(|p| p.handles(&req.volume_context))
            .ok_or_else(|| {
                CsiError::InvalidArgument(
                    "volumeAttributes must describe an NFS volume (server, share) or an iSCSI LUN (targetPortal, iqn, lun)".into(),
                )
            })?;
        protocol
            .stage(
                &self.shared,
                volume_id,
                staging,
                cap,
                &req.volume_context,
                &req.secrets,
            )
            .await
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let staging = validate::host_path("staging_target_path", &req.staging_target_path)?;
        let held = self.shared.guard.acquire(&volume_id)?;
        let mounter = self.shared.mounter.clone();
        let probes = self.shared.probes.clone();
        let (shared, protocols) = (self.shared.clone(), self.protocols.clone());
        let id = volume_id.clone();
        guarded(
            held,
            self.shared.settings.mount_timeout,
            format!("unstaging volume {volume_id}"),
            move || {
                // Unmount every layer (a retried stage may have stacked mounts).
                while mounter.mount_at(&staging)?.is_some() {
                    unmount(&mounter, &staging, &probes)?;
                }
                for protocol in &protocols {
                    protocol.detach(&shared, &id)?;
                }
                Ok(())
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, "volume unstaged");
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let target = validate::host_path("target_path", &req.target_path)?;
        let cap = capability(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME)".into(),
            ));
        }
        let staging = validate::host_path("staging_target_path", &req.staging_target_path)?;
        let read_only = req.readonly || cap.reader_only;
        if cap.block {
            for protocol in &self.protocols {
                if let Some(done) = protocol
                    .publish_block(&self.shared, &volume_id, target.clone(), read_only)
                    .await
                {
                    done?;
                    tracing::info!(volume_id = %volume_id, read_only, "block volume published");
                    return Ok(());
                }
            }
            return Err(CsiError::FailedPrecondition(format!(
                "volume {volume_id} is not staged for block access; NodeStageVolume must succeed first"
            )));
        }
        let held = self.shared.guard.acquire(&volume_id)?;
        let mounter = self.shared.mounter.clone();
        let vid = volume_id.clone();
        guarded(held,
            self.shared.settings.mount_timeout,
            format!("publishing volume {volume_id}"),
            move || {
                // The kubelet's first call for a volume: the target does not exist yet, so
                // nothing can be mounted there. Then the kernel says in one statx(2)
                // whether the staging path is mounted, and the mount table (the costly
                // part) is not read at all.
                if matches!(std::fs::symlink_metadata(&target), Err(e) if e.kind() == io::ErrorKind::NotFound)
                {
                    match mounter.is_mount_point(&staging) {
                        Some(true) => {
                            prepare_target(&target, TargetKind::Directory)?;
                            if let Err(e) = mounter.bind(&staging, &target, read_only) {
                                let _ = std::fs::remove_dir(&target);
                                return Err(e.into());
                            }
                            return Ok(());
                        }
                        Some(false) => return Err(not_staged(&vid, &staging)),
                        None => {}
                    }
                }
                // One read of the mount table answers both questions.
                let table = mounter.mount_table()?;
                let staged = topmost(&table, &staging)
                    .cloned()
                    .ok_or_else(|| not_staged(&vid, &staging))?;
                if let Some(existing) = topmost(&table, &target) {
                    if same_volume(existing, &staged) && existing.read_only() == read_only {
                        return Ok(());
                    }
                    return Err(CsiError::AlreadyExists(format!(
                        "target path {} is already published {}",
                        target.display(),
                        if same_volume(existing, &staged) {
                            format!("with readonly={}", existing.read_only())
                        } else {
                            format!("with another volume ({})", existing.source)
                        }
                    )));
                }
                let created = prepare_target(&target, TargetKind::Directory)?;
                if let Err(e) = mounter.bind(&staging, &target, read_only) {
                    if created {
                        let _ = std::fs::remove_dir(&target);
                    }
                    return Err(e.into());
                }
                Ok(())
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, read_only, "volume published");
        Ok(())
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let target = validate::host_path("target_path", &req.target_path)?;
        let held = self.shared.guard.acquire(&volume_id)?;
        let mounter = self.shared.mounter.clone();
        let probes = self.shared.probes.clone();
        guarded(
            held,
            self.shared.settings.mount_timeout,
            format!("unpublishing volume {volume_id}"),
            move || {
                // The mount table first: lstat(2) on a mount whose NFS server is gone blocks
                // in the kernel (a hard mount retries for minutes; found in the VM); the
                // table never does. A mount point is never a symlink (the kernel unmounts
                // it with UMOUNT_NOFOLLOW below); only a path that is not one is looked at.
                if mounter.mount_at(&target)?.is_none() {
                    match std::fs::symlink_metadata(&target) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                        Ok(meta) if meta.file_type().is_symlink() => {
                            return Err(CsiError::FailedPrecondition(format!(
                                "target path {} is a symlink; not touching it",
                                target.display()
                            )));
                        }
                        _ => {}
                    }
                }
                while mounter.mount_at(&target)?.is_some() {
                    unmount(&mounter, &target, &probes)?;
                }
                // A raw block volume is published on a file, a filesystem on a directory.
                let removed = match std::fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_file() => std::fs::remove_file(&target),
                    _ => std::fs::remove_dir(&target),
                };
                match removed {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(CsiError::Internal(format!(
                        "removing target path {} after unmount: {e}; it was left in place",
                        target.display()
                    ))),
                }
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, "volume unpublished");
        Ok(())
    }

    async fn stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let path = validate::volume_path(&volume_id, &req.volume_path)?;
        let mounter = self.shared.mounter.clone();
        let p: PathBuf = path.clone();
        let mounted = blocking(
            Duration::from_secs(5),
            "reading the mount table".into(),
            move || Ok(mounter.mount_at(&p)?.is_some()),
        )
        .await?;
        if !mounted {
            return Err(CsiError::NotFound(format!(
                "volume {volume_id} is not mounted at {}",
                path.display()
            )));
        }
        for protocol in &self.protocols {
            if let Some(answer) = protocol.block_stats(&self.shared, &volume_id).await? {
                return Ok(answer);
            }
        }
        let mounter = self.shared.mounter.clone();
        let probes = self.shared.probes.clone();
        let limit = self.shared.settings.stats_timeout;
        let p = path.clone();
        // The probe itself bounds the wait; the outer deadline only guards the pool.
        let stats = blocking(
            limit + Duration::from_secs(5),
            format!("statvfs {}", path.display()),
            move || {
                probes
                    .statvfs(mounter, &p, limit)
                    .map_err(|e| CsiError::Internal(e.to_string()))
            },
        )
        .await;
        Ok(match stats {
            Ok(s) => NodeGetVolumeStatsResponse {
                usage: vec![
                    VolumeUsage {
                        available: s.available_bytes as i64,
                        total: s.total_bytes as i64,
                        used: s.used_bytes as i64,
                        unit: Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: s.free_inodes as i64,
                        total: s.total_inodes as i64,
                        used: s.used_inodes as i64,
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: Some(VolumeCondition {
                    abnormal: false,
                    message: "volume is healthy".into(),
                }),
            },
            Err(e) => {
                self.shared.metrics.abnormal();
                tracing::warn!(volume_id = %volume_id, error = %e, "volume is abnormal");
                NodeGetVolumeStatsResponse {
                    usage: Vec::new(),
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message: format!("the filesystem does not answer: {e}"),
                    }),
                }
            }
        })
    }

    /// NodeExpandVolume: the protocol that owns the volume grows it; a volume no protocol
    /// owns on the node (NFS: the export grows on the server) needs nothing here, if it
    /// is mounted where the kubelet says.
    async fn expand(&self, req: NodeExpandVolumeRequest) -> Result<i64, CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let path = validate::volume_path(&volume_id, &req.volume_path)?;
        for protocol in &self.protocols {
            if let Some(done) = protocol
                .expand(&self.shared, &volume_id, path.clone())
                .await
            {
                return done;
            }
        }
        let mounter = self.shared.mounter.clone();
        let p = path.clone();
        let mounted = blocking(
            Duration::from_secs(5),
            "reading the mount table".into(),
            move || Ok(mounter.mount_at(&p)?.is_some()),
        )
        .await?;
        if mounted {
            Ok(0)
        } else {
            Err(CsiError::NotFound(format!(
                "volume {volume_id} is not staged on this node"
            )))
        }
    }
}

fn cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.stage(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodeStageVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.unstage(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodeUnstageVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.publish(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodePublishVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.unpublish(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodeUnpublishVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.stats(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodeGetVolumeStats", started, &result);
        result.map(Response::new).map_err(CsiError::into_status)
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.expand(request.into_inner()).await;
        self.shared
            .metrics
            .observe("NodeExpandVolume", started, &result);
        result
            .map(|capacity_bytes| Response::new(NodeExpandVolumeResponse { capacity_bytes }))
            .map_err(CsiError::into_status)
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::StageUnstageVolume),
                cap(rpc::Type::GetVolumeStats),
                cap(rpc::Type::ExpandVolume),
                cap(rpc::Type::VolumeCondition),
                cap(rpc::Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.shared.settings.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: (!self.shared.settings.topology.is_empty()).then(|| Topology {
                segments: self.shared.settings.topology.clone(),
            }),
        }))
    }
}
