//! The CSI services served on a Unix socket and dialled the way the kubelet dials them,
//! shared by the node tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use hybridlet_csi::{CsiMetrics, CsiSettings, Host, services_on};
use hybridlet_kubelet_plugin::{PluginSocket, serve};
use hybridlet_proto::csi::v1::identity_client::IdentityClient;
use hybridlet_proto::csi::v1::identity_server::IdentityServer;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use hybridlet_proto::csi::v1::node_server::NodeServer;
use hybridlet_runtime::CancellationToken;
use tonic::transport::Channel;

/// Clients of both services, and the token that stops serving.
pub struct Served {
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    pub stop: CancellationToken,
}

/// The Identity and Node services of `settings` over `host`, on the socket `socket`.
pub async fn serve_csi(socket: &Path, settings: CsiSettings, host: Host) -> Served {
    let (identity, node) = services_on(settings, host, CsiMetrics::default());
    let bound = PluginSocket::bind(socket).unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node));
    let stop = CancellationToken::new();
    tokio::spawn(serve(bound, router, stop.clone()));
    let channel = hybridlet_kubelet_plugin::connect(socket).await.unwrap();
    Served {
        node: NodeClient::new(channel.clone()),
        identity: IdentityClient::new(channel),
        stop,
    }
}
