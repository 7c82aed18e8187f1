use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use crate::{ComputeCapability, GpuError, GpuInfo, GpuSource};

/// GPUs through NVML: one session, opened once.
pub struct NvmlSource {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlSource")
    }
}

fn nvml_err(call: impl Into<String>) -> impl FnOnce(NvmlError) -> GpuError {
    let call = call.into();
    move |e| GpuError::Nvml {
        call,
        message: e.to_string(),
    }
}

impl NvmlSource {
    /// Load `libnvidia-ml.so.1` and initialise NVML. `Ok(None)` when the library or the
    /// kernel driver is absent: a host without NVIDIA GPUs.
    pub fn open() -> Result<Option<Self>, GpuError> {
        match Nvml::init() {
            Ok(nvml) => Ok(Some(Self { nvml })),
            Err(
                NvmlError::LibloadingError(_)
                | NvmlError::LibraryNotFound
                | NvmlError::DriverNotLoaded
                | NvmlError::FailedToLoadSymbol(_),
            ) => Ok(None),
            Err(e) => Err(nvml_err("nvmlInit")(e)),
        }
    }
}

impl GpuSource for NvmlSource {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let nvml = &self.nvml;
        let driver_version = nvml
            .sys_driver_version()
            .map_err(nvml_err("nvmlSystemGetDriverVersion"))?;
        let cuda = nvml
            .sys_cuda_driver_version()
            .map_err(nvml_err("nvmlSystemGetCudaDriverVersion"))?;
        let cuda_driver_version = format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(cuda),
            nvml_wrapper::cuda_driver_version_minor(cuda)
        );
        let count = nvml
            .device_count()
            .map_err(nvml_err("nvmlDeviceGetCount"))?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let d = nvml
                .device_by_index(index)
                .map_err(nvml_err(format!("nvmlDeviceGetHandleByIndex({index})")))?;
            let cc = d.cuda_compute_capability().map_err(nvml_err(format!(
                "nvmlDeviceGetCudaComputeCapability({index})"
            )))?;
            let mig_enabled = match d.mig_mode() {
                Ok(m) => Some(m.current == 1),
                Err(NvmlError::NotSupported) => None,
                Err(e) => return Err(nvml_err(format!("nvmlDeviceGetMigMode({index})"))(e)),
            };
            out.push(GpuInfo {
                index,
                minor_number: d
                    .minor_number()
                    .map_err(nvml_err(format!("nvmlDeviceGetMinorNumber({index})")))?,
                uuid: d
                    .uuid()
                    .map_err(nvml_err(format!("nvmlDeviceGetUUID({index})")))?,
                name: d
                    .name()
                    .map_err(nvml_err(format!("nvmlDeviceGetName({index})")))?,
                brand: d
                    .brand()
                    .map(|b| format!("{b:?}"))
                    .map_err(nvml_err(format!("nvmlDeviceGetBrand({index})")))?,
                architecture: d
                    .architecture()
                    .map(|a| a.to_string())
                    .map_err(nvml_err(format!("nvmlDeviceGetArchitecture({index})")))?,
                cuda_compute_capability: ComputeCapability {
                    major: cc.major,
                    minor: cc.minor,
                },
                driver_version: driver_version.clone(),
                cuda_driver_version: cuda_driver_version.clone(),
                memory_total_bytes: d
                    .memory_info()
                    .map_err(nvml_err(format!("nvmlDeviceGetMemoryInfo({index})")))?
                    .total,
                pci_bus_id: d
                    .pci_info()
                    .map_err(nvml_err(format!("nvmlDeviceGetPciInfo({index})")))?
                    .bus_id,
                mig_enabled,
            });
        }
        Ok(out)
    }
}
