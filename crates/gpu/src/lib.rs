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
mod nvml;

use std::collections::HashMap;
use std::path::Path;

use hybridlet_sys::{PciAddress, PciDevice, Topology};
use serde::{Deserialize, Serialize};

pub use health::{APPLICATION_XIDS, GPU_RECOVERY, GpuHealth};
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
}

/// GPUs described in data.
#[derive(Debug, Clone, Default)]
pub struct FakeSource {
    gpus: Vec<GpuInfo>,
    samples: Vec<GpuSample>,
    xids: Vec<XidEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    gpus: Vec<GpuInfo>,
    #[serde(default)]
    samples: Vec<GpuSample>,
    #[serde(default)]
    xids: Vec<XidEvent>,
}

impl FakeSource {
    /// These GPUs.
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        Self {
            gpus,
            samples: Vec::new(),
            xids: Vec::new(),
        }
    }

    /// These GPUs, reporting these XID errors as soon as a watch starts.
    pub fn with_xids(mut self, xids: Vec<XidEvent>) -> Self {
        self.xids = xids;
        self
    }

    /// These GPUs, reporting this telemetry.
    pub fn with_samples(mut self, samples: Vec<GpuSample>) -> Self {
        self.samples = samples;
        self
    }

    /// Read `{"gpus": [...]}` from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, GpuError> {
        let fixture_err = |message: String| GpuError::Fixture {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fixture_err(e.to_string()))?;
        let file: FixtureFile =
            serde_json::from_str(&text).map_err(|e| fixture_err(e.to_string()))?;
        Ok(Self {
            gpus: file.gpus,
            samples: file.samples,
            xids: file.xids,
        })
    }
}

impl GpuSource for FakeSource {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.gpus.clone())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        Ok(self.samples.clone())
    }

    fn watch_xids(
        &self,
        stop: &dyn Fn() -> bool,
        on_start: &mut dyn FnMut(&XidWatch),
        on_event: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError> {
        let watch = XidWatch {
            watched: self.gpus.iter().map(|g| g.uuid.clone()).collect(),
            unsupported: Vec::new(),
        };
        on_start(&watch);
        if watch.watched.is_empty() {
            return Ok(());
        }
        for event in &self.xids {
            on_event(event.clone());
        }
        while !stop() {
            // watch_xids runs on a blocking thread by contract, as NVML's wait does.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        Ok(())
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
