//! [`ImageRuntime`] on containerd's socket: CRI (`runtime.v1`) for the version, pulls and
//! status, containerd's image service for the pinned label.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hybridlet_proto::containerd_images::{self as images, images_client::ImagesClient};
use hybridlet_proto::cri::runtime_service_client::RuntimeServiceClient;
use hybridlet_proto::cri::{self, image_service_client::ImageServiceClient};
use tonic::transport::Channel;

use crate::{
    CriError, ImageInfo, ImageRuntime, PINNED_LABEL, PINNED_VALUE, Pinned, RegistryAuth,
    RuntimeVersion,
};

/// containerd at a socket.
#[derive(Debug, Clone)]
pub struct Containerd {
    socket: PathBuf,
    /// Bound on a pull (layers can be large).
    pull_timeout: Duration,
    /// Bound on every other call.
    call_timeout: Duration,
}

impl Containerd {
    /// containerd at `socket`; a pull may take `pull_timeout`.
    pub fn new(socket: impl Into<PathBuf>, pull_timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            pull_timeout,
            call_timeout: Duration::from_secs(10),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn channel(&self) -> Result<Channel, CriError> {
        let path = self.socket.clone();
        let endpoint = tonic::transport::Endpoint::from_static("http://containerd.invalid");
        let connect =
            endpoint.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        match tokio::time::timeout(self.call_timeout, connect).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(CriError::Connect {
                socket: self.socket.display().to_string(),
                message: hybridlet_runtime::error_chain(&e),
            }),
            Err(_) => Err(CriError::Connect {
                socket: self.socket.display().to_string(),
                message: format!("no connection within {:?}", self.call_timeout),
            }),
        }
    }

    async fn bounded<T>(
        &self,
        call: &'static str,
        image: &str,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(CriError::Call {
                call,
                image: image.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(CriError::Timeout {
                call,
                image: image.to_string(),
                limit,
            }),
        }
    }
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// A request in the CRI plugin's namespace.
fn namespaced<T>(body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        images::NAMESPACE_HEADER,
        tonic::metadata::MetadataValue::from_static(images::CRI_NAMESPACE),
    );
    request
}

#[tonic::async_trait]
impl ImageRuntime for Containerd {
    async fn version(&self) -> Result<RuntimeVersion, CriError> {
        let mut client = RuntimeServiceClient::new(self.channel().await?);
        let v = self
            .bounded(
                "Version",
                "",
                self.call_timeout,
                client.version(cri::VersionRequest {
                    version: "v1".into(),
                }),
            )
            .await?;
        Ok(RuntimeVersion {
            name: v.runtime_name,
            version: v.runtime_version,
            api_version: v.runtime_api_version,
        })
    }

    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<String, CriError> {
        let mut client = ImageServiceClient::new(self.channel().await?);
        let request = cri::PullImageRequest {
            image: spec(image),
            auth: auth.map(|a| cri::AuthConfig {
                username: a.username.clone(),
                password: a.password.clone(),
                auth: a.auth.clone(),
                server_address: a.server_address.clone(),
                ..Default::default()
            }),
        };
        let answer = self
            .bounded(
                "PullImage",
                image,
                self.pull_timeout,
                client.pull_image(request),
            )
            .await?;
        Ok(answer.image_ref)
    }

    async fn status(&self, image: &str) -> Result<Option<ImageInfo>, CriError> {
        let mut client = ImageServiceClient::new(self.channel().await?);
        let answer = self
            .bounded(
                "ImageStatus",
                image,
                self.call_timeout,
                client.image_status(cri::ImageStatusRequest {
                    image: spec(image),
                    verbose: false,
                }),
            )
            .await?;
        Ok(answer.image.map(|i| ImageInfo {
            id: i.id,
            repo_tags: i.repo_tags,
            repo_digests: i.repo_digests,
            size: i.size,
            pinned: i.pinned,
        }))
    }

    async fn pin(&self, image: &str) -> Result<Pinned, CriError> {
        let mut client = ImagesClient::new(self.channel().await?);
        let got = self
            .bounded(
                "Images.Get",
                image,
                self.call_timeout,
                client.get(namespaced(images::GetImageRequest {
                    name: image.to_string(),
                })),
            )
            .await?;
        let mut record = got.image.ok_or_else(|| CriError::Call {
            call: "Images.Get",
            image: image.to_string(),
            code: tonic::Code::NotFound,
            message: "containerd answered without the image".into(),
        })?;
        if record.labels.get(PINNED_LABEL).map(String::as_str) != Some(PINNED_VALUE) {
            record
                .labels
                .insert(PINNED_LABEL.to_string(), PINNED_VALUE.to_string());
            // Only the one label: the mask names it, so other labels are left as they are.
            let mask = prost_types::FieldMask {
                paths: vec![format!("labels.{PINNED_LABEL}")],
            };
            self.bounded(
                "Images.Update",
                image,
                self.call_timeout,
                client.update(namespaced(images::UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(mask),
                })),
            )
            .await?;
        }
        // containerd's CRI plugin learns of the label through the image event; ask it.
        let mut pinned = false;
        for _ in 0..10 {
            if self.status(image).await?.is_some_and(|i| i.pinned) {
                pinned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(if pinned {
            Pinned::Yes
        } else {
            Pinned::LabelOnly
        })
    }
}
