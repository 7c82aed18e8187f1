use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cdi::{self, ContainerEdits};
use crate::checkpoint::{Checkpoint, PreparedClaim, PreparedDevice};
use crate::claims::ClaimSource;

/// What a DRA driver's devices are.
pub trait DeviceBackend: Send + Sync + std::fmt::Debug + 'static {
    /// The DRA driver name, e.g. `gpu.hybridlet.io`.
    fn driver_name(&self) -> &str;
    /// The pool this node publishes (the node name).
    fn pool_name(&self) -> &str;
    /// The container edits for one device, or why it cannot be used (unknown, unhealthy).
    fn edits(&self, device: &str) -> Result<ContainerEdits, String>;
    /// Host changes a device needs before a container can use it (an SR-IOV VF moved to
    /// vfio-pci). Must be idempotent: it runs again when the kubelet repeats a prepare,
    /// e.g. after a reboot. Default: nothing to do (GPUs).
    fn attach(&self, _device: &str) -> Result<(), String> {
        Ok(())
    }
    /// Undo [`DeviceBackend::attach`]; idempotent. Default: nothing to do.
    fn release(&self, _device: &str) -> Result<(), String> {
        Ok(())
    }
}

/// Attach every device, or none: on a failure the ones attached are released again.
fn attach_all(backend: &dyn DeviceBackend, devices: &[PreparedDevice]) -> Result<(), String> {
    for (i, d) in devices.iter().enumerate() {
        if let Err(e) = backend.attach(&d.device) {
            for done in devices[..i].iter().rev() {
                if let Err(undo) = backend.release(&done.device) {
                    tracing::error!(device = %done.device, "releasing after a failed prepare: {undo}");
                }
            }
            return Err(format!("device {}: {e}", d.device));
        }
    }
    Ok(())
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The CDI directory or checkpoint could not be written.
    #[error("{what} {}: {message}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Prepare/unprepare with a checkpoint and CDI specs.
#[derive(Debug)]
pub struct Driver {
    backend: Arc<dyn DeviceBackend>,
    claims: Arc<dyn ClaimSource>,
    checkpoint_path: PathBuf,
    cdi_dir: PathBuf,
    state: tokio::sync::Mutex<Checkpoint>,
    /// The prepared claims after every change, for whoever labels metrics with them.
    changes: tokio::sync::watch::Sender<BTreeMap<String, PreparedClaim>>,
}

impl Driver {
    /// Load the checkpoint (moving a corrupt one aside) and make sure every checkpointed
    /// claim has its CDI spec (after a reboot `/var/run/cdi` is empty).
    pub fn open(
        backend: Arc<dyn DeviceBackend>,
        claims: Arc<dyn ClaimSource>,
        checkpoint_path: &Path,
        cdi_dir: &Path,
        boot_id: &str,
    ) -> Result<Self, DriverError> {
        std::fs::create_dir_all(cdi_dir).map_err(|e| DriverError::Io {
            what: "creating the CDI directory",
            path: cdi_dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let loaded = Checkpoint::load(checkpoint_path, boot_id);
        if loaded.rebooted {
            tracing::warn!(
                driver = backend.driver_name(),
                "reboot detected since the last checkpoint; rebuilding CDI specs of prepared claims"
            );
        }
        let mut checkpoint = loaded.checkpoint;
        checkpoint.boot_id = boot_id.to_string();
        checkpoint.version = crate::checkpoint::CHECKPOINT_VERSION;
        let mut driver = Self {
            backend,
            claims,
            checkpoint_path: checkpoint_path.to_path_buf(),
            cdi_dir: cdi_dir.to_path_buf(),
            state: tokio::sync::Mutex::new(Checkpoint::default()),
            changes: tokio::sync::watch::Sender::new(BTreeMap::new()),
        };
        for (uid, claim) in &checkpoint.claims {
            if let Err(e) = driver.write_cdi(uid, &claim.devices) {
                tracing::error!(claim_uid = %uid, "rebuilding the CDI spec failed: {e}");
            }
        }
        checkpoint
            .save(checkpoint_path)
            .map_err(|e| DriverError::Io {
                what: "writing the checkpoint",
                path: checkpoint_path.to_path_buf(),
                message: e.to_string(),
            })?;
        driver.changes.send_replace(checkpoint.claims.clone());
        *driver.state.get_mut() = checkpoint;
        Ok(driver)
    }

    fn write_cdi(&self, uid: &str, devices: &[PreparedDevice]) -> Result<(), String> {
        let mut entries = Vec::with_capacity(devices.len());
        for d in devices {
            entries.push((d.device.clone(), self.backend.edits(&d.device)?));
        }
        let driver = self.backend.driver_name();
        let path = cdi::spec_file(&self.cdi_dir, driver, uid);
        hybridlet_sys::atomic_write(&path, cdi::spec(driver, uid, &entries).as_bytes(), 0o644)
            .map_err(|e| format!("writing CDI spec: {e}"))
    }

    /// Prepare one claim; the error is the per-claim message the kubelet shows.
    pub async fn prepare(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Vec<PreparedDevice>, String> {
        {
            let state = self.state.lock().await;
            if let Some(done) = state.claims.get(uid) {
                // Idempotent: same devices, same CDI IDs; restore the spec if it vanished
                // and the host state if it was lost (a reboot, a crash before attaching).
                attach_all(self.backend.as_ref(), &done.devices)?;
                let spec = cdi::spec_file(&self.cdi_dir, self.backend.driver_name(), uid);
                if !spec.exists() {
                    self.write_cdi(uid, &done.devices)?;
                }
                return Ok(done.devices.clone());
            }
        }
        // Fetch without holding the lock: other claims need not wait for the API server.
        let claim = self
            .claims
            .get(namespace, name)
            .await
            .map_err(|e| e.to_string())?;
        if claim.uid != uid {
            return Err(format!(
                "ResourceClaim {namespace}/{name} has UID {}, the kubelet asked for {uid} (deleted and recreated?)",
                claim.uid
            ));
        }
        let driver = self.backend.driver_name();
        let ours: Vec<_> = claim
            .allocations
            .iter()
            .filter(|a| a.driver == driver)
            .collect();
        if ours.is_empty() {
            return Err(format!(
                "ResourceClaim {namespace}/{name} has no devices allocated by {driver}"
            ));
        }
        let mut devices: Vec<PreparedDevice> = Vec::new();
        for a in ours {
            if a.pool != self.backend.pool_name() {
                return Err(format!(
                    "device {} was allocated from pool {}, not this node's pool {}",
                    a.device,
                    a.pool,
                    self.backend.pool_name()
                ));
            }
            // The same device can serve several requests of one claim.
            if let Some(existing) = devices.iter_mut().find(|d| d.device == a.device) {
                existing.request_names.push(a.request.clone());
                continue;
            }
            devices.push(PreparedDevice {
                request_names: vec![a.request.clone()],
                pool: a.pool.clone(),
                device: a.device.clone(),
                cdi_device_ids: vec![cdi::cdi_device_id(driver, uid, &a.device)],
            });
        }
        let mut state = self.state.lock().await;
        if let Some(done) = state.claims.get(uid) {
            return Ok(done.devices.clone()); // a concurrent retry finished first
        }
        for d in &devices {
            if let Some((other, _)) = state
                .claims
                .iter()
                .find(|(_, c)| c.devices.iter().any(|x| x.device == d.device))
            {
                return Err(format!(
                    "device {} is already prepared for claim {other}",
                    d.device
                ));
            }
        }
        attach_all(self.backend.as_ref(), &devices)?;
        if let Err(e) = self.write_cdi(uid, &devices) {
            for d in &devices {
                let _ = self.backend.release(&d.device);
            }
            return Err(e);
        }
        let mut next = state.clone();
        next.claims.insert(
            uid.to_string(),
            PreparedClaim {
                namespace: namespace.to_string(),
                name: name.to_string(),
                devices: devices.clone(),
                pods: claim.pods.clone(),
            },
        );
        if let Err(e) = next.save(&self.checkpoint_path) {
            // Not recorded, so not prepared: remove the spec we wrote, release the devices.
            let _ = std::fs::remove_file(cdi::spec_file(&self.cdi_dir, driver, uid));
            for d in &devices {
                let _ = self.backend.release(&d.device);
            }
            return Err(e.to_string());
        }
        self.changes.send_replace(next.claims.clone());
        *state = next;
        tracing::info!(claim_uid = %uid, claim = %format!("{namespace}/{name}"), devices = devices.len(), "claim prepared");
        Ok(devices)
    }

    /// Unprepare one claim; unknown claims succeed.
    pub async fn unprepare(&self, uid: &str) -> Result<(), String> {
        let mut state = self.state.lock().await;
        if !state.claims.contains_key(uid) {
            // Not ours or already done; still make sure no spec is left behind.
            let _ = std::fs::remove_file(cdi::spec_file(
                &self.cdi_dir,
                self.backend.driver_name(),
                uid,
            ));
            return Ok(());
        }
        // Release first: a failure keeps the claim recorded, so the kubelet's retry (or
        // the next start) can still release it.
        if let Some(claim) = state.claims.get(uid) {
            for d in &claim.devices {
                self.backend
                    .release(&d.device)
                    .map_err(|e| format!("device {}: {e}", d.device))?;
            }
        }
        let mut next = state.clone();
        next.claims.remove(uid);
        next.save(&self.checkpoint_path)
            .map_err(|e| e.to_string())?;
        self.changes.send_replace(next.claims.clone());
        *state = next;
        match std::fs::remove_file(cdi::spec_file(
            &self.cdi_dir,
            self.backend.driver_name(),
            uid,
        )) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(claim_uid = %uid, "removing the CDI spec failed: {e}"),
        }
        tracing::info!(claim_uid = %uid, "claim unprepared");
        Ok(())
    }

    /// The prepared claims now and after every change (a claim's devices and pods label
    /// device metrics).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, PreparedClaim>> {
        self.changes.subscribe()
    }

    /// Prepared claims by UID (for metrics and tests).
    pub async fn prepared(&self) -> BTreeMap<String, PreparedClaim> {
        self.state.lock().await.claims.clone()
    }
}
