//! Which kernel driver a PCI function is bound to, and moving it: a VF goes to
//! `vfio-pci` for a DPDK or VM workload and back to its own driver afterwards. Real
//! implementation: the sysfs `driver_override` protocol (set the override, unbind from
//! the current driver, ask the kernel to probe, check the `driver` link); fake: a map.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pci::{PciAddress, Sysfs};

/// Failure of a bind or release, naming the function and the step.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A sysfs write failed.
    #[error("{address}: writing {}: {source}", path.display())]
    Write {
        /// The PCI function.
        address: String,
        /// The sysfs file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel did not bind the wanted driver.
    #[error(
        "{address}: still bound to {current} after asking for {wanted} (is the {wanted} module loaded and the IOMMU on?)"
    )]
    NotBound {
        /// The PCI function.
        address: String,
        /// Wanted.
        wanted: String,
        /// What it has (`none` when unbound).
        current: String,
    },
}

/// How a function is bound, as the kernel shows it: what `restore` puts back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingState {
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// `driver_override`, if one is set (an operator's or driverctl's).
    pub driver_override: Option<String>,
}

/// Driver binding of PCI functions.
pub trait DriverBinding: Send + Sync + std::fmt::Debug {
    /// The driver `address` is bound to, if any.
    fn driver(&self, address: &PciAddress) -> Option<String>;
    /// The driver and the override of `address`.
    fn state(&self, address: &PciAddress) -> BindingState;
    /// Bind `address` to `driver` (no-op when it already is).
    fn bind(&self, address: &PciAddress, driver: &str) -> Result<(), BindError>;
    /// Clear the override and let the kernel bind the function's own driver again.
    fn release(&self, address: &PciAddress) -> Result<(), BindError>;
    /// Put `address` back as `original` was: the same override (or none) and the same
    /// driver (or none). A no-op when it already is.
    fn restore(&self, address: &PciAddress, original: &BindingState) -> Result<(), BindError>;
}

impl Sysfs {
    fn write(&self, address: &PciAddress, path: PathBuf, value: &str) -> Result<(), BindError> {
        self.write_attribute(&path, value)
            .map_err(|source| BindError::Write {
                address: address.to_string(),
                path,
                source,
            })
    }

    /// The driver_override protocol: set the override, unbind from the current driver,
    /// ask the kernel to probe the function again.
    fn reprobe(&self, address: &PciAddress, driver_override: &str) -> Result<(), BindError> {
        let dev = self.dir().join("bus/pci/devices").join(address.as_str());
        self.write(address, dev.join("driver_override"), driver_override)?;
        self.unbind_current(address)?;
        self.write(
            address,
            self.dir().join("bus/pci/drivers_probe"),
            address.as_str(),
        )
    }

    fn unbind_current(&self, address: &PciAddress) -> Result<(), BindError> {
        let dev = self.dir().join("bus/pci/devices").join(address.as_str());
        if dev.join("driver").exists() {
            self.write(address, dev.join("driver/unbind"), address.as_str())?;
        }
        Ok(())
    }

    fn wait_for_driver(&self, address: &PciAddress, wanted: Option<&str>) -> Option<String> {
        // The kernel binds synchronously in drivers_probe; a short wait covers udev races.
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let current = self.driver(address);
            if wanted.is_none_or(|w| current.as_deref() == Some(w)) || Instant::now() >= until {
                return current;
            }
            #[allow(clippy::disallowed_methods)] // a short poll on a blocking thread
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl DriverBinding for Sysfs {
    fn state(&self, address: &PciAddress) -> BindingState {
        let dev = self.dir().join("bus/pci/devices").join(address.as_str());
        let driver_override = std::fs::read_to_string(dev.join("driver_override"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|o| !o.is_empty() && o != "(null)");
        BindingState {
            driver: self.driver(address),
            driver_override,
        }
    }

    fn restore(&self, address: &PciAddress, original: &BindingState) -> Result<(), BindError> {
        if self.state(address) == *original {
            return Ok(());
        }
        let dev = self.dir().join("bus/pci/devices").join(address.as_str());
        // The override first, so no probe in between picks another driver.
        let over = original.driver_override.as_deref().unwrap_or("\n");
        self.write(address, dev.join("driver_override"), over)?;
        if self.driver(address) != original.driver {
            self.unbind_current(address)?;
            if let Some(driver) = &original.driver {
                let bind = self.dir().join("bus/pci/drivers").join(driver).join("bind");
                // An explicit bind names the driver; should it refuse, a probe still
                // gets whatever the override or the ID table picks.
                if self.write(address, bind, address.as_str()).is_err() {
                    self.write(
                        address,
                        self.dir().join("bus/pci/drivers_probe"),
                        address.as_str(),
                    )?;
                }
            }
        }
        let now = self.wait_for_driver(address, original.driver.as_deref());
        if now != original.driver {
            return Err(BindError::NotBound {
                address: address.to_string(),
                wanted: original.driver.clone().unwrap_or_else(|| "none".into()),
                current: now.unwrap_or_else(|| "none".into()),
            });
        }
        Ok(())
    }

    fn driver(&self, address: &PciAddress) -> Option<String> {
        let link = self
            .dir()
            .join("bus/pci/devices")
            .join(address.as_str())
            .join("driver");
        std::fs::read_link(link)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    fn bind(&self, address: &PciAddress, driver: &str) -> Result<(), BindError> {
        if self.driver(address).as_deref() == Some(driver) {
            return Ok(());
        }
        self.reprobe(address, driver)?;
        match self.wait_for_driver(address, Some(driver)) {
            Some(d) if d == driver => Ok(()),
            other => {
                // Leave no override behind: it would catch the function at its next probe.
                // The bind error is what the caller can act on; a failed cleanup adds nothing.
                let _ = self.release(address);
                Err(BindError::NotBound {
                    address: address.to_string(),
                    wanted: driver.to_string(),
                    current: other.unwrap_or_else(|| "none".into()),
                })
            }
        }
    }

    fn release(&self, address: &PciAddress) -> Result<(), BindError> {
        // An empty override (a newline) clears it.
        self.reprobe(address, "\n")?;
        self.wait_for_driver(address, None);
        Ok(())
    }
}

/// Bindings in memory: `release` restores the driver a function had first.
#[derive(Debug, Default)]
pub struct FakeBinding {
    state: Mutex<FakeBindState>,
}

#[derive(Debug, Default)]
struct FakeBindState {
    current: BTreeMap<String, Option<String>>,
    original: BTreeMap<String, Option<String>>,
    overrides: BTreeMap<String, String>,
    calls: Vec<String>,
    refuse: Option<String>,
}

impl FakeBinding {
    /// Functions and their drivers.
    pub fn with(devices: &[(&str, Option<&str>)]) -> Self {
        let fake = Self::default();
        {
            let mut s = fake.lock();
            for (a, d) in devices {
                s.current.insert((*a).into(), d.map(str::to_string));
                s.original.insert((*a).into(), d.map(str::to_string));
            }
        }
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeBindState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `address` has this driver_override (an operator's).
    pub fn set_override(&self, address: &str, driver: &str) {
        self.lock().overrides.insert(address.into(), driver.into());
    }

    /// Make binding `address` fail (the kernel refuses, e.g. no IOMMU).
    pub fn refuse(&self, address: &str) {
        self.lock().refuse = Some(address.into());
    }

    /// Calls so far (`bind <addr> <driver>`, `release <addr>`).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

impl DriverBinding for FakeBinding {
    fn driver(&self, address: &PciAddress) -> Option<String> {
        self.lock().current.get(address.as_str()).cloned().flatten()
    }

    fn state(&self, address: &PciAddress) -> BindingState {
        let s = self.lock();
        BindingState {
            driver: s.current.get(address.as_str()).cloned().flatten(),
            driver_override: s.overrides.get(address.as_str()).cloned(),
        }
    }

    fn restore(&self, address: &PciAddress, original: &BindingState) -> Result<(), BindError> {
        let mut s = self.lock();
        s.calls.push(format!(
            "restore {address} {} {}",
            original.driver.as_deref().unwrap_or("-"),
            original.driver_override.as_deref().unwrap_or("-")
        ));
        s.current
            .insert(address.to_string(), original.driver.clone());
        match &original.driver_override {
            Some(o) => s.overrides.insert(address.to_string(), o.clone()),
            None => s.overrides.remove(address.as_str()),
        };
        Ok(())
    }

    fn bind(&self, address: &PciAddress, driver: &str) -> Result<(), BindError> {
        let mut s = self.lock();
        s.calls.push(format!("bind {address} {driver}"));
        s.overrides.insert(address.to_string(), driver.into());
        if s.refuse.as_deref() == Some(address.as_str()) {
            return Err(BindError::NotBound {
                address: address.to_string(),
                wanted: driver.into(),
                current: "none".into(),
            });
        }
        s.current.insert(address.to_string(), Some(driver.into()));
        Ok(())
    }

    fn release(&self, address: &PciAddress) -> Result<(), BindError> {
        let mut s = self.lock();
        s.calls.push(format!("release {address}"));
        s.overrides.remove(address.as_str());
        let original = s.original.get(address.as_str()).cloned().flatten();
        s.current.insert(address.to_string(), original);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::HostRoot;

    fn writes(kernel: &hybridlet_fixtures::kernel::KernelStandIn) -> Vec<String> {
        kernel
            .writes()
            .into_iter()
            .map(|(path, value)| format!("{path} <- {}", value.trim()).trim_end().to_string())
            .collect()
    }

    /// The override protocol's writes, in order, against the kernel stand-in: the override
    /// is written before the unbind, the probe comes last, and the function ends on the
    /// wanted driver; release clears the override and the probe brings its own driver back.
    #[test]
    fn sysfs_bind_writes_the_override_protocol_in_order() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::e810_server(dir.path()).unwrap();
        let kernel = hybridlet_fixtures::kernel::KernelStandIn::new(dir.path());
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()))
            .with_writer(std::sync::Arc::new(kernel.writer()));
        let vf = PciAddress::parse("0000:81:00.2").unwrap();
        assert_eq!(sysfs.driver(&vf).as_deref(), Some("iavf"));
        sysfs.bind(&vf, "vfio-pci").unwrap();
        assert_eq!(sysfs.driver(&vf).as_deref(), Some("vfio-pci"));
        assert_eq!(
            writes(&kernel),
            [
                "bus/pci/devices/0000:81:00.2/driver_override <- vfio-pci",
                "bus/pci/devices/0000:81:00.2/driver/unbind <- 0000:81:00.2",
                "bus/pci/drivers_probe <- 0000:81:00.2",
            ]
        );
        // Bound already: nothing is written.
        sysfs.bind(&vf, "vfio-pci").unwrap();
        assert_eq!(writes(&kernel).len(), 3);
        sysfs.release(&vf).unwrap();
        assert_eq!(sysfs.driver(&vf).as_deref(), Some("iavf"));
        assert_eq!(
            writes(&kernel)[3..],
            [
                "bus/pci/devices/0000:81:00.2/driver_override <-",
                "bus/pci/devices/0000:81:00.2/driver/unbind <- 0000:81:00.2",
                "bus/pci/drivers_probe <- 0000:81:00.2",
            ]
        );
    }

    /// A kernel that will not bind (vfio-pci not loaded): the error says so, and the
    /// override is cleared and the function's own driver probed back.
    #[test]
    fn a_refused_bind_is_reported_and_leaves_no_override() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::e810_server(dir.path()).unwrap();
        let kernel = hybridlet_fixtures::kernel::KernelStandIn::new(dir.path());
        kernel.refuse("vfio-pci");
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()))
            .with_writer(std::sync::Arc::new(kernel.writer()));
        let vf = PciAddress::parse("0000:81:00.2").unwrap();
        let err = sysfs.bind(&vf, "vfio-pci").unwrap_err();
        assert!(
            matches!(&err, BindError::NotBound { current, .. } if current == "none"),
            "{err}"
        );
        assert_eq!(sysfs.driver(&vf).as_deref(), Some("iavf"));
        let w = writes(&kernel);
        assert_eq!(
            w[0],
            "bus/pci/devices/0000:81:00.2/driver_override <- vfio-pci"
        );
        assert_eq!(w[3], "bus/pci/devices/0000:81:00.2/driver_override <-");
        assert_eq!(w.last().unwrap(), "bus/pci/drivers_probe <- 0000:81:00.2");
        assert_eq!(
            std::fs::read_to_string(
                dir.path()
                    .join("sys/bus/pci/devices/0000:81:00.2/driver_override")
            )
            .unwrap(),
            "(null)\n"
        );
    }
}
