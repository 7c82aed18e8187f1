//! MIG (Multi-Instance GPU): what a GPU in MIG mode can be split into (profiles and their
//! placements, in NVML's terms) and the instances it holds now, as one model for NVML and
//! the fake; the rules NVML applies when an instance is created or destroyed, so the fake
//! answers as NVML does.
//!
//! A placement is a start and a size in memory slices (eight on an H100/H200); a GPU
//! instance takes its placement's memory slices and its profile's compute slices (seven).

use serde::{Deserialize, Serialize};

/// Where a GPU instance sits: `size` memory slices from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// First memory slice.
    pub start: u32,
    /// Memory slices.
    pub size: u32,
}

impl Placement {
    /// Whether the two share a memory slice.
    pub fn overlaps(&self, other: &Placement) -> bool {
        self.start < other.start + other.size && other.start < self.start + self.size
    }

    /// The memory slices it takes.
    pub fn slices(&self) -> std::ops::Range<u32> {
        self.start..self.start + self.size
    }
}

/// One GPU instance profile (`nvidia-smi mig -lgip`; NVML's
/// `nvmlGpuInstanceProfileInfo_t` and its possible placements).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigProfile {
    /// NVML's profile ID (`19` for `1g.18gb` on an H200).
    pub id: u32,
    /// The name without `MIG `: `1g.18gb`, `1g.18gb+me`, `7g.141gb`.
    pub name: String,
    /// Compute slices (the `1` of `1g`).
    pub compute_slices: u32,
    /// How many instances of it fit on an empty GPU.
    pub instance_count: u32,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Copy engines.
    pub copy_engines: u32,
    /// Video decoders (NVDEC).
    pub decoders: u32,
    /// Video encoders (NVENC).
    pub encoders: u32,
    /// JPEG decoders.
    pub jpeg_engines: u32,
    /// Optical flow accelerators.
    pub ofa_engines: u32,
    /// Every placement NVML allows for it.
    pub placements: Vec<Placement>,
}

/// One MIG device that exists: a GPU instance with its (whole) compute instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigInstance {
    /// `MIG-…` UUID (what `NVIDIA_VISIBLE_DEVICES` takes).
    pub uuid: String,
    /// The GPU instance profile's ID.
    pub profile_id: u32,
    /// NVML's GPU instance ID (the `gi` of `/proc/driver/nvidia/capabilities`).
    pub gpu_instance_id: u32,
    /// NVML's compute instance ID (the `ci`).
    pub compute_instance_id: u32,
    /// Where it sits.
    pub placement: Placement,
    /// Processes run on it (the fake's stand-in for a busy instance: NVML refuses to
    /// destroy it, IN_USE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
}

/// A GPU's MIG facts, present while MIG mode is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigInfo {
    /// Memory slices of the whole GPU (8).
    pub memory_slices: u32,
    /// Compute slices of the whole GPU (7).
    pub compute_slices: u32,
    /// The GPU instance profiles.
    pub profiles: Vec<MigProfile>,
    /// The MIG devices that exist now.
    #[serde(default)]
    pub instances: Vec<MigInstance>,
}

impl MigInfo {
    /// The profile with NVML ID `id`.
    pub fn profile(&self, id: u32) -> Option<&MigProfile> {
        self.profiles.iter().find(|p| p.id == id)
    }

    /// The instance that sits exactly at `placement` with profile `profile_id`.
    pub fn instance_at(&self, profile_id: u32, placement: Placement) -> Option<&MigInstance> {
        self.instances
            .iter()
            .find(|i| i.profile_id == profile_id && i.placement == placement)
    }

    /// Whether an instance of `profile_id` at `start` may be created, as
    /// `nvmlDeviceCreateGpuInstanceWithPlacement` decides: the placement must be one of the
    /// profile's (else INVALID_ARGUMENT), free of other instances, and within the profile's
    /// instance count and the free compute slices (else INSUFFICIENT_RESOURCES).
    pub fn can_create(&self, profile_id: u32, start: u32) -> Result<Placement, (MigCode, String)> {
        let profile = self.profile(profile_id).ok_or_else(|| {
            (
                MigCode::InvalidArgument,
                format!("no GPU instance profile with ID {profile_id}"),
            )
        })?;
        let placement = profile
            .placements
            .iter()
            .find(|p| p.start == start)
            .copied()
            .ok_or_else(|| {
                (
                    MigCode::InvalidArgument,
                    format!(
                        "profile {} (ID {profile_id}) cannot start at memory slice {start}",
                        profile.name
                    ),
                )
            })?;
        if let Some(other) = self
            .instances
            .iter()
            .find(|i| i.placement.overlaps(&placement))
        {
            return Err((
                MigCode::InsufficientResources,
                format!(
                    "memory slices {}..{} are taken by GPU instance {} ({})",
                    placement.start,
                    placement.start + placement.size,
                    other.gpu_instance_id,
                    other.uuid
                ),
            ));
        }
        let same = self
            .instances
            .iter()
            .filter(|i| i.profile_id == profile_id)
            .count() as u32;
        if same >= profile.instance_count {
            return Err((
                MigCode::InsufficientResources,
                format!(
                    "profile {} allows {} instance(s) and {same} exist",
                    profile.name, profile.instance_count
                ),
            ));
        }
        let used: u32 = self
            .instances
            .iter()
            .filter_map(|i| self.profile(i.profile_id))
            .map(|p| p.compute_slices)
            .sum();
        if used + profile.compute_slices > self.compute_slices {
            return Err((
                MigCode::InsufficientResources,
                format!(
                    "{} of {} compute slices are in use; profile {} needs {}",
                    used, self.compute_slices, profile.name, profile.compute_slices
                ),
            ));
        }
        Ok(placement)
    }
}

/// NVML's answer to a MIG call, where it matters to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigCode {
    /// NOT_SUPPORTED: the GPU cannot do MIG, or MIG mode is off.
    NotSupported,
    /// INVALID_ARGUMENT: no such profile or placement.
    InvalidArgument,
    /// INSUFFICIENT_RESOURCES: the placement or the slices are taken.
    InsufficientResources,
    /// IN_USE: processes run on the instance.
    InUse,
    /// NOT_FOUND: no such instance.
    NotFound,
    /// NO_PERMISSION: MIG changes need root (or the MIG config capability).
    NoPermission,
    /// Anything else.
    Other,
}

impl std::fmt::Display for MigCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigCode::NotSupported => "NOT_SUPPORTED",
            MigCode::InvalidArgument => "INVALID_ARGUMENT",
            MigCode::InsufficientResources => "INSUFFICIENT_RESOURCES",
            MigCode::InUse => "IN_USE",
            MigCode::NotFound => "NOT_FOUND",
            MigCode::NoPermission => "NO_PERMISSION",
            MigCode::Other => "UNKNOWN",
        })
    }
}

/// `1g.18gb+me` → `1g18gbme`: a profile name as part of a DNS label.
pub fn profile_label(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn h200() -> MigInfo {
        serde_json::from_value(hybridlet_fixtures::h200_mig(&[])).unwrap()
    }

    fn h200_profiles() -> Vec<MigProfile> {
        h200().profiles
    }

    fn add(info: &mut MigInfo, profile: u32, start: u32) -> Result<(), MigCode> {
        let placement = info.can_create(profile, start).map_err(|(c, _)| c)?;
        let n = info.instances.len() as u32 + 1;
        info.instances.push(MigInstance {
            uuid: format!("MIG-{n}"),
            profile_id: profile,
            gpu_instance_id: n,
            compute_instance_id: 0,
            placement,
            busy: false,
        });
        Ok(())
    }

    #[test]
    fn h200_placements_are_those_nvml_lists() {
        let p = h200_profiles();
        let starts = |id: u32| -> Vec<(u32, u32)> {
            p.iter()
                .find(|x| x.id == id)
                .unwrap()
                .placements
                .iter()
                .map(|p| (p.start, p.size))
                .collect()
        };
        assert_eq!(starts(19), (0..7).map(|s| (s, 1)).collect::<Vec<_>>());
        assert_eq!(starts(15), [(0, 2), (2, 2), (4, 2), (6, 2)]);
        assert_eq!(starts(14), [(0, 2), (2, 2), (4, 2), (6, 2)][..3].to_vec());
        assert_eq!(starts(9), [(0, 4), (4, 4)]);
        assert_eq!(starts(5), [(0, 4)]);
        assert_eq!(starts(0), [(0, 8)]);
        assert_eq!(profile_label("1g.18gb+me"), "1g18gbme");
    }

    #[test]
    fn creation_follows_nvmls_rules() {
        let mut g = h200();
        assert_eq!(add(&mut g, 99, 0), Err(MigCode::InvalidArgument));
        assert_eq!(
            add(&mut g, 9, 2),
            Err(MigCode::InvalidArgument),
            "3g starts at 0 or 4"
        );
        add(&mut g, 9, 4).unwrap();
        assert_eq!(
            add(&mut g, 19, 5),
            Err(MigCode::InsufficientResources),
            "overlap"
        );
        add(&mut g, 5, 0).unwrap();
        assert_eq!(
            add(&mut g, 19, 0),
            Err(MigCode::InsufficientResources),
            "full"
        );
        let mut g = h200();
        add(&mut g, 20, 0).unwrap();
        assert_eq!(
            add(&mut g, 20, 1),
            Err(MigCode::InsufficientResources),
            "one +me instance per GPU"
        );
        for start in 1..7 {
            add(&mut g, 19, start).unwrap();
        }
        assert_eq!(g.instances.len(), 7);
    }
}
