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

/// A CDI spec (cdiVersion 0.6.0) with one device per prepared device of the claim.
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
    let spec = json!({
        "cdiVersion": "0.6.0",
        "kind": format!("{driver}/claim"),
        "devices": devices,
    });
    serde_json::to_string_pretty(&spec).unwrap_or_default() + "\n"
}
