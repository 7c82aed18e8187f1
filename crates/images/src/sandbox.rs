//! The pod sandbox (pause) image: which one, and its pull.
//!
//! nodeadm pulls it right after containerd starts, through CRI with an ECR token, because
//! containerd would pull a missing sandbox image itself, anonymously, and EKS's registry
//! refuses anonymous pulls: the node's first pod would never start. hybridlet does the
//! same, through a configured mirror first when there is one, and retries with backoff.

use std::time::Duration;

use hybridlet_aws::{EksRegistry, RegionData, eks_registry};
use hybridlet_config::{ImageRef, ImagesSpec, RegistryMirror};
use hybridlet_cri::{ImageRuntime, RegistryAuth};

use crate::ImagesError;
use crate::logins::attempts;

/// Which sandbox image, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The reference containerd's config names.
    pub image: String,
    /// EKS's registry, when the image is EKS's (an ECR token is needed).
    pub eks: Option<EksRegistry>,
}

/// The sandbox image for a node in `region`: `spec.images.sandbox` when set, else EKS's.
pub fn resolve(
    spec: &ImagesSpec,
    region: &str,
    manifest: Option<&RegionData>,
    fips: bool,
) -> Sandbox {
    match &spec.sandbox {
        Some(image) => Sandbox {
            image: image.clone(),
            eks: None,
        },
        None => {
            let registry = eks_registry(region, manifest, fips);
            Sandbox {
                image: registry.sandbox_image(),
                eks: Some(registry),
            }
        }
    }
}

/// How often and how patiently to pull.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Rounds of attempts.
    pub rounds: u32,
    /// The wait after the first failed round; doubled after each.
    pub first_wait: Duration,
}

impl Default for Retry {
    /// nodeadm's: three rounds, 2 s then 4 s.
    fn default() -> Self {
        Self {
            rounds: 3,
            first_wait: Duration::from_secs(2),
        }
    }
}

/// Pull `image` through each attempt in turn (mirror logins first, then the registry with
/// `registry_login`), for up to `retry.rounds` rounds; the image ID and what got it.
pub async fn pull(
    runtime: &dyn ImageRuntime,
    image: &str,
    spec: &ImagesSpec,
    mirrors: &[RegistryMirror],
    registry_login: Option<RegistryAuth>,
    retry: Retry,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(String, String), ImagesError> {
    let parsed = ImageRef::parse(image).map_err(|why| ImagesError::Pull {
        image: image.to_string(),
        message: format!("not an image reference: {why}"),
        auth: false,
    })?;
    let plan = attempts(&parsed, spec, mirrors, registry_login)?;
    let mut wait = retry.first_wait;
    let mut failures = Vec::new();
    let mut auth_refused = false;
    for round in 1..=retry.rounds.max(1) {
        for attempt in &plan {
            match runtime.pull(image, attempt.auth.as_ref()).await {
                Ok(id) => return Ok((id, attempt.via.clone())),
                Err(e) => {
                    auth_refused |= e.is_auth();
                    let line = format!("{} (round {round}, {}): {e}", image, attempt.via);
                    say(format!("pull failed: {line}"));
                    failures.push(format!("{}: {e}", attempt.via));
                }
            }
        }
        if round < retry.rounds {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    failures.dedup();
    Err(ImagesError::Pull {
        image: image.to_string(),
        message: failures.join("; "),
        auth: auth_refused,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_cri::FakeRuntime;

    #[test]
    fn the_override_wins_else_eks_pause_of_the_region() {
        let spec = ImagesSpec::default();
        let s = resolve(&spec, "cn-northwest-1", None, false);
        assert_eq!(
            s.image,
            "961992271922.dkr.ecr.cn-northwest-1.amazonaws.com.cn/eks/pause:3.5"
        );
        let spec = ImagesSpec {
            sandbox: Some("harbor.example.com/eks/pause:3.5".into()),
            ..ImagesSpec::default()
        };
        let s = resolve(&spec, "cn-northwest-1", None, false);
        assert_eq!(
            (s.image.as_str(), s.eks.is_none()),
            ("harbor.example.com/eks/pause:3.5", true)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_then_reports_every_attempt_and_a_login_refusal() {
        let rt = FakeRuntime::new("1.7.24");
        let image = "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5";
        rt.fail_next_pull(
            image,
            hybridlet_cri::Code::Unknown,
            "failed to resolve reference: unexpected status: 503",
        );
        let token = RegistryAuth {
            auth: "QVdTOng=".into(),
            ..RegistryAuth::default()
        };
        let mut lines = Vec::new();
        let (id, via) = pull(
            &rt,
            image,
            &ImagesSpec::default(),
            &[],
            Some(token),
            Retry::default(),
            &mut |l| lines.push(l),
        )
        .await
        .unwrap();
        assert!(id.starts_with("sha256:") && via.starts_with("registry"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let pulls = rt.pulls();
        assert_eq!(
            pulls[1].1.as_ref().unwrap().server_address,
            "https://602401143452.dkr.ecr.us-west-2.amazonaws.com"
        );
        for _ in 0..3 {
            rt.fail_next_pull(
                "harbor.example.com/x:1",
                hybridlet_cri::Code::Unknown,
                "pulling from host harbor.example.com failed: 401 Unauthorized",
            );
        }
        let err = pull(
            &rt,
            "harbor.example.com/x:1",
            &ImagesSpec::default(),
            &[],
            None,
            Retry::default(),
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImagesError::Pull { auth: true, .. }), "{err}");
    }
}
