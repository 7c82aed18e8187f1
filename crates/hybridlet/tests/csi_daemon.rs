//! `hybridlet run` with the CSI node plugin on: the kubelet's view — registration socket,
//! CSI socket, GetInfo, Identity, NodeGetInfo — and clean removal of both sockets on stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hybridlet_proto::csi::v1::identity_client::IdentityClient;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use hybridlet_proto::csi::v1::{GetPluginInfoRequest, NodeGetInfoRequest};
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;
use hybridlet_proto::pluginregistration::{InfoRequest, RegistrationStatus};

async fn channel(path: PathBuf) -> tonic::transport::Channel {
    hybridlet_kubelet_plugin::connect(&path).await.unwrap()
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_plugin_registers_and_serves() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/hybridlet");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("config.yaml"),
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  admin:\n    listenAddress: 127.0.0.1:0\n  shutdownGracePeriod: 5s\n  csi:\n    nfs:\n      enabled: true\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .args([
            "--root",
            root.path().to_str().unwrap(),
            "--log-format",
            "json",
            "run",
        ])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let kubelet = root.path().join("var/lib/kubelet");
    let reg = kubelet.join("plugins_registry/csi.hybridlet.io-reg.sock");
    let csi = kubelet.join("plugins/csi.hybridlet.io/csi.sock");
    wait_for_socket(&reg);
    wait_for_socket(&csi);

    let mut registration = RegistrationClient::new(channel(reg.clone()).await);
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "csi.hybridlet.io");
    assert_eq!(PathBuf::from(&info.endpoint), csi);
    assert_eq!(info.supported_versions, ["1.0.0"]);

    // What the kubelet does next: dial the endpoint, GetPluginInfo, NodeGetInfo.
    let ch = channel(PathBuf::from(&info.endpoint)).await;
    let name = IdentityClient::new(ch.clone())
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name;
    assert_eq!(name, "csi.hybridlet.io");
    let node_id = NodeClient::new(ch)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id;
    assert!(!node_id.is_empty());
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!reg.exists() && !csi.exists(), "sockets left behind");
    assert!(log.contains("kubelet registered the plugin"), "{log}");
    assert!(log.contains("CSI node plugin serving"), "{log}");
}
