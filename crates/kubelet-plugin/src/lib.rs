//! The kubelet plugin framework shared by the DRA drivers and the CSI node plugin.
//!
//! * [`PluginSocket`]: a Unix socket for a gRPC service, created safely — missing parent
//!   directories made with mode 0700, a stale socket from a crash removed only if it is a
//!   socket nobody answers on, the socket itself mode 0600 — and removed on shutdown.
//! * [`RegistrationService`]: the kubelet's `pluginregistration.Registration` service
//!   (`GetInfo`, `NotifyRegistrationStatus`), served on `<kubelet-root>/plugins_registry/<name>-reg.sock`
//!   so that no node-driver-registrar sidecar is needed. `GetInfo` never blocks; failed
//!   registrations are logged and counted.
//! * [`serve`]: run a tonic router on a plugin socket until shutdown, then remove it.
//!   Each connection passes through [`conn::KubeletConnection`], which makes any
//!   `:authority` a Unix-socket gRPC client sends acceptable to the HTTP/2 server (the
//!   kubelet's plugin watcher sends the socket path, which h2 refuses) and logs and counts
//!   ([`PluginMetrics`]) requests refused below the gRPC layer.
//!
//! What this crate must never do: know about DRA or CSI semantics, or touch sockets it did
//! not create (a live socket at our path belongs to someone else and is left alone).

pub mod conn;
pub mod hpack;
mod metrics;
mod registration;
mod socket;

pub use metrics::PluginMetrics;
pub use registration::{RegistrationService, RegistrationState};
pub use socket::{PluginSocket, SocketError, connect, serve};

use std::path::{Path, PathBuf};

/// `<kubelet-root>/plugins_registry/<name>-reg.sock`.
pub fn registration_socket_path(kubelet_root: &Path, name: &str) -> PathBuf {
    kubelet_root
        .join("plugins_registry")
        .join(format!("{name}-reg.sock"))
}

/// `<kubelet-root>/plugins/<name>/<file>` (`csi.sock`, `dra.sock`).
pub fn service_socket_path(kubelet_root: &Path, name: &str, file: &str) -> PathBuf {
    kubelet_root.join("plugins").join(name).join(file)
}
