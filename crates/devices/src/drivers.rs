//! The DRA drivers' device side, per kind, from one discovery: the `DriverParts` a
//! `DraPlugin` serves and the health policy the sampler feeds. The binary picks the kind
//! and wires the plugin; what each kind is made of lives here, next to the discovery it
//! comes from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hybridlet_dra::{DriverParts, HealthBoard};
use hybridlet_sys::Sysfs;

use crate::{Discovery, HealthPolicy};

/// Which driver, with what only it needs.
#[derive(Debug, Clone)]
pub enum DriverKind {
    /// GPUs through NVML, with how MIG is handled.
    Gpu(hybridlet_gpu::dra::GpuOptions),
    /// SR-IOV VFs.
    Sriov,
    /// Allowlisted PCI functions, with the allow rules and where their series go.
    Pci(Vec<hybridlet_pci::Rule>, hybridlet_pci::PciMetrics),
}

/// One driver's devices, ready to serve.
pub struct DriverDevices {
    /// For logs: `GPU`, `SR-IOV`, `PCI`.
    pub label: &'static str,
    /// What the plugin serves.
    pub parts: DriverParts,
    /// The health policy over the plugin's health board.
    pub policy: Box<dyn FnOnce(HealthBoard) -> HealthPolicy + Send>,
}

impl std::fmt::Debug for DriverDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverDevices")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// The devices of driver `driver` (kind `kind`) on `node`, from `found`; the host's `/sys`
/// and `/dev` are `sys_dir` and `dev_dir` (under `--root` in tests).
pub fn driver_devices(
    kind: DriverKind,
    driver: &str,
    node: &str,
    found: Discovery,
    sysfs: &Sysfs,
    sys_dir: PathBuf,
    dev_dir: PathBuf,
) -> DriverDevices {
    let driver_name = driver.to_string();
    match kind {
        DriverKind::Sriov => {
            let parts = hybridlet_sriov::dra::parts(
                driver,
                node,
                &found.inventory,
                Arc::new(sysfs.clone()),
                sys_dir,
                dev_dir,
            );
            let by_key = by_key(&parts);
            DriverDevices {
                label: "SR-IOV",
                parts,
                policy: Box::new(move |board| {
                    HealthPolicy::Vf(Arc::new(hybridlet_sriov::VfHealth::new(
                        board,
                        &driver_name,
                        by_key,
                    )))
                }),
            }
        }
        DriverKind::Pci(rules, metrics) => {
            let inventory = hybridlet_pci::discover(sysfs, &found.pci, &rules);
            for w in &inventory.warnings {
                tracing::warn!("{w}");
            }
            tracing::info!(
                functions = inventory.functions.len(),
                "PCI functions allowed by spec.dra.pci.allow"
            );
            let parts = hybridlet_pci::dra::parts(
                driver,
                node,
                &inventory,
                Arc::new(sysfs.clone()),
                sysfs.clone(),
                dev_dir,
            );
            DriverDevices {
                label: "PCI",
                parts,
                policy: Box::new(move |board| {
                    HealthPolicy::Pci(Arc::new(
                        hybridlet_pci::PciHealth::new(board, &driver_name, &inventory)
                            .with_metrics(metrics),
                    ))
                }),
            }
        }
        DriverKind::Gpu(options) => {
            let parts = hybridlet_gpu::dra::parts(driver, node, found.gpus, dev_dir, options);
            // A GPU's MIG devices share its UUID: an XID on the GPU taints them all.
            let by_key: Vec<(String, String)> = parts
                .keys
                .iter()
                .map(|(name, key)| (key.clone(), name.clone()))
                .collect();
            DriverDevices {
                label: "GPU",
                parts,
                policy: Box::new(move |board| {
                    HealthPolicy::Gpu(Arc::new(hybridlet_gpu::GpuHealth::new(
                        board,
                        &driver_name,
                        by_key,
                        hybridlet_gpu::GPU_RECOVERY,
                    )))
                }),
            }
        }
    }
}

/// Host key (GPU UUID, VF address) → device name, for the health policies.
fn by_key(parts: &DriverParts) -> BTreeMap<String, String> {
    parts
        .keys
        .iter()
        .map(|(name, key)| (key.clone(), name.clone()))
        .collect()
}
