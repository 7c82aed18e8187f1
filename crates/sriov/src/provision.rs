use std::time::{Duration, Instant};

use hybridlet_sys::{PciAddress, Sysfs, SysfsError};

/// Which PF to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PfSelector {
    /// By PCI address.
    Address(PciAddress),
    /// By network interface.
    Interface(String),
}

impl PfSelector {
    /// The PF a `spec.sriov.physicalFunctions[]` entry names (`None`: neither field set,
    /// or an address that does not parse; validation refuses both).
    pub fn from_config(pf: &hybridlet_config::PfProvisioning) -> Option<Self> {
        match (&pf.pci_address, &pf.interface) {
            (Some(a), _) => PciAddress::parse(a).map(PfSelector::Address),
            (None, Some(i)) => Some(PfSelector::Interface(i.clone())),
            (None, None) => None,
        }
    }
}

impl std::fmt::Display for PfSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PfSelector::Address(a) => write!(f, "{a}"),
            PfSelector::Interface(i) => write!(f, "interface {i}"),
        }
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The PF could not be found or read.
    #[error("{pf}: {source}")]
    Pf {
        /// The PF as configured.
        pf: String,
        /// The sysfs error.
        #[source]
        source: SysfsError,
    },
    /// The PF has no SR-IOV, or the count is out of range, or the write failed.
    #[error("{pf}: {source}")]
    Write {
        /// The PF.
        pf: PciAddress,
        /// The sysfs error.
        #[source]
        source: SysfsError,
    },
    /// The kernel did not create (or remove) the VFs in time.
    #[error(
        "{pf}: {found} of {wanted} VFs present after {waited:?}; check `dmesg` for the driver's reason"
    )]
    Timeout {
        /// The PF.
        pf: PciAddress,
        /// VFs present when we gave up.
        found: usize,
        /// VFs wanted.
        wanted: u32,
        /// How long we waited.
        waited: Duration,
    },
}

/// What provisioning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The PF.
    pub pf: PciAddress,
    /// VF count before.
    pub before: u32,
    /// VF count now.
    pub after: u32,
}

/// Set the PF's VF count (through 0 when changing a non-zero count) and wait until the
/// kernel shows exactly `count` VFs, polling every `poll` up to `timeout`.
pub fn provision(
    sysfs: &Sysfs,
    selector: &PfSelector,
    count: u32,
    timeout: Duration,
    poll: Duration,
) -> Result<Provisioned, ProvisionError> {
    let pf = match selector {
        PfSelector::Address(a) => a.clone(),
        PfSelector::Interface(i) => {
            sysfs
                .pci_address_of_interface(i)
                .map_err(|source| ProvisionError::Pf {
                    pf: selector.to_string(),
                    source,
                })?
        }
    };
    let device = sysfs.pci_device(&pf).map_err(|source| ProvisionError::Pf {
        pf: selector.to_string(),
        source,
    })?;
    let before = device.sriov.map_or(0, |s| s.num_vfs);
    sysfs
        .set_num_vfs(&pf, count)
        .map_err(|source| ProvisionError::Write {
            pf: pf.clone(),
            source,
        })?;
    let started = Instant::now();
    loop {
        // Done when exactly virtfn0..virtfn{count-1} exist and all resolve: a count that
        // merely matches while VFs are still being torn down does not qualify.
        let (present, complete) = match sysfs.pci_device(&pf) {
            Ok(d) => {
                let in_order = d.virtfns.iter().map(|(i, _)| *i).eq(0..count);
                (d.virtfns.len(), in_order && d.dangling_links.is_empty())
            }
            Err(_) => (0, false),
        };
        if complete {
            return Ok(Provisioned {
                pf,
                before,
                after: count,
            });
        }
        if started.elapsed() >= timeout {
            return Err(ProvisionError::Timeout {
                pf,
                found: present,
                wanted: count,
                waited: started.elapsed(),
            });
        }
        // Provisioning runs once at start-up on a blocking thread; polling is fine here.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(poll);
    }
}
