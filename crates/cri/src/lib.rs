//! containerd, as hybridlet uses it for images: the runtime's name and version (CRI
//! `Version`), image pulls with registry credentials (CRI `PullImage`, exactly as the
//! kubelet and nodeadm call it), image status, and pinning (the CRI plugin's
//! `io.cri-containerd.pinned` label, set through containerd's own image service in the
//! `k8s.io` namespace, which is what makes the kubelet's image garbage collector keep an
//! image on containerd 1.7 and later).
//!
//! [`ImageRuntime`] is the boundary: [`Containerd`] speaks gRPC on containerd's socket;
//! [`FakeRuntime`] is an in-memory runtime with scripted failures for tests.
//!
//! What this crate must never do: log or `Debug`-print a registry password, or decide
//! which credentials an image gets (the caller does).

mod containerd;
mod fake;

use std::time::Duration;

pub use containerd::Containerd;
pub use fake::FakeRuntime;
pub use tonic::Code;

/// The label containerd's CRI plugin reads to report an image as pinned.
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
/// Its value.
pub const PINNED_VALUE: &str = "pinned";

/// Errors talking to the runtime, naming the socket or the call.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// Nothing answers on the socket.
    #[error("containerd does not answer on {socket}: {message}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        message: String,
    },
    /// The runtime answered a call with an error.
    #[error("{call} {image}: {message} ({code:?})")]
    Call {
        /// `PullImage`, `ImageStatus`, `Version`, `Images.Update`.
        call: &'static str,
        /// The image asked about (empty for `Version`).
        image: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The runtime's message.
        message: String,
    },
    /// The call took longer than allowed.
    #[error("{call} {image}: no answer within {limit:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The image.
        image: String,
        /// The limit.
        limit: Duration,
    },
}

impl CriError {
    /// An authentication or authorization refusal by the registry (worth saying apart from
    /// "unreachable": the fix is a login, not a network).
    pub fn is_auth(&self) -> bool {
        match self {
            CriError::Call { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.contains("401")
                    || m.contains("403")
                    || m.contains("unauthorized")
                    || m.contains("authorization failed")
                    || m.contains("denied")
            }
            _ => false,
        }
    }
}

/// A registry login for one pull (CRI `AuthConfig`). `Debug` shows no secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name (with `password`).
    pub username: String,
    /// Password.
    pub password: String,
    /// `base64(user:password)` instead of the two (ECR's token form).
    pub auth: String,
    /// When set, containerd gives the login only to this host: a URL
    /// (`https://HOST[:PORT]`, containerd compares its host); when empty, to every host the
    /// pull reaches, mirrors included.
    pub server_address: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field(
                "auth",
                &if self.auth.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("server_address", &self.server_address)
            .finish()
    }
}

/// What the runtime says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`.
    pub name: String,
    /// `1.6.20~ds1`, `v2.0.4`.
    pub version: String,
    /// The CRI API version (`v1`).
    pub api_version: String,
}

/// An image the runtime has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:…` (the config digest).
    pub id: String,
    /// Tags naming it.
    pub repo_tags: Vec<String>,
    /// Digests naming it.
    pub repo_digests: Vec<String>,
    /// Bytes.
    pub size: u64,
    /// Whether CRI reports it pinned (containerd ≥ 1.7 with the label).
    pub pinned: bool,
}

/// The result of [`ImageRuntime::pin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// The label is set and CRI reports the image pinned: the kubelet keeps it.
    Yes,
    /// The label is set but CRI does not report it (containerd before 1.7 has no pinning).
    LabelOnly,
}

/// containerd's image side, as hybridlet needs it.
#[tonic::async_trait]
pub trait ImageRuntime: Send + Sync {
    /// The runtime's name and version.
    async fn version(&self) -> Result<RuntimeVersion, CriError>;
    /// Pull `image` (a reference) with `auth`; the image's ID.
    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<String, CriError>;
    /// The image, or `None` when the runtime does not have it.
    async fn status(&self, image: &str) -> Result<Option<ImageInfo>, CriError>;
    /// Pin `image` (a normalized reference naming an image the runtime has) against the
    /// kubelet's image garbage collection.
    async fn pin(&self, image: &str) -> Result<Pinned, CriError>;
}

/// containerd's major version from a version string (`1.6.20~ds1`, `v2.0.4`,
/// `containerd github.com/containerd/containerd 1.7.24 …`).
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    version.split_whitespace().find_map(|word| {
        let word = word.trim_start_matches('v');
        let mut parts = word.split(['.', '~', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn versions_as_containerd_prints_them() {
        assert_eq!(major_minor("1.6.20~ds1"), Some((1, 6)));
        assert_eq!(major_minor("v2.0.4"), Some((2, 0)));
        assert_eq!(
            major_minor(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
            ),
            Some((1, 6))
        );
        assert_eq!(
            major_minor("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da"),
            Some((1, 7))
        );
        assert_eq!(major_minor("containerd"), None);
    }

    #[test]
    fn auth_debug_shows_no_secret() {
        let a = RegistryAuth {
            username: "robot$ml".into(),
            password: "hunter2".into(),
            auth: "QVdTOnNlY3JldA==".into(),
            server_address: "harbor.example.com".into(),
        };
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("QVdTOnNlY3JldA"),
            "{shown}"
        );
    }
}
