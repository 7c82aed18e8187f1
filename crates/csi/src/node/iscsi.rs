//! iSCSI on the node: stage (discovery and login with CHAP, every multipath path, the
//! dm-multipath map, format once, fsck, mount), raw block publish, block stats,
//! expansion, and the reference-counted detach after unstage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hybridlet_proto::csi::v1::volume_usage::Unit;
use hybridlet_proto::csi::v1::{NodeGetVolumeStatsResponse, VolumeCondition, VolumeUsage};
use hybridlet_sys::iscsi::{DiskFormat, IscsiError, IscsiTarget};
use hybridlet_sys::mount::{MountRequest, topmost};

use crate::iscsi::{self, Records, StageRecord};
use crate::node::protocol::Protocol;
use crate::node::work::{Capability, Shared, TargetKind, blocking, guarded, prepare_target};
use crate::{CsiError, Host, validate};

/// How long to wait for the LUN's by-path link after login (udev under load is slow).
const DEVICE_WAIT: Duration = Duration::from_secs(30);

fn iscsi_error(e: IscsiError) -> CsiError {
    match &e {
        IscsiError::Timeout { .. } => CsiError::Timeout(e.to_string()),
        _ if e.is_auth_failure() => CsiError::FailedPrecondition(format!(
            "{e}: check the CHAP user and password in the node-stage secret"
        )),
        IscsiError::NoDevice { .. } => CsiError::NotFound(format!(
            "{e}: the target accepted the login but does not present this LUN"
        )),
        _ => CsiError::Internal(e.to_string()),
    }
}

/// Detach the record's LUN: for multipath, flush and remove the dm-multipath map first
/// (a path must not go while the map still uses it); then, per path, log out of the
/// target unless another staged volume still uses that target through that portal (then
/// only this LUN's SCSI disk is removed), and forget the record. Logging out of a target
/// another volume uses would pull the disk from under it.
pub(crate) fn detach(host: &Host, records: &Records, record: &StageRecord) -> Result<(), CsiError> {
    // Unmounted already; write out what the block layer still buffers (raw block users
    // write through it) before the disk goes away.
    let device_present = !record.device.as_os_str().is_empty() && record.device.exists();
    if device_present && let Err(e) = host.disks.flush(&record.device) {
        tracing::warn!(volume_id = %record.volume_id, error = %e, "flushing the LUN's buffers failed");
    }
    if record.multipath() && !record.device.as_os_str().is_empty() {
        host.disks.remove_multipath(&record.device).map_err(|e| {
            CsiError::Internal(format!(
                "{e}; the paths stay logged in while the multipath map exists (is something still using {}?)",
                record.device.display()
            ))
        })?;
    }
    let others: Vec<IscsiTarget> = records
        .all()
        .iter()
        .filter(|r| r.volume_id != record.volume_id)
        .flat_map(StageRecord::targets)
        .collect();
    let paths: Vec<(IscsiTarget, PathBuf)> = if record.paths.is_empty() {
        vec![(record.target.clone(), record.device.clone())]
    } else {
        record.paths.clone()
    };
    for (target, disk) in &paths {
        if others.contains(target) {
            if !disk.as_os_str().is_empty()
                && disk.exists()
                && let Err(e) = host.disks.remove_scsi_device(disk)
            {
                tracing::warn!(volume_id = %record.volume_id, error = %e, "could not remove the LUN's SCSI disk; it stays until the target is logged out");
            }
        } else {
            host.initiator.logout(target).map_err(iscsi_error)?;
        }
    }
    records.remove(&record.volume_id)
}

/// iSCSI volumes, each with its stage record (what it is logged in to, which device).
#[derive(Debug, Clone)]
pub(crate) struct Iscsi {
    records: Records,
}

impl Iscsi {
    /// Records under `records`.
    pub(crate) fn new(records: Records) -> Self {
        Self { records }
    }
}

#[tonic::async_trait]
impl Protocol for Iscsi {
    fn handles(&self, context: &HashMap<String, String>) -> bool {
        iscsi::is_iscsi(context)
    }

    async fn stage(
        &self,
        shared: &Shared,
        volume_id: String,
        staging: PathBuf,
        cap: Capability,
        context: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> Result<(), CsiError> {
        if !shared.settings.iscsi_enabled {
            return Err(CsiError::FailedPrecondition(
                "iSCSI volumes are disabled on this node (spec.csi.iscsi.enabled)".into(),
            ));
        }
        let volume = iscsi::volume(context, secrets, &cap.fs_type)?;
        let mut options = Vec::new();
        for flag in &cap.mount_flags {
            options.push(validate::mount_option(flag)?);
        }
        let held = shared.guard.acquire(&volume_id)?;
        let host = shared.host.clone();
        let records = self.records.clone();
        let timeout = shared.settings.mount_timeout;
        let id = volume_id.to_string();
        let block = cap.block;
        let read_only = cap.reader_only;
        guarded(held,
            timeout + DEVICE_WAIT + Duration::from_secs(30),
            format!("staging volume {volume_id}"),
            move || {
                let mounted = host.mounter.mount_at(&staging)?;
                let paths: Vec<IscsiTarget> = std::iter::once(volume.target.clone())
                    .chain(volume.extra_paths.iter().cloned())
                    .collect();
                let multipath = paths.len() > 1;
                if let Some(existing) = records.load(&id)? {
                    if existing.target != volume.target
                        || existing.lun != volume.lun
                        || existing.block != block
                        || existing.targets() != paths
                    {
                        return Err(CsiError::AlreadyExists(format!(
                            "volume {id} is already staged as LUN {} of {} on {} ({} access)",
                            existing.lun,
                            existing.target.iqn,
                            existing.target.portal,
                            if existing.block { "block" } else { "mount" }
                        )));
                    }
                    let sessions = host.initiator.sessions().map_err(iscsi_error)?;
                    let logged_in = paths.iter().any(|t| sessions.contains(t));
                    if logged_in && (block || mounted.is_some()) {
                        return Ok(()); // already staged
                    }
                } else if let Some(m) = &mounted {
                    return Err(CsiError::AlreadyExists(format!(
                        "staging path {} already has {} mounted",
                        staging.display(),
                        m.source
                    )));
                }

                if let Some(chap) = &volume.discovery_chap {
                    for path in &paths {
                        let offered = host
                            .initiator
                            .discover(&path.portal, Some(chap))
                            .map_err(iscsi_error)?;
                        if !offered.contains(path) {
                            return Err(CsiError::NotFound(format!(
                                "portal {} does not offer target {}",
                                path.portal, path.iqn
                            )));
                        }
                    }
                }
                // Every path is tried; with multipath, the volume works (degraded) as long
                // as one path logs in, and multipathd adds the others when they come back.
                let mut logged_in = Vec::new();
                let mut first_error = None;
                for path in &paths {
                    match host.initiator.login(path, volume.session_chap.as_ref()) {
                        Ok(()) => logged_in.push(path.clone()),
                        Err(e) => {
                            tracing::warn!(volume_id = %id, portal = %path.portal, error = %e, "iSCSI login through this portal failed");
                            first_error.get_or_insert(e);
                        }
                    }
                }
                if logged_in.is_empty() {
                    return Err(first_error.map(iscsi_error).unwrap_or_else(|| {
                        CsiError::Internal("no portal to log in through".into())
                    }));
                }
                // Recorded before anything else can fail, so unstage logs out even if
                // this stage never finishes.
                let mut record = StageRecord {
                    volume_id: id.clone(),
                    target: volume.target.clone(),
                    lun: volume.lun,
                    fs_type: volume.fs_type.clone(),
                    block,
                    device: PathBuf::new(),
                    paths: if multipath {
                        paths.iter().map(|t| (t.clone(), PathBuf::new())).collect()
                    } else {
                        Vec::new()
                    },
                };
                records.save(&record)?;
                let device = if multipath {
                    let mut disks = Vec::new();
                    for path in &logged_in {
                        match host.disks.wait_for(&path.by_path(volume.lun), DEVICE_WAIT) {
                            Ok(disk) => {
                                if let Some(slot) = record.paths.iter_mut().find(|(t, _)| t == path) {
                                    slot.1 = disk.clone();
                                }
                                disks.push(disk);
                            }
                            Err(e) => {
                                tracing::warn!(volume_id = %id, portal = %path.portal, error = %e, "no disk through this portal");
                            }
                        }
                    }
                    if disks.is_empty() {
                        return Err(CsiError::NotFound(format!(
                            "no portal of {} presents LUN {}",
                            volume.target.iqn, volume.lun
                        )));
                    }
                    records.save(&record)?;
                    host.disks
                        .multipath_device(&disks, DEVICE_WAIT)
                        .map_err(|e| CsiError::FailedPrecondition(e.to_string()))?
                } else {
                    host.disks
                        .wait_for(&volume.target.by_path(volume.lun), DEVICE_WAIT)
                        .map_err(iscsi_error)?
                };
                record.device = device.clone();
                records.save(&record)?;
                if block {
                    return Ok(());
                }
                if mounted.is_some() {
                    return Ok(()); // mounted, the session had dropped: login was all it took
                }
                match host.disks.probe(&device).map_err(iscsi_error)? {
                    DiskFormat::Blank => {
                        tracing::info!(volume_id = %id, fs_type = %volume.fs_type, "LUN is blank; formatting it");
                        host.disks
                            .format(&device, &volume.fs_type)
                            .map_err(iscsi_error)?;
                    }
                    DiskFormat::Filesystem(fs) if fs == volume.fs_type => {
                        if !read_only {
                            host.disks
                                .check(&device, &fs)
                                .map_err(|e| CsiError::FailedPrecondition(format!(
                                    "the {fs} filesystem on LUN {} of {} has errors fsck cannot fix safely: {e}",
                                    volume.lun, volume.target.iqn
                                )))?;
                        }
                    }
                    DiskFormat::Filesystem(fs) => {
                        return Err(CsiError::FailedPrecondition(format!(
                            "LUN {} of {} holds {fs}, but the volume asks for {}; refusing to reformat it",
                            volume.lun, volume.target.iqn, volume.fs_type
                        )));
                    }
                    DiskFormat::PartitionTable(pt) => {
                        return Err(CsiError::FailedPrecondition(format!(
                            "LUN {} of {} has a {pt} partition table; refusing to format over it",
                            volume.lun, volume.target.iqn
                        )));
                    }
                }
                std::fs::create_dir_all(&staging).map_err(|e| {
                    CsiError::Internal(format!("creating staging path {}: {e}", staging.display()))
                })?;
                if read_only {
                    options.push("ro".into());
                }
                host.mounter.mount(&MountRequest {
                    fs_type: volume.fs_type.clone(),
                    source: device.display().to_string(),
                    target: staging.clone(),
                    options,
                    timeout,
                })?;
                Ok(())
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, "iSCSI volume staged");
        Ok(())
    }

    fn detach(&self, shared: &Shared, volume_id: &str) -> Result<(), CsiError> {
        match self.records.load(volume_id)? {
            Some(record) => detach(&shared.host, &self.records, &record),
            None => Ok(()),
        }
    }

    async fn block_stats(
        &self,
        shared: &Shared,
        volume_id: &str,
    ) -> Result<Option<NodeGetVolumeStatsResponse>, CsiError> {
        let Some(record) = self.records.load(volume_id)?.filter(|r| r.block) else {
            return Ok(None);
        };
        let disks = shared.host.disks.clone();
        let device = record.device.clone();
        let size = blocking(
            Duration::from_secs(10),
            format!("sizing {}", device.display()),
            move || disks.size_bytes(&device).map_err(iscsi_error),
        )
        .await;
        Ok(Some(match size {
            Ok(total) => NodeGetVolumeStatsResponse {
                usage: vec![VolumeUsage {
                    available: 0,
                    total: total as i64,
                    used: 0,
                    unit: Unit::Bytes as i32,
                }],
                volume_condition: Some(VolumeCondition {
                    abnormal: false,
                    message: "volume is healthy".into(),
                }),
            },
            Err(e) => {
                shared.metrics.abnormal();
                NodeGetVolumeStatsResponse {
                    usage: Vec::new(),
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message: format!("the LUN's device is gone: {e}"),
                    }),
                }
            }
        }))
    }

    async fn publish_block(
        &self,
        shared: &Shared,
        volume_id: &str,
        target: PathBuf,
        read_only: bool,
    ) -> Option<Result<(), CsiError>> {
        let record = match self.records.load(volume_id) {
            Ok(Some(r)) if r.block => r,
            Ok(_) => return None,
            Err(e) => return Some(Err(e)),
        };
        Some(
            self.bind_block(shared, volume_id, record, target, read_only)
                .await,
        )
    }

    async fn expand(
        &self,
        shared: &Shared,
        volume_id: &str,
        path: PathBuf,
    ) -> Option<Result<i64, CsiError>> {
        match self.records.load(volume_id) {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        }
        Some(self.grow_volume(shared, volume_id, path).await)
    }
}

impl Iscsi {
    async fn bind_block(
        &self,
        shared: &Shared,
        volume_id: &str,
        record: StageRecord,
        target: PathBuf,
        read_only: bool,
    ) -> Result<(), CsiError> {
        let held = shared.guard.acquire(volume_id)?;
        let mounter = shared.mounter.clone();
        guarded(
            held,
            shared.settings.mount_timeout,
            format!("publishing block volume {volume_id}"),
            move || {
                let device = &record.device;
                let node_name = device
                    .file_name()
                    .map(|n| format!("/{}", n.to_string_lossy()))
                    .unwrap_or_default();
                let table = mounter.mount_table()?;
                if let Some(existing) = topmost(&table, &target) {
                    if existing.root == node_name && existing.read_only() == read_only {
                        return Ok(());
                    }
                    return Err(CsiError::AlreadyExists(format!(
                        "target path {} already has something else bound",
                        target.display()
                    )));
                }
                let created = prepare_target(&target, TargetKind::File)?;
                if let Err(e) = mounter.bind(device, &target, read_only) {
                    if created {
                        let _ = std::fs::remove_file(&target);
                    }
                    return Err(e.into());
                }
                Ok(())
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, read_only, "block volume published");
        Ok(())
    }

    async fn grow_volume(
        &self,
        shared: &Shared,
        volume_id: &str,
        path: PathBuf,
    ) -> Result<i64, CsiError> {
        let held = shared.guard.acquire(volume_id)?;
        let host = shared.host.clone();
        let records = self.records.clone();
        let id = volume_id.to_string();
        let size = guarded(
            held,
            shared.settings.mount_timeout,
            format!("expanding volume {volume_id}"),
            move || {
                let mounted = host.mounter.mount_at(&path)?.is_some();
                let Some(record) = records.load(&id)? else {
                    return Err(CsiError::NotFound(format!(
                        "volume {id} is not staged on this node"
                    )));
                };
                if !mounted {
                    return Err(CsiError::NotFound(format!(
                        "volume {id} is not mounted at {}",
                        path.display()
                    )));
                }
                for target in record.targets() {
                    host.initiator.rescan(&target).map_err(iscsi_error)?;
                }
                if record.multipath() {
                    // The map keeps its old size until multipathd re-reads the paths.
                    host.disks
                        .resize_multipath(&record.device)
                        .map_err(iscsi_error)?;
                }
                if !record.block {
                    grow(&host, &record, &path)?;
                }
                let size = host.disks.size_bytes(&record.device).map_err(iscsi_error)?;
                Ok(size as i64)
            },
        )
        .await?;
        tracing::info!(volume_id = %volume_id, size, "volume expanded");
        Ok(size)
    }
}

fn grow(host: &Host, record: &StageRecord, mount_point: &Path) -> Result<(), CsiError> {
    host.disks
        .grow(&record.device, &record.fs_type, mount_point)
        .map_err(iscsi_error)
}
