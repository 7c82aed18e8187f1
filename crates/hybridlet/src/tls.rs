//! One TLS stack for the whole process: rustls with the *ring* provider.
//!
//! Both the AWS SDK and the Kubernetes client are built with rustls on *ring* (their
//! default features, which would add aws-lc-rs and a legacy hyper 0.14 stack, are off).
//! Installing *ring* as the process default before any client is built means rustls never
//! has to guess between providers, which is the situation that makes `kube` panic at run
//! time in other agents.

/// Install *ring* as the process-wide default rustls provider. Idempotent.
pub fn install_default_provider() {
    // Err means a provider is already installed; only ours is compiled in, so that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
