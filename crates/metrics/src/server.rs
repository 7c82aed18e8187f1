use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hybridlet_runtime::{CancellationToken, Readiness};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::AgentMetrics;
use crate::format::Format;

/// Slow or idle clients must not hold connections open forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight requests get this long to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (spec.admin.listenAddress): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("spec.admin.tls: {message}")]
    Tls {
        /// What is wrong (file and reason).
        message: String,
    },
    /// Accepting connections failed.
    #[error("accepting admin connections on {addr}: {source}")]
    Accept {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Shared {
    registry: Arc<Registry>,
    readiness: Readiness,
    metrics: AgentMetrics,
}

/// The admin server's TLS setting, shared with whoever rotates it: each new connection
/// takes the current one (HTTPS with it, or plain HTTP when there is none), so a reload
/// swaps certificates without closing the listener or dropping open connections.
#[derive(Clone, Default)]
pub struct AdminTls(Arc<std::sync::RwLock<Option<Arc<rustls::ServerConfig>>>>);

impl AdminTls {
    /// Starting with `config` (`None`: plain HTTP).
    pub fn new(config: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(config)))
    }

    /// Use `config` for connections accepted from now on.
    pub fn set(&self, config: Option<Arc<rustls::ServerConfig>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    /// The setting new connections get.
    pub fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls")
            .field("enabled", &self.current().is_some())
            .finish()
    }
}

/// The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: AdminTls,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A TLS handshake that takes longer than this is dropped (a stuck client must not hold
/// a connection slot).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A rustls server configuration from PEM files: the certificate chain (leaf first) and
/// its private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, AdminServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |message: String| AdminServerError::Tls { message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls(format!("certFile {}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(tls(format!(
            "certFile {}: no certificate in it",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| tls(format!("keyFile {}: {e}", key_file.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        tls(format!(
            "certFile and keyFile do not form a usable pair: {e}"
        ))
    })?;
    Ok(Arc::new(config))
}

/// Where the admin server listens.
#[derive(Debug)]
pub enum AdminListener {
    /// Bind this address when the subsystem starts.
    Address(SocketAddr),
    /// Already bound (by a reload, before the old server stopped).
    Bound(std::net::TcpListener),
}

/// What the admin subsystem serves: the registry, readiness, its own metrics and the TLS
/// setting (read again at every reload).
#[derive(Debug, Clone)]
pub struct AdminParts {
    /// The metrics registry.
    pub registry: Arc<Registry>,
    /// The daemon's readiness.
    pub readiness: Readiness,
    /// The agent's own families.
    pub metrics: AgentMetrics,
    /// HTTPS or not.
    pub tls: AdminTls,
}

impl AdminServer {
    /// The admin server as a subsystem: listen on `listener`, serve until shutdown, ready
    /// once listening (after `startup_delay`, a testing aid that holds readiness back).
    pub async fn subsystem(
        listener: AdminListener,
        parts: AdminParts,
        startup_delay: Option<Duration>,
        ctx: hybridlet_runtime::SubsystemContext,
    ) -> Result<(), hybridlet_runtime::BoxError> {
        let AdminParts {
            registry,
            readiness,
            metrics,
            tls,
        } = parts;
        let server = match listener {
            AdminListener::Address(addr) => Self::bind(addr, registry, readiness, metrics).await?,
            AdminListener::Bound(l) => Self::from_listener(l, registry, readiness, metrics)?,
        }
        .with_tls_setting(tls);
        tracing::info!(address = %server.local_addr(), tls = server.is_tls(), "admin server listening (/metrics, /healthz, /readyz)");
        let serve = tokio::spawn(server.serve(ctx.shutdown.clone()));
        if let Some(delay) = startup_delay {
            tracing::warn!(?delay, "start-up delay requested (testing aid)");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = ctx.shutdown.cancelled() => {}
            }
        }
        if !ctx.shutdown.is_cancelled() {
            ctx.ready.set_ready();
        }
        serve.await??;
        Ok(())
    }

    /// Bind the listen address.
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        readiness: Readiness,
        metrics: AgentMetrics,
    ) -> Result<Self, AdminServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminServerError::Bind { addr, source })?;
        Self::on(listener, addr, registry, readiness, metrics)
    }

    /// Serve on a listener bound beforehand (a reload binds the new address first, so a
    /// taken port is refused while the old server still runs).
    pub fn from_listener(
        listener: std::net::TcpListener,
        registry: Arc<Registry>,
        readiness: Readiness,
        metrics: AgentMetrics,
    ) -> Result<Self, AdminServerError> {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
            .map_err(|source| AdminServerError::Bind { addr, source })?;
        Self::on(listener, addr, registry, readiness, metrics)
    }

    fn on(
        listener: TcpListener,
        addr: SocketAddr,
        registry: Arc<Registry>,
        readiness: Readiness,
        metrics: AgentMetrics,
    ) -> Result<Self, AdminServerError> {
        let addr = listener
            .local_addr()
            .map_err(|source| AdminServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            addr,
            shared: Arc::new(Shared {
                registry,
                readiness,
                metrics,
            }),
            tls: AdminTls::default(),
        })
    }

    /// Serve HTTPS with `config` instead of plain HTTP.
    pub fn with_tls(self, config: Arc<rustls::ServerConfig>) -> Self {
        self.with_tls_setting(AdminTls::new(Some(config)))
    }

    /// Take the TLS setting from `tls` at each connection (rotation).
    pub fn with_tls_setting(mut self, tls: AdminTls) -> Self {
        self.tls = tls;
        self
    }

    /// Whether it serves HTTPS now.
    pub fn is_tls(&self) -> bool {
        self.tls.current().is_some()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `shutdown` is cancelled, then let in-flight requests finish.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), AdminServerError> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        // Per-connection errors (e.g. the peer reset before accept) are
                        // not fatal; running out of descriptors is worth a warning.
                        Err(e) if is_transient(&e) => {
                            tracing::warn!(error = %e, "admin accept failed; continuing");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        Err(source) => return Err(AdminServerError::Accept { addr: self.addr, source }),
                    };
                    let shared = self.shared.clone();
                    let stop = shutdown.clone();
                    let tls = self.tls.current().map(tokio_rustls::TlsAcceptor::from);
                    connections.spawn(async move {
                        match tls {
                            None => serve_connection(stream, shared, stop, peer).await,
                            Some(acceptor) => {
                                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(tls_stream)) => serve_connection(tls_stream, shared, stop, peer).await,
                                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin TLS handshake failed"),
                                    Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                                }
                            }
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("admin connections still open after {DRAIN_TIMEOUT:?}; closing them");
            connections.abort_all();
        }
        Ok(())
    }
}

/// One HTTP/1.1 connection (plain or TLS) until it ends or shutdown asks it to.
async fn serve_connection<IO>(
    io: IO,
    shared: Arc<Shared>,
    stop: CancellationToken,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, &req)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (route, response) = if !matches!(*req.method(), Method::GET | Method::HEAD) {
        (
            "other",
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n".to_string(),
            ),
        )
    } else {
        match path {
            "/metrics" => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                ("/metrics", metrics(shared, Format::negotiate(accept)))
            }
            "/healthz" | "/livez" => ("/healthz", text(StatusCode::OK, "ok\n".to_string())),
            "/readyz" => ("/readyz", readyz(shared)),
            _ => (
                "other",
                text(
                    StatusCode::NOT_FOUND,
                    "not found; try /metrics, /healthz or /readyz\n".to_string(),
                ),
            ),
        }
    };
    shared
        .metrics
        .admin_requests
        .get_or_create(&vec![
            ("route".to_string(), route.to_string()),
            ("code".to_string(), response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

fn metrics(shared: &Shared, format: Format) -> Response<Full<Bytes>> {
    match crate::encode(&shared.registry) {
        Ok(body) => {
            let body = match format {
                Format::OpenMetrics => body,
                Format::Text => crate::format::to_text_0_0_4(&body),
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            resp.headers_mut()
                .insert(header::VARY, header::HeaderValue::from_static("accept"));
            resp
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n".to_string(),
        ),
    }
}

fn readyz(shared: &Shared) -> Response<Full<Bytes>> {
    let snapshot = shared.readiness.snapshot();
    let mut body = String::new();
    for c in &snapshot {
        let state = if c.ready { "ready" } else { "not ready" };
        body.push_str(&format!("{}: {state}", c.name));
        if let Some(reason) = c.reason.as_ref().filter(|_| !c.ready) {
            body.push_str(&format!(" ({reason})"));
        }
        body.push('\n');
    }
    if shared.readiness.is_ready() {
        text(StatusCode::OK, body)
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
