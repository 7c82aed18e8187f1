//! The node's devices as one view, for `hybridlet devices` and the `devices` subsystem of
//! `hybridlet run`: discovery makes one sysfs walk and hands it to the GPU and SR-IOV
//! domain crates ([`discover`]); the sampler repeats it on a timer with the GPUs'
//! telemetry and the VFs' counters and exports them ([`DeviceMetrics`]: a scrape reads
//! memory, never sysfs or NVML); its observations (XID errors, samples, PF links) go to
//! the DRA drivers' health policies ([`HealthPolicy`]), and the drivers' prepared claims
//! label the telemetry ([`holders_observer`]).
//!
//! What this crate must never do: change the host, or talk to the cluster.

mod discovery;
mod drivers;
mod metrics;

pub use discovery::{
    Discovery, GpuView, PfView, Placement, Report, SkippedView, VfView, discover, gpu_source, table,
};
pub use drivers::{DriverDevices, DriverKind, driver_devices};
pub use metrics::{
    COUNTERS_FRESH, DeviceMetrics, HealthPolicy, Holder, Holders, REWALK, SAMPLE_INTERVAL,
    holders_observer, kernel_uevents,
};

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PCI devices could not be listed.
    #[error("reading PCI devices: {0}")]
    Pci(String),
    /// NVML (or the GPU fixture) failed.
    #[error("{0}")]
    Gpu(#[from] hybridlet_gpu::GpuError),
}
