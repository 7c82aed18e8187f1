//! `hybridlet check` against an API server stand-in on 127.0.0.1 (HTTPS with a test
//! certificate that is its own CA): a verified server with our clock passes; a server
//! whose clock is 10 minutes off fails the clock check naming the fix; a CA that does not
//! verify the server fails the TLS step; a closed port fails the TCP step. Each failure
//! names its step, and `-o json` carries the same verdicts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../metrics/tests/fixtures")
        .join(name)
}

/// An HTTPS server answering every request with 401 and `Date: <now + offset>`.
async fn api_stand_in(offset_secs: i64) -> String {
    let config = hybridlet_metrics::tls_config(&fixture("cert.pem"), &fixture("key.pem")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let when = if offset_secs >= 0 {
                    SystemTime::now() + Duration::from_secs(offset_secs as u64)
                } else {
                    SystemTime::now() - Duration::from_secs((-offset_secs) as u64)
                };
                let body = r#"{"kind":"Status","status":"Failure","code":401}"#;
                let response = format!(
                    "HTTP/1.1 401 Unauthorized\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    httpdate::fmt_http_date(when),
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

fn write_config(dir: &Path, endpoint: &str, ca_pem: &[u8]) -> std::path::PathBuf {
    use base64::Engine as _;
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
    )
    .unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("apiServerEndpoint:") {
            out.push_str(&format!("    apiServerEndpoint: {endpoint}\n"));
        } else if line.trim_start().starts_with("certificateAuthority:") {
            out.push_str(&format!(
                "    certificateAuthority: {}\n",
                base64::engine::general_purpose::STANDARD.encode(ca_pem)
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join("config.yaml");
    std::fs::write(&path, out).unwrap();
    path
}

async fn check(config: &Path, json: bool) -> (i32, String) {
    let root = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
    cmd.arg("--root")
        .arg(root.path())
        .args(["check", "--config"])
        .arg(config);
    if json {
        cmd.args(["-o", "json"]);
    }
    // The credentials check goes to STS: keep it on a closed loopback port, with no
    // credentials from this machine.
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_checks_name_the_failing_step() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::fs::read(fixture("cert.pem")).unwrap();

    let good = api_stand_in(0).await;
    let (_, out) = check(&write_config(dir.path(), &good, &ca), false).await;
    assert!(
        out.contains(&format!("ok: API server: {good} answers over TLS verified with the cluster CA (GET /healthz: 401")),
        "{out}"
    );
    assert!(
        out.contains("ok: clock: within 30s of the API server"),
        "{out}"
    );

    let skewed = api_stand_in(-600).await;
    let (code, out) = check(&write_config(dir.path(), &skewed, &ca), false).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL: clock: this host's clock is"), "{out}");
    assert!(out.contains("ahead of the API server's"), "{out}");
    assert!(out.contains("timedatectl set-ntp true"), "{out}");

    // A CA that did not sign the server's certificate (the cluster's real CA, say).
    let other_ca = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../bootstrap/tests/golden/iam-ra/etc__kubernetes__pki__ca.crt"),
    )
    .unwrap();
    let (code, out) = check(&write_config(dir.path(), &good, &other_ca), false).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL: API server TLS:"), "{out}");
    assert!(out.contains("spec.cluster.certificateAuthority"), "{out}");

    // Nothing listens: the TCP step fails, with the route and security group as the fix.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let (code, out) = check(&write_config(dir.path(), &closed, &ca), true).await;
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(json["ok"], false);
    let tcp = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "API server reachable")
        .unwrap();
    assert_eq!(tcp["status"], "fail");
    assert!(
        tcp["detail"]
            .as_str()
            .unwrap()
            .contains("security group allows 443/tcp"),
        "{tcp}"
    );
}

/// The credential provider's endpoint (IAM Roles Anywhere here, moved to a loopback TLS
/// stand-in with AWS_ENDPOINT_URL_ROLESANYWHERE and trusted through SSL_CERT_FILE) is
/// reached through spec.proxy's CONNECT tunnel; a proxy that refuses the tunnel fails the
/// check naming the proxy step; missing proxy drop-ins are pointed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_endpoints_are_checked_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::fs::read(fixture("cert.pem")).unwrap();
    let api = api_stand_in(0).await;
    let rolesanywhere = api_stand_in(0).await;
    let with_proxy = |proxy: &str| {
        let path = write_config(dir.path(), &api, &ca);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("http://proxy.example.internal:3128", proxy)
            .replace(
                "noProxy: [localhost, 127.0.0.1, .svc, 10.0.0.0/8]",
                "noProxy: [localhost]",
            );
        let out = dir
            .path()
            .join(format!("proxy-{}.yaml", proxy.len() + text.len()));
        std::fs::write(&out, text).unwrap();
        out
    };
    let run = |config: std::path::PathBuf| {
        let rolesanywhere = rolesanywhere.clone();
        async move {
            let root = tempfile::tempdir().unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
            cmd.arg("--root")
                .arg(root.path())
                .args(["check", "--config"])
                .arg(&config)
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
                .env("AWS_ENDPOINT_URL_ROLESANYWHERE", &rolesanywhere)
                .env("SSL_CERT_FILE", fixture("cert.pem"))
                .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
                .env("AWS_CONFIG_FILE", "/nonexistent")
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("AWS_PROFILE");
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }
    };
    let port = rolesanywhere.rsplit(':').next().unwrap().to_string();

    let proxy = hybridlet_fixtures::proxy::ConnectProxy::start(false);
    let out = run(with_proxy(&proxy.url)).await;
    assert!(
        out.contains(&format!(
            "ok: IAM Roles Anywhere endpoint: 127.0.0.1:{port} reachable over TLS through the proxy {}",
            proxy.url
        )),
        "{out}"
    );
    assert!(proxy.targets().contains(&format!("127.0.0.1:{port}")));
    assert!(
        out.contains("warning: proxy settings: spec.proxy is set but /etc/systemd/system/containerd.service.d/http-proxy.conf"),
        "{out}"
    );

    let refusing = hybridlet_fixtures::proxy::ConnectProxy::start(true);
    let out = run(with_proxy(&refusing.url)).await;
    assert!(
        out.contains(&format!(
            "FAIL: IAM Roles Anywhere endpoint: {rolesanywhere}: proxy failed:"
        )),
        "{out}"
    );
    assert!(
        out.contains("403 Forbidden") && out.contains("allow CONNECT"),
        "{out}"
    );
}
