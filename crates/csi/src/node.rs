use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hybridlet_proto::csi::v1::node_server::Node;
use hybridlet_proto::csi::v1::node_service_capability::{Rpc, rpc};
use hybridlet_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};
use hybridlet_proto::csi::v1::volume_usage::Unit;
use hybridlet_proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage, node_service_capability,
};
use hybridlet_sys::mount::{MountEntry, MountError, MountRequest, Mounter, topmost};
use tonic::{Request, Response, Status};

use crate::guard::VolumeGuard;
use crate::iscsi::{self, Records};
use crate::probe::Probes;
use crate::{CsiError, CsiMetrics, CsiSettings, Host, nfs, validate};

/// The CSI Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    pub(crate) settings: Arc<CsiSettings>,
    pub(crate) mounter: Arc<dyn Mounter>,
    pub(crate) host: Host,
    pub(crate) guard: VolumeGuard,
    pub(crate) metrics: CsiMetrics,
    pub(crate) probes: Probes,
    pub(crate) records: Records,
}

/// What a capability asks for, once validated.
pub(crate) struct Capability {
    pub(crate) block: bool,
    pub(crate) mount_flags: Vec<String>,
    pub(crate) fs_type: String,
    pub(crate) reader_only: bool,
}

pub(crate) fn capability(cap: Option<&VolumeCapability>) -> Result<Capability, CsiError> {
    let cap =
        cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| {
            CsiError::InvalidArgument("volume_capability.access_mode is required".into())
        })?;
    let (block, mount_flags, fs_type) = match &cap.access_type {
        Some(AccessType::Block(_)) => (true, Vec::new(), String::new()),
        Some(AccessType::Mount(m)) => (false, m.mount_flags.clone(), m.fs_type.clone()),
        None => {
            return Err(CsiError::InvalidArgument(
                "volume_capability.access_type (block or mount) is required".into(),
            ));
        }
    };
    Ok(Capability {
        block,
        mount_flags,
        fs_type,
        reader_only: matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly),
    })
}

/// Run blocking host work off the async executor, bounded by `limit`.
pub(crate) async fn blocking<T: Send + 'static>(
    limit: Duration,
    what: String,
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(CsiError::Internal(format!("{what}: worker failed: {join}"))),
        Err(_) => Err(CsiError::Timeout(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// Host work for a volume whose guard is `held`: the guard goes with the work and is
/// released when the work really ends — also when the caller stops waiting at `limit` —
/// so a retry answers ABORTED while a helper that outlived its deadline still runs,
/// instead of running beside it.
pub(crate) async fn guarded<T: Send + 'static>(
    held: crate::guard::Held,
    limit: Duration,
    what: String,
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    blocking(limit, what, move || {
        let _held = held;
        f()
    })
    .await
}

fn is_stale(e: &MountError) -> bool {
    // ESTALE 116, ENOTCONN 107, EIO 5, EHOSTDOWN 112: the server is gone; only a lazy
    // unmount can detach such a mount.
    match e {
        MountError::UnmountFailed { source, .. } | MountError::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(116 | 107 | 5 | 112))
        }
        _ => false,
    }
}

fn is_busy(e: &MountError) -> bool {
    matches!(e, MountError::UnmountFailed { source, .. } if source.raw_os_error() == Some(16))
}

/// How long an unmount that got EBUSY waits for the file system to answer before it
/// concludes the server is gone.
const BUSY_PROBE: Duration = Duration::from_secs(2);

/// Unmount without following symlinks; detach lazily when the mount is stale, or when it
/// is busy because its server does not answer (processes blocked in the dead file system,
/// our own statvfs included, keep it busy until the server returns, possibly never). A
/// busy mount whose file system answers is a real error and is reported.
pub(crate) fn unmount(
    mounter: &Arc<dyn Mounter>,
    target: &Path,
    probes: &Probes,
) -> Result<(), CsiError> {
    match mounter.unmount(target, false) {
        Ok(()) => Ok(()),
        Err(e) if is_stale(&e) => {
            tracing::warn!(target = %target.display(), error = %e, "stale mount; detaching lazily");
            mounter.unmount(target, true).map_err(CsiError::from)
        }
        Err(e)
            if is_busy(&e)
                && (probes.is_blocked(target)
                    || !probes.responds(mounter.clone(), target, BUSY_PROBE)) =>
        {
            tracing::warn!(target = %target.display(), "busy mount whose server does not answer; detaching lazily");
            mounter.unmount(target, true).map_err(CsiError::from)
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn same_volume(a: &MountEntry, b: &MountEntry) -> bool {
    a.device == b.device && a.root == b.root
}

/// What a publish target is: a directory (mount access) or a file (a raw block device is
/// bound onto a file).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Directory,
    File,
}

/// Make sure the publish target can take a bind mount, without following a symlink:
/// create it when missing (`Ok(true)`: the caller removes it if the bind fails), accept
/// an existing one of the right kind (`Ok(false)`).
pub(crate) fn prepare_target(target: &Path, kind: TargetKind) -> Result<bool, CsiError> {
    let what = match kind {
        TargetKind::Directory => "a directory",
        TargetKind::File => "a file (block volumes are published on a file)",
    };
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => Err(CsiError::InvalidArgument(format!(
            "target path {} is a symlink; refusing to mount through it",
            target.display()
        ))),
        Ok(meta)
            if match kind {
                TargetKind::Directory => meta.is_dir(),
                TargetKind::File => meta.is_file(),
            } =>
        {
            Ok(false)
        }
        Ok(_) => Err(CsiError::AlreadyExists(format!(
            "target path {} exists and is not {what}",
            target.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let made = match kind {
                TargetKind::Directory => std::fs::create_dir(target),
                TargetKind::File => std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map(drop),
            };
            made.map_err(|e| {
                CsiError::Internal(format!("creating target path {}: {e}", target.display()))
            })?;
            Ok(true)
        }
        Err(e) => Err(CsiError::Internal(format!(
            "inspecting {}: {e}",
            target.display()
        ))),
    }
}

fn not_staged(volume_id: &str, staging: &Path) -> CsiError {
    CsiError::FailedPrecondition(format!(
        "volume {volume_id} is not staged at {}; NodeStageVolume must succeed first",
        staging.display()
    ))
}

impl NodeService {
    pub(crate) fn new(settings: Arc<CsiSettings>, host: Host, metrics: CsiMetrics) -> Self {
        Self {
            records: Records::new(settings.state_dir.join("iscsi")),
            settings,
            mounter: host.mounter.clone(),
            host,
            guard: VolumeGuard::default(),
            metrics,
            probes: Probes::default(),
        }
    }

    /// Share `guard` with other instances: a node service started after another stopped
    /// (a reload restarting the CSI plugin) answers ABORTED for a volume whose host work
    /// from the old one still runs, instead of running beside it.
    pub fn with_guard(mut self, guard: VolumeGuard) -> Self {
        self.guard = guard;
        self
    }

    fn nfs_volume(
        &self,
        context: &std::collections::HashMap<String, String>,
        cap: &Capability,
    ) -> Result<nfs::NfsVolume, CsiError> {
        if !nfs::is_nfs(context) {
            return Err(CsiError::InvalidArgument(
                "volumeAttributes must describe an NFS volume (server, share) or an iSCSI LUN (targetPortal, iqn, lun)".into(),
            ));
        }
        if !self.settings.nfs_enabled {
            return Err(CsiError::FailedPrecondition(
                "NFS volumes are disabled on this node (spec.csi.nfs.enabled)".into(),
            ));
        }
        if cap.block {
            return Err(CsiError::InvalidArgument(
                "NFS volumes support the mount access type only, not block".into(),
            ));
        }
        nfs::volume(context, &cap.mount_flags)
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let staging = validate::host_path("staging_target_path", &req.staging_target_path)?;
        let cap = capability(req.volume_capability.as_ref())?;
        if iscsi::is_iscsi(&req.volume_context) {
            return self
                .stage_iscsi(volume_id, staging, cap, &req.volume_context, &req.secrets)
                .await;
        }
        let volume = self.nfs_volume(&req.volume_context, &cap)?;
        let held = self.guard.acquire(&volume_id)?;
        let mounter = self.mounter.clone();
        let timeout = self.settings.mount_timeout;
        let what = format!("staging volume {volume_id}");
        guarded(held, timeout + Duration::from_secs(5), what, move || {
            if let Some(existing) = mounter.mount_at(&staging)? {
                if existing.source.trim_end_matches('/') == volume.source.trim_end_matches('/') {
                    return Ok(());
                }
                return Err(CsiError::AlreadyExists(format!(
                    "staging path {} already has {} mounted, not {}",
                    staging.display(),
                    existing.source,
                    volume.source
                )));
            }
            std::fs::create_dir_all(&staging).map_err(|e| {
                CsiError::Internal(format!("creating staging path {}: {e}", staging.display()))
            })?;
            mounter.mount(&MountRequest {
                fs_type: "nfs".into(),
                source: volume.source.clone(),
                target: staging.clone(),
                options: volume.options,
                timeout,
            })?;
            Ok(())
        })
        .await?;
        tracing::info!(volume_id = %volume_id, "volume staged");
        Ok(())
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::volume_id(&req.volume_id)?.to_string();
        let staging = validate::host_path("staging_target_path", &req.staging_target_path)?;
        let held = self.guard.acquire(&volume_id)?;
        let mounter = self.mounter.clone();
        let probes = self.probes.clone();
        let records = self.records.clone();
        let host = self.host.clone();
        let id = volume_id.clone();
        guarded(
            held,
            self.settings.mount_timeout,
            format!("unstaging volume {volume_id}"),
            move || {
                // Unmount every layer (a retried stage may have stacked mounts).
                while mounter.mount_at(&staging)?.is_some() {
                    unmount(&mounter, &staging, &probes)?;
                }
                if let Some(record) = records.load(&id)? {
                    crate::iscsi_node::detach(&host, &records, &record)?;
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
            return self.publish_block(volume_id, target, read_only).await;
        }
        let held = self.guard.acquire(&volume_id)?;
        let mounter = self.mounter.clone();
        let vid = volume_id.clone();
        guarded(held,
            self.settings.mount_timeout,
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
        let held = self.guard.acquire(&volume_id)?;
        let mounter = self.mounter.clone();
        let probes = self.probes.clone();
        guarded(
            held,
            self.settings.mount_timeout,
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
        let mounter = self.mounter.clone();
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
        if let Some(record) = self.records.load(&volume_id)?.filter(|r| r.block) {
            return self.block_stats(record).await;
        }
        let mounter = self.mounter.clone();
        let probes = self.probes.clone();
        let limit = self.settings.stats_timeout;
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
                self.metrics.abnormal();
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
        self.metrics.observe("NodeStageVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.unstage(request.into_inner()).await;
        self.metrics.observe("NodeUnstageVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.publish(request.into_inner()).await;
        self.metrics.observe("NodePublishVolume", started, &result);
        result.map_err(CsiError::into_status)?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.unpublish(request.into_inner()).await;
        self.metrics
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
        self.metrics.observe("NodeGetVolumeStats", started, &result);
        result.map(Response::new).map_err(CsiError::into_status)
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.expand(request.into_inner()).await;
        self.metrics.observe("NodeExpandVolume", started, &result);
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
            node_id: self.settings.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: (!self.settings.topology.is_empty()).then(|| Topology {
                segments: self.settings.topology.clone(),
            }),
        }))
    }
}
