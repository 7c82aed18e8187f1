//! Plugin sockets serve any `:authority` a Unix-socket client sends, and what they still
//! refuse below the gRPC layer is counted. These requests are written frame by frame here
//! (fault injection: forms no gRPC library sends, and malformed ones); the real clients
//! (grpc-go dialing as the kubelet, grpc C-core) are the peers tier's
//! (`crates/hybridlet/tests/peers.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hybridlet_kubelet_plugin::hpack::{self, Decoder, Field};
use hybridlet_kubelet_plugin::{
    PluginMetrics, PluginSocket, RegistrationService, connect, registration_socket_path, serve,
};
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;
use hybridlet_proto::pluginregistration::{InfoRequest, PluginInfo};
use hybridlet_runtime::CancellationToken;
use prometheus_client::registry::Registry;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Served {
    _dir: tempfile::TempDir,
    path: PathBuf,
    registry: Registry,
    stop: CancellationToken,
}

async fn serve_registration() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let path = registration_socket_path(&dir.path().join("kubelet"), "csi.hybridlet.io");
    let mut registry = Registry::default();
    let metrics = PluginMetrics::register(&mut registry);
    let service = RegistrationService::new(
        PluginInfo {
            r#type: "CSIPlugin".into(),
            name: "csi.hybridlet.io".into(),
            endpoint: "/var/lib/kubelet/plugins/csi.hybridlet.io/csi.sock".into(),
            supported_versions: vec!["1.0.0".into()],
        },
        metrics.clone(),
    );
    let socket = PluginSocket::bind(&path).unwrap().with_metrics(&metrics);
    let stop = CancellationToken::new();
    let router = tonic::transport::Server::builder().add_service(service.into_server());
    tokio::spawn(serve(socket, router, stop.clone()));
    Served {
        _dir: dir,
        path,
        registry,
        stop,
    }
}

fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn field(name: &str, value: &[u8]) -> Field {
    Field {
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
        sensitive: false,
    }
}

/// What the server answered one request with.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The gRPC status from the trailers.
    Grpc(String),
    /// The stream was reset with this HTTP/2 error code.
    Reset(u32),
    /// The connection ended without an answer.
    Closed,
}

/// One `GetInfo` call, frames written by hand with exactly `authority` (None: no header)
/// and `extra` headers; reads frames until the stream ends.
fn raw_get_info(socket: &Path, authority: Option<&[u8]>, extra: &[Field]) -> Outcome {
    let mut conn = UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut fields = vec![
        field(":method", b"POST"),
        field(":scheme", b"http"),
        field(":path", b"/pluginregistration.Registration/GetInfo"),
    ];
    if let Some(a) = authority {
        fields.push(field(":authority", a));
    }
    fields.push(field("content-type", b"application/grpc"));
    fields.push(field("te", b"trailers"));
    fields.extend(extra.iter().cloned());
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &hpack::encode(&fields)));
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    conn.write_all(&out).unwrap();

    let mut decoder = Decoder::new(4096, 1 << 20);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                0x1 => {
                    let headers = decoder.decode(&payload).unwrap();
                    if let Some(status) = headers.iter().find(|f| f.name == b"grpc-status") {
                        return Outcome::Grpc(String::from_utf8(status.value.clone()).unwrap());
                    }
                    assert_eq!(flags & 0x1, 0, "a response without grpc-status");
                }
                0x3 => return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap())),
                0x4 if flags & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).unwrap(),
                0x7 => return Outcome::Closed,
                _ => {}
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return Outcome::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_authority_a_unix_socket_client_sends_is_served() {
    let s = serve_registration().await;
    // A tonic client (a valid authority) still works.
    let info = RegistrationClient::new(connect(&s.path).await.unwrap())
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.hybridlet.io");

    let path = s.path.display().to_string();
    let percent = path.replace('/', "%2F");
    let forms: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("localhost", Some(b"localhost".to_vec())),
        ("absent", None),
        ("empty", Some(Vec::new())),
        (
            "the raw path (grpc-go before 1.55)",
            Some(path.into_bytes()),
        ),
        (
            "the percent-encoded path (grpc-go 1.55+, C-core)",
            Some(percent.into_bytes()),
        ),
        ("spaces", Some(b"not a host at all".to_vec())),
        ("not UTF-8", Some(b"\xc3\x28\xff".to_vec())),
        ("userinfo", Some(b"user@localhost:1".to_vec())),
    ];
    let socket = s.path.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        forms
            .into_iter()
            .map(|(what, authority)| (what, raw_get_info(&socket, authority.as_deref(), &[])))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (what, outcome) in outcomes {
        assert_eq!(outcome, Outcome::Grpc("0".into()), "authority {what}");
    }
    let metrics = scrape(&s.registry);
    assert!(
        !metrics.contains("kubelet_plugin_refused_total{"),
        "{metrics}"
    );
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn what_is_still_refused_below_grpc_is_counted_per_socket_and_reason() {
    let s = serve_registration().await;
    let socket = s.path.clone();
    let (reset, http1) = tokio::task::spawn_blocking(move || {
        // A connection-specific header is malformed in HTTP/2 (RFC 9113 §8.2.2): the
        // server resets the stream, and the connection serves the next client.
        let reset = raw_get_info(
            &socket,
            Some(b"localhost"),
            &[field("connection", b"keep-alive")],
        );
        // HTTP/1.1 on a gRPC socket: closed without an answer.
        let mut conn = UnixStream::connect(&socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        (reset, rest)
    })
    .await
    .unwrap();
    assert_eq!(reset, Outcome::Reset(1), "PROTOCOL_ERROR");
    assert!(!String::from_utf8_lossy(&http1).contains("200"));
    let path = s.path.display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(&s.registry);
        let protocol = format!(
            "kubelet_plugin_refused_total{{socket=\"{path}\",reason=\"PROTOCOL_ERROR\"}} 1"
        );
        let not_http2 =
            format!("kubelet_plugin_refused_total{{socket=\"{path}\",reason=\"not_http2\"}} 1");
        if metrics.contains(&protocol) && metrics.contains(&not_http2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The socket still serves.
    let ok = tokio::task::spawn_blocking({
        let socket = s.path.clone();
        move || raw_get_info(&socket, None, &[])
    })
    .await
    .unwrap();
    assert_eq!(ok, Outcome::Grpc("0".into()));
    s.stop.cancel();
}
