//! hybridlet configuration.
//!
//! One or more YAML documents, in `/etc/hybridlet/config.yaml` and the drop-in directory
//! `/etc/hybridlet/config.d/*.yaml` (merged in lexical order over the main file):
//!
//! * `apiVersion: node.eks.aws/v1alpha1`, `kind: NodeConfig` — AWS nodeadm's file, read
//!   unchanged, with nodeadm's defaults and rules. Its presence means *joined* mode.
//! * `apiVersion: hybridlet.io/v1alpha1`, `kind: AgentConfig` — hybridlet's own settings
//!   (admin/metrics listener, directories, plugin toggles, registry mirrors, proxy). Every
//!   field has a default, so a missing or empty configuration is a valid *standalone*
//!   configuration.
//!
//! Decoding is strict (unknown fields are errors) and every error names the file, the field
//! path and the reason, e.g. `spec.hybrid.ssm.activationId: "abc" is not a UUID`.
//! Validation reports every problem at once rather than the first one only.
//!
//! What this crate must never do: touch the host beyond reading the configuration files,
//! contact the network, or print secrets (SSM activation codes never appear in errors or
//! `Debug` output).

mod duration;
mod error;
mod image_ref;
mod load;
mod merge;
mod types;
mod validate;

pub use duration::GoDuration;
pub use error::{ConfigError, FieldError};
pub use image_ref::ImageRef;
pub use load::{
    ConfigSources, DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_FILE, LoadedConfig, load, parse_str,
};
pub use types::*;
pub use validate::{parse_pci_class, parse_pci_id};

/// `apiVersion` of nodeadm's NodeConfig.
pub const NODE_API_VERSION: &str = "node.eks.aws/v1alpha1";
/// `kind` of nodeadm's NodeConfig.
pub const NODE_KIND: &str = "NodeConfig";
/// `apiVersion` of hybridlet's AgentConfig.
pub const AGENT_API_VERSION: &str = "hybridlet.io/v1alpha1";
/// `kind` of hybridlet's AgentConfig.
pub const AGENT_KIND: &str = "AgentConfig";

/// The validated configuration the rest of hybridlet works from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// nodeadm's NodeConfig, when the node is to be joined to a cluster.
    pub node: Option<NodeConfig>,
    /// hybridlet's own settings, defaults filled in.
    pub agent: AgentSpec,
}

/// Whether hybridlet runs with a cluster or on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No NodeConfig: metrics and health only, no cluster contact.
    Standalone,
    /// A NodeConfig is present: the node belongs to an EKS cluster.
    Joined,
}

impl Mode {
    /// Lower-case name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Joined => "joined",
        }
    }
}

impl Config {
    /// Standalone or joined.
    pub fn mode(&self) -> Mode {
        if self.node.is_some() {
            Mode::Joined
        } else {
            Mode::Standalone
        }
    }
}
