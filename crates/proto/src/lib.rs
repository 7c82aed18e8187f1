//! The gRPC APIs hybridlet serves to the kubelet and calls on containerd, generated from the `.proto` files in
//! `proto/` (which we wrote from the published APIs: package names, message and field
//! numbers match the kubelet's and the CSI specification's exactly).
//!
//! The generated Rust is committed in `src/gen/`, so a build needs neither `protoc` nor a
//! build script. `tests/regenerate.rs` regenerates it with the pure-Rust `protox` compiler
//! and fails when the committed code has drifted from the `.proto` files
//! (`HYBRIDLET_REGENERATE=1 cargo test -p hybridlet-proto` rewrites it).
//!
//! What this crate must never do: contain hand-written logic. It is the wire contract only.

/// Kubelet plugin registration (`pluginregistration`, the kubelet's v1 API).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod pluginregistration {
    include!("gen/pluginregistration.rs");

    /// `PluginInfo.type` of a CSI plugin.
    pub const CSI_PLUGIN: &str = "CSIPlugin";
    /// `PluginInfo.type` of a DRA plugin.
    pub const DRA_PLUGIN: &str = "DRAPlugin";
}

/// The Container Storage Interface.
pub mod csi {
    /// CSI v1 (`csi.v1`): Identity and Node services.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms,
        missing_debug_implementations
    )]
    pub mod v1 {
        include!("gen/csi.v1.rs");
    }
}

/// Kubelet Dynamic Resource Allocation plugin API.
pub mod dra {
    /// `k8s.io.kubelet.pkg.apis.dra.v1` (kubelet 1.34+), advertised as `v1.DRAPlugin`.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms,
        missing_debug_implementations
    )]
    pub mod v1 {
        include!("gen/k8s.io.kubelet.pkg.apis.dra.v1.rs");
    }
    /// `k8s.io.kubelet.pkg.apis.dra.v1beta1` (kubelet 1.32–1.33), advertised as
    /// `v1beta1.DRAPlugin`.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms,
        missing_debug_implementations
    )]
    pub mod v1beta1 {
        include!("gen/k8s.io.kubelet.pkg.apis.dra.v1beta1.rs");
    }
}

/// Kubelet DRA device-health API (KEP-4680): `DRAResourceHealth.NodeWatchResources`.
pub mod dra_health {
    /// Package `v1alpha1` (kubelet 1.34+), advertised as `v1alpha1.DRAResourceHealth`.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms,
        missing_debug_implementations
    )]
    pub mod v1alpha1 {
        include!("gen/v1alpha1.rs");
    }
    /// Package `v1` (newer kubelets), advertised as `v1.DRAResourceHealth`.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms,
        missing_debug_implementations
    )]
    pub mod v1 {
        include!("gen/v1.rs");
    }
}

/// The Container Runtime Interface as hybridlet calls it on containerd (`runtime.v1`):
/// the runtime's version and the image service (pull with credentials, status, list).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod cri {
    include!("gen/runtime.v1.rs");
}

/// containerd's own image metadata service (`containerd.services.images.v1`): read an
/// image and update its labels (pinning). Requests carry the `containerd-namespace` header.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod containerd_images {
    include!("gen/containerd.services.images.v1.rs");

    /// The gRPC header that scopes a containerd request to a namespace.
    pub const NAMESPACE_HEADER: &str = "containerd-namespace";
    /// The namespace of the CRI plugin (the kubelet's images and containers).
    pub const CRI_NAMESPACE: &str = "k8s.io";
}
