use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use hybridlet_sys::nvml_mig::{MigDevice, NvmlMig, NvmlMigError};

use crate::{
    ComputeCapability, GpuError, GpuInfo, GpuSample, GpuSource, MigCode, MigInfo, MigInstance,
    MigProfile, Placement, XidEvent, XidWatch,
};

/// GPUs through NVML: one session, opened once (and NVML's MIG calls beside it).
pub struct NvmlSource {
    nvml: Nvml,
    mig: Option<NvmlMig>,
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

/// A MIG call's failure, with NVML's code as the model names it.
fn mig_err(gpu: &str, e: NvmlMigError) -> GpuError {
    use hybridlet_sys::nvml_mig as n;
    let code = match e.code {
        n::NOT_SUPPORTED => MigCode::NotSupported,
        n::INVALID_ARGUMENT => MigCode::InvalidArgument,
        n::INSUFFICIENT_RESOURCES => MigCode::InsufficientResources,
        n::IN_USE => MigCode::InUse,
        n::NOT_FOUND => MigCode::NotFound,
        n::NO_PERMISSION => MigCode::NoPermission,
        _ => MigCode::Other,
    };
    GpuError::Mig {
        gpu: gpu.to_string(),
        call: e.call,
        code,
        message: e.message,
    }
}

fn instance(d: MigDevice) -> MigInstance {
    MigInstance {
        uuid: d.uuid,
        profile_id: d.profile_id,
        gpu_instance_id: d.gpu_instance_id,
        compute_instance_id: d.compute_instance_id,
        placement: Placement {
            start: d.placement.0,
            size: d.placement.1,
        },
        busy: false,
    }
}

impl NvmlSource {
    fn mig(&self, gpu: &str) -> Result<&NvmlMig, GpuError> {
        self.mig.as_ref().ok_or_else(|| GpuError::Mig {
            gpu: gpu.to_string(),
            call: "nvmlInit_v2",
            code: MigCode::NotSupported,
            message: "NVML could not be opened for its MIG calls".into(),
        })
    }

    /// A GPU's MIG facts, read while its MIG mode is on.
    fn mig_info(&self, gpu: &str) -> Result<MigInfo, GpuError> {
        let mig = self.mig(gpu)?;
        let profiles: Vec<MigProfile> = mig
            .profiles(gpu)
            .map_err(|e| mig_err(gpu, e))?
            .into_iter()
            .map(|p| MigProfile {
                id: p.id,
                name: p.name,
                compute_slices: p.slices,
                instance_count: p.instances,
                multiprocessors: p.multiprocessors,
                memory_bytes: p.memory_mib << 20,
                copy_engines: p.engines[0],
                decoders: p.engines[1],
                encoders: p.engines[2],
                jpeg_engines: p.engines[3],
                ofa_engines: p.engines[4],
                placements: p
                    .placements
                    .iter()
                    .map(|&(start, size)| Placement { start, size })
                    .collect(),
            })
            .collect();
        Ok(MigInfo {
            // The widest profile spans the GPU: its memory slices, its compute slices.
            memory_slices: profiles
                .iter()
                .flat_map(|p| &p.placements)
                .map(|p| p.start + p.size)
                .max()
                .unwrap_or(0),
            compute_slices: profiles.iter().map(|p| p.compute_slices).max().unwrap_or(0),
            instances: self.mig_instances(gpu)?,
            profiles,
        })
    }

    /// Load `libnvidia-ml.so.1` and initialise NVML. `Ok(None)` when the library or the
    /// kernel driver is absent: a host without NVIDIA GPUs.
    pub fn open() -> Result<Option<Self>, GpuError> {
        match Nvml::init() {
            Ok(nvml) => Ok(Some(Self {
                nvml,
                mig: NvmlMig::open(),
            })),
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

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        use nvml_wrapper::enum_wrappers::device::{
            Clock, EccCounter, MemoryError, TemperatureSensor,
        };
        let count = self
            .nvml
            .device_count()
            .map_err(nvml_err("nvmlDeviceGetCount"))?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(nvml_err(format!("nvmlDeviceGetHandleByIndex({index})")))?;
            // Each reading on its own: a GPU without ECC or power readings still reports
            // the rest.
            out.push(GpuSample {
                index,
                uuid: device.uuid().map_err(nvml_err("nvmlDeviceGetUUID"))?,
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_used_bytes: device.memory_info().ok().map(|m| m.used),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                power_milliwatts: device.power_usage().ok(),
                power_limit_milliwatts: device.enforced_power_limit().ok(),
                sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                ecc_corrected: device
                    .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                    .ok(),
                ecc_uncorrected: device
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok(),
                pcie_replays: device.pcie_replay_counter().ok(),
                throttle_reasons: device.current_throttle_reasons().ok().map(|r| r.bits()),
            });
        }
        Ok(out)
    }

    fn watch_xids(
        &self,
        stop: &dyn Fn() -> bool,
        on_start: &mut dyn FnMut(&XidWatch),
        on_event: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError> {
        use nvml_wrapper::bitmasks::event::EventTypes;
        use nvml_wrapper::enums::event::XidError;
        let count = self
            .nvml
            .device_count()
            .map_err(nvml_err("nvmlDeviceGetCount"))?;
        let mut watch = XidWatch::default();
        let mut candidates = Vec::new();
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(nvml_err(format!("nvmlDeviceGetHandleByIndex({index})")))?;
            let uuid = device
                .uuid()
                .map_err(nvml_err(format!("nvmlDeviceGetUUID({index})")))?;
            // Some GPUs (and some virtualised ones) cannot deliver XID events; the others
            // are still watched.
            match device.supported_event_types() {
                Ok(t) if t.contains(EventTypes::CRITICAL_XID_ERROR) => candidates.push(device),
                Ok(_) => watch
                    .unsupported
                    .push((uuid, "XID events not supported".into())),
                Err(e) => watch.unsupported.push((uuid, e.to_string())),
            }
        }
        // nvmlDeviceRegisterEvents frees the set when it fails: drop that GPU and register
        // the rest on a fresh set.
        let set = 'register: loop {
            if candidates.is_empty() {
                on_start(&watch);
                return Ok(());
            }
            let mut set = self
                .nvml
                .create_event_set()
                .map_err(nvml_err("nvmlEventSetCreate"))?;
            for (i, device) in candidates.iter().enumerate() {
                match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(back) => set = back,
                    Err(e) => {
                        let failed = candidates.remove(i);
                        let uuid = failed.uuid().unwrap_or_else(|_| "unknown".into());
                        watch.unsupported.push((uuid, e.to_string()));
                        continue 'register;
                    }
                }
            }
            break set;
        };
        watch.watched = candidates
            .iter()
            .map(|d| d.uuid().unwrap_or_else(|_| "unknown".into()))
            .collect();
        on_start(&watch);
        while !stop() {
            match set.wait(1000) {
                Ok(data) => on_event(XidEvent {
                    uuid: data.device.uuid().unwrap_or_else(|_| "unknown".into()),
                    xid: match data.event_data {
                        Some(XidError::Value(v)) => Some(v),
                        Some(XidError::Unknown) | None => None,
                    },
                }),
                // A timeout (or a signal) is the once-a-second look at `stop`.
                Err(NvmlError::Timeout) => {}
                Err(e) => return Err(nvml_err("nvmlEventSetWait")(e)),
            }
        }
        Ok(())
    }

    fn mig_instances(&self, gpu: &str) -> Result<Vec<MigInstance>, GpuError> {
        let devices = self.mig(gpu)?.devices(gpu).map_err(|e| mig_err(gpu, e))?;
        Ok(devices.into_iter().map(instance).collect())
    }

    fn create_mig(&self, gpu: &str, profile: u32, start: u32) -> Result<MigInstance, GpuError> {
        let d = self
            .mig(gpu)?
            .create(gpu, profile, start)
            .map_err(|e| mig_err(gpu, e))?;
        Ok(instance(d))
    }

    fn destroy_mig(&self, gpu: &str, gpu_instance_id: u32) -> Result<(), GpuError> {
        self.mig(gpu)?
            .destroy(gpu, gpu_instance_id)
            .map_err(|e| mig_err(gpu, e))
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
                mig: match mig_enabled {
                    Some(true) => {
                        let uuid = d.uuid().map_err(nvml_err(format!("nvmlDeviceGetUUID({index})")))?;
                        self.mig_info(&uuid)
                            .inspect_err(|e| tracing::warn!(gpu = %uuid, "MIG mode is on, but its profiles and instances cannot be read: {e}"))
                            .ok()
                    }
                    _ => None,
                },
                mig_enabled,
            });
        }
        Ok(out)
    }
}
