//! The DRA kubelet plugin framework: `NodePrepareResources` / `NodeUnprepareResources`
//! for the kubelet's v1 and v1beta1 APIs over one implementation, a crash-safe checkpoint
//! of prepared claims, and one CDI spec file per claim. What a device *is* comes from a
//! [`DeviceBackend`] (the GPU and SR-IOV drivers implement it); where claims come from is a
//! [`ClaimSource`] (the API server, or a fake).
//!
//! Contract (KEP-4381): prepare is idempotent and does as little as possible; a claim
//! already in the checkpoint returns the same CDI device IDs (and its CDI spec is rewritten
//! if it vanished, e.g. after a reboot cleared `/var/run/cdi`); unprepare of an unknown
//! claim succeeds; one bad claim never fails the others.
//!
//! What this crate must never do: know about GPUs or NICs, or depend on domain crates.

mod capacity;
mod cdi;
mod checkpoint;
mod claims;
mod driver;
mod grpc;
mod health;
mod metrics;
mod plugin;
mod pool;
mod slices;
mod topology;

pub use capacity::{
    CapacityBoard, DeviceCounts, DriverCapacity, NodeLabeler, desired_labels, free_bucket,
    label_changes, label_value, owned_label,
};
pub use cdi::{ContainerEdits, cdi_device_id};
pub use checkpoint::{Checkpoint, CheckpointError, PreparedClaim, PreparedDevice};
pub use claims::{
    AllocatedClaim, Allocation, ClaimError, ClaimSource, FakeClaims, KubeClaims, NodePod,
    OpaqueConfig, config_for,
};
pub use driver::{
    ClaimFailure, DeviceBackend, DeviceError, Driver, DriverError, Reconciled, config_mode,
};
pub use grpc::{V1Service, V1beta1Service};
pub use health::{
    DeviceHealth, HEALTH_RESEND, HEALTH_TIMEOUT_SECONDS, HealthBoard, HealthService, Taint,
    V1Health, V1alpha1Health,
};
pub use metrics::DraMetrics;
pub use plugin::{ClaimsObserver, DraPlugin, DriverParts, PluginPaths, checkpoint_path};
pub use pool::{NodeSliceWatch, Subscription, WATCH_RETRY_MAX, WatchTiming};
pub use slices::{
    Attr, CounterLayout, CounterSet, CounterUse, MAX_COUNTER_SETS_PER_SLICE, MAX_DEVICES_PER_SLICE,
    PublishError, Published, SliceDevice, SlicePublisher,
};
pub use topology::topology_attributes;
