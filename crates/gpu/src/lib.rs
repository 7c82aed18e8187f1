//! GPU discovery.
//!
//! NVML sits behind [`GpuSource`]: [`NvmlSource`] loads `libnvidia-ml.so.1` at run time
//! and keeps one session for the life of the process; [`FakeSource`] describes GPUs in
//! JSON for tests and demos. [`discover`] links each GPU, by its PCI bus ID, into the
//! sysfs PCIe topology (root complex, nearest switch, NUMA node) that hybridlet-sys reads.
//!
//! A host without the NVIDIA library or without GPUs is normal: zero GPUs and one info
//! log, not an error.
//!
//! What this crate must never do: depend on other domain crates (SR-IOV, CSI), or call
//! NVML from a metrics scrape (sampling belongs on a timer).

pub mod dra;
mod health;
pub mod mig;
mod nvml;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hybridlet_sys::{PciAddress, PciDevice, Topology};
use serde::{Deserialize, Serialize};

pub use health::{APPLICATION_XIDS, GPU_RECOVERY, GpuHealth};
pub use mig::{MigCode, MigInfo, MigInstance, MigProfile, Placement};
pub use nvml::NvmlSource;

/// CUDA compute capability, e.g. 9.0 for Hopper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeCapability {
    /// Major version.
    pub major: i32,
    /// Minor version.
    pub minor: i32,
}

/// What NVML says about one GPU. The JSON form (camelCase) is also the fake's fixture
/// format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// Minor number: the N in `/dev/nvidiaN`.
    pub minor_number: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Brand, e.g. `Nvidia`, `Tesla`.
    pub brand: String,
    /// Architecture, e.g. `Hopper`.
    pub architecture: String,
    /// CUDA compute capability.
    pub cuda_compute_capability: ComputeCapability,
    /// Kernel driver version, e.g. `570.86.15`.
    pub driver_version: String,
    /// CUDA driver API version, e.g. `12.8`.
    pub cuda_driver_version: String,
    /// Framebuffer memory in bytes.
    pub memory_total_bytes: u64,
    /// PCI bus ID as NVML prints it (`00000000:1B:00.0`).
    pub pci_bus_id: String,
    /// MIG mode, when the GPU supports MIG.
    pub mig_enabled: Option<bool>,
    /// Its MIG profiles and instances, while MIG mode is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<MigInfo>,
}

/// Errors from a GPU source.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML failed on a call.
    #[error("NVML {call}: {message}")]
    Nvml {
        /// The call, e.g. `nvmlDeviceGetUUID(2)`.
        call: String,
        /// NVML's message.
        message: String,
    },
    /// A MIG call failed with NVML's `code`.
    #[error("NVML {call} on GPU {gpu}: {code}: {message}")]
    Mig {
        /// The GPU's UUID.
        gpu: String,
        /// The call, e.g. `nvmlDeviceCreateGpuInstanceWithPlacement`.
        call: &'static str,
        /// NVML's answer.
        code: MigCode,
        /// What it means here.
        message: String,
    },
    /// The fake's fixture could not be read or parsed.
    #[error("GPU fixture {path}: {message}")]
    Fixture {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// One GPU's telemetry at one moment. A field NVML cannot read on this GPU (unsupported,
/// no permission) is `None` and its series is left out rather than reported as 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuSample {
    /// NVML index.
    pub index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// GPU utilization, percent over the last sample period (DCGM_FI_DEV_GPU_UTIL).
    #[serde(default)]
    pub utilization_percent: Option<u32>,
    /// Framebuffer memory in use (DCGM_FI_DEV_FB_USED, in bytes here).
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    /// Core temperature (DCGM_FI_DEV_GPU_TEMP).
    #[serde(default)]
    pub temperature_celsius: Option<u32>,
    /// Power draw in milliwatts (DCGM_FI_DEV_POWER_USAGE, in watts there).
    #[serde(default)]
    pub power_milliwatts: Option<u32>,
    /// Enforced power limit in milliwatts (DCGM_FI_DEV_ENFORCED_POWER_LIMIT).
    #[serde(default)]
    pub power_limit_milliwatts: Option<u32>,
    /// SM clock in MHz (DCGM_FI_DEV_SM_CLOCK).
    #[serde(default)]
    pub sm_clock_mhz: Option<u32>,
    /// Volatile corrected ECC errors (DCGM_FI_DEV_ECC_SBE_VOL_TOTAL).
    #[serde(default)]
    pub ecc_corrected: Option<u64>,
    /// Volatile uncorrected ECC errors (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL).
    #[serde(default)]
    pub ecc_uncorrected: Option<u64>,
    /// PCIe replays since the driver loaded (DCGM_FI_DEV_PCIE_REPLAY_COUNTER).
    #[serde(default)]
    pub pcie_replays: Option<u32>,
    /// Clock throttle reasons bitmask (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS).
    #[serde(default)]
    pub throttle_reasons: Option<u64>,
}

/// A critical XID error: the driver's report of a GPU fault (e.g. 48 double-bit ECC
/// error, 79 fallen off the bus, 94/95 contained/uncontained ECC error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct XidEvent {
    /// `GPU-…` UUID of the GPU that reported it.
    pub uuid: String,
    /// The XID code; `None` when NVML could not decode it.
    pub xid: Option<u64>,
}

/// What an XID watch could cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XidWatch {
    /// GPUs (UUIDs) whose critical XID errors are watched.
    pub watched: Vec<String>,
    /// GPUs that cannot report them, with NVML's reason.
    pub unsupported: Vec<(String, String)>,
}

/// Something that lists GPUs.
pub trait GpuSource: Send + Sync {
    /// Which source this is (`nvml`, `fake`), for logs.
    fn kind(&self) -> &'static str;
    /// All GPUs, in index order.
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// Telemetry of every GPU, in index order.
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;
    /// Block, reporting every critical XID error to `on_event`, until `stop` returns true
    /// (it is asked at least once a second). `on_start` learns first which GPUs are
    /// watched. Returns early, with `Ok`, when no GPU can report XID errors.
    fn watch_xids(
        &self,
        stop: &dyn Fn() -> bool,
        on_start: &mut dyn FnMut(&XidWatch),
        on_event: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError>;
    /// The MIG devices of GPU `gpu` (UUID) now; empty when MIG mode is off.
    fn mig_instances(&self, gpu: &str) -> Result<Vec<MigInstance>, GpuError>;
    /// Create a GPU instance of profile `profile_id` at memory slice `start` on GPU `gpu`,
    /// with one compute instance over all of it; both or neither (a compute instance that
    /// fails takes its GPU instance with it).
    fn create_mig(&self, gpu: &str, profile_id: u32, start: u32) -> Result<MigInstance, GpuError>;
    /// Destroy GPU instance `gpu_instance_id` of GPU `gpu` and its compute instances.
    fn destroy_mig(&self, gpu: &str, gpu_instance_id: u32) -> Result<(), GpuError>;
}

/// GPUs described in data. MIG instances it creates or destroys change its data as NVML
/// would change the GPU (with NVML's refusals), are written back to the fixture file it
/// was read from (so a restarted daemon finds them, as on a real GPU), and, with a
/// `driverRoot`, appear as the driver's capability files
/// (`proc/driver/nvidia/capabilities/gpu<minor>/mig/gi<G>/ci<C>/access`) and device nodes
/// (`dev/nvidia-caps/nvidia-cap<N>`) under it.
#[derive(Debug, Clone, Default)]
pub struct FakeSource {
    state: Arc<Mutex<FixtureFile>>,
    /// The fixture file (MIG changes are written back to it).
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FixtureFile {
    gpus: Vec<GpuInfo>,
    #[serde(default)]
    samples: Vec<GpuSample>,
    #[serde(default)]
    xids: Vec<XidEvent>,
    /// Where the driver's MIG capability files and nodes go, relative to the fixture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    driver_root: Option<PathBuf>,
    /// Fault injection: the next MIG instance created aborts the process right after it
    /// exists (and is written back): a crash between NVML's change and the checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    abort_after_create: bool,
    /// Fault injection: creating a compute instance fails (NVML leaves the GPU instance).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fail_compute_instance: bool,
}

/// The capability minor the fake gives GPU instance `gi` (and compute instance `ci`) of
/// the GPU with minor `minor`.
fn fake_cap_minor(minor: u32, gi: u32, ci: Option<u32>) -> u32 {
    3 + minor * 128 + gi * 9 + ci.map_or(0, |c| c + 1)
}

impl FakeSource {
    /// These GPUs.
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        Self::from_fixture(
            FixtureFile {
                gpus,
                ..FixtureFile::default()
            },
            None,
        )
    }

    fn from_fixture(file: FixtureFile, path: Option<PathBuf>) -> Self {
        Self {
            state: Arc::new(Mutex::new(file)),
            file: path,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FixtureFile> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// These GPUs, reporting these XID errors as soon as a watch starts.
    pub fn with_xids(self, xids: Vec<XidEvent>) -> Self {
        self.lock().xids = xids;
        self
    }

    /// These GPUs, reporting this telemetry.
    pub fn with_samples(self, samples: Vec<GpuSample>) -> Self {
        self.lock().samples = samples;
        self
    }

    /// Write the MIG capability files and device nodes under `root`.
    pub fn with_driver_root(self, root: &Path) -> Self {
        self.lock().driver_root = Some(root.to_path_buf());
        self
    }

    /// Read `{"gpus": [...]}` from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, GpuError> {
        let fixture_err = |message: String| GpuError::Fixture {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fixture_err(e.to_string()))?;
        let mut file: FixtureFile =
            serde_json::from_str(&text).map_err(|e| fixture_err(e.to_string()))?;
        if let (Some(root), Some(dir)) = (&file.driver_root, path.parent()) {
            file.driver_root = Some(dir.join(root));
        }
        // The driver lists the instances that exist.
        if let Some(root) = &file.driver_root {
            for g in &file.gpus {
                for i in g.mig.iter().flat_map(|m| &m.instances) {
                    Self::show_caps(root, g.minor_number, i)?;
                }
            }
        }
        Ok(Self::from_fixture(file, Some(path.to_path_buf())))
    }

    /// Write the state back to the fixture file (relative `driverRoot` kept relative).
    fn save(&self, state: &FixtureFile) -> Result<(), GpuError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut out = state.clone();
        if let (Some(root), Some(dir)) = (&out.driver_root, path.parent()) {
            out.driver_root = root.strip_prefix(dir).ok().map(|r| {
                if r.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    r.to_path_buf()
                }
            });
        }
        let text = serde_json::to_vec_pretty(&out).map_err(|e| GpuError::Fixture {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        hybridlet_sys::atomic_write(path, &text, 0o644).map_err(|e| GpuError::Fixture {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// What the driver shows for an instance: its capability files and device nodes.
    fn show_caps(root: &Path, minor: u32, i: &MigInstance) -> Result<(), GpuError> {
        let gi = root.join(format!(
            "proc/driver/nvidia/capabilities/gpu{minor}/mig/gi{}",
            i.gpu_instance_id
        ));
        for (dir, ci) in [
            (gi.clone(), None),
            (
                gi.join(format!("ci{}", i.compute_instance_id)),
                Some(i.compute_instance_id),
            ),
        ] {
            let cap = fake_cap_minor(minor, i.gpu_instance_id, ci);
            let write = |path: PathBuf, text: String| {
                if let Some(parent) = path.parent() {
                    let _ = hybridlet_sys::ensure_dir(parent, 0o755);
                }
                hybridlet_sys::atomic_write(&path, text.as_bytes(), 0o444).map_err(|e| {
                    GpuError::Fixture {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    }
                })
            };
            write(
                dir.join("access"),
                format!("DeviceFileMinor: {cap}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"),
            )?;
            write(
                root.join(format!("dev/nvidia-caps/nvidia-cap{cap}")),
                String::new(),
            )?;
        }
        Ok(())
    }
}

/// GPU `gpu` of the fake's state, its minor number and its MIG facts, as NVML answers a
/// MIG call `call` on it: NOT_FOUND for an unknown GPU, NOT_SUPPORTED unless MIG mode is on.
fn mig_gpu<'a>(
    state: &'a mut FixtureFile,
    gpu: &str,
    call: &'static str,
) -> Result<(u32, &'a mut MigInfo), GpuError> {
    let g = state
        .gpus
        .iter_mut()
        .find(|g| g.uuid == gpu)
        .ok_or_else(|| {
            mig_err(
                gpu,
                "nvmlDeviceGetHandleByUUID",
                (MigCode::NotFound, "no such GPU".into()),
            )
        })?;
    let why = match g.mig_enabled {
        None => "the GPU cannot do MIG",
        _ => "MIG mode is off",
    };
    match g.mig.as_mut().filter(|_| g.mig_enabled == Some(true)) {
        Some(mig) => Ok((g.minor_number, mig)),
        None => Err(mig_err(gpu, call, (MigCode::NotSupported, why.into()))),
    }
}

/// A MIG error from the fake, worded as NVML's.
fn mig_err(gpu: &str, call: &'static str, (code, message): (MigCode, String)) -> GpuError {
    GpuError::Mig {
        gpu: gpu.to_string(),
        call,
        code,
        message,
    }
}

impl GpuSource for FakeSource {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.lock().gpus.clone())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        Ok(self.lock().samples.clone())
    }

    fn watch_xids(
        &self,
        stop: &dyn Fn() -> bool,
        on_start: &mut dyn FnMut(&XidWatch),
        on_event: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError> {
        let (watched, xids) = {
            let state = self.lock();
            let watched: Vec<String> = state.gpus.iter().map(|g| g.uuid.clone()).collect();
            (watched, state.xids.clone())
        };
        let watch = XidWatch {
            watched,
            unsupported: Vec::new(),
        };
        on_start(&watch);
        if watch.watched.is_empty() {
            return Ok(());
        }
        for event in xids {
            on_event(event);
        }
        while !stop() {
            // watch_xids runs on a blocking thread by contract, as NVML's wait does.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        Ok(())
    }

    fn mig_instances(&self, gpu: &str) -> Result<Vec<MigInstance>, GpuError> {
        let mut state = self.lock();
        match mig_gpu(&mut state, gpu, "nvmlDeviceGetGpuInstances") {
            Ok((_, mig)) => Ok(mig.instances.clone()),
            // MIG mode off: no instances, as NVML lists none.
            Err(GpuError::Mig {
                code: MigCode::NotSupported,
                ..
            }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn create_mig(&self, gpu: &str, profile_id: u32, start: u32) -> Result<MigInstance, GpuError> {
        const CALL: &str = "nvmlDeviceCreateGpuInstanceWithPlacement";
        let mut state = self.lock();
        let root = state.driver_root.clone();
        let (abort, fail_ci) = (state.abort_after_create, state.fail_compute_instance);
        let (minor, mig) = mig_gpu(&mut state, gpu, CALL)?;
        let placement = mig
            .can_create(profile_id, start)
            .map_err(|e| mig_err(gpu, CALL, e))?;
        if fail_ci {
            return Err(mig_err(
                gpu,
                "nvmlGpuInstanceCreateComputeInstance",
                (
                    MigCode::InsufficientResources,
                    "compute instance could not be created".into(),
                ),
            ));
        }
        let gpu_instance_id = (1..)
            .find(|id| !mig.instances.iter().any(|i| i.gpu_instance_id == *id))
            .unwrap_or(1);
        let instance = MigInstance {
            uuid: format!(
                "MIG-{:08x}-{:04x}-5{:03x}-8{:03x}-{:012x}",
                (minor << 16) | (gpu_instance_id << 8) | profile_id,
                start,
                placement.size,
                minor,
                u64::from(minor) << 32 | u64::from(gpu_instance_id)
            ),
            profile_id,
            gpu_instance_id,
            compute_instance_id: 0,
            placement,
            busy: false,
        };
        mig.instances.push(instance.clone());
        if let Some(root) = &root {
            Self::show_caps(root, minor, &instance)?;
        }
        state.abort_after_create = false;
        self.save(&state)?;
        if abort {
            tracing::error!(mig = %instance.uuid, "fake NVML: aborting the process after creating a MIG instance (abortAfterCreate)");
            std::process::abort();
        }
        Ok(instance)
    }

    fn destroy_mig(&self, gpu: &str, gpu_instance_id: u32) -> Result<(), GpuError> {
        const CALL: &str = "nvmlGpuInstanceDestroy";
        let mut state = self.lock();
        let root = state.driver_root.clone();
        let (minor, mig) = mig_gpu(&mut state, gpu, CALL)?;
        let at = mig
            .instances
            .iter()
            .position(|i| i.gpu_instance_id == gpu_instance_id)
            .ok_or_else(|| {
                mig_err(
                    gpu,
                    "nvmlDeviceGetGpuInstanceById",
                    (
                        MigCode::NotFound,
                        format!("no GPU instance {gpu_instance_id}"),
                    ),
                )
            })?;
        if mig.instances[at].busy {
            return Err(mig_err(
                gpu,
                CALL,
                (
                    MigCode::InUse,
                    format!("processes run on GPU instance {gpu_instance_id}"),
                ),
            ));
        }
        mig.instances.remove(at);
        if let Some(root) = &root {
            let _ = std::fs::remove_dir_all(root.join(format!(
                "proc/driver/nvidia/capabilities/gpu{minor}/mig/gi{gpu_instance_id}"
            )));
        }
        self.save(&state)
    }
}

/// What an XID code means, for the log line next to it (NVIDIA's XID catalogue; the
/// codes an operator meets most on datacenter GPUs).
pub fn xid_meaning(xid: u64) -> &'static str {
    match xid {
        13 => "graphics engine exception (usually the application)",
        31 => "GPU memory page fault (usually the application)",
        43 => "GPU stopped processing (usually the application)",
        45 => "preemptive cleanup after a previous error",
        48 => "double-bit ECC error: drain the node and reset the GPU",
        61 | 62 => "internal micro-controller error: reset the GPU",
        63 | 64 => "ECC page retirement or row remapping event",
        74 => "NVLink error: check the NVLink connections",
        79 => "GPU has fallen off the bus: drain the node",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error: the affected application was stopped",
        95 => "uncontained ECC error: drain the node and reset the GPU",
        119 | 120 => "GSP firmware error: reset the GPU",
        _ => "see NVIDIA's XID catalogue",
    }
}

/// A GPU with its place in the PCIe topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// NVML's view.
    pub info: GpuInfo,
    /// The sysfs form of its PCI address, when NVML's bus ID parses.
    pub pci_address: Option<PciAddress>,
    /// Its topology, when sysfs has the device.
    pub topology: Option<Topology>,
    /// Its NUMA node, when the platform reports one.
    pub numa_node: Option<u32>,
}

/// List GPUs from `source` and place each in the topology of `pci` (the devices from one
/// sysfs walk). A GPU that sysfs does not show is kept, without topology, with a warning.
pub fn discover(
    source: &dyn GpuSource,
    pci: &[PciDevice],
) -> Result<(Vec<Gpu>, Vec<String>), GpuError> {
    let by_address: HashMap<&PciAddress, &PciDevice> =
        pci.iter().map(|d| (&d.address, d)).collect();
    let mut warnings = Vec::new();
    let gpus = source
        .gpus()?
        .into_iter()
        .map(|info| {
            let pci_address = PciAddress::parse(&info.pci_bus_id);
            let device = pci_address.as_ref().and_then(|a| by_address.get(a));
            if device.is_none() {
                warnings.push(format!(
                    "GPU {} ({}) has PCI bus ID {:?}, which sysfs does not show; its topology is unknown",
                    info.index, info.uuid, info.pci_bus_id
                ));
            }
            Gpu {
                topology: device.map(|d| d.topology.clone()),
                numa_node: device.and_then(|d| d.numa_node),
                pci_address,
                info,
            }
        })
        .collect();
    Ok((gpus, warnings))
}
