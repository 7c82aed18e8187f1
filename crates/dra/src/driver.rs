use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cdi::{self, ContainerEdits};
use crate::checkpoint::{Checkpoint, CheckpointError, Intent, PreparedClaim, PreparedDevice};
use crate::claims::ClaimSource;

/// Why a backend cannot use or change a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// This node has no such device (the slice the scheduler read was stale).
    #[error("no device {0} on this node (was the slice stale?)")]
    Unknown(String),
    /// The claim's opaque parameters for this driver are wrong; the message says how.
    #[error("{0}")]
    Config(String),
    /// The host is not set up to hand the device over (a kernel driver not loaded, no
    /// IOMMU, a missing device node), or changing it failed; the message says the fix.
    #[error("{0}")]
    Host(String),
}

/// The `mode` a driver's opaque parameters ask for (`{"mode": "..."}`, with optional
/// `apiVersion`/`kind`): one of `modes`, the first when no config or no `mode` is given.
/// Anything else — not an object, an unknown key, another mode — is refused by name, so a
/// typo fails the claim instead of silently picking the default.
pub fn config_mode<'a>(
    driver: &str,
    config: Option<&serde_json::Value>,
    modes: &[&'a str],
) -> Result<&'a str, DeviceError> {
    let default = modes.first().copied().unwrap_or_default();
    let Some(config) = config else {
        return Ok(default);
    };
    let example = modes.get(1).unwrap_or(&default);
    let Some(object) = config.as_object() else {
        return Err(DeviceError::Config(format!(
            "{driver} config must be an object like {{\"mode\": \"{example}\"}}"
        )));
    };
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "mode" | "apiVersion" | "kind"))
    {
        return Err(DeviceError::Config(format!(
            "{driver} config has an unknown field {key:?} (known: mode, apiVersion, kind)"
        )));
    }
    match object.get("mode") {
        None => Ok(default),
        Some(serde_json::Value::String(m)) if modes.contains(&m.as_str()) => Ok(modes
            .iter()
            .find(|x| **x == m.as_str())
            .copied()
            .unwrap_or(default)),
        Some(other) => Err(DeviceError::Config(format!(
            "{driver} config: mode must be {}, not {other}",
            modes
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
    }
}

/// Why one claim could not be prepared or unprepared: the message the kubelet records
/// for that claim (the others are not affected).
#[derive(Debug, thiserror::Error)]
pub enum ClaimFailure {
    /// The API server could not give the claim.
    #[error("{0}")]
    Lookup(#[from] crate::ClaimError),
    /// The claim the kubelet names is not the one the API server has.
    #[error(
        "ResourceClaim {namespace}/{name} has UID {found}, the kubelet asked for {asked} (deleted and recreated?)"
    )]
    UidMismatch {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API server's UID.
        found: String,
        /// The kubelet's.
        asked: String,
    },
    /// Nothing of this driver's is allocated to the claim.
    #[error("ResourceClaim {namespace}/{name} has no devices allocated by {driver}")]
    NotOurs {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// This driver.
        driver: String,
    },
    /// A device allocated from another node's pool.
    #[error("device {device} was allocated from pool {pool}, not this node's pool {ours}")]
    WrongPool {
        /// The device.
        device: String,
        /// Its pool.
        pool: String,
        /// This node's.
        ours: String,
    },
    /// The device is prepared for another claim.
    #[error("device {device} is already prepared for claim {holder}")]
    Busy {
        /// The device.
        device: String,
        /// The claim UID holding it.
        holder: String,
    },
    /// A device that must change with this one (same IOMMU group) is held by another
    /// claim.
    #[error(
        "device {device} cannot be prepared: {other} changes with it (same IOMMU group) and is held by claim {holder}"
    )]
    Shared {
        /// The device asked for.
        device: String,
        /// The device it shares the host resource with.
        other: String,
        /// The claim UID holding `other`.
        holder: String,
    },
    /// The backend refused or failed a device.
    #[error("device {device}: {source}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// Writing state (the checkpoint, a CDI spec) or running the host work failed.
    #[error("{what}: {message}")]
    State {
        /// What was being done.
        what: &'static str,
        /// Why.
        message: String,
    },
}

impl ClaimFailure {
    fn device(device: &str, source: DeviceError) -> Self {
        ClaimFailure::Device {
            device: device.to_string(),
            source,
        }
    }

    fn state(what: &'static str, message: impl std::fmt::Display) -> Self {
        ClaimFailure::State {
            what,
            message: message.to_string(),
        }
    }
}

/// What a DRA driver's devices are.
pub trait DeviceBackend: Send + Sync + std::fmt::Debug + 'static {
    /// The DRA driver name, e.g. `gpu.hybridlet.io`.
    fn driver_name(&self) -> &str;
    /// The pool this node publishes (the node name).
    fn pool_name(&self) -> &str;
    /// The container edits for one device, or why it cannot be used (unknown, unhealthy);
    /// `config` is the driver's opaque parameters for it, if the claim or class gave any.
    fn edits(
        &self,
        device: &str,
        config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError>;
    /// Whether `device` can be prepared with `config`, before anything changes. Default:
    /// its container edits can be made. A device that [`DeviceBackend::attach`] creates
    /// (a MIG instance) checks what it can without creating it.
    fn check(&self, device: &str, config: Option<&serde_json::Value>) -> Result<(), DeviceError> {
        self.edits(device, config).map(|_| ())
    }
    /// At start, after interrupted prepares were released: `prepared` are the devices the
    /// checkpoint's claims hold; anything else this backend made on the host (a MIG
    /// instance no claim holds) can go. Default: nothing to do.
    fn tidy(&self, _prepared: &[&str]) {}
    /// What [`DeviceBackend::release`] must put back for `device`, read before
    /// [`DeviceBackend::attach`] changes anything (an SR-IOV VF's driver and
    /// driver_override). The driver records it with the intent and the prepared device.
    /// Default: nothing (GPUs).
    fn snapshot(&self, _device: &str) -> Result<Option<serde_json::Value>, DeviceError> {
        Ok(None)
    }
    /// Host changes a device needs before a container can use it (an SR-IOV VF moved to
    /// vfio-pci). Must be idempotent: it runs again when the kubelet repeats a prepare,
    /// e.g. after a reboot. Default: nothing to do (GPUs).
    fn attach(
        &self,
        _device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Undo [`DeviceBackend::attach`], putting back `original` (what
    /// [`DeviceBackend::snapshot`] said) when it is known; idempotent. Default: nothing.
    fn release(
        &self,
        _device: &str,
        _original: Option<&serde_json::Value>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Devices that change with `device` on the host (the other functions of its IOMMU
    /// group, which move to vfio-pci together), so none of them can serve another claim
    /// while `device` is prepared: the driver reserves them with it. Default: none.
    fn companions(&self, _device: &str) -> Vec<String> {
        Vec::new()
    }
    /// Whether [`DeviceBackend::attach`] changes the host (then the driver records its
    /// intent in the checkpoint before attaching, so a crash midway is undone at start).
    fn changes_host(&self) -> bool {
        false
    }
}

/// Each of `devices` and its companions, as (held device, the claimed device it comes
/// with); a claimed device comes first, as its own entry.
fn held_by(backend: &dyn DeviceBackend, devices: &[PreparedDevice]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = devices
        .iter()
        .map(|d| (d.device.clone(), d.device.clone()))
        .collect();
    for d in devices {
        for c in backend.companions(&d.device) {
            if !out.iter().any(|(name, _)| *name == c) {
                out.push((c, d.device.clone()));
            }
        }
    }
    out
}

/// Release `devices`, last first; the first failure stops it (the devices before it stay
/// attached, so a retry can release them).
fn release_devices(
    backend: &dyn DeviceBackend,
    devices: &[PreparedDevice],
) -> Result<(), ClaimFailure> {
    for d in devices.iter().rev() {
        backend
            .release(&d.device, d.original.as_ref())
            .map_err(|e| ClaimFailure::device(&d.device, e))?;
    }
    Ok(())
}

/// Release every device, logging (not returning) failures: the clean-up path after a
/// failed prepare.
fn release_all(backend: &dyn DeviceBackend, devices: &[PreparedDevice]) {
    for d in devices.iter().rev() {
        if let Err(e) = backend.release(&d.device, d.original.as_ref()) {
            tracing::error!(device = %d.device, "releasing after a failed prepare: {e}");
        }
    }
}

fn write_cdi(
    backend: &dyn DeviceBackend,
    cdi_dir: &Path,
    uid: &str,
    devices: &[PreparedDevice],
) -> Result<(), ClaimFailure> {
    let mut entries = Vec::with_capacity(devices.len());
    for d in devices {
        entries.push((
            d.device.clone(),
            backend
                .edits(&d.device, d.config.as_ref())
                .map_err(|e| ClaimFailure::device(&d.device, e))?,
        ));
    }
    let driver = backend.driver_name();
    let path = cdi::spec_file(cdi_dir, driver, uid);
    hybridlet_sys::atomic_write(&path, cdi::spec(driver, uid, &entries).as_bytes(), 0o644)
        .map_err(|e| ClaimFailure::state("writing CDI spec", e))
}

/// After a crash: a CDI spec written for a claim whose prepare never reached the
/// checkpoint is not prepared (the kubelet asks again and gets a fresh one), and the
/// temporary files of an interrupted atomic write are garbage. Only this driver's files
/// are touched.
fn remove_crash_leftovers(
    cdi_dir: &Path,
    checkpoint_path: &Path,
    driver: &str,
    checkpoint: &Checkpoint,
) {
    let spec_prefix = format!(".{}-", driver.replace(['/', '.'], "_"));
    let checkpoint_tmp = checkpoint_path
        .file_name()
        .map(|n| format!(".{}.tmp.", n.to_string_lossy()));
    let dirs = [Some(cdi_dir), checkpoint_path.parent()];
    for dir in dirs.into_iter().flatten() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let temp = (name.starts_with(&spec_prefix) && name.contains(".json.tmp."))
                || checkpoint_tmp
                    .as_ref()
                    .is_some_and(|t| name.starts_with(t.as_str()));
            let orphan = dir == cdi_dir
                && cdi::spec_uid(&name, driver)
                    .is_some_and(|uid| !checkpoint.claims.contains_key(&uid));
            if temp || orphan {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed a leftover of an interrupted prepare")
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), "removing a leftover of an interrupted prepare failed: {e}")
                    }
                }
            }
        }
    }
}

/// Holds one claim's lock; drops the map entry when nobody else waits for it.
struct ClaimGuard<'a> {
    driver: &'a Driver,
    uid: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self._guard = None;
        let mut locks = self
            .driver
            .claim_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Ours plus the map's: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.uid);
        }
    }
}

/// Attach every device, or none: on a failure the ones attached are released again.
fn attach_all(backend: &dyn DeviceBackend, devices: &[PreparedDevice]) -> Result<(), ClaimFailure> {
    for (i, d) in devices.iter().enumerate() {
        if let Err(e) = backend.attach(&d.device, d.config.as_ref()) {
            release_all(backend, &devices[..i]);
            return Err(ClaimFailure::device(&d.device, e));
        }
    }
    Ok(())
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The checkpoint cannot be used (written by a newer hybridlet).
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
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
///
/// Concurrency: claims on different devices prepare in parallel. A claim's devices are
/// reserved in memory under a short lock (a device reserved by another claim refuses this
/// one at once); the host work (attach, CDI spec) runs on a blocking thread without any
/// driver-wide lock; the checkpoint is written by group commit — whoever holds the commit
/// lock writes everything prepared so far in one fsync'ed write, and the claims it covered
/// do not write again. Two calls for the same claim (a kubelet retry) run one after the
/// other.
#[derive(Debug)]
pub struct Driver {
    backend: Arc<dyn DeviceBackend>,
    claims: Arc<dyn ClaimSource>,
    checkpoint_path: PathBuf,
    cdi_dir: PathBuf,
    state: std::sync::Mutex<State>,
    /// The generation on disk; held while writing the checkpoint.
    committed: tokio::sync::Mutex<u64>,
    /// One lock per claim UID being worked on.
    claim_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The prepared claims after every change, for whoever labels metrics with them.
    changes: tokio::sync::watch::Sender<BTreeMap<String, PreparedClaim>>,
    metrics: Option<crate::DraMetrics>,
    /// Prepared claims whose ResourceClaim the API server says is gone, since when.
    gone: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// What one reconcile of prepared claims against the API server did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Claims unprepared because their ResourceClaim was gone.
    pub released: Vec<String>,
    /// Claims whose ResourceClaim is gone, waiting out the grace period or a pod of theirs.
    pub waiting: Vec<String>,
    /// The API server did not answer: nothing was decided.
    pub skipped: bool,
}

/// The in-memory truth; the checkpoint file lags it by at most one group commit.
#[derive(Debug, Default)]
struct State {
    checkpoint: Checkpoint,
    /// Bumped on every change of `checkpoint.claims`.
    generation: u64,
    /// Device → the claim UID holding it (prepared, or being prepared).
    reserved: HashMap<String, String>,
}

impl Driver {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serialise work on one claim; the entry goes when its last user is done.
    async fn lock_claim(&self, uid: &str) -> ClaimGuard<'_> {
        let lock = {
            let mut locks = self
                .claim_locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(uid.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        ClaimGuard {
            driver: self,
            uid: uid.to_string(),
            lock,
            _guard: Some(guard),
        }
    }

    /// Write the checkpoint unless a group commit already covered `generation`.
    async fn persist(&self, generation: u64) -> Result<(), ClaimFailure> {
        let mut committed = self.committed.lock().await;
        if *committed >= generation {
            return Ok(());
        }
        let (snapshot, covers) = {
            let state = self.lock_state();
            (state.checkpoint.clone(), state.generation)
        };
        let path = self.checkpoint_path.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || snapshot.save(&path))
            .await
            .map_err(|e| ClaimFailure::state("writing the checkpoint", e))?
            .map_err(|e| ClaimFailure::state("writing the checkpoint", e))?;
        if let Some(m) = &self.metrics {
            m.checkpoint_written(started.elapsed());
        }
        *committed = covers;
        Ok(())
    }

    fn publish_changes(&self) {
        let claims = self.lock_state().checkpoint.claims.clone();
        if let Some(m) = &self.metrics {
            m.prepared(claims.len(), claims.values().map(|c| c.devices.len()).sum());
        }
        self.changes.send_replace(claims);
    }

    /// Export this driver's calls, checkpoint writes and prepared state.
    pub fn with_metrics(mut self, metrics: crate::DraMetrics) -> Self {
        let claims = self.lock_state().checkpoint.claims.clone();
        metrics.prepared(claims.len(), claims.values().map(|c| c.devices.len()).sum());
        self.metrics = Some(metrics);
        self
    }

    /// Record one claim's call (the gRPC services call this).
    pub fn observe(&self, operation: &str, ok: bool, took: std::time::Duration) {
        if let Some(m) = &self.metrics {
            m.operation(operation, ok, took);
        }
    }

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
        let loaded = Checkpoint::load(checkpoint_path, boot_id)?;
        if loaded.rebooted {
            tracing::warn!(
                driver = backend.driver_name(),
                "reboot detected since the last checkpoint; rebuilding CDI specs of prepared claims"
            );
        }
        let mut checkpoint = loaded.checkpoint;
        // Prepares that crashed while changing the host: give the devices back (release
        // is idempotent), so nothing stays on vfio-pci for a claim nobody holds.
        for (uid, intents) in std::mem::take(&mut checkpoint.attaching) {
            let devices: Vec<PreparedDevice> = intents
                .into_iter()
                .map(|Intent { device, original }| PreparedDevice {
                    device,
                    original,
                    ..PreparedDevice::default()
                })
                .collect();
            match release_devices(backend.as_ref(), &devices) {
                Ok(()) => {
                    tracing::warn!(claim_uid = %uid, devices = devices.len(), "released the devices of a prepare interrupted by a crash")
                }
                Err(e) => {
                    tracing::error!(claim_uid = %uid, "releasing the devices of a prepare interrupted by a crash failed: {e}")
                }
            }
        }
        {
            let prepared: Vec<&str> = checkpoint
                .claims
                .values()
                .flat_map(|c| c.devices.iter().map(|d| d.device.as_str()))
                .collect();
            backend.tidy(&prepared);
        }
        checkpoint.boot_id = boot_id.to_string();
        checkpoint.version = crate::checkpoint::CHECKPOINT_VERSION;
        let mut driver = Self {
            backend,
            claims,
            checkpoint_path: checkpoint_path.to_path_buf(),
            cdi_dir: cdi_dir.to_path_buf(),
            state: std::sync::Mutex::new(State::default()),
            committed: tokio::sync::Mutex::new(0),
            claim_locks: std::sync::Mutex::new(HashMap::new()),
            changes: tokio::sync::watch::Sender::new(BTreeMap::new()),
            metrics: None,
            gone: std::sync::Mutex::new(HashMap::new()),
        };
        for (uid, claim) in &checkpoint.claims {
            if let Err(e) = driver.write_cdi(uid, &claim.devices) {
                tracing::error!(claim_uid = %uid, "rebuilding the CDI spec failed: {e}");
            }
        }
        remove_crash_leftovers(
            cdi_dir,
            checkpoint_path,
            driver.backend.driver_name(),
            &checkpoint,
        );
        checkpoint
            .save(checkpoint_path)
            .map_err(|e| DriverError::Io {
                what: "writing the checkpoint",
                path: checkpoint_path.to_path_buf(),
                message: e.to_string(),
            })?;
        driver.changes.send_replace(checkpoint.claims.clone());
        let state = driver
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (uid, claim) in &checkpoint.claims {
            for (name, _) in held_by(driver.backend.as_ref(), &claim.devices) {
                state.reserved.insert(name, uid.clone());
            }
        }
        state.checkpoint = checkpoint;
        Ok(driver)
    }

    fn write_cdi(&self, uid: &str, devices: &[PreparedDevice]) -> Result<(), ClaimFailure> {
        write_cdi(self.backend.as_ref(), &self.cdi_dir, uid, devices)
    }

    /// Attach the devices and write the claim's CDI spec on a blocking thread (sysfs
    /// writes and fsyncs); all or nothing.
    async fn set_up(&self, uid: &str, devices: &[PreparedDevice]) -> Result<(), ClaimFailure> {
        let (backend, cdi_dir, uid, devices) = (
            self.backend.clone(),
            self.cdi_dir.clone(),
            uid.to_string(),
            devices.to_vec(),
        );
        tokio::task::spawn_blocking(move || {
            attach_all(backend.as_ref(), &devices)?;
            if let Err(e) = write_cdi(backend.as_ref(), &cdi_dir, &uid, &devices) {
                release_all(backend.as_ref(), &devices);
                return Err(e);
            }
            Ok(())
        })
        .await
        .map_err(|e| ClaimFailure::state("preparing the devices", e))?
    }

    /// Drop a recorded intent and write the checkpoint without it, so a failed prepare
    /// leaves nothing behind on disk. (Should the write fail, the next start releases
    /// devices that are released already: harmless.)
    async fn forget_intent(&self, uid: &str) {
        let generation = {
            let mut state = self.lock_state();
            if state.checkpoint.attaching.remove(uid).is_none() {
                return;
            }
            state.generation += 1;
            state.generation
        };
        if let Err(e) = self.persist(generation).await {
            tracing::warn!(claim_uid = %uid, "writing the checkpoint without a failed prepare's intent: {e}");
        }
    }

    /// Everything about `devices` that can be known before the host is touched: each is
    /// usable with its config (so a claim naming a device this node does not have fails
    /// before any intent is recorded), and what release must put back.
    async fn inspect(&self, devices: &mut [PreparedDevice]) -> Result<(), ClaimFailure> {
        let backend = self.backend.clone();
        let list = devices.to_vec();
        let originals = tokio::task::spawn_blocking(move || {
            list.iter()
                .map(|d| {
                    backend
                        .check(&d.device, d.config.as_ref())
                        .and_then(|()| backend.snapshot(&d.device))
                        .map_err(|e| ClaimFailure::device(&d.device, e))
                })
                .collect::<Result<Vec<_>, ClaimFailure>>()
        })
        .await
        .map_err(|e| ClaimFailure::state("inspecting the devices", e))??;
        for (d, original) in devices.iter_mut().zip(originals) {
            d.original = original;
        }
        Ok(())
    }

    /// Each device with its companions: everything a claim on `devices` holds.
    fn held(&self, devices: &[PreparedDevice]) -> Vec<(String, String)> {
        held_by(self.backend.as_ref(), devices)
    }

    fn unreserve(&self, uid: &str, devices: &[PreparedDevice]) {
        let held = self.held(devices);
        let mut state = self.lock_state();
        for (name, _) in held {
            if state
                .reserved
                .get(&name)
                .is_some_and(|holder| holder == uid)
            {
                state.reserved.remove(&name);
            }
        }
    }

    /// Prepare one claim; the error is the per-claim message the kubelet shows.
    pub async fn prepare(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Vec<PreparedDevice>, ClaimFailure> {
        let _claim = self.lock_claim(uid).await;
        let done = self.lock_state().checkpoint.claims.get(uid).cloned();
        if let Some(done) = done {
            // Idempotent: same devices, same CDI IDs; the host state restored if it was
            // lost (a reboot, a crash before attaching) and the spec written again, as
            // it may have vanished or a device may have been made anew (a MIG instance
            // after a reboot has a new UUID).
            self.set_up(uid, &done.devices).await?;
            return Ok(done.devices);
        }
        // Fetch without any driver-wide lock: other claims need not wait for the API server.
        let claim = self.claims.get(namespace, name).await?;
        if claim.uid != uid {
            return Err(ClaimFailure::UidMismatch {
                namespace: namespace.to_string(),
                name: name.to_string(),
                found: claim.uid,
                asked: uid.to_string(),
            });
        }
        let driver = self.backend.driver_name();
        let ours: Vec<_> = claim
            .allocations
            .iter()
            .filter(|a| a.driver == driver)
            .collect();
        if ours.is_empty() {
            return Err(ClaimFailure::NotOurs {
                namespace: namespace.to_string(),
                name: name.to_string(),
                driver: driver.to_string(),
            });
        }
        let mut devices: Vec<PreparedDevice> = Vec::new();
        for a in ours {
            if a.pool != self.backend.pool_name() {
                return Err(ClaimFailure::WrongPool {
                    device: a.device.clone(),
                    pool: a.pool.clone(),
                    ours: self.backend.pool_name().to_string(),
                });
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
                config: crate::claims::config_for(&claim.configs, driver, &a.request).cloned(),
                original: None,
            });
        }
        self.inspect(&mut devices).await?;
        {
            // Reserve every device (with the devices that change with it) or none.
            let held = self.held(&devices);
            let mut state = self.lock_state();
            for (name, of) in &held {
                if let Some(holder) = state.reserved.get(name).filter(|h| *h != uid) {
                    // Held as another claim's companion: name the device it came with.
                    let via = (name == of)
                        .then(|| {
                            self.backend
                                .companions(name)
                                .into_iter()
                                .find(|c| state.reserved.get(c) == Some(holder))
                        })
                        .flatten();
                    return Err(if let Some(via) = via {
                        ClaimFailure::Shared {
                            device: name.clone(),
                            other: via,
                            holder: holder.clone(),
                        }
                    } else if name == of {
                        ClaimFailure::Busy {
                            device: name.clone(),
                            holder: holder.clone(),
                        }
                    } else {
                        ClaimFailure::Shared {
                            device: of.clone(),
                            other: name.clone(),
                            holder: holder.clone(),
                        }
                    });
                }
            }
            for (name, _) in held {
                state.reserved.insert(name, uid.to_string());
            }
        }
        let intent = self.backend.changes_host();
        if intent {
            let generation = {
                let mut state = self.lock_state();
                state.checkpoint.attaching.insert(
                    uid.to_string(),
                    devices
                        .iter()
                        .map(|d| Intent {
                            device: d.device.clone(),
                            original: d.original.clone(),
                        })
                        .collect(),
                );
                state.generation += 1;
                state.generation
            };
            if let Err(e) = self.persist(generation).await {
                self.forget_intent(uid).await;
                self.unreserve(uid, &devices);
                return Err(e);
            }
        }
        if let Err(e) = self.set_up(uid, &devices).await {
            if intent {
                self.forget_intent(uid).await;
            }
            self.unreserve(uid, &devices);
            return Err(e);
        }
        let generation = {
            let mut state = self.lock_state();
            state.checkpoint.attaching.remove(uid);
            state.checkpoint.claims.insert(
                uid.to_string(),
                PreparedClaim {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    devices: devices.clone(),
                    pods: claim.pods.clone(),
                },
            );
            state.generation += 1;
            state.generation
        };
        if let Err(e) = self.persist(generation).await {
            // Not recorded, so not prepared: forget it, remove the spec, release.
            {
                let mut state = self.lock_state();
                state.checkpoint.claims.remove(uid);
                state.generation += 1;
            }
            let _ = std::fs::remove_file(cdi::spec_file(&self.cdi_dir, driver, uid));
            release_all(self.backend.as_ref(), &devices);
            self.unreserve(uid, &devices);
            return Err(e);
        }
        self.publish_changes();
        tracing::info!(claim_uid = %uid, claim = %format!("{namespace}/{name}"), devices = devices.len(), "claim prepared");
        Ok(devices)
    }

    /// Unprepare one claim; unknown claims succeed.
    pub async fn unprepare(&self, uid: &str) -> Result<(), ClaimFailure> {
        let _claim = self.lock_claim(uid).await;
        let spec = cdi::spec_file(&self.cdi_dir, self.backend.driver_name(), uid);
        let Some(claim) = self.lock_state().checkpoint.claims.get(uid).cloned() else {
            // Not ours or already done; still make sure no spec is left behind.
            let _ = std::fs::remove_file(&spec);
            return Ok(());
        };
        // Release first: a failure keeps the claim recorded, so the kubelet's retry (or
        // the next start) can still release it.
        {
            let (backend, devices) = (self.backend.clone(), claim.devices.clone());
            tokio::task::spawn_blocking(move || release_devices(backend.as_ref(), &devices))
                .await
                .map_err(|e| ClaimFailure::state("releasing the devices", e))??;
        }
        let generation = {
            let mut state = self.lock_state();
            state.checkpoint.claims.remove(uid);
            state.generation += 1;
            state.generation
        };
        if let Err(e) = self.persist(generation).await {
            let mut state = self.lock_state();
            state.checkpoint.claims.insert(uid.to_string(), claim);
            state.generation += 1;
            return Err(e);
        }
        self.unreserve(uid, &claim.devices);
        match std::fs::remove_file(&spec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(claim_uid = %uid, "removing the CDI spec failed: {e}"),
        }
        self.publish_changes();
        tracing::info!(claim_uid = %uid, "claim unprepared");
        Ok(())
    }

    /// Compare the prepared claims with the API server (at start and periodically): a
    /// claim whose ResourceClaim is gone — deleted (force-deleted while prepared), or its
    /// name now held by a claim with another UID — for longer than `grace`, and that no
    /// unfinished pod on this node still uses, is unprepared and its devices released, so
    /// they cannot stay reserved for a claim nobody holds. Nothing is decided while the
    /// API server does not answer or answers with errors. Each release is logged and
    /// counted.
    pub async fn reconcile(&self, grace: std::time::Duration) -> Reconciled {
        let prepared = self.lock_state().checkpoint.claims.clone();
        let mut out = Reconciled::default();
        let now = std::time::Instant::now();
        let mut gone_now = Vec::new();
        for (uid, claim) in &prepared {
            match self.claims.get(&claim.namespace, &claim.name).await {
                Ok(current) if current.uid == *uid => {}
                Ok(_) | Err(crate::ClaimError::NotFound { .. }) => gone_now.push(uid.clone()),
                Err(e) => {
                    tracing::debug!("claim reconcile skipped: {e}");
                    out.skipped = true;
                    return out;
                }
            }
        }
        let due: Vec<String> = {
            let mut gone = self
                .gone
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            gone.retain(|uid, _| gone_now.contains(uid));
            gone_now
                .iter()
                .filter(|uid| {
                    now.duration_since(*gone.entry((*uid).clone()).or_insert(now)) >= grace
                })
                .cloned()
                .collect()
        };
        for uid in gone_now.iter().filter(|u| !due.contains(u)) {
            out.waiting.push(uid.clone());
        }
        for uid in due {
            let claim = &prepared[&uid];
            let pods = match self.claims.pods(&claim.namespace).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("claim reconcile skipped: {e}");
                    out.skipped = true;
                    return out;
                }
            };
            // Its own pods (those it was reserved for) still running here, or, when it
            // recorded none, any running pod naming it: leave it to the kubelet.
            let in_use = pods.iter().filter(|p| !p.finished).any(|p| {
                if claim.pods.is_empty() {
                    p.claims.contains(&claim.name)
                } else {
                    claim.pods.contains(&p.name)
                }
            });
            if in_use {
                out.waiting.push(uid);
                continue;
            }
            match self.unprepare(&uid).await {
                Ok(()) => {
                    tracing::warn!(claim_uid = %uid, claim = %format!("{}/{}", claim.namespace, claim.name), devices = claim.devices.len(), "released a prepared claim whose ResourceClaim is gone and whose pods have left the node");
                    if let Some(m) = &self.metrics {
                        m.orphan_released();
                    }
                    self.gone
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&uid);
                    out.released.push(uid);
                }
                Err(e) => {
                    tracing::error!(claim_uid = %uid, "releasing a prepared claim whose ResourceClaim is gone failed: {e}");
                    out.waiting.push(uid);
                }
            }
        }
        out
    }

    /// The prepared claims now and after every change (a claim's devices and pods label
    /// device metrics).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, PreparedClaim>> {
        self.changes.subscribe()
    }

    /// Prepared claims by UID (for metrics and tests).
    pub async fn prepared(&self) -> BTreeMap<String, PreparedClaim> {
        self.lock_state().checkpoint.claims.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn config_mode_takes_a_known_mode_and_names_what_is_wrong() {
        let modes = ["vfio", "driver"];
        let mode = |c: serde_json::Value| config_mode("pci.example.com", Some(&c), &modes);
        assert_eq!(config_mode("d", None, &modes).unwrap(), "vfio");
        assert_eq!(mode(json!({})).unwrap(), "vfio");
        assert_eq!(
            mode(json!({"apiVersion": "v1", "kind": "K", "mode": "driver"})).unwrap(),
            "driver"
        );
        let err = |c| mode(c).unwrap_err().to_string();
        assert_eq!(
            err(json!("driver")),
            "pci.example.com config must be an object like {\"mode\": \"driver\"}"
        );
        assert_eq!(
            err(json!({"mdoe": "driver"})),
            "pci.example.com config has an unknown field \"mdoe\" (known: mode, apiVersion, kind)"
        );
        assert_eq!(
            err(json!({"mode": 3})),
            "pci.example.com config: mode must be \"vfio\" or \"driver\", not 3"
        );
    }
}
