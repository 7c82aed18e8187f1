//! VF health for the DRA driver: when a PF's link is down (`operstate` `down` or
//! `lowerlayerdown`), every VF of that PF is unhealthy and tainted
//! `<driver>/pf-link-down=<netdev>:NoSchedule` on its health board, until the link is up
//! again. Only a clear answer changes health: `unknown` or `dormant` says nothing.

use std::collections::BTreeMap;

use hybridlet_dra::{HealthBoard, Taint};
use hybridlet_sys::Sysfs;

use crate::Inventory;

/// VF health from the PF's link.
#[derive(Debug)]
pub struct VfHealth {
    board: HealthBoard,
    driver: String,
    /// VF PCI address → device name in the slice.
    names: BTreeMap<String, String>,
}

impl VfHealth {
    /// For the SR-IOV driver `driver`, whose devices `names` maps from VF PCI addresses.
    pub fn new(board: HealthBoard, driver: &str, names: BTreeMap<String, String>) -> Self {
        Self {
            board,
            driver: driver.to_string(),
            names,
        }
    }
}

impl VfHealth {
    /// A sample finished: each PF's link decides its VFs' health.
    pub fn sampled(&self, sysfs: &Sysfs, inventory: &Inventory) {
        for pf in &inventory.pfs {
            let Some(netdev) = &pf.netdev else { continue };
            // Only a clear answer changes health: "unknown" or "dormant" says nothing.
            let down = match sysfs.oper_state(netdev).as_deref() {
                Some("up") => false,
                Some("down" | "lowerlayerdown") => true,
                _ => continue,
            };
            for vf in &pf.vfs {
                let Some(device) = self.names.get(&vf.device.address.to_string()) else {
                    continue;
                };
                if down {
                    if self.board.set_unhealthy(
                        device,
                        &format!("the link of PF {} ({netdev}) is down", pf.device.address),
                        Taint {
                            key: format!("{}/pf-link-down", self.driver),
                            value: netdev.clone(),
                            effect: "NoSchedule".into(),
                        },
                    ) {
                        tracing::warn!(device = %device, pf = %pf.device.address, "VF marked unhealthy and tainted: the PF's link ({netdev}) is down");
                    }
                } else if self.board.set_healthy(device) {
                    tracing::info!(device = %device, pf = %pf.device.address, "VF healthy again: the PF's link ({netdev}) is up; taint removed");
                }
            }
        }
    }
}
