//! The real claim source: `resource.k8s.io/v1` ResourceClaims from an API server (a
//! loopback stub answering like one, including 404 Status objects).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use hybridlet_dra::{ClaimError, ClaimSource, KubeClaims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn api_stub() -> (String, tokio::task::JoinHandle<Vec<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut paths = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = req.split_whitespace().nth(1).unwrap().to_string();
            let (status, body) = if path.ends_with("/resourceclaims/train") {
                (
                    "200 OK",
                    r#"{"apiVersion":"resource.k8s.io/v1","kind":"ResourceClaim","metadata":{"name":"train","namespace":"ml","uid":"0d6f-uid"},"spec":{"devices":{"requests":[{"name":"gpu","exactly":{"deviceClassName":"gpu.hybridlet.io"}}]}},"status":{"allocation":{"devices":{"results":[{"request":"gpu","driver":"gpu.hybridlet.io","pool":"node-a","device":"gpu-3"}]}}}}"#,
                )
            } else {
                (
                    "404 Not Found",
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"resourceclaims.resource.k8s.io \"gone\" not found","reason":"NotFound","code":404}"#,
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            paths.push(path);
        }
        paths
    });
    (url, task)
}

#[tokio::test]
async fn reads_allocations_and_maps_not_found() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, paths) = api_stub().await;
    let client =
        kube::Client::try_from(kube::Config::new(url.parse::<http::Uri>().unwrap())).unwrap();
    let claims = KubeClaims::new(client, "node-a");
    let c = claims.get("ml", "train").await.unwrap();
    assert_eq!(c.uid, "0d6f-uid");
    assert_eq!(c.allocations.len(), 1);
    assert_eq!(c.allocations[0].device, "gpu-3");
    assert_eq!(c.allocations[0].driver, "gpu.hybridlet.io");
    assert!(matches!(
        claims.get("ml", "gone").await,
        Err(ClaimError::NotFound { .. })
    ));
    let paths = paths.await.unwrap();
    assert_eq!(
        paths[0],
        "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/train"
    );
}

/// The pods of this node, asked as a node may ask (field selector `spec.nodeName`), with
/// the claims each names and whether it has finished.
#[tokio::test]
async fn lists_this_nodes_pods_and_the_claims_they_name() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = hybridlet_fixtures::apiserver::FakeApiServer::start()
        .await
        .unwrap();
    for (name, node, phase, claim) in [
        ("train-0", "node-a", "Running", "train"),
        ("done-0", "node-a", "Succeeded", "old"),
        ("elsewhere", "node-b", "Running", "train"),
    ] {
        api.put(
            &format!("/api/v1/namespaces/ml/pods/{name}"),
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ml"},
                "spec": {"nodeName": node, "containers": [],
                         "resourceClaims": [{"name": "gpu", "resourceClaimName": claim}]},
                "status": {"phase": phase,
                           "resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": format!("{claim}-generated")}]}}),
        );
    }
    let mut config = kube::Config::new(api.url().parse::<http::Uri>().unwrap());
    config.default_retry = false;
    let claims = KubeClaims::new(kube::Client::try_from(config).unwrap(), "node-a");
    let mut pods = claims.pods("ml").await.unwrap();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert_eq!(pods[0].name, "done-0");
    assert!(pods[0].finished);
    assert_eq!(pods[1].name, "train-0");
    assert!(!pods[1].finished);
    assert_eq!(pods[1].claims, ["train-generated", "train"]);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/ml/pods?")
                && r.contains("spec.nodeName%3Dnode-a")),
        "{:?}",
        api.requests()
    );
}
