//! Images on a hybrid node.
//!
//! * [`sandbox`]: which pod sandbox (pause) image containerd runs (an override, else EKS's
//!   `eks/pause:3.5` in the ECR registry of the cluster's region) and its pull, as nodeadm
//!   does it (CRI `PullImage` with an ECR token, retried) and through a configured mirror.
//! * [`logins`]: registry logins (Harbor robot accounts) from root-only files, and which
//!   login each pull attempt carries ([`logins::attempts`]: a mirror's own login goes only
//!   to the mirror, the registry's only to the registry).
//! * [`provider`]: `hybridlet credential-provider`, the kubelet's image credential provider
//!   protocol (`credentialprovider.kubelet.k8s.io/v1`) over those logins.
//! * [`prepull`]: images kept present and pinned, pulled at `init` and checked by the
//!   daemon; `hybridlet_image_*` metrics.
//!
//! What this crate must never do: log, print or `Debug`-show a password or token, read a
//! login from a file others can read, or let a failed pre-pull stop the node.

pub mod logins;
pub mod prepull;
pub mod provider;
pub mod sandbox;

/// Errors of this crate, naming the image, file or registry.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A login file cannot be used.
    #[error("registry login {file}: {message}")]
    Login {
        /// The file.
        file: String,
        /// Why (never its content).
        message: String,
    },
    /// A pull failed after every attempt.
    #[error("pulling {image} failed: {message}")]
    Pull {
        /// The image.
        image: String,
        /// What each attempt met.
        message: String,
        /// Whether a registry refused a login (the fix is the login, not the network).
        auth: bool,
    },
    /// The kubelet's request could not be answered.
    #[error("credential provider: {0}")]
    Provider(String),
    /// containerd could not be asked.
    #[error(transparent)]
    Runtime(#[from] hybridlet_cri::CriError),
}
