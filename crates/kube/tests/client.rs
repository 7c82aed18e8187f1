//! Clients built from a kubeconfig and from parts, talking to a loopback stub.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use hybridlet_kube::{client_for, client_from_kubeconfig, server_version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn version_stub() -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).await.unwrap();
        let body = r#"{"major":"1","minor":"34","gitVersion":"v1.34.2-eks-1234","gitCommit":"x","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.24","compiler":"gc","platform":"linux/amd64"}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    (url, task)
}

#[tokio::test]
async fn client_from_parts_reads_the_version() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, req) = version_stub().await;
    let client = client_for(&url, None).unwrap();
    assert_eq!(server_version(&client).await.unwrap(), "v1.34.2-eks-1234");
    assert!(req.await.unwrap().starts_with("GET /version "));
}

#[tokio::test]
async fn client_from_kubeconfig_uses_its_server_and_token() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, req) = version_stub().await;
    let dir = std::env::temp_dir().join(format!("hybridlet-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\ncurrent-context: k\nusers:\n- name: u\n  user:\n    token: test-token-123\n"
        ),
    )
    .unwrap();
    let client = client_from_kubeconfig(&path).await.unwrap();
    assert_eq!(server_version(&client).await.unwrap(), "v1.34.2-eks-1234");
    let request = req.await.unwrap().to_ascii_lowercase();
    assert!(
        request.contains("authorization: bearer test-token-123"),
        "{request}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_kubeconfig_names_the_file() {
    let Err(err) = client_from_kubeconfig(std::path::Path::new("/nonexistent/kubeconfig")).await
    else {
        panic!("a missing kubeconfig was accepted");
    };
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}
