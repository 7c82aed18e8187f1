//! One TLS stack: a Kubernetes client and an AWS client built and used in one process.
//!
//! With two rustls crypto providers compiled in and none installed as the default,
//! building a kube client panics at run time. hybridlet compiles only *ring* and installs
//! it at start-up; this test builds both clients the way the binary does and makes both
//! open TLS connections (to a loopback listener that is not a TLS server) to prove that no
//! provider ambiguity is left.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Accepts connections and answers with plain text, so every TLS handshake fails cleanly.
async fn not_tls() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 not tls\r\n\r\n").await;
        }
    });
    format!("https://{addr}")
}

#[tokio::test]
async fn kube_and_aws_clients_share_one_provider() {
    hybridlet::tls::install_default_provider();
    let provider = rustls::crypto::CryptoProvider::get_default().expect("default provider");
    // *ring*'s provider offers exactly these cipher suites first; aws-lc-rs would differ.
    let ring = rustls::crypto::ring::default_provider();
    assert_eq!(
        provider
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect::<Vec<_>>(),
        ring.cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect::<Vec<_>>()
    );

    let url = not_tls().await;

    let kube = hybridlet_kube::client_for(&url, None).expect("kube client builds");
    let err = hybridlet_kube::server_version(&kube).await.unwrap_err();
    assert!(err.to_string().contains("GET /version"), "{err}");

    let aws = hybridlet_aws::sdk_config(&hybridlet_aws::AwsSettings {
        region: "us-west-2".into(),
        endpoint_url: Some(url),
        static_credentials: Some(aws_credential_types_for_test()),
        config_file: None,
        credentials_file: None,
    })
    .await;
    let eks = hybridlet_aws::eks_client(&aws);
    let err = hybridlet_aws::describe_cluster(&eks, "c", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("eks:DescribeCluster c"), "{err}");
}

fn aws_credential_types_for_test() -> hybridlet_aws::Credentials {
    hybridlet_aws::Credentials::new("AKIDEXAMPLE", "secret", None, None, "test")
}
