//! `systemctl reload` (SIGHUP) on the real daemon: what changed is applied without a
//! restart — the log level, a rotated admin certificate, a new admin address, each plugin
//! started, stopped or restarted on its own, containerd's mirror files on a joined node —
//! and what cannot be applied is refused before anything changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use common::{Daemon, is_socket, wait_until};
use hybridlet_proto::csi::v1::NodeGetInfoRequest;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../metrics/tests/fixtures")
        .join(name)
}

/// Put a certificate pair where the configuration below expects it.
fn place_pair(root: &Path, cert: &str, key: &str) {
    let dir = root.join("etc/hybridlet/tls");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tls_fixture(cert), dir.join("cert.pem")).unwrap();
    std::fs::copy(tls_fixture(key), dir.join("key.pem")).unwrap();
}

/// The fixture configuration with the admin server on `address` over TLS, plus `extra`
/// lines at the end of the AgentConfig spec.
fn tls_config(config: String, address: &str, extra: &str) -> String {
    let config = config.replace(
        "  admin:\n    listenAddress: 127.0.0.1:0\n",
        &format!("  admin:\n    listenAddress: {address}\n    tls:\n      certFile: /etc/hybridlet/tls/cert.pem\n      keyFile: /etc/hybridlet/tls/key.pem\n"),
    );
    assert!(config.contains("tls:"), "fixture changed");
    format!("{config}{extra}")
}

/// GET over TLS, trusting only the certificate in `ca` (a file of the fixtures).
async fn tls_get(addr: &str, path: &str, ca: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(tls_fixture(ca)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

fn applied(verdict: &serde_json::Value) -> String {
    verdict["applied"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_rotates_the_certificate_moves_the_address_and_sets_the_log_level() {
    let d = Daemon::start(
        |root| place_pair(root, "cert.pem", "key.pem"),
        |config| tls_config(config, "127.0.0.1:0", ""),
        |_| Vec::new(),
    )
    .await;
    d.wait_log("ready").await;
    let addr = d.admin_address().await;
    assert!(
        tls_get(&addr, "/healthz", "cert.pem")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );

    // Rotation keeps the paths: the files change, the configuration does not.
    place_pair(d.root.path(), "rotated-cert.pem", "rotated-key.pem");
    let verdict = d.reload().await;
    assert_eq!(
        verdict["message"],
        "configuration reloaded: unchanged (admin TLS certificate read again)"
    );
    assert!(
        tls_get(&addr, "/healthz", "rotated-cert.pem")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    assert!(tls_get(&addr, "/healthz", "cert.pem").await.is_err());

    // A half-written key: refused, the rotated certificate stays.
    std::fs::write(
        d.root.path().join("etc/hybridlet/tls/key.pem"),
        "-----BEGIN",
    )
    .unwrap();
    let verdict = d.reload().await;
    let message = verdict["message"].as_str().unwrap();
    assert!(
        message.starts_with("configuration reload rejected"),
        "{verdict}"
    );
    assert!(message.contains("spec.admin.tls"), "{verdict}");
    assert!(tls_get(&addr, "/healthz", "rotated-cert.pem").await.is_ok());
    place_pair(d.root.path(), "rotated-cert.pem", "rotated-key.pem");

    // Debug logging and the CSI plugin in one reload: the plugin's start is logged at
    // debug, so the new level was in force first.
    d.write_config(|c| {
        tls_config(
            c,
            "127.0.0.1:0",
            "  logLevel: debug\n  csi:\n    nfs:\n      enabled: true\n",
        )
    });
    let verdict = d.reload().await;
    assert_eq!(
        verdict["message"],
        "configuration reloaded: log level debug; admin TLS certificate read again; csi started",
        "{verdict}"
    );
    assert!(applied(&verdict).contains("log level debug"), "{verdict}");
    assert!(applied(&verdict).contains("csi started"), "{verdict}");
    let started = d.wait_log("subsystem started").await;
    assert_eq!(started["subsystem"], "csi", "{started}");

    // A new address: bound before the old one closes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moved = format!("127.0.0.1:{port}");
    d.write_config(|c| {
        tls_config(
            c,
            &moved,
            "  logLevel: debug\n  csi:\n    nfs:\n      enabled: true\n",
        )
    });
    let verdict = d.reload().await;
    assert!(
        applied(&verdict).contains(&format!("admin server moved to {moved}")),
        "{verdict}"
    );
    assert!(
        !applied(&verdict).contains("csi"),
        "the CSI plugin is left alone: {verdict}"
    );
    let mut answer = Err(String::new());
    wait_until("the admin server on its new address", || {
        answer = futures_lite_block(tls_get(&moved, "/metrics", "rotated-cert.pem"));
        answer.is_ok()
    })
    .await;
    let metrics = answer.unwrap();
    assert!(
        metrics.contains("hybridlet_config_reloads_total{result=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hybridlet_config_reloads_total{result=\"invalid\"} 1"),
        "{metrics}"
    );
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "the old address is closed"
    );

    // An address in use: refused, nothing moves.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    d.write_config(|c| {
        tls_config(
            c,
            &taken_addr,
            "  logLevel: debug\n  csi:\n    nfs:\n      enabled: true\n",
        )
    });
    let verdict = d.reload().await;
    let message = verdict["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "spec.admin.listenAddress: cannot listen on {taken_addr}"
        )),
        "{verdict}"
    );
    assert!(
        tls_get(&moved, "/healthz", "rotated-cert.pem")
            .await
            .is_ok()
    );

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// Run a future to completion from a synchronous closure (the test's poll loop).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A file's identity: inode and change time (a new file may reuse a freed inode number).
fn inode(p: &Path) -> (u64, i64, i64) {
    std::fs::symlink_metadata(p).map_or((0, 0, 0), |m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

fn sriov_and_csi(config: String, sriov: bool, topology: &str) -> String {
    let config = config.replace(
        "    gpu:\n      driverName: gpu.example.com",
        &format!("    sriov:\n      enabled: {sriov}"),
    );
    assert!(
        config.contains("    sriov:\n      enabled:"),
        "fixture changed"
    );
    format!("{config}  csi:\n    nfs:\n      enabled: true\n{topology}")
}

/// Each plugin is started, stopped or restarted on its own: a CSI topology change
/// restarts the CSI plugin only (its registration socket is created again, so the kubelet
/// registers it again and reads the new topology), disabling the SR-IOV driver removes
/// its sockets and withdraws its slices, enabling it brings both back; the other
/// plugin's sockets are never touched.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_start_stop_and_restart_one_at_a_time() {
    let d = Daemon::start(
        |root| hybridlet_fixtures::e810_server(root).unwrap(),
        |config| sriov_and_csi(config, true, ""),
        |_| Vec::new(),
    )
    .await;
    let (api, kubelet) = (&d.api, &d.kubelet);
    let csi_reg = kubelet.join("plugins_registry/csi.hybridlet.io-reg.sock");
    let csi = kubelet.join("plugins/csi.hybridlet.io/csi.sock");
    let dra = kubelet.join("plugins/sriov.hybridlet.io/dra.sock");
    let slices = || api.list("/apis/resource.k8s.io/v1/resourceslices").len();
    wait_until("the sockets", || {
        is_socket(&csi_reg) && is_socket(&csi) && is_socket(&dra)
    })
    .await;
    wait_until("the slice", || slices() == 1).await;
    let (csi_before, dra_before) = (inode(&csi_reg), inode(&dra));

    let topology = "    topology:\n      topology.hybridlet.io/site: fra1\n";
    d.write_config(|c| sriov_and_csi(c, true, topology));
    let verdict = d.reload().await;
    assert_eq!(applied(&verdict), "csi restarted", "{verdict}");
    wait_until("a new CSI registration socket", || {
        is_socket(&csi_reg) && inode(&csi_reg) != csi_before
    })
    .await;
    assert_eq!(inode(&dra), dra_before, "the DRA driver was not touched");
    let channel = hybridlet_kubelet_plugin::connect(&csi).await.unwrap();
    let info = NodeClient::new(channel)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.hybridlet.io/site"],
        "fra1"
    );
    let csi_now = inode(&csi_reg);

    d.write_config(|c| sriov_and_csi(c, false, topology));
    let verdict = d.reload().await;
    assert_eq!(applied(&verdict), "dra-sriov stopped", "{verdict}");
    wait_until("the DRA socket gone", || !dra.exists()).await;
    wait_until("the slices withdrawn", || slices() == 0).await;
    assert_eq!(inode(&csi_reg), csi_now, "the CSI plugin was not touched");

    d.write_config(|c| sriov_and_csi(c, true, topology));
    let verdict = d.reload().await;
    assert_eq!(applied(&verdict), "dra-sriov started", "{verdict}");
    wait_until("the DRA socket back", || is_socket(&dra)).await;
    wait_until("the slice back", || slices() == 1).await;
    assert_eq!(inode(&csi_reg), csi_now, "the CSI plugin was not touched");

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// On a joined node, changed mirrors are written into containerd's `hosts.toml` files
/// (containerd reads them at each pull), with init's backups; a mirror removed from the
/// configuration loses the file hybridlet wrote, never an operator's own.
#[tokio::test(flavor = "multi_thread")]
async fn registry_mirrors_are_written_again_on_a_joined_node() {
    let d = Daemon::start(
        |root| {
            let own = root.join("etc/containerd/certs.d/quay.io");
            std::fs::create_dir_all(&own).unwrap();
            std::fs::write(own.join("hosts.toml"), "server = \"https://quay.io\"\n").unwrap();
        },
        |config| config,
        |_| Vec::new(),
    )
    .await;
    d.wait_log("ready").await;
    let certs = d.root.path().join("etc/containerd/certs.d");
    let docker = certs.join("docker.io/hosts.toml");
    assert!(!docker.exists(), "the daemon renders nothing at start");

    d.write_config(|c| c.replace("harbor.example.internal", "harbor-b.example.internal"));
    let verdict = d.reload().await;
    assert_eq!(
        applied(&verdict),
        "registry mirrors: 1 hosts.toml written, 0 removed",
        "{verdict}"
    );
    let text = std::fs::read_to_string(&docker).unwrap();
    assert!(
        text.contains("[host.\"https://harbor-b.example.internal/v2/dockerhub\"]"),
        "{text}"
    );

    let mirrors = "  registryMirrors:\n    - registry: docker.io\n      endpoints: [\"https://harbor.example.internal/v2/dockerhub\"]\n      overridePath: true\n";
    d.write_config(|c| {
        assert!(c.contains(mirrors), "fixture changed");
        c.replace(mirrors, "  registryMirrors: []\n")
    });
    let verdict = d.reload().await;
    assert_eq!(
        applied(&verdict),
        "registry mirrors: 0 hosts.toml written, 1 removed",
        "{verdict}"
    );
    assert!(!docker.exists());
    assert!(
        certs.join("quay.io/hosts.toml").exists(),
        "the operator's own file stays"
    );
    let backups = d.root.path().join("var/lib/hybridlet/init-backups");
    assert_eq!(
        std::fs::read_dir(&backups).unwrap().count(),
        2,
        "one backup per change"
    );

    let (status, log) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}
