//! The admin server over real loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::sync::Arc;

use hybridlet_metrics::{AdminServer, AgentMetrics, BuildInfo, new_registry};
use hybridlet_runtime::{CancellationToken, Readiness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str, method: &str) -> (u16, String) {
    let (code, _, body) = get_with(addr, path, method, "").await;
    (code, body)
}

/// A request with extra header lines; the status, the header block and the body.
async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    method: &str,
    headers: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status: u16 = buf[9..12].parse().unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The Accept header Prometheus sends by default (scrape.go, 2.x and 3.x).
const PROMETHEUS_ACCEPT: &str = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";

#[tokio::test]
async fn serves_metrics_health_and_readiness() {
    let readiness = Readiness::new();
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "1.2.3".into(),
        commit: "abc".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "standalone", readiness.clone());
    let server = AdminServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(registry),
        readiness.clone(),
        metrics,
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.serve(stop.clone()));

    let admin = readiness.register("admin");
    let dra = readiness.register("dra-gpu");
    admin.set_ready();
    let (code, body) = get(addr, "/readyz", "GET").await;
    assert_eq!(code, 503);
    assert!(body.contains("dra-gpu: not ready (starting)"), "{body}");
    dra.set_ready();
    let (code, body) = get(addr, "/readyz", "GET").await;
    assert_eq!(code, 200, "{body}");

    assert_eq!(get(addr, "/healthz", "GET").await.0, 200);
    assert_eq!(get(addr, "/nope", "GET").await.0, 404);
    assert_eq!(get(addr, "/metrics", "POST").await.0, 405);

    let (code, head, body) = get_with(addr, "/metrics", "GET", PROMETHEUS_ACCEPT).await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    for needle in [
        "hybridlet_build_info{version=\"1.2.3\",commit=\"abc\",build_date=\"2026-12-04T00:00:00Z\"} 1",
        "hybridlet_config_info{mode=\"standalone\"} 1",
        "# TYPE hybridlet_uptime_seconds gauge",
        "# UNIT hybridlet_uptime_seconds seconds",
        "hybridlet_start_time_seconds ",
        "hybridlet_ready 1",
        "hybridlet_subsystem_up{subsystem=\"dra-gpu\"} 1",
        "hybridlet_subsystem_ready{subsystem=\"admin\"} 1",
        "hybridlet_admin_http_requests_total{route=\"/readyz\",code=\"503\"} 1",
        "# EOF",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
    }
    // A scraper that does not ask for OpenMetrics (curl, older Prometheus, Telegraf) gets
    // the 0.0.4 text format: no info type, no UNIT, no EOF.
    let (code, head, body) = get_with(addr, "/metrics", "GET", "Accept: */*\r\n").await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    for needle in [
        "# TYPE hybridlet_build_info gauge",
        "hybridlet_build_info{version=\"1.2.3\",commit=\"abc\",build_date=\"2026-12-04T00:00:00Z\"} 1",
        "# TYPE hybridlet_admin_http_requests_total counter",
        "hybridlet_admin_http_requests_total{route=\"/readyz\",code=\"503\"} 1",
        "# TYPE hybridlet_uptime_seconds gauge",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
    }
    for absent in ["# EOF", "# UNIT", " info\n", " unknown\n"] {
        assert!(!body.contains(absent), "{absent:?} in:\n{body}");
    }

    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test]
async fn bind_conflict_names_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let readiness = Readiness::new();
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "x".into(),
        commit: "y".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "standalone", readiness.clone());
    let err = AdminServer::bind(addr, Arc::new(registry), readiness, metrics)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("spec.admin.listenAddress"),
        "{err}"
    );
}

#[test]
fn docs_list_exactly_the_registered_metrics() {
    let readiness = Readiness::new();
    let _handle = readiness.register("admin");
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "x".into(),
        commit: "y".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "standalone", readiness);
    // Families only appear once they have a member.
    metrics.config_reloaded("ok");
    metrics
        .admin_requests
        .get_or_create(&vec![
            ("route".into(), "/metrics".into()),
            ("code".into(), "200".into()),
        ])
        .inc();
    let text = hybridlet_metrics::encode(&registry).unwrap();
    let mut registered: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            match kind {
                "counter" => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.to_string(),
            }
        })
        .collect();
    registered.sort();
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md"),
    )
    .unwrap();
    let mut documented: Vec<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `hybridlet_"))
        .map(|l| format!("hybridlet_{}", l.split('`').next().unwrap()))
        .collect();
    documented.sort();
    // Every agent metric is documented; the live scrape test in the hybridlet crate
    // checks the whole binary's set.
    for name in &registered {
        assert!(
            documented.contains(name),
            "{name} is not in docs/metrics.md"
        );
    }
}

/// HTTPS with a certificate from PEM files: a client that trusts the certificate gets
/// /metrics over TLS; a plain-HTTP client gets nothing; a key that does not match the
/// certificate is refused at start-up, naming the files.
#[tokio::test]
async fn serves_over_tls_from_pem_files() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config =
        hybridlet_metrics::tls_config(&fixtures.join("cert.pem"), &fixtures.join("key.pem"))
            .unwrap();
    let readiness = Readiness::new();
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "1.2.3".into(),
        commit: "abc".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "standalone", readiness.clone());
    let server = AdminServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(registry),
        readiness,
        metrics,
    )
    .await
    .unwrap()
    .with_tls(config);
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.serve(stop.clone()));

    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(fixtures.join("cert.pem")).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    tls.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    assert!(buf.contains("hybridlet_build_info"), "{buf}");

    // Plain HTTP on the TLS port: the handshake fails, no metrics leak.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("hybridlet_build_info"));

    stop.cancel();
    task.await.unwrap().unwrap();

    let err = hybridlet_metrics::tls_config(&fixtures.join("cert.pem"), &fixtures.join("cert.pem"))
        .unwrap_err();
    assert!(err.to_string().contains("spec.admin.tls: keyFile"), "{err}");
}

/// A TLS client that trusts only the certificate in `ca` (a PEM file of the fixtures).
async fn tls_get(addr: std::net::SocketAddr, ca: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(fixtures.join(ca)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    tls.read_to_string(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Rotation: the certificate set on the shared TLS setting is what the next connection
/// gets, on the same listener; an open connection keeps its own; `None` serves plain
/// HTTP. The listener can also be bound beforehand (a reload binding a new address).
#[tokio::test]
async fn certificates_rotate_without_a_new_listener() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let pair = |cert: &str, key: &str| {
        hybridlet_metrics::tls_config(&fixtures.join(cert), &fixtures.join(key)).unwrap()
    };
    let readiness = Readiness::new();
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "1.2.3".into(),
        commit: "abc".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "standalone", readiness.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tls = hybridlet_metrics::AdminTls::new(Some(pair("cert.pem", "key.pem")));
    let server = AdminServer::from_listener(listener, Arc::new(registry), readiness, metrics)
        .unwrap()
        .with_tls_setting(tls.clone());
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.serve(stop.clone()));

    assert!(
        tls_get(addr, "cert.pem")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    let err = tls_get(addr, "rotated-cert.pem").await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");

    tls.set(Some(pair("rotated-cert.pem", "rotated-key.pem")));
    assert!(
        tls_get(addr, "rotated-cert.pem")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    assert!(tls_get(addr, "cert.pem").await.is_err());

    tls.set(None);
    assert_eq!(get(addr, "/healthz", "GET").await.0, 200);

    stop.cancel();
    task.await.unwrap().unwrap();
}
