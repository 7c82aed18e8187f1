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

/// Driver binding of PCI functions.
pub trait DriverBinding: Send + Sync + std::fmt::Debug {
    /// The driver `address` is bound to, if any.
    fn driver(&self, address: &PciAddress) -> Option<String>;
    /// Bind `address` to `driver` (no-op when it already is).
    fn bind(&self, address: &PciAddress, driver: &str) -> Result<(), BindError>;
    /// Clear the override and let the kernel bind the function's own driver again.
    fn release(&self, address: &PciAddress) -> Result<(), BindError>;
}

impl Sysfs {
    fn write(&self, address: &PciAddress, path: PathBuf, value: &str) -> Result<(), BindError> {
        std::fs::write(&path, value).map_err(|source| BindError::Write {
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

    fn bind(&self, address: &PciAddress, driver: &str) -> Result<(), BindError> {
        let mut s = self.lock();
        s.calls.push(format!("bind {address} {driver}"));
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

    /// On a generated sysfs tree (no kernel behind it) the protocol's writes land in the
    /// right files, and a kernel that does not bind is reported as such.
    #[test]
    fn sysfs_bind_writes_the_override_protocol_and_checks_the_result() {
        let dir = tempfile::tempdir().unwrap();
        hybridlet_fixtures::e810_server(dir.path()).unwrap();
        let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
        let vf = PciAddress::parse("0000:81:00.2").unwrap();
        let before = sysfs.driver(&vf);
        assert_eq!(before.as_deref(), Some("iavf"));
        let err = sysfs.bind(&vf, "vfio-pci").unwrap_err();
        assert!(matches!(err, BindError::NotBound { .. }), "{err}");
        let dev = dir.path().join("sys/bus/pci/devices/0000:81:00.2");
        // The failed bind cleared its override again.
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
        assert_eq!(
            std::fs::read_to_string(dev.join("driver/unbind")).unwrap(),
            "0000:81:00.2"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sys/bus/pci/drivers_probe")).unwrap(),
            "0000:81:00.2"
        );
        sysfs.release(&vf).unwrap();
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
    }
}
