//! The registration service over a real Unix socket, called the way the kubelet calls it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use hybridlet_kubelet_plugin::{
    PluginSocket, RegistrationMetrics, RegistrationService, RegistrationState, SocketError,
    connect, registration_socket_path, serve,
};
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;
use hybridlet_proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus};
use hybridlet_runtime::CancellationToken;

fn info(endpoint: &Path) -> PluginInfo {
    PluginInfo {
        r#type: "CSIPlugin".into(),
        name: "csi.hybridlet.io".into(),
        endpoint: endpoint.display().to_string(),
        supported_versions: vec!["1.0.0".into()],
    }
}

#[tokio::test]
async fn get_info_and_status_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().join("var/lib/kubelet");
    let path = registration_socket_path(&kubelet, "csi.hybridlet.io");
    let mut registry = prometheus_client::registry::Registry::default();
    let service = RegistrationService::new(
        info(Path::new(
            "/var/lib/kubelet/plugins/csi.hybridlet.io/csi.sock",
        )),
        RegistrationMetrics::register(&mut registry),
    );
    let mut state = service.subscribe();
    let socket = PluginSocket::bind(&path).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let stop = CancellationToken::new();
    let router = tonic::transport::Server::builder().add_service(service.into_server());
    let server = tokio::spawn(serve(socket, router, stop.clone()));

    let mut client = RegistrationClient::new(connect(&path).await.unwrap());
    let got = client.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(got.r#type, "CSIPlugin");
    assert_eq!(got.name, "csi.hybridlet.io");
    assert_eq!(
        got.endpoint,
        "/var/lib/kubelet/plugins/csi.hybridlet.io/csi.sock"
    );
    assert_eq!(*state.borrow_and_update(), RegistrationState::Pending);

    client
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "version mismatch".into(),
        })
        .await
        .unwrap();
    state.changed().await.unwrap();
    assert_eq!(
        *state.borrow(),
        RegistrationState::Failed("version mismatch".into())
    );
    client
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    state.changed().await.unwrap();
    assert_eq!(*state.borrow(), RegistrationState::Registered);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "kubelet_plugin_registrations_total{plugin=\"csi.hybridlet.io\",result=\"failed\"} 1"
        ),
        "{text}"
    );

    stop.cancel();
    server.await.unwrap().unwrap();
    assert!(!path.exists(), "socket not removed on shutdown");
}

#[tokio::test]
async fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugins_registry/x-reg.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();

    // A socket left by a crashed process: bound, nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = PluginSocket::bind(&path).unwrap();

    // Our own live socket: a second bind must refuse.
    match PluginSocket::bind(&path) {
        Err(SocketError::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    drop(first);

    let file = dir.path().join("plugins_registry/not-a-socket.sock");
    std::fs::write(&file, "precious").unwrap();
    match PluginSocket::bind(&file) {
        Err(SocketError::NotASocket { .. }) => {}
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

    let long = dir.path().join("a".repeat(120)).join("x.sock");
    assert!(matches!(
        PluginSocket::bind(&long),
        Err(SocketError::TooLong { .. })
    ));
}
