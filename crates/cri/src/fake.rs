//! An in-memory [`ImageRuntime`] for tests: images pulled, logins seen, scripted failures.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::{CriError, ImageInfo, ImageRuntime, Pinned, RegistryAuth, RuntimeVersion};

/// What the fake holds.
#[derive(Debug, Default)]
struct State {
    images: BTreeMap<String, ImageInfo>,
    failures: VecDeque<(String, tonic::Code, String)>,
    pulls: Vec<(String, Option<RegistryAuth>)>,
    /// When set, pinning sets the label only (containerd before 1.7).
    label_only: bool,
    down: bool,
    version: String,
}

/// A runtime in memory.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    /// An empty runtime reporting containerd `version`.
    pub fn new(version: &str) -> Self {
        let fake = Self::default();
        fake.lock().version = version.to_string();
        fake
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next pull of `image` fails with `code` and `message`.
    pub fn fail_next_pull(&self, image: &str, code: tonic::Code, message: &str) {
        self.lock()
            .failures
            .push_back((image.to_string(), code, message.to_string()));
    }

    /// Pins set the label only, as on containerd before 1.7.
    pub fn label_only_pins(&self) {
        self.lock().label_only = true;
    }

    /// Stop (or start) answering, as a stopped containerd.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Forget an image (the kubelet's garbage collection, an `rmi`).
    pub fn remove(&self, image: &str) {
        self.lock().images.remove(&normalized(image));
    }

    /// Every pull asked for, with its login.
    pub fn pulls(&self) -> Vec<(String, Option<RegistryAuth>)> {
        self.lock().pulls.clone()
    }

    fn up(&self) -> Result<MutexGuard<'_, State>, CriError> {
        let state = self.lock();
        if state.down {
            return Err(CriError::Connect {
                socket: "fake".into(),
                message: "connection refused".into(),
            });
        }
        Ok(state)
    }
}

/// The name containerd keeps an image under (`busybox:1` → `docker.io/library/busybox:1`).
fn normalized(image: &str) -> String {
    hybridlet_config::ImageRef::parse(image).map_or_else(|_| image.to_string(), |r| r.normalized())
}

#[tonic::async_trait]
impl ImageRuntime for FakeRuntime {
    async fn version(&self) -> Result<RuntimeVersion, CriError> {
        let state = self.up()?;
        Ok(RuntimeVersion {
            name: "containerd".into(),
            version: state.version.clone(),
            api_version: "v1".into(),
        })
    }

    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<String, CriError> {
        let mut state = self.up()?;
        state.pulls.push((image.to_string(), auth.cloned()));
        let scripted = state.failures.iter().position(|(name, _, _)| name == image);
        if let Some((_, code, message)) = scripted.and_then(|i| state.failures.remove(i)) {
            return Err(CriError::Call {
                call: "PullImage",
                image: image.to_string(),
                code,
                message,
            });
        }
        let id = format!("sha256:{:064x}", image.len() * 7919 + state.images.len());
        let name = normalized(image);
        let info = state.images.entry(name.clone()).or_insert(ImageInfo {
            id: id.clone(),
            repo_tags: vec![name],
            repo_digests: Vec::new(),
            size: 1024,
            pinned: false,
        });
        Ok(info.id.clone())
    }

    async fn status(&self, image: &str) -> Result<Option<ImageInfo>, CriError> {
        Ok(self.up()?.images.get(&normalized(image)).cloned())
    }

    async fn pin(&self, image: &str) -> Result<Pinned, CriError> {
        let mut state = self.up()?;
        let label_only = state.label_only;
        let info = state
            .images
            .get_mut(&normalized(image))
            .ok_or_else(|| CriError::Call {
                call: "Images.Get",
                image: image.to_string(),
                code: tonic::Code::NotFound,
                message: format!("image \"{image}\": not found"),
            })?;
        if label_only {
            return Ok(Pinned::LabelOnly);
        }
        info.pinned = true;
        Ok(Pinned::Yes)
    }
}
