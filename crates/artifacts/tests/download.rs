//! Downloads against a real HTTP server on 127.0.0.1: verification before placement,
//! resume after a dropped connection, no second download of a file already in place,
//! errors that leave the destination untouched, redirects, file:// sources.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use hybridlet_fixtures::files::FileServer;

use hybridlet_artifacts::{ArtifactError, Downloaded, Fetcher, sha256_file};

fn serve(files: HashMap<&'static str, Vec<u8>>) -> (String, FileServer) {
    let server = FileServer::start(files.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    (server.base.clone(), server)
}

fn payload() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

fn sha(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, bytes).unwrap();
    sha256_file(&p).unwrap()
}

#[tokio::test]
async fn verified_download_is_placed_once_with_its_mode() {
    let body = payload();
    let sum = sha(&body);
    let (base, log) = serve(HashMap::from([
        ("/kubelet", body.clone()),
        ("/kubelet.sha256", format!("{sum}  kubelet\n").into_bytes()),
    ]));
    let fetcher = Fetcher::new().unwrap();
    assert_eq!(
        fetcher
            .checksum(&format!("{base}/kubelet.sha256"))
            .await
            .unwrap(),
        sum
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("usr/bin/kubelet");
    let got = fetcher
        .download(&format!("{base}/kubelet"), &sum, &dest, 0o755, &mut ())
        .await
        .unwrap();
    assert_eq!(
        got,
        Downloaded::Fetched {
            bytes: body.len() as u64,
            resumed: false
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let before = log.requests().len();
    let again = fetcher
        .download(&format!("{base}/kubelet"), &sum, &dest, 0o755, &mut ())
        .await
        .unwrap();
    assert_eq!(again, Downloaded::AlreadyPresent);
    assert_eq!(log.requests().len(), before, "downloaded again");
    // Redirects within the scheme are followed.
    let moved = dir.path().join("moved");
    fetcher
        .download(&format!("{base}/moved"), &sum, &moved, 0o644, &mut ())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&moved).unwrap(), body);
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_a_range_request() {
    let body = payload();
    let sum = sha(&body);
    let (base, log) = serve(HashMap::from([("/flaky", body.clone())]));
    let fetcher = Fetcher::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("kubelet");
    let got = fetcher
        .download(&format!("{base}/flaky"), &sum, &dest, 0o755, &mut ())
        .await
        .unwrap();
    assert!(
        matches!(got, Downloaded::Fetched { resumed: true, .. }),
        "{got:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let requests = log.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[1].1.as_deref(), Some("150000"), "{requests:?}");
    assert!(!dir.path().join(".kubelet.hybridlet-part").exists());
}

#[tokio::test]
async fn a_wrong_checksum_or_a_404_changes_nothing() {
    let body = payload();
    let (base, log) = serve(HashMap::from([("/kubelet", body.clone())]));
    let fetcher = Fetcher::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("kubelet");
    std::fs::write(&dest, "the old kubelet").unwrap();
    let wrong = "0".repeat(64);
    let err = fetcher
        .download(&format!("{base}/kubelet"), &wrong, &dest, 0o755, &mut ())
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "the old kubelet");
    assert!(
        !dir.path().join(".kubelet.hybridlet-part").exists(),
        "partial file left"
    );

    let n = log.requests().len();
    let err = fetcher
        .download(&format!("{base}/missing"), &wrong, &dest, 0o755, &mut ())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::Status { status: 404, .. }),
        "{err}"
    );
    assert_eq!(log.requests().len(), n + 1, "a 404 is not retried");
    assert!(
        fetcher.checksum(&format!("{base}/kubelet")).await.is_err(),
        "binary is not a checksum"
    );
    assert!(matches!(
        fetcher.get_bytes("ftp://example.invalid/x", 10).await,
        Err(ArtifactError::Scheme { .. })
    ));
}

#[tokio::test]
async fn file_sources_work_for_air_gapped_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(mirror.join("kubectl"), b"kubectl-bytes").unwrap();
    let sum = sha(b"kubectl-bytes");
    std::fs::write(mirror.join("kubectl.sha256"), &sum).unwrap();
    let fetcher = Fetcher::new().unwrap();
    let url = format!("file://{}", mirror.join("kubectl").display());
    let published = fetcher.checksum(&format!("{url}.sha256")).await.unwrap();
    let dest = dir.path().join("out/kubectl");
    fetcher
        .download(&url, &published, &dest, 0o755, &mut ())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"kubectl-bytes");
}
