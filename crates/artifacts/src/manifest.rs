//! The release manifest: supported EKS minor versions, their patch releases and the
//! artifacts (URI and checksum URI) of each, per OS and architecture.

use serde::Deserialize;

use crate::ArtifactError;

/// The manifest (fields hybridlet uses; unknown fields are ignored, the format grows).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Kubernetes minors and their patches.
    #[serde(default)]
    pub supported_eks_releases: Vec<SupportedEksRelease>,
    /// The IAM Roles Anywhere signing helper releases.
    #[serde(default)]
    pub iam_roles_anywhere_releases: Vec<ToolRelease>,
    /// SSM agent packages (`amazon-ssm-agent`, a `.deb` or `.rpm` per architecture); the
    /// public manifest has none (`null`), a mirror for air-gapped sites may carry them.
    #[serde(default)]
    pub ssm_releases: Option<Vec<ToolRelease>>,
    /// Per region: its partition and the account of EKS's image registry there (what
    /// nodeadm reads first for the pod sandbox image).
    #[serde(default)]
    pub region_config: std::collections::BTreeMap<String, RegionConfig>,
    /// Container image archives (OCI or docker, e.g. the pod sandbox image) that `install`
    /// downloads, verifies and imports into containerd: hybridlet's extension for mirrors
    /// of sites no registry reaches (the public manifest has none).
    #[serde(default)]
    pub image_archives: Option<Vec<Artifact>>,
}

/// `region_config.<region>` (fields hybridlet uses).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct RegionConfig {
    /// `aws`, `aws-cn`, `aws-us-gov`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// EKS's registry account in the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr_account_id: Option<String>,
}

/// One Kubernetes minor version.
#[derive(Debug, Clone, Deserialize)]
pub struct SupportedEksRelease {
    /// `1.31`.
    pub major_minor_version: String,
    /// The newest patch number, e.g. `"7"`.
    pub latest_patch_version: String,
    /// Every patch release.
    #[serde(default)]
    pub patch_releases: Vec<EksPatchRelease>,
}

/// One patch release.
#[derive(Debug, Clone, Deserialize)]
pub struct EksPatchRelease {
    /// `1.31.7`.
    pub version: String,
    /// `"7"`.
    pub patch_version: String,
    /// Release date.
    #[serde(default)]
    pub release_date: String,
    /// Its files.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// A tool release (signing helper).
#[derive(Debug, Clone, Deserialize)]
pub struct ToolRelease {
    /// Version.
    pub version: String,
    /// Its files.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// One downloadable file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    /// `kubelet`, `kubectl`, `cni-plugins`, `aws_signing_helper`, ...
    pub name: String,
    /// `amd64` or `arm64`.
    pub arch: String,
    /// `linux`.
    pub os: String,
    /// Where the file is.
    pub uri: String,
    /// Where its SHA-256 is.
    #[serde(default)]
    pub checksum_uri: String,
}

impl Manifest {
    /// Parse a manifest fetched from `url`.
    pub fn parse(url: &str, text: &str) -> Result<Self, ArtifactError> {
        serde_saphyr::from_str(text).map_err(|e| ArtifactError::Manifest {
            url: url.to_string(),
            message: e.to_string(),
        })
    }

    /// `1.31` → its latest patch; `1.31.4` → exactly that one.
    pub fn release(&self, version: &str) -> Result<&EksPatchRelease, ArtifactError> {
        let version = version.trim_start_matches('v');
        let parts: Vec<&str> = version.split('.').collect();
        let minor = parts.iter().take(2).copied().collect::<Vec<_>>().join(".");
        let unknown = || ArtifactError::UnknownVersion {
            version: version.to_string(),
            available: self
                .supported_eks_releases
                .iter()
                .map(|r| r.major_minor_version.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
            return Err(unknown());
        }
        let supported = self
            .supported_eks_releases
            .iter()
            .find(|r| r.major_minor_version == minor)
            .ok_or_else(unknown)?;
        let patch = parts
            .get(2)
            .copied()
            .unwrap_or(&supported.latest_patch_version);
        supported
            .patch_releases
            .iter()
            .find(|p| p.patch_version == patch)
            .ok_or_else(|| ArtifactError::UnknownVersion {
                version: version.to_string(),
                available: supported
                    .patch_releases
                    .iter()
                    .map(|p| p.version.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The newest signing helper for `arch`.
    pub fn signing_helper(&self, arch: &str) -> Option<&Artifact> {
        self.iam_roles_anywhere_releases
            .last()?
            .artifacts
            .iter()
            .find(|a| a.arch == arch && a.os == "linux")
    }
}

impl Manifest {
    /// The image archives for `arch`.
    pub fn image_archives(&self, arch: &str) -> Vec<&Artifact> {
        self.image_archives
            .iter()
            .flatten()
            .filter(|a| a.arch == arch && a.os == "linux")
            .collect()
    }

    /// The newest SSM agent package for `arch` in `format` (`deb` or `rpm`).
    pub fn ssm_agent_package(&self, arch: &str, format: &str) -> Option<&Artifact> {
        let suffix = format!(".{format}");
        self.ssm_releases
            .as_ref()?
            .last()?
            .artifacts
            .iter()
            .find(|a| {
                a.name == "amazon-ssm-agent"
                    && a.arch == arch
                    && a.os == "linux"
                    && a.uri.ends_with(&suffix)
            })
    }
}

impl EksPatchRelease {
    /// The artifact `name` for linux/`arch`.
    pub fn artifact(&self, name: &str, arch: &str) -> Result<&Artifact, ArtifactError> {
        self.artifacts
            .iter()
            .find(|a| a.name == name && a.arch == arch && a.os == "linux")
            .ok_or_else(|| ArtifactError::MissingArtifact {
                version: self.version.clone(),
                name: name.to_string(),
                arch: arch.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TEXT: &str = r#"
supported_eks_releases:
- major_minor_version: "1.31"
  latest_patch_version: "7"
  patch_releases:
  - version: 1.31.3
    patch_version: "3"
    release_date: "2025-01-10"
    artifacts:
    - {name: kubelet, arch: amd64, os: linux, uri: "https://a/1.31.3/kubelet", checksum_uri: "https://a/1.31.3/kubelet.sha256"}
  - version: 1.31.7
    patch_version: "7"
    release_date: "2025-04-01"
    artifacts:
    - {name: kubelet, arch: amd64, os: linux, uri: "https://a/1.31.7/kubelet", checksum_uri: "https://a/1.31.7/kubelet.sha256"}
    - {name: kubelet, arch: arm64, os: linux, uri: "https://a/1.31.7/arm64/kubelet", checksum_uri: "https://a/1.31.7/arm64/kubelet.sha256"}
region_config:
  us-west-2: {partition: aws, ecr_account_id: "602401143452", cred_providers: {ssm: true, iam-ra: true}}
ssm_releases: null
"#;

    #[test]
    fn resolves_minor_to_latest_patch_and_exact_patches() {
        let m = Manifest::parse("test", TEXT).unwrap();
        assert_eq!(m.release("1.31").unwrap().version, "1.31.7");
        let west = &m.region_config["us-west-2"];
        assert_eq!(
            (west.partition.as_deref(), west.ecr_account_id.as_deref()),
            (Some("aws"), Some("602401143452"))
        );
        assert_eq!(m.release("v1.31.3").unwrap().version, "1.31.3");
        let err = m.release("1.30").unwrap_err();
        assert!(err.to_string().contains("available: 1.31"), "{err}");
        let err = m.release("1.31.5").unwrap_err();
        assert!(err.to_string().contains("1.31.3, 1.31.7"), "{err}");
        assert!(m.release("latest").is_err());
        let r = m.release("1.31").unwrap();
        assert_eq!(
            r.artifact("kubelet", "arm64").unwrap().uri,
            "https://a/1.31.7/arm64/kubelet"
        );
        assert!(
            r.artifact("kubectl", "amd64")
                .unwrap_err()
                .to_string()
                .contains("no kubectl")
        );
        assert!(Manifest::parse("u", "supported_eks_releases: 7").is_err());
        assert!(
            m.ssm_agent_package("amd64", "deb").is_none(),
            "ssm_releases: null"
        );
        let mirror = format!(
            "{TEXT}\n"
        )
        .replace(
            "ssm_releases: null",
            "ssm_releases:\n- version: 3.3.0.0\n  artifacts:\n  - {name: amazon-ssm-agent, arch: amd64, os: linux, uri: \"file:///m/amazon-ssm-agent.deb\", checksum_uri: \"file:///m/amazon-ssm-agent.deb.sha256\"}\n  - {name: amazon-ssm-agent, arch: amd64, os: linux, uri: \"file:///m/amazon-ssm-agent.rpm\", checksum_uri: \"file:///m/amazon-ssm-agent.rpm.sha256\"}",
        );
        let m = Manifest::parse("mirror", &mirror).unwrap();
        assert_eq!(
            m.ssm_agent_package("amd64", "rpm").unwrap().uri,
            "file:///m/amazon-ssm-agent.rpm"
        );
        assert!(m.ssm_agent_package("arm64", "deb").is_none());
    }
}
