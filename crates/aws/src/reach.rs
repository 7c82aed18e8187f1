//! Can this node reach an AWS endpoint (SSM, IAM Roles Anywhere, STS, EKS) the way its
//! agents will: name resolution, TCP, an HTTP proxy's CONNECT tunnel when one is
//! configured, and a TLS handshake verified with the system's roots. Each failure names
//! the step, so `hybridlet check` can say whether DNS, the route, the proxy or TLS
//! interception is the problem.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReachStep {
    /// The URL or the proxy setting is unusable.
    Address,
    /// The host (or the proxy's host) does not resolve.
    Dns,
    /// No TCP connection (to the host, or to the proxy).
    Tcp,
    /// The proxy refused or broke the tunnel.
    Proxy,
    /// The TLS handshake failed (a middlebox with its own certificate, a wrong host).
    Tls,
}

impl ReachStep {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ReachStep::Address => "address",
            ReachStep::Dns => "DNS",
            ReachStep::Tcp => "TCP",
            ReachStep::Proxy => "proxy",
            ReachStep::Tls => "TLS",
        }
    }
}

/// How the endpoint was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    /// `host:port` of the endpoint.
    pub endpoint: String,
    /// The proxy it went through, if any.
    pub via_proxy: Option<String>,
}

fn host_port(url: &str, default_port: u16) -> Result<(String, u16, bool), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = uri.scheme_str() != Some("http");
    Ok((host, uri.port_u16().unwrap_or(default_port), tls))
}

/// Whether `host` is excluded from the proxy by `no_proxy` entries (`.suffix`,
/// `suffix`, exact names or addresses, `*`).
pub fn bypasses_proxy(host: &str, no_proxy: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    no_proxy.iter().any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        if e.is_empty() {
            return false;
        }
        if e == "*" {
            return true;
        }
        if let Ok(net) = e.parse::<ipnet::IpNet>()
            && let Ok(ip) = host.parse::<std::net::IpAddr>()
        {
            return net.contains(&ip);
        }
        let e = e.trim_start_matches('.');
        host == e || host.ends_with(&format!(".{e}"))
    })
}

async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, (ReachStep, String)> {
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return Err((ReachStep::Dns, format!("{host}: {e}"))),
            Err(_) => {
                return Err((
                    ReachStep::Dns,
                    format!("{host}: no answer within {timeout:?}"),
                ));
            }
        };
    let mut last = format!("{host}: no addresses");
    for a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within {timeout:?}"),
        }
    }
    Err((ReachStep::Tcp, last))
}

/// `scheme://user:password@host` → (`scheme://host` for messages, `user:password`
/// percent-decoded for `Proxy-Authorization`).
fn split_credentials(proxy: &str) -> (String, Option<String>) {
    let (scheme, rest) = proxy.split_once("://").unwrap_or(("http", proxy));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        None => (proxy.to_string(), None),
        Some(at) => (
            format!("{scheme}://{}", &rest[at + 1..]),
            Some(percent_decode(&rest[..at])),
        ),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Open a CONNECT tunnel to `host:port` through the proxy at `stream` (`proxy` is shown
/// in messages without credentials; `credentials` go in `Proxy-Authorization`).
async fn tunnel(
    stream: &mut TcpStream,
    proxy: &str,
    credentials: Option<&str>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(), (ReachStep, String)> {
    use base64::Engine as _;
    let auth = credentials
        .map(|c| {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        })
        .unwrap_or_default();
    let request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n");
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        // Read the status line and headers, up to the blank line, byte by byte so that
        // nothing of the tunnelled stream is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            if stream.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            (
                ReachStep::Proxy,
                format!("{proxy}: no answer to CONNECT within {timeout:?}"),
            )
        })?
        .map_err(|e| (ReachStep::Proxy, format!("{proxy}: {e}")))?;
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or("").trim().to_string();
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        Ok(())
    } else if code == "407" {
        Err((
            ReachStep::Proxy,
            format!(
                "{proxy} wants authentication for CONNECT {host}:{port} ({status:?}){}",
                if credentials.is_some() {
                    ": the user and password in spec.proxy were refused"
                } else {
                    ": put them in spec.proxy (http://user:password@proxy:port)"
                }
            ),
        ))
    } else if status.is_empty() {
        Err((
            ReachStep::Proxy,
            format!("{proxy} closed the connection on CONNECT {host}:{port}"),
        ))
    } else {
        Err((
            ReachStep::Proxy,
            format!("{proxy} answered CONNECT {host}:{port} with {status:?}"),
        ))
    }
}

/// The system's trust roots.
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

/// Reach `url` (`https://host[:port]`), through `proxy` (`http://host:port`) unless
/// `no_proxy` exempts the host, verifying TLS with `roots`; each step bounded by
/// `timeout`.
pub async fn reach(
    url: &str,
    proxy: Option<&str>,
    no_proxy: &[String],
    roots: rustls::RootCertStore,
    timeout: Duration,
) -> Result<Reached, (ReachStep, String)> {
    let (host, port, tls) = host_port(url, 443).map_err(|e| (ReachStep::Address, e))?;
    let proxy = proxy.filter(|_| !bypasses_proxy(&host, no_proxy));
    let mut stream = match proxy {
        None => connect(&host, port, timeout).await?,
        Some(p) => {
            let (shown, credentials) = split_credentials(p);
            let (phost, pport, _) =
                host_port(&shown, 3128).map_err(|e| (ReachStep::Address, format!("proxy {e}")))?;
            let mut s = connect(&phost, pport, timeout)
                .await
                .map_err(|(step, e)| (step, format!("proxy {e}")))?;
            tunnel(&mut s, &shown, credentials.as_deref(), &host, port, timeout).await?;
            s
        }
    };
    let reached = Reached {
        endpoint: format!("{host}:{port}"),
        // Never the credentials.
        via_proxy: proxy.map(|p| split_credentials(p).0),
    };
    if !tls {
        return Ok(reached);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| (ReachStep::Tls, e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| (ReachStep::Address, format!("{host}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut session = tokio::time::timeout(timeout, connector.connect(name, &mut stream))
        .await
        .map_err(|_| {
            (
                ReachStep::Tls,
                format!("{host}: no TLS handshake within {timeout:?}"),
            )
        })?
        .map_err(|e| (ReachStep::Tls, format!("{host}: {e}")))?;
    let _ = session.shutdown().await;
    Ok(reached)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../metrics/tests/fixtures")
            .join(name)
    }

    /// A TLS server with the test certificate (its own CA, for 127.0.0.1 and localhost).
    async fn tls_server() -> u16 {
        let pem = |p: &str| std::fs::read(fixture(p)).unwrap();
        let certs: Vec<_> = rustls_pemfile_free(&pem("cert.pem"), "CERTIFICATE")
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::try_from(
            rustls_pemfile_free(&pem("key.pem"), "PRIVATE KEY").remove(0),
        )
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        port
    }

    /// PEM blocks of `label` as DER, without a PEM crate.
    fn rustls_pemfile_free(text: &[u8], label: &str) -> Vec<Vec<u8>> {
        use base64::Engine as _;
        let text = String::from_utf8_lossy(text);
        let mut out = Vec::new();
        let mut body: Option<String> = None;
        for line in text.lines() {
            if line.starts_with("-----BEGIN") && line.contains(label) {
                body = Some(String::new());
            } else if line.starts_with("-----END") {
                if let Some(b) = body.take() {
                    out.push(base64::engine::general_purpose::STANDARD.decode(b).unwrap());
                }
            } else if let Some(b) = body.as_mut() {
                b.push_str(line.trim());
            }
        }
        out
    }

    fn test_roots() -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pemfile_free(&std::fs::read(fixture("cert.pem")).unwrap(), "CERTIFICATE")
        {
            roots.add(der.into()).unwrap();
        }
        roots
    }

    async fn proxy(refuse: bool) -> String {
        hybridlet_fixtures::proxy::ConnectProxy::start(refuse).url
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn direct_and_through_a_proxy() {
        let port = tls_server().await;
        let url = format!("https://127.0.0.1:{port}");
        let r = reach(&url, None, &[], test_roots(), T).await.unwrap();
        assert_eq!(r.endpoint, format!("127.0.0.1:{port}"));
        assert_eq!(r.via_proxy, None);

        let p = proxy(false).await;
        let r = reach(&url, Some(&p), &[], test_roots(), T).await.unwrap();
        assert_eq!(r.via_proxy.as_deref(), Some(p.as_str()));

        // Exempt by NO_PROXY: straight there even with a refusing proxy.
        let refusing = proxy(true).await;
        let r = reach(
            &url,
            Some(&refusing),
            &["127.0.0.0/8".into()],
            test_roots(),
            T,
        )
        .await
        .unwrap();
        assert_eq!(r.via_proxy, None);
    }

    #[tokio::test]
    async fn each_failure_names_its_step() {
        let port = tls_server().await;
        let url = format!("https://127.0.0.1:{port}");
        // The system roots do not know the test CA: what TLS interception looks like.
        let (step, e) = reach(&url, None, &[], rustls::RootCertStore::empty(), T)
            .await
            .unwrap_err();
        assert_eq!(step, ReachStep::Tls, "{e}");
        let refusing = proxy(true).await;
        let (step, e) = reach(&url, Some(&refusing), &[], test_roots(), T)
            .await
            .unwrap_err();
        assert_eq!(step, ReachStep::Proxy);
        assert!(e.contains("403 Forbidden"), "{e}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let (step, e) = reach(&url, Some(&dead), &[], test_roots(), T)
            .await
            .unwrap_err();
        assert_eq!(step, ReachStep::Tcp);
        assert!(e.starts_with("proxy "), "{e}");
        // (No DNS failure case: resolving a name would leave loopback.)
        let (step, _) = reach("https://[::1", None, &[], test_roots(), T)
            .await
            .unwrap_err();
        assert_eq!(step, ReachStep::Address);
    }

    #[tokio::test]
    async fn proxy_credentials_are_sent_and_never_shown() {
        let port = tls_server().await;
        let url = format!("https://127.0.0.1:{port}");
        let proxy = hybridlet_fixtures::proxy::ConnectProxy::start_with_auth("svc:p@ss");
        let bare = proxy.url.clone();
        let with = bare.replace("http://", "http://svc:p%40ss@");
        let r = reach(&url, Some(&with), &[], test_roots(), T)
            .await
            .unwrap();
        assert_eq!(r.via_proxy.as_deref(), Some(bare.as_str()));
        let (step, e) = reach(&url, Some(&bare), &[], test_roots(), T)
            .await
            .unwrap_err();
        assert_eq!(step, ReachStep::Proxy);
        assert!(
            e.contains("wants authentication") && e.contains("spec.proxy"),
            "{e}"
        );
        let wrong = bare.replace("http://", "http://svc:nope@");
        let (_, e) = reach(&url, Some(&wrong), &[], test_roots(), T)
            .await
            .unwrap_err();
        assert!(e.contains("were refused") && !e.contains("nope"), "{e}");
        assert_eq!(percent_decode("a%40b%2"), "a@b%2");
    }

    #[test]
    fn no_proxy_matching() {
        let np: Vec<String> = ["localhost", ".svc", "10.0.0.0/8", "amazonaws.com"]
            .map(String::from)
            .to_vec();
        assert!(bypasses_proxy("ssm.us-west-2.amazonaws.com", &np));
        assert!(bypasses_proxy("kubernetes.default.svc", &np));
        assert!(bypasses_proxy("10.1.2.3", &np));
        assert!(!bypasses_proxy("11.1.2.3", &np));
        assert!(!bypasses_proxy("example.com", &np));
        assert!(!bypasses_proxy("notamazonaws.com", &np));
        assert!(bypasses_proxy("anything", &["*".into()]));
    }
}
