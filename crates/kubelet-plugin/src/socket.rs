use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};

use hybridlet_runtime::CancellationToken;
use tokio::net::UnixListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use crate::PluginMetrics;
use crate::conn::{KubeletConnection, SocketObserver};

/// Problems creating or serving a plugin socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something other than a socket is at the path; it is not ours to remove.
    #[error("{}: exists and is not a socket; refusing to remove it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live process answers on the socket: another instance is running.
    #[error("{}: another process is serving this socket (is a second hybridlet running?)", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Unix socket paths are limited to 107 bytes.
    #[error("{}: socket path is {len} bytes; Unix sockets allow at most 107", path.display())]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// An IO step failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server on {}: {message}", path.display())]
    Serve {
        /// The socket.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io { step, path, source }
}

/// A bound plugin socket. Call [`serve`] to run a gRPC router on it; the socket file is
/// removed when serving ends.
#[derive(Debug)]
pub struct PluginSocket {
    path: PathBuf,
    listener: UnixListener,
    metrics: Option<PluginMetrics>,
}

impl PluginSocket {
    /// Bind `path` (see the crate docs for the safety rules). Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        let len = path.as_os_str().len();
        if len > 107 {
            return Err(SocketError::TooLong {
                path: path.to_path_buf(),
                len,
            });
        }
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("creating directory", dir))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(_) => {
                    tracing::info!(path = %path.display(), "removing stale socket left by an earlier run");
                    std::fs::remove_file(path).map_err(io_err("removing stale socket", path))?;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspecting", path)(e)),
        }
        // bind(2) creates the file before listen(2) runs, and a client dialing in between
        // (the kubelet's plugin watcher reacts to the file) gets ECONNREFUSED. So bind and
        // listen under a temporary name, set the mode, then rename: the socket appears
        // complete, listening and 0600, in one step.
        // The name is unique per bind, not per process: one process binds several sockets
        // in the same directory at once (CSI and both DRA drivers in plugins_registry).
        static BINDS: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_file_name(format!(
            ".{}-{}.sock",
            std::process::id(),
            BINDS.fetch_add(1, Ordering::Relaxed)
        ));
        let listener = if tmp.as_os_str().len() <= 107 {
            let _ = std::fs::remove_file(&tmp);
            let listener = UnixListener::bind(&tmp).map_err(io_err("binding", &tmp))?;
            let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err("setting permissions on", &tmp))
                .and_then(|()| {
                    std::fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
                });
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            listener
        } else {
            let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err("setting permissions on", path))?;
            listener
        };
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            metrics: None,
        })
    }

    /// Count requests refused on this socket in `metrics` (they are logged either way).
    pub fn with_metrics(mut self, metrics: &PluginMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serve `router` on `socket` until `shutdown` is cancelled, then remove the socket file.
///
/// Every connection goes through [`KubeletConnection`], so any `:authority` a Unix-socket
/// client sends is served (see `conn.rs`), and refusals below gRPC are logged and counted.
pub async fn serve(
    socket: PluginSocket,
    router: tonic::transport::server::Router,
    shutdown: CancellationToken,
) -> Result<(), SocketError> {
    let PluginSocket {
        path,
        listener,
        metrics,
    } = socket;
    let observer = SocketObserver::new(&path, metrics);
    let incoming = UnixListenerStream::new(listener)
        .map(move |conn| conn.map(|c| KubeletConnection::new(c, observer.clone())));
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    // Remove our socket whatever happened: a socket left behind would look like a live
    // plugin to the kubelet's watcher until it times out.
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove plugin socket");
    }
    result.map_err(|e| SocketError::Serve {
        path,
        message: e.to_string(),
    })
}

/// A gRPC channel to a plugin socket: how the kubelet (and hybridlet's own checks) reach a
/// plugin. The URI is a placeholder; every connection goes to `path`.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://plugin.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
