//! The GPU DRA driver's devices: each GPU is a device of the node's pool (`gpu-<index>`,
//! with NVML's identity, versions as semantic versions, memory as capacity, and its PCIe
//! placement), prepared into CDI edits that name only device nodes that exist.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hybridlet_dra::{
    Attr, ContainerEdits, DeviceBackend, DeviceError, DriverParts, SliceDevice, topology_attributes,
};

use crate::Gpu;

/// The driver `driver` on `node` over `gpus`, whose device nodes are under `dev_dir`.
pub fn parts(driver: &str, node: &str, gpus: Vec<Gpu>, dev_dir: PathBuf) -> DriverParts {
    let gpus: BTreeMap<String, Gpu> = gpus.into_iter().map(|g| (device_name(&g), g)).collect();
    let devices = gpus.values().map(slice_device).collect();
    let keys = gpus
        .iter()
        .map(|(name, g)| (name.clone(), g.info.uuid.clone()))
        .collect();
    DriverParts {
        backend: Arc::new(GpuBackend {
            driver: driver.to_string(),
            node: node.to_string(),
            gpus,
            dev_dir,
        }),
        devices,
        keys,
    }
}

/// The GPUs of this node as DRA devices: a container gets the GPU's device nodes and
/// `NVIDIA_VISIBLE_DEVICES` (its UUID).
#[derive(Debug)]
struct GpuBackend {
    driver: String,
    node: String,
    gpus: BTreeMap<String, Gpu>,
    /// Where the host's `/dev` is (under `--root` in tests).
    dev_dir: PathBuf,
}

/// `gpu-<index>`: the device's name in the slice.
pub fn device_name(g: &Gpu) -> String {
    format!("gpu-{}", g.info.index)
}

/// `12.8` → `12.8.0`: DRA version attributes are semantic versions.
fn semver(v: &str) -> String {
    let parts: Vec<&str> = v.split('.').collect();
    match parts.len() {
        1 => format!("{v}.0.0"),
        2 => format!("{v}.0"),
        _ => parts[..3].join("."),
    }
}

impl DeviceBackend for GpuBackend {
    fn driver_name(&self) -> &str {
        &self.driver
    }

    fn pool_name(&self) -> &str {
        &self.node
    }

    fn edits(
        &self,
        device: &str,
        _config: Option<&serde_json::Value>,
    ) -> Result<ContainerEdits, DeviceError> {
        let g = self
            .gpus
            .get(device)
            .ok_or_else(|| DeviceError::Unknown(device.to_string()))?;
        // The runtime refuses a CDI device whose node is missing, so name only nodes that
        // exist: the GPU's own and nvidiactl are required; the UVM nodes (created when
        // nvidia-uvm loads, or by nvidia-modprobe) are added when present.
        let gpu_node = format!("nvidia{}", g.info.minor_number);
        let mut device_nodes = Vec::new();
        for required in [gpu_node.as_str(), "nvidiactl"] {
            if !self.dev_dir.join(required).exists() {
                return Err(DeviceError::Host(format!(
                    "/dev/{required} does not exist: is the NVIDIA driver loaded? (`nvidia-modprobe -c={}` creates the nodes)",
                    g.info.minor_number
                )));
            }
            device_nodes.push(format!("/dev/{required}"));
        }
        for optional in ["nvidia-uvm", "nvidia-uvm-tools"] {
            if self.dev_dir.join(optional).exists() {
                device_nodes.push(format!("/dev/{optional}"));
            } else {
                tracing::warn!(
                    device,
                    "/dev/{optional} does not exist, so the container gets no {optional}; CUDA programs need /dev/nvidia-uvm (`nvidia-modprobe -u -c=0` creates it)"
                );
            }
        }
        Ok(ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={}", g.info.uuid)],
            device_nodes,
        })
    }
}

/// One GPU as a slice device: its identity, versions, PCI bus ID and placement.
pub fn slice_device(g: &Gpu) -> SliceDevice {
    let mut attributes = BTreeMap::from([
        ("type".to_string(), Attr::String("gpu".into())),
        ("uuid".to_string(), Attr::String(g.info.uuid.clone())),
        ("index".to_string(), Attr::Int(i64::from(g.info.index))),
        ("productName".to_string(), Attr::String(g.info.name.clone())),
        ("brand".to_string(), Attr::String(g.info.brand.clone())),
        (
            "architecture".to_string(),
            Attr::String(g.info.architecture.clone()),
        ),
        (
            "driverVersion".to_string(),
            Attr::Version(semver(&g.info.driver_version)),
        ),
        (
            "cudaDriverVersion".to_string(),
            Attr::Version(semver(&g.info.cuda_driver_version)),
        ),
        (
            "cudaComputeCapability".to_string(),
            Attr::Version(format!(
                "{}.{}.0",
                g.info.cuda_compute_capability.major, g.info.cuda_compute_capability.minor
            )),
        ),
    ]);
    if let Some(addr) = &g.pci_address {
        attributes.insert(
            "resource.kubernetes.io/pciBusID".into(),
            Attr::String(addr.to_string()),
        );
    }
    topology_attributes(&mut attributes, g.topology.as_ref(), g.numa_node);
    SliceDevice {
        name: device_name(g),
        attributes,
        capacity: BTreeMap::from([("memory".to_string(), g.info.memory_total_bytes.to_string())]),
        taints: Vec::new(),
    }
}
