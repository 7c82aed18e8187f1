use std::path::Path;

use serde_json::json;

/// What a device adds to a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEdits {
    /// `NAME=value` environment entries.
    pub env: Vec<String>,
    /// Device node paths (e.g. `/dev/nvidia0`).
    pub device_nodes: Vec<String>,
}

/// The CDI device name for `device` of `claim_uid`: `<driver>/claim=<uid>-<device>`.
pub fn cdi_device_id(driver: &str, claim_uid: &str, device: &str) -> String {
    format!("{driver}/claim={claim_uid}-{device}")
}

/// File name of a claim's CDI spec: `<driver with '/' and '.' made safe>-<uid>.json`.
pub(crate) fn spec_file(cdi_dir: &Path, driver: &str, claim_uid: &str) -> std::path::PathBuf {
    cdi_dir.join(format!(
        "{}-{claim_uid}.json",
        driver.replace(['/', '.'], "_")
    ))
}

/// The claim UID of a file in the CDI directory that is this driver's spec, if it is one.
pub(crate) fn spec_uid(file_name: &str, driver: &str) -> Option<String> {
    let prefix = format!("{}-", driver.replace(['/', '.'], "_"));
    file_name
        .strip_prefix(&prefix)?
        .strip_suffix(".json")
        .filter(|uid| !uid.is_empty())
        .map(str::to_string)
}

/// The oldest CDI version a spec with these device names can declare. Consumers refuse
/// versions newer than the CDI library they were built with (podman 4.3 and containerd
/// 1.7.0 know 0.5.0 at most), so a spec declares the oldest version its content needs, as
/// the CDI producer library does: 0.3.0 for environment and device nodes by path, 0.5.0
/// once a device name starts with a digit (claim UIDs often do). A kind whose class holds
/// a dot would need 0.6.0; ours is `<driver>/claim`.
fn minimum_version<'a>(names: impl IntoIterator<Item = &'a str>) -> &'static str {
    if names
        .into_iter()
        .any(|n| !n.starts_with(|c: char| c.is_ascii_alphabetic()))
    {
        "0.5.0"
    } else {
        "0.3.0"
    }
}

/// A CDI spec with one device per prepared device of the claim, declaring the oldest CDI
/// version its content needs.
pub(crate) fn spec(driver: &str, claim_uid: &str, devices: &[(String, ContainerEdits)]) -> String {
    let devices: Vec<_> = devices
        .iter()
        .map(|(name, edits)| {
            json!({
                "name": format!("{claim_uid}-{name}"),
                "containerEdits": {
                    "env": edits.env,
                    "deviceNodes": edits.device_nodes.iter().map(|p| json!({"path": p})).collect::<Vec<_>>(),
                }
            })
        })
        .collect();
    let version = minimum_version(devices.iter().filter_map(|d| d["name"].as_str()));
    let spec = json!({
        "cdiVersion": version,
        "kind": format!("{driver}/claim"),
        "devices": devices,
    });
    serde_json::to_string_pretty(&spec).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_declares_the_oldest_version_its_content_needs() {
        let edits = ContainerEdits {
            env: vec!["A=b".into()],
            device_nodes: vec!["/dev/null".into()],
        };
        let version = |uid: &str| {
            let text = spec("gpu.hybridlet.io", uid, &[("gpu-0".into(), edits.clone())]);
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["cdiVersion"].clone()
        };
        assert_eq!(version("uid-a"), "0.3.0");
        // A claim UID is a UUID: a device name starting with a digit needs 0.5.0.
        assert_eq!(version("0f8e2c1a-7b3d-4e5f-9a6b-1c2d3e4f5a6b"), "0.5.0");
    }
}
