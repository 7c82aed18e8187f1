//! Kubernetes artifacts for hybrid nodes: the EKS hybrid release manifest (the format
//! nodeadm reads from `https://hybrid-assets.eks.amazonaws.com/manifest.yaml`, or a mirror
//! of it for air-gapped sites) and downloads that are trustworthy on a flaky link:
//!
//! - every file is checked against the SHA-256 the manifest points to **before** it is
//!   placed; a mismatch leaves the old file untouched;
//! - bytes go to a temporary file beside the destination (`.<name>.hybridlet-part`),
//!   which is fsynced and renamed into place, so a crash never leaves half a kubelet;
//! - an interrupted download resumes from the partial file with an HTTP range request
//!   (and starts over when the server cannot resume or the result does not verify);
//! - a destination that already has the right bytes is not downloaded again.
//!
//! Sources: `https://` (rustls, the system's roots), `http://` (mirrors on a trusted
//! network: the checksum still protects the bytes) and `file://` (a local mirror).
//!
//! What this crate must never do: place a file that did not verify, follow a redirect to
//! another scheme, or talk to anything but the URLs it is given.

mod archive;
mod fetch;
mod manifest;

pub use archive::{Unpacked, unpack_flat};
pub use fetch::{Downloaded, Fetcher, Progress, sha256_file};
pub use manifest::{Artifact, EksPatchRelease, Manifest, RegionConfig, SupportedEksRelease};

/// The public EKS hybrid nodes release manifest.
pub const DEFAULT_MANIFEST: &str = "https://hybrid-assets.eks.amazonaws.com/manifest.yaml";

/// Failure of a manifest or download operation, naming the URL or file.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The URL is not http, https or file.
    #[error("{url}: only https://, http:// and file:// sources are supported")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// The request failed (connection, TLS, timeout).
    #[error("fetching {url}: {message}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with an error status.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The bytes do not match the published checksum; nothing was placed.
    #[error(
        "{url}: SHA-256 {actual} does not match the published {expected}; the download was discarded and nothing was changed"
    )]
    Checksum {
        /// The URL.
        url: String,
        /// Published.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// An archive is unreadable or has a member that may not be unpacked; nothing of it
    /// was placed when a member was refused.
    #[error("{}: {message}", path.display())]
    Archive {
        /// The archive.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checksum file is not a SHA-256.
    #[error("{url}: not a SHA-256 checksum file")]
    BadChecksumFile {
        /// The URL.
        url: String,
    },
    /// The manifest does not parse.
    #[error("release manifest {url}: {message}")]
    Manifest {
        /// Where it came from.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The version is not in the manifest.
    #[error("Kubernetes {version} is not in the release manifest; available: {available}")]
    UnknownVersion {
        /// Asked for.
        version: String,
        /// What the manifest has.
        available: String,
    },
    /// The release lacks an artifact for this platform.
    #[error("Kubernetes {version} has no {name} for linux/{arch} in the release manifest")]
    MissingArtifact {
        /// Release.
        version: String,
        /// Artifact.
        name: String,
        /// Architecture.
        arch: String,
    },
    /// A local file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
