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

mod nvml;

use std::collections::HashMap;
use std::path::Path;

use hybridlet_sys::{PciAddress, PciDevice, Topology};
use serde::{Deserialize, Serialize};

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

/// Something that lists GPUs.
pub trait GpuSource: Send + Sync {
    /// Which source this is (`nvml`, `fake`), for logs.
    fn kind(&self) -> &'static str;
    /// All GPUs, in index order.
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// GPUs described in data.
#[derive(Debug, Clone, Default)]
pub struct FakeSource {
    gpus: Vec<GpuInfo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    gpus: Vec<GpuInfo>,
}

impl FakeSource {
    /// These GPUs.
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        Self { gpus }
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
        Ok(Self { gpus: file.gpus })
    }
}

impl GpuSource for FakeSource {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.gpus.clone())
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
