//! DescribeCluster through the real SDK and HTTP client against a loopback stub that
//! answers like EKS (REST-JSON `GET /clusters/{name}`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::time::Duration;

use hybridlet_aws::{AwsSettings, describe_cluster, eks_client, sdk_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn stub(status: u16, body: &'static str) -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 16384];
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-amzn-errortype: ResourceNotFoundException\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    });
    (url, task)
}

fn settings(url: String) -> AwsSettings {
    AwsSettings {
        region: "eu-west-1".into(),
        endpoint_url: Some(url),
        static_credentials: Some(aws_credential_types::Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        )),
        config_file: None,
        credentials_file: None,
    }
}

#[tokio::test]
async fn describe_cluster_reads_the_join_fields() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, req) = stub(
        200,
        r#"{"cluster":{"name":"prod-hybrid","status":"ACTIVE","version":"1.34",
            "endpoint":"https://ABC.gr7.eu-west-1.eks.amazonaws.com",
            "certificateAuthority":{"data":"LS0tLS1CRUdJTg=="},
            "kubernetesNetworkConfig":{"serviceIpv4Cidr":"172.16.0.0/16"},
            "remoteNetworkConfig":{"remoteNodeNetworks":[{"cidrs":["10.80.0.0/16","10.81.0.0/16"]}],
                                   "remotePodNetworks":[{"cidrs":["10.90.0.0/16"]}]}}}"#,
    )
    .await;
    let client = eks_client(&sdk_config(&settings(url)).await);
    let info = describe_cluster(&client, "prod-hybrid", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(info.status, "ACTIVE");
    assert_eq!(info.service_ipv4_cidr.as_deref(), Some("172.16.0.0/16"));
    assert_eq!(info.remote_node_cidrs, ["10.80.0.0/16", "10.81.0.0/16"]);
    assert_eq!(info.remote_pod_cidrs, ["10.90.0.0/16"]);
    assert_eq!(
        info.certificate_authority.as_deref(),
        Some("LS0tLS1CRUdJTg==")
    );
    let request = req.await.unwrap();
    assert!(
        request.starts_with("GET /clusters/prod-hybrid "),
        "{request}"
    );
    // SigV4-signed for the eks service in the configured region.
    assert!(
        request
            .to_ascii_lowercase()
            .contains("/eu-west-1/eks/aws4_request"),
        "{request}"
    );
}

#[tokio::test]
async fn errors_carry_the_cluster_and_the_reason() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, _req) = stub(404, r#"{"message":"No cluster found for name: nope."}"#).await;
    let client = eks_client(&sdk_config(&settings(url)).await);
    let err = describe_cluster(&client, "nope", Duration::from_secs(20))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("eks:DescribeCluster nope"), "{text}");
    assert!(text.contains("No cluster found"), "{text}");
}
