//! Images kept on the node (`spec.images.prePull`): pulled at `init`, then checked by the
//! daemon every `checkInterval` and whenever containerd comes back after being away (a
//! restart, an upgrade): a missing image is pulled again, an unpinned one pinned. A
//! failure is reported (log, metrics, the `HybridletImagePrePullFailing` alert), never
//! fatal: the node keeps running on what it has.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hybridlet_config::{ImageRef, ImagesSpec, PrePullImage, RegistryMirror};
use hybridlet_cri::{ImageRuntime, Pinned, RegistryAuth};
use hybridlet_metrics::prometheus_client::metrics::counter::Counter;
use hybridlet_metrics::prometheus_client::metrics::family::Family;
use hybridlet_metrics::prometheus_client::metrics::gauge::Gauge;
use hybridlet_metrics::prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::ImagesError;
use crate::logins::read_login;
use crate::sandbox::{Retry, pull};

type Labels = Vec<(String, String)>;

/// Where an image stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Present and pinned: the kubelet's garbage collection keeps it.
    Ready,
    /// Present, labelled pinned, but the runtime does not honour pins (containerd < 1.7).
    Unpinned,
    /// The last pull failed and the image is not there.
    Failed,
}

impl State {
    /// Every state, for the metric's one-hot series.
    pub const ALL: [State; 3] = [State::Ready, State::Unpinned, State::Failed];

    /// The `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Unpinned => "unpinned",
            State::Failed => "failed",
        }
    }
}

/// The `hybridlet_image_*` families.
#[derive(Debug, Clone, Default)]
pub struct ImageMetrics {
    state: Family<Labels, Gauge>,
    last_success: Family<Labels, Gauge>,
    failures: Family<Labels, Counter>,
}

impl ImageMetrics {
    /// Register the families.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "image_prepull",
            "Pre-pulled images (spec.images.prePull) by state: 1 for the state the image is in (ready, unpinned, failed)",
            m.state.clone(),
        );
        registry.register(
            "image_prepull_last_success_timestamp_seconds",
            "When the image was last found present (or pulled), seconds since the epoch",
            m.last_success.clone(),
        );
        registry.register(
            "image_prepull_failures",
            "Failed pulls of a pre-pulled image, by reason (auth: a registry refused the login; pull: anything else)",
            m.failures.clone(),
        );
        m
    }

    fn set(&self, image: &str, state: State) {
        for s in State::ALL {
            let labels = vec![
                ("image".to_string(), image.to_string()),
                ("state".to_string(), s.as_str().to_string()),
            ];
            self.state.get_or_create(&labels).set(i64::from(s == state));
        }
        if state != State::Failed {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_success
                .get_or_create(&vec![("image".to_string(), image.to_string())])
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    fn failed(&self, image: &str, auth: bool) {
        let reason = if auth { "auth" } else { "pull" };
        self.failures
            .get_or_create(&vec![
                ("image".to_string(), image.to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .inc();
    }
}

/// One image's outcome in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The image as configured.
    pub image: String,
    /// Where it stands.
    pub state: State,
    /// What happened: `present`, `pulled via registry …`, or the failure.
    pub detail: String,
}

/// Keeps the configured images present and pinned.
pub struct PrePuller {
    runtime: Arc<dyn ImageRuntime>,
    images: Vec<PrePullImage>,
    spec: ImagesSpec,
    mirrors: Vec<RegistryMirror>,
    metrics: ImageMetrics,
    retry: Retry,
}

impl std::fmt::Debug for PrePuller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrePuller")
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

impl PrePuller {
    /// A pre-puller for `spec.images.prePull`, pulling through `mirrors` with the logins
    /// of `spec.images.credentials`.
    pub fn new(
        runtime: Arc<dyn ImageRuntime>,
        spec: &ImagesSpec,
        mirrors: &[RegistryMirror],
        metrics: ImageMetrics,
    ) -> Self {
        for p in &spec.pre_pull {
            // 0 = never, until the first pass finds it.
            drop(
                metrics
                    .last_success
                    .get_or_create(&vec![("image".to_string(), p.image.clone())]),
            );
        }
        Self {
            runtime,
            images: spec.pre_pull.clone(),
            spec: spec.clone(),
            mirrors: mirrors.to_vec(),
            metrics,
            retry: Retry {
                rounds: 1,
                first_wait: Duration::ZERO,
            },
        }
    }

    /// Check every image once: pull what is missing, pin what is not pinned.
    pub async fn pass(&self, say: &mut (dyn FnMut(String) + Send)) -> Vec<Outcome> {
        let mut out = Vec::new();
        for image in &self.images {
            let outcome = self.one(image, say).await;
            self.metrics.set(&image.image, outcome.state);
            out.push(outcome);
        }
        out
    }

    async fn one(&self, wanted: &PrePullImage, say: &mut (dyn FnMut(String) + Send)) -> Outcome {
        let image = wanted.image.as_str();
        // containerd names images by their normalized reference (docker.io/library/…).
        let name = ImageRef::parse(image).map_or_else(|_| image.to_string(), |r| r.normalized());
        let outcome = |state, detail: String| Outcome {
            image: image.to_string(),
            state,
            detail,
        };
        let detail = match self.runtime.status(&name).await {
            Ok(Some(info)) if info.pinned => {
                return outcome(State::Ready, "present, pinned".into());
            }
            Ok(Some(_)) => "present".to_string(),
            Ok(None) => {
                // The image's own login, when it names one, for its registry only.
                let own = match wanted.credentials_file.as_deref() {
                    Some(file) => match read_login(std::path::Path::new(file)) {
                        Ok(login) => Some(RegistryAuth {
                            username: login.username,
                            password: login.password,
                            ..RegistryAuth::default()
                        }),
                        Err(e) => {
                            self.metrics.failed(image, true);
                            return outcome(State::Failed, e.to_string());
                        }
                    },
                    None => None,
                };
                match pull(
                    &*self.runtime,
                    image,
                    &self.spec,
                    &self.mirrors,
                    own,
                    self.retry,
                    say,
                )
                .await
                {
                    Ok((_, via)) => format!("pulled via {via}"),
                    Err(e) => {
                        let auth = matches!(e, ImagesError::Pull { auth: true, .. });
                        self.metrics.failed(image, auth);
                        return outcome(State::Failed, e.to_string());
                    }
                }
            }
            Err(e) => {
                self.metrics.failed(image, false);
                return outcome(State::Failed, e.to_string());
            }
        };
        match self.runtime.pin(&name).await {
            Ok(Pinned::Yes) => outcome(State::Ready, format!("{detail}, pinned")),
            Ok(Pinned::LabelOnly) => outcome(
                State::Unpinned,
                format!(
                    "{detail}; labelled pinned, but this containerd does not honour pins (1.7 or later does): the kubelet may garbage-collect it"
                ),
            ),
            Err(e) => outcome(State::Unpinned, format!("{detail}; pinning failed: {e}")),
        }
    }

    /// The daemon's loop: a pass now, then every `interval`, and at once when containerd
    /// answers again after not answering; until `shutdown`.
    pub async fn run(&self, interval: Duration, shutdown: CancellationToken) {
        let probe = Duration::from_secs(15).min(interval);
        let mut since_pass = Duration::MAX;
        let mut was_up = true;
        loop {
            let up = self.runtime.version().await.is_ok();
            if !up && was_up {
                tracing::warn!(
                    "containerd does not answer; pre-pulled images are checked again when it is back"
                );
            }
            // A pass also while containerd is away (every image then reports failed), so
            // the state never claims what nobody checked.
            if since_pass >= interval || (up && !was_up) {
                for o in self.pass(&mut |line| tracing::info!("{line}")).await {
                    match o.state {
                        State::Failed => {
                            tracing::warn!(image = %o.image, "pre-pull failed: {}", o.detail)
                        }
                        State::Unpinned => tracing::warn!(image = %o.image, "{}", o.detail),
                        State::Ready => tracing::debug!(image = %o.image, "{}", o.detail),
                    }
                }
                since_pass = Duration::ZERO;
            }
            was_up = up;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(probe) => since_pass = since_pass.saturating_add(probe),
            }
        }
    }
}

/// The daemon's `images` subsystem: ready at once (a pull never holds readiness), then
/// [`PrePuller::run`] on containerd at `socket` until shutdown.
pub async fn subsystem(
    socket: std::path::PathBuf,
    agent: hybridlet_config::AgentSpec,
    metrics: ImageMetrics,
    ctx: hybridlet_runtime::SubsystemContext,
) -> Result<(), hybridlet_runtime::BoxError> {
    let runtime = Arc::new(hybridlet_cri::Containerd::new(
        socket,
        Duration::from_secs(1800),
    ));
    let puller = PrePuller::new(runtime, &agent.images, &agent.registry_mirrors, metrics);
    ctx.ready.set_ready();
    puller
        .run(agent.images.check_interval.get(), ctx.shutdown)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_cri::FakeRuntime;

    fn spec(images: &[&str]) -> ImagesSpec {
        ImagesSpec {
            pre_pull: images
                .iter()
                .map(|i| PrePullImage {
                    image: (*i).into(),
                    credentials_file: None,
                })
                .collect(),
            ..ImagesSpec::default()
        }
    }

    fn scrape(registry: &Registry) -> String {
        let mut out = String::new();
        hybridlet_metrics::prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[tokio::test]
    async fn pulls_pins_and_reports_failures_without_stopping() {
        let rt = Arc::new(FakeRuntime::new("1.7.24"));
        rt.fail_next_pull(
            "harbor.example.com/ml/bad:1",
            hybridlet_cri::Code::Unknown,
            "401 Unauthorized",
        );
        let mut registry = Registry::with_prefix("hybridlet");
        let metrics = ImageMetrics::register(&mut registry);
        let p = PrePuller::new(
            rt.clone(),
            &spec(&["busybox:1", "harbor.example.com/ml/bad:1"]),
            &[],
            metrics,
        );
        let out = p.pass(&mut |_| {}).await;
        assert_eq!(out[0].state, State::Ready, "{out:?}");
        assert_eq!(rt.pulls()[0].0, "busybox:1");
        let held = rt.status("docker.io/library/busybox:1").await.unwrap();
        assert!(
            held.is_some_and(|i| i.pinned),
            "pinned under its normalized name"
        );
        assert_eq!(out[1].state, State::Failed);
        let text = scrape(&registry);
        assert!(
            text.contains(
                r#"hybridlet_image_prepull{image="harbor.example.com/ml/bad:1",state="failed"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"hybridlet_image_prepull_failures_total{image="harbor.example.com/ml/bad:1",reason="auth"} 1"#), "{text}");
        // The next pass pulls the failed one again; nothing else is pulled twice.
        let out = p.pass(&mut |_| {}).await;
        assert_eq!(out[1].state, State::Ready);
        assert_eq!(rt.pulls().len(), 3);
    }

    /// The daemon's loop: a pass at start, then at the interval; when containerd comes
    /// back after an outage (a restart, an upgrade that lost the image), at once rather
    /// than at the next interval.
    #[tokio::test(start_paused = true)]
    async fn a_containerd_that_comes_back_is_checked_at_once() {
        let rt = Arc::new(FakeRuntime::new("1.7.24"));
        let mut registry = Registry::default();
        let metrics = ImageMetrics::register(&mut registry);
        let p = Arc::new(PrePuller::new(
            rt.clone(),
            &spec(&["busybox:1"]),
            &[],
            metrics,
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (p, stop) = (p.clone(), stop.clone());
            async move { p.run(Duration::from_secs(3600), stop).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rt.pulls().len(), 1, "the first pass pulls");
        // containerd restarts with an empty store (the image is gone).
        rt.set_down(true);
        rt.remove("busybox:1");
        tokio::time::sleep(Duration::from_secs(20)).await;
        rt.set_down(false);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(
            rt.pulls().len(),
            2,
            "pulled again as soon as containerd answered"
        );
        assert!(
            rt.status("busybox:1")
                .await
                .unwrap()
                .is_some_and(|i| i.pinned)
        );
        stop.cancel();
        task.await.unwrap();
    }

    /// An image with its own login: that login, for its registry only.
    #[tokio::test]
    async fn an_image_with_its_own_login_pulls_with_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nvcr.json");
        std::fs::write(&file, r#"{"username":"$oauthtoken","password":"nv-key"}"#).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let rt = Arc::new(FakeRuntime::new("1.7.24"));
        let spec = ImagesSpec {
            pre_pull: vec![
                PrePullImage {
                    image: "nvcr.io/nvidia/cuda:12.4.1-base".into(),
                    credentials_file: Some(file.display().to_string()),
                },
                PrePullImage {
                    image: "nvcr.io/nvidia/dcgm:4".into(),
                    credentials_file: Some("/nonexistent/login.json".into()),
                },
            ],
            ..ImagesSpec::default()
        };
        let p = PrePuller::new(rt.clone(), &spec, &[], ImageMetrics::default());
        let out = p.pass(&mut |_| {}).await;
        assert_eq!(out[0].state, State::Ready, "{out:?}");
        let (_, auth) = &rt.pulls()[0];
        let auth = auth.as_ref().unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.server_address.as_str()),
            ("$oauthtoken", "https://nvcr.io")
        );
        // A login file that cannot be read fails that image only, naming the file.
        assert_eq!(out[1].state, State::Failed);
        assert!(
            out[1].detail.contains("/nonexistent/login.json"),
            "{}",
            out[1].detail
        );
        assert_eq!(rt.pulls().len(), 1);
    }
}
