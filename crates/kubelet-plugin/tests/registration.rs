//! The registration service over a real Unix socket, called the way the kubelet calls it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use hybridlet_kubelet_plugin::{
    PluginMetrics, PluginSocket, RegistrationService, RegistrationState, SocketError, connect,
    registration_socket_path, serve,
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
        PluginMetrics::register(&mut registry),
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

    let text = scrape(&registry);
    assert!(
        text.contains(
            "kubelet_plugin_registrations_total{plugin=\"csi.hybridlet.io\",result=\"failed\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("kubelet_plugin_registered{plugin=\"csi.hybridlet.io\"} 1"),
        "{text}"
    );

    stop.cancel();
    server.await.unwrap().unwrap();
    assert!(!path.exists(), "socket not removed on shutdown");
}

fn scrape(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test(start_paused = true)]
async fn a_plugin_unregistered_past_its_deadline_is_overdue_until_the_kubelet_registers_it() {
    use hybridlet_proto::pluginregistration::registration_server::Registration as _;
    let mut registry = prometheus_client::registry::Registry::default();
    let service = RegistrationService::new(
        info(Path::new(
            "/var/lib/kubelet/plugins/csi.hybridlet.io/csi.sock",
        )),
        PluginMetrics::register(&mut registry),
    );
    let stop = CancellationToken::new();
    let watch =
        tokio::spawn(service.watch_overdue(std::time::Duration::from_secs(300), stop.clone()));
    let overdue = |registry: &prometheus_client::registry::Registry, v: u8| {
        let text = scrape(registry);
        let line =
            format!("kubelet_plugin_registration_overdue{{plugin=\"csi.hybridlet.io\"}} {v}");
        assert!(text.contains(&line), "want {line}:\n{text}");
    };
    tokio::time::sleep(std::time::Duration::from_secs(299)).await;
    overdue(&registry, 0);
    // A failed verdict is not a registration.
    service
        .notify_registration_status(tonic::Request::new(RegistrationStatus {
            plugin_registered: false,
            error: "no handler".into(),
        }))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    overdue(&registry, 1);
    service
        .notify_registration_status(tonic::Request::new(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        }))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    overdue(&registry, 0);
    assert!(scrape(&registry).contains("kubelet_plugin_registered{plugin=\"csi.hybridlet.io\"} 1"));
    stop.cancel();
    watch.await.unwrap();
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

/// The CSI plugin and both DRA drivers create their registration sockets in one directory
/// from one process, at the same moment: each must end up with its own listening socket
/// (the temporary name a socket is bound under is unique per bind, not per process).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_starting_together_each_get_their_own_socket() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("plugins_registry");
    for round in 0..100 {
        let names = ["csi.hybridlet.io", "gpu.hybridlet.io", "sriov.hybridlet.io"];
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(names.len()));
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let path = registry.join(format!("{name}-reg.sock"));
                let barrier = barrier.clone();
                let rt = tokio::runtime::Handle::current();
                std::thread::spawn(move || {
                    let _entered = rt.enter();
                    barrier.wait();
                    (path.clone(), PluginSocket::bind(&path))
                })
            })
            .collect();
        let mut sockets = Vec::new();
        for h in handles {
            let (path, bound) = h.join().unwrap();
            let socket = bound.unwrap_or_else(|e| panic!("round {round}: {e}"));
            sockets.push((path, socket));
        }
        for (path, socket) in &sockets {
            assert_eq!(socket.path(), path);
            assert!(
                std::fs::symlink_metadata(path)
                    .unwrap()
                    .file_type()
                    .is_socket(),
                "round {round}: {} is not a socket",
                path.display()
            );
            std::os::unix::net::UnixStream::connect(path)
                .unwrap_or_else(|e| panic!("round {round}: {}: {e}", path.display()));
        }
        let leftovers: Vec<_> = std::fs::read_dir(&registry)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
        for (path, _) in &sockets {
            std::fs::remove_file(path).unwrap();
        }
    }
}
