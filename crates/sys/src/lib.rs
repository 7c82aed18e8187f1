//! Host access for hybridlet.
//!
//! This is the foundation crate that touches the host: it resolves host paths under a
//! configurable root (so tests and demos run the real code against a temporary tree),
//! writes state files atomically and reads host facts such as the boot ID.
//!
//! Later layers add mount, sysfs walking and process spawning here, behind traits, so
//! that this remains the only crate that performs such side effects.
//!
//! Its one `unsafe` module is `nvml_mig` (NVML's MIG calls, through FFI), each block with
//! a `// SAFETY:` comment; the workspace denies `unsafe` everywhere else.
//!
//! What this crate must never do: parse configuration, talk to the network, or log
//! secrets. It knows nothing about Kubernetes or AWS.

pub mod binding;
pub mod containerd;
pub mod fileset;
mod fsutil;
pub mod iscsi;
pub mod mount;
pub mod nvml_mig;
pub mod packages;
pub mod pci;
pub mod pci_detail;
pub mod process;
mod root;
pub mod ssm_agent;
pub mod systemd;
pub mod tree;
pub mod uevent;

pub use fsutil::{AtomicWriteError, atomic_write, ensure_dir, host_name, read_boot_id};
pub use pci::{
    AttributeWriter, NetdevCounters, PciAddress, PciDevice, Sysfs, SysfsError, Topology,
};
pub use root::{HostRoot, RootError};
