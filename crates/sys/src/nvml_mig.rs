//! NVML's MIG calls, which the NVML binding hybridlet uses elsewhere (nvml-wrapper) does
//! not wrap: the GPU instance profiles with their placements, the GPU and compute
//! instances that exist with their MIG device UUIDs, and creating and destroying them.
//! They change the host (a MIG instance is the GPU's partition), so they live here.
//!
//! The library is `libnvidia-ml.so.1`, opened and initialised once (NVML counts its
//! initialisations, so the GPU crate's own session is unaffected) and shut down on drop.
//! Structures and version numbers are nvml.h's (NVML_STRUCT_VERSION: the size, with the
//! version in the top byte).
#![allow(unsafe_code)] // FFI into NVML: each unsafe block says why it is sound.

use std::ffi::{CStr, CString, c_char, c_uint};

use nvml_wrapper_sys::bindings::{
    NvmlLib, nvmlComputeInstance_t, nvmlComputeInstanceInfo_t, nvmlComputeInstanceProfileInfo_v2_t,
    nvmlDevice_t, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t,
    nvmlGpuInstanceProfileInfo_v2_t,
};

/// NVML_SUCCESS.
const SUCCESS: c_uint = 0;
/// NVML_ERROR_NOT_SUPPORTED.
pub const NOT_SUPPORTED: u32 = 3;
/// NVML_ERROR_INVALID_ARGUMENT.
pub const INVALID_ARGUMENT: u32 = 2;
/// NVML_ERROR_NO_PERMISSION.
pub const NO_PERMISSION: u32 = 4;
/// NVML_ERROR_NOT_FOUND.
pub const NOT_FOUND: u32 = 6;
/// NVML_ERROR_IN_USE.
pub const IN_USE: u32 = 19;
/// NVML_ERROR_INSUFFICIENT_RESOURCES.
pub const INSUFFICIENT_RESOURCES: u32 = 23;
/// GPU instance profile indexes (NVML_GPU_INSTANCE_PROFILE_*), and compute instance ones.
const GPU_INSTANCE_PROFILES: c_uint = 17;
const COMPUTE_INSTANCE_PROFILES: c_uint = 8;
/// NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED.
const ENGINE_SHARED: c_uint = 0;
/// NVML_DEVICE_UUID_V2_BUFFER_SIZE.
const UUID_LEN: usize = 96;

/// A failed NVML call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NVML {call}: {message} (error {code})")]
pub struct NvmlMigError {
    /// The function.
    pub call: &'static str,
    /// NVML's return code (the constants of this module name the ones that matter).
    pub code: u32,
    /// `nvmlErrorString`.
    pub message: String,
}

/// A GPU instance profile, with its placements (start, size in memory slices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInstanceProfile {
    /// NVML's profile ID.
    pub id: u32,
    /// Its name without `MIG `, e.g. `1g.18gb`.
    pub name: String,
    /// Compute slices.
    pub slices: u32,
    /// Instances that fit on an empty GPU.
    pub instances: u32,
    /// Multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines, decoders, encoders, JPEG decoders, OFA engines.
    pub engines: [u32; 5],
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Every placement NVML allows.
    pub placements: Vec<(u32, u32)>,
}

/// A MIG device: a GPU instance and one of its compute instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    /// `MIG-…`.
    pub uuid: String,
    /// The GPU instance's profile ID.
    pub profile_id: u32,
    /// GPU instance ID.
    pub gpu_instance_id: u32,
    /// Compute instance ID.
    pub compute_instance_id: u32,
    /// Placement start and size, in memory slices.
    pub placement: (u32, u32),
}

/// A MIG device's (GPU instance ID, compute instance ID) and UUID.
type MigUuid = ((u32, u32), String);

/// NVML, opened for its MIG calls.
pub struct NvmlMig {
    lib: NvmlLib,
}

impl std::fmt::Debug for NvmlMig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlMig")
    }
}

impl Drop for NvmlMig {
    fn drop(&mut self) {
        if let Ok(shutdown) = &self.lib.nvmlShutdown {
            // SAFETY: NVML was initialised in `open`; shutdown takes no arguments.
            unsafe { shutdown() };
        }
    }
}

/// The version word of an NVML structure: its size, the version in the top byte.
fn struct_version<T>(version: u32) -> c_uint {
    std::mem::size_of::<T>() as c_uint | (version << 24)
}

/// A NUL-terminated name in a fixed buffer.
fn name(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

macro_rules! sym {
    ($self:ident, $name:ident) => {
        $self.lib.$name.as_ref().map_err(|e| NvmlMigError {
            call: stringify!($name),
            code: NOT_SUPPORTED,
            message: format!("this NVML has no {}: {e}", stringify!($name)),
        })?
    };
}

impl NvmlMig {
    /// Load `libnvidia-ml.so.1` and initialise NVML. `None` when the library or the kernel
    /// driver is absent.
    pub fn open() -> Option<Self> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions; the
        // symbols are typed by nvml.h through the bindings.
        let lib = unsafe { NvmlLib::new("libnvidia-ml.so.1") }.ok()?;
        let init = lib.nvmlInit_v2.as_ref().ok()?;
        // SAFETY: nvmlInit_v2 takes no arguments and may be called more than once.
        if unsafe { init() } != SUCCESS {
            return None;
        }
        Some(Self { lib })
    }

    fn check(&self, call: &'static str, code: c_uint) -> Result<(), NvmlMigError> {
        if code == SUCCESS {
            return Ok(());
        }
        let message = match &self.lib.nvmlErrorString {
            // SAFETY: nvmlErrorString returns a static NUL-terminated string for any code.
            Ok(f) => unsafe {
                let p = f(code);
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            },
            Err(_) => String::new(),
        };
        Err(NvmlMigError {
            call,
            code,
            message,
        })
    }

    fn device(&self, uuid: &str) -> Result<nvmlDevice_t, NvmlMigError> {
        let f = sym!(self, nvmlDeviceGetHandleByUUID);
        let c = CString::new(uuid).map_err(|_| NvmlMigError {
            call: "nvmlDeviceGetHandleByUUID",
            code: INVALID_ARGUMENT,
            message: "a UUID with a NUL byte".into(),
        })?;
        let mut dev: nvmlDevice_t = std::ptr::null_mut();
        // SAFETY: `c` is NUL-terminated and outlives the call; `dev` is a valid out pointer.
        let code = unsafe { f(c.as_ptr(), &mut dev) };
        self.check("nvmlDeviceGetHandleByUUID", code)?;
        Ok(dev)
    }

    /// Whether MIG mode is on now (`None`: the GPU cannot do MIG).
    pub fn mig_mode(&self, gpu: &str) -> Result<Option<bool>, NvmlMigError> {
        let dev = self.device(gpu)?;
        let f = sym!(self, nvmlDeviceGetMigMode);
        let (mut current, mut pending) = (0, 0);
        // SAFETY: `dev` is a handle NVML gave; both out pointers are valid.
        let code = unsafe { f(dev, &mut current, &mut pending) };
        match self.check("nvmlDeviceGetMigMode", code) {
            Ok(()) => Ok(Some(current == 1)),
            Err(e) if e.code == NOT_SUPPORTED => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// NVML's description of each GPU instance profile `dev` offers (MIG mode on).
    fn profile_infos(
        &self,
        dev: nvmlDevice_t,
    ) -> Result<Vec<nvmlGpuInstanceProfileInfo_v2_t>, NvmlMigError> {
        let info_fn = sym!(self, nvmlDeviceGetGpuInstanceProfileInfoV);
        let mut out = Vec::new();
        for index in 0..GPU_INSTANCE_PROFILES {
            // SAFETY: the structure is plain data; all-zero is a valid value.
            let mut info: nvmlGpuInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
            info.version = struct_version::<nvmlGpuInstanceProfileInfo_v2_t>(2);
            // SAFETY: `info` is a valid, versioned out structure.
            let code = unsafe { info_fn(dev, index, &mut info) };
            match self.check("nvmlDeviceGetGpuInstanceProfileInfoV", code) {
                Ok(()) => out.push(info),
                // Profiles this GPU does not have.
                Err(e) if e.code == NOT_SUPPORTED || e.code == INVALID_ARGUMENT => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The GPU instance profiles this GPU offers (MIG mode on), with their placements.
    pub fn profiles(&self, gpu: &str) -> Result<Vec<GpuInstanceProfile>, NvmlMigError> {
        let dev = self.device(gpu)?;
        let placements_fn = sym!(self, nvmlDeviceGetGpuInstancePossiblePlacements_v2);
        let mut out = Vec::new();
        for info in self.profile_infos(dev)? {
            let mut count: c_uint = 0;
            // SAFETY: a null array with a count asks for the count.
            let code = unsafe { placements_fn(dev, info.id, std::ptr::null_mut(), &mut count) };
            self.check("nvmlDeviceGetGpuInstancePossiblePlacements_v2", code)?;
            let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
            // SAFETY: `buf` holds `count` elements, as `count` says.
            let code = unsafe { placements_fn(dev, info.id, buf.as_mut_ptr(), &mut count) };
            self.check("nvmlDeviceGetGpuInstancePossiblePlacements_v2", code)?;
            buf.truncate(count as usize);
            let full = name(&info.name);
            out.push(GpuInstanceProfile {
                id: info.id,
                name: full.strip_prefix("MIG ").unwrap_or(&full).to_string(),
                slices: info.sliceCount,
                instances: info.instanceCount,
                multiprocessors: info.multiprocessorCount,
                engines: [
                    info.copyEngineCount,
                    info.decoderCount,
                    info.encoderCount,
                    info.jpegCount,
                    info.ofaCount,
                ],
                memory_mib: info.memorySizeMB,
                placements: buf.iter().map(|p| (p.start, p.size)).collect(),
            });
        }
        Ok(out)
    }

    /// The GPU instances of profile `profile_id` on `dev`.
    fn gpu_instances(
        &self,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<Vec<nvmlGpuInstance_t>, NvmlMigError> {
        let f = sym!(self, nvmlDeviceGetGpuInstances);
        let mut buf: Vec<nvmlGpuInstance_t> = vec![std::ptr::null_mut(); 8];
        let mut count: c_uint = 0;
        // SAFETY: `buf` has room for 8 instances, the most any GPU holds.
        let code = unsafe { f(dev, profile_id, buf.as_mut_ptr(), &mut count) };
        self.check("nvmlDeviceGetGpuInstances", code)?;
        buf.truncate(count as usize);
        Ok(buf)
    }

    fn gpu_instance_info(
        &self,
        gi: nvmlGpuInstance_t,
    ) -> Result<nvmlGpuInstanceInfo_t, NvmlMigError> {
        let f = sym!(self, nvmlGpuInstanceGetInfo);
        // SAFETY: plain data; all-zero is valid.
        let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` is a handle NVML gave; `info` is a valid out pointer.
        let code = unsafe { f(gi, &mut info) };
        self.check("nvmlGpuInstanceGetInfo", code)?;
        Ok(info)
    }

    /// The compute instances of `gi`, of every profile.
    fn compute_instances(
        &self,
        gi: nvmlGpuInstance_t,
    ) -> Result<Vec<nvmlComputeInstance_t>, NvmlMigError> {
        let list = sym!(self, nvmlGpuInstanceGetComputeInstances);
        let info_fn = sym!(self, nvmlGpuInstanceGetComputeInstanceProfileInfoV);
        let mut out = Vec::new();
        for index in 0..COMPUTE_INSTANCE_PROFILES {
            // SAFETY: plain data; all-zero is valid.
            let mut info: nvmlComputeInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
            info.version = struct_version::<nvmlComputeInstanceProfileInfo_v2_t>(2);
            // SAFETY: a valid, versioned out structure.
            let code = unsafe { info_fn(gi, index, ENGINE_SHARED, &mut info) };
            if code != SUCCESS {
                continue;
            }
            let mut buf: Vec<nvmlComputeInstance_t> = vec![std::ptr::null_mut(); 8];
            let mut count: c_uint = 0;
            // SAFETY: room for 8, the most compute instances a GPU instance holds.
            let code = unsafe { list(gi, info.id, buf.as_mut_ptr(), &mut count) };
            self.check("nvmlGpuInstanceGetComputeInstances", code)?;
            buf.truncate(count as usize);
            out.extend(buf);
        }
        Ok(out)
    }

    /// (GPU instance, compute instance) → MIG device UUID, for every MIG device of `dev`.
    fn mig_uuids(&self, dev: nvmlDevice_t) -> Result<Vec<MigUuid>, NvmlMigError> {
        let max_fn = sym!(self, nvmlDeviceGetMaxMigDeviceCount);
        let by_index = sym!(self, nvmlDeviceGetMigDeviceHandleByIndex);
        let gi_fn = sym!(self, nvmlDeviceGetGpuInstanceId);
        let ci_fn = sym!(self, nvmlDeviceGetComputeInstanceId);
        let uuid_fn = sym!(self, nvmlDeviceGetUUID);
        let mut max: c_uint = 0;
        // SAFETY: a valid out pointer.
        let code = unsafe { max_fn(dev, &mut max) };
        self.check("nvmlDeviceGetMaxMigDeviceCount", code)?;
        let mut out = Vec::new();
        for index in 0..max {
            let mut mig: nvmlDevice_t = std::ptr::null_mut();
            // SAFETY: a valid out pointer; an index without a device answers NOT_FOUND.
            if unsafe { by_index(dev, index, &mut mig) } != SUCCESS {
                continue;
            }
            let (mut gi, mut ci) = (0, 0);
            let mut buf = [0 as c_char; UUID_LEN];
            // SAFETY: `mig` is a MIG device handle NVML gave; the out pointers and the
            // buffer (of the length passed) are valid.
            let codes = unsafe {
                [
                    gi_fn(mig, &mut gi),
                    ci_fn(mig, &mut ci),
                    uuid_fn(mig, buf.as_mut_ptr(), UUID_LEN as c_uint),
                ]
            };
            for (call, code) in [
                "nvmlDeviceGetGpuInstanceId",
                "nvmlDeviceGetComputeInstanceId",
                "nvmlDeviceGetUUID",
            ]
            .into_iter()
            .zip(codes)
            {
                self.check(call, code)?;
            }
            out.push(((gi, ci), name(&buf)));
        }
        Ok(out)
    }

    /// The MIG devices of GPU `gpu` now.
    pub fn devices(&self, gpu: &str) -> Result<Vec<MigDevice>, NvmlMigError> {
        let dev = self.device(gpu)?;
        let uuids = self.mig_uuids(dev)?;
        let ci_info = sym!(self, nvmlComputeInstanceGetInfo_v2);
        let mut out = Vec::new();
        for profile in self.profile_infos(dev)? {
            for gi in self.gpu_instances(dev, profile.id)? {
                let info = self.gpu_instance_info(gi)?;
                for ci in self.compute_instances(gi)? {
                    // SAFETY: plain data; all-zero is valid.
                    let mut c: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `ci` is a handle NVML gave; `c` a valid out pointer.
                    let code = unsafe { ci_info(ci, &mut c) };
                    self.check("nvmlComputeInstanceGetInfo_v2", code)?;
                    let uuid = uuids
                        .iter()
                        .find(|(ids, _)| *ids == (info.id, c.id))
                        .map(|(_, u)| u.clone())
                        .unwrap_or_default();
                    out.push(MigDevice {
                        uuid,
                        profile_id: info.profileId,
                        gpu_instance_id: info.id,
                        compute_instance_id: c.id,
                        placement: (info.placement.start, info.placement.size),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Create a GPU instance of `profile_id` at `start` on GPU `gpu` and one compute
    /// instance over all of it; if the compute instance fails, the GPU instance goes too.
    pub fn create(
        &self,
        gpu: &str,
        profile_id: u32,
        start: u32,
    ) -> Result<MigDevice, NvmlMigError> {
        let dev = self.device(gpu)?;
        let create_gi = sym!(self, nvmlDeviceCreateGpuInstanceWithPlacement);
        let ci_profile = sym!(self, nvmlGpuInstanceGetComputeInstanceProfileInfoV);
        let create_ci = sym!(self, nvmlGpuInstanceCreateComputeInstance);
        let size = self
            .profiles(gpu)?
            .into_iter()
            .find(|p| p.id == profile_id)
            .and_then(|p| {
                p.placements
                    .iter()
                    .find(|(s, _)| *s == start)
                    .map(|(_, z)| *z)
            })
            .ok_or(NvmlMigError {
                call: "nvmlDeviceCreateGpuInstanceWithPlacement",
                code: INVALID_ARGUMENT,
                message: format!("profile {profile_id} has no placement at {start}"),
            })?;
        let placement = nvmlGpuInstancePlacement_t { start, size };
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: `placement` and `gi` are valid for the call.
        let code = unsafe { create_gi(dev, profile_id, &placement, &mut gi) };
        self.check("nvmlDeviceCreateGpuInstanceWithPlacement", code)?;
        let info = self.gpu_instance_info(gi)?;
        // The compute instance profile as wide as the GPU instance: the most slices (the
        // first such index, so never a REV1 variant when the plain one exists).
        let mut widest: Option<nvmlComputeInstanceProfileInfo_v2_t> = None;
        for index in 0..COMPUTE_INSTANCE_PROFILES {
            // SAFETY: plain data; all-zero is valid.
            let mut p: nvmlComputeInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
            p.version = struct_version::<nvmlComputeInstanceProfileInfo_v2_t>(2);
            // SAFETY: a valid, versioned out structure.
            if unsafe { ci_profile(gi, index, ENGINE_SHARED, &mut p) } != SUCCESS {
                continue;
            }
            if widest.is_none_or(|w| p.sliceCount > w.sliceCount) {
                widest = Some(p);
            }
        }
        let made = match widest {
            Some(p) => {
                let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
                // SAFETY: `gi` is the instance just created; `ci` a valid out pointer.
                let code = unsafe { create_ci(gi, p.id, &mut ci) };
                self.check("nvmlGpuInstanceCreateComputeInstance", code)
                    .map(|()| ci)
            }
            None => Err(NvmlMigError {
                call: "nvmlGpuInstanceGetComputeInstanceProfileInfoV",
                code: NOT_SUPPORTED,
                message: "the GPU instance offers no compute instance profile".into(),
            }),
        };
        let ci = match made {
            Ok(ci) => ci,
            Err(e) => {
                let destroy = sym!(self, nvmlGpuInstanceDestroy);
                // SAFETY: `gi` is the instance just created, without compute instances.
                unsafe { destroy(gi) };
                return Err(e);
            }
        };
        let ci_info = sym!(self, nvmlComputeInstanceGetInfo_v2);
        // SAFETY: plain data; all-zero is valid.
        let mut c: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `ci` is the instance just created.
        let code = unsafe { ci_info(ci, &mut c) };
        self.check("nvmlComputeInstanceGetInfo_v2", code)?;
        let uuid = self
            .mig_uuids(dev)?
            .into_iter()
            .find(|(ids, _)| *ids == (info.id, c.id))
            .map(|(_, u)| u)
            .unwrap_or_default();
        Ok(MigDevice {
            uuid,
            profile_id,
            gpu_instance_id: info.id,
            compute_instance_id: c.id,
            placement: (info.placement.start, info.placement.size),
        })
    }

    /// Destroy GPU instance `gpu_instance_id` of GPU `gpu`, its compute instances first.
    pub fn destroy(&self, gpu: &str, gpu_instance_id: u32) -> Result<(), NvmlMigError> {
        let dev = self.device(gpu)?;
        let by_id = sym!(self, nvmlDeviceGetGpuInstanceById);
        let destroy_ci = sym!(self, nvmlComputeInstanceDestroy);
        let destroy_gi = sym!(self, nvmlGpuInstanceDestroy);
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        let code = unsafe { by_id(dev, gpu_instance_id, &mut gi) };
        self.check("nvmlDeviceGetGpuInstanceById", code)?;
        for ci in self.compute_instances(gi)? {
            // SAFETY: `ci` is a compute instance of `gi`, handed out by NVML.
            let code = unsafe { destroy_ci(ci) };
            self.check("nvmlComputeInstanceDestroy", code)?;
        }
        // SAFETY: `gi` is a handle NVML gave, its compute instances gone.
        let code = unsafe { destroy_gi(gi) };
        self.check("nvmlGpuInstanceDestroy", code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_versions_are_nvml_h_s() {
        // nvmlGpuInstanceProfileInfo_v2: 11 uints, a u64 (aligned), 96 chars.
        assert_eq!(
            struct_version::<nvmlGpuInstanceProfileInfo_v2_t>(2),
            (2 << 24) | 152
        );
        assert_eq!(
            name(&[b'M' as c_char, b'I' as c_char, 0, b'x' as c_char]),
            "MI"
        );
    }
}
