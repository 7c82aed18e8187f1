//! `e2e-kubelet`: a stand-in for the kubelet in the VM end-to-end suite. It makes one gRPC
//! call on a plugin's Unix socket (registration, CSI Identity or Node, DRA v1), prints the
//! answer on one line and reports the outcome through its exit status, so shell scenarios
//! can assert exact status codes:
//!   0 = OK, 3 = the call returned a gRPC error (printed as `ERR <Code> <message>`),
//!   1 = could not connect or the deadline passed before an answer.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a test tool whose output is its result

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hybridlet_proto::csi::v1::identity_client::IdentityClient;
use hybridlet_proto::csi::v1::node_client::NodeClient;
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::*;
use hybridlet_proto::dra::v1 as dra;
use hybridlet_proto::pluginregistration::InfoRequest;
use hybridlet_proto::pluginregistration::registration_client::RegistrationClient;

#[derive(Parser)]
#[command(
    name = "e2e-kubelet",
    about = "Make one kubelet-style gRPC call on a plugin socket"
)]
struct Args {
    /// The plugin's Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// Give up after this many seconds (the kubelet's own deadlines are of this order).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    call: Call,
}

#[derive(clap::Args, Clone)]
struct Volume {
    #[arg(long)]
    volume_id: String,
    /// volume_context entries (the PV's volumeAttributes), KEY=VALUE.
    #[arg(long = "attr", value_parser = key_value)]
    attrs: Vec<(String, String)>,
    /// Mount flags (the PV's mountOptions).
    #[arg(long = "mount-flag")]
    mount_flags: Vec<String>,
    /// Raw block access instead of a file system.
    #[arg(long)]
    block: bool,
    #[arg(long, default_value = "")]
    fs_type: String,
    /// Node-stage / node-publish secrets, KEY=VALUE.
    #[arg(long = "secret", value_parser = key_value)]
    secrets: Vec<(String, String)>,
    /// Access mode: single-writer (RWO) or multi-writer (RWX).
    #[arg(long, default_value = "multi-writer")]
    mode: String,
}

#[derive(Subcommand)]
enum Call {
    /// pluginregistration GetInfo on a registration socket.
    Register,
    /// CSI GetPluginInfo, Probe and NodeGetInfo.
    Info,
    Stage {
        #[command(flatten)]
        volume: Volume,
        #[arg(long)]
        staging: String,
    },
    Unstage {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        staging: String,
    },
    Publish {
        #[command(flatten)]
        volume: Volume,
        #[arg(long)]
        staging: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        readonly: bool,
    },
    Unpublish {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        target: String,
    },
    Stats {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        path: String,
    },
    Expand {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        required_bytes: i64,
    },
    /// DRA NodePrepareResources (v1) for one claim.
    DraPrepare {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        uid: String,
    },
    /// The first message of the DRA health stream (v1alpha1 NodeWatchResources): one line
    /// per device, `<pool>/<device> HEALTHY|UNHEALTHY|UNKNOWN <message>`.
    DraHealth,
    /// DRA NodeUnprepareResources (v1) for one claim.
    DraUnprepare {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        uid: String,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn capability(v: &Volume) -> Result<VolumeCapability, String> {
    let mode = match v.mode.as_str() {
        "single-writer" => Mode::SingleNodeWriter,
        "multi-writer" => Mode::MultiNodeMultiWriter,
        "reader" => Mode::MultiNodeReaderOnly,
        other => return Err(format!("unknown --mode {other}")),
    };
    let access_type = if v.block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume {
            fs_type: v.fs_type.clone(),
            mount_flags: v.mount_flags.clone(),
            volume_mount_group: String::new(),
        })
    };
    Ok(VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn map(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}

async fn call(args: Args) -> Result<String, CallError> {
    let channel = hybridlet_kubelet_plugin::connect(&args.socket)
        .await
        .map_err(|e| CallError::Connect(format!("{}: {e}", args.socket.display())))?;
    let mut node = NodeClient::new(channel.clone());
    let answer = match args.call {
        Call::Register => {
            let info = RegistrationClient::new(channel)
                .get_info(InfoRequest {})
                .await?
                .into_inner();
            format!("{info:?}")
        }
        Call::Info => {
            let mut identity = IdentityClient::new(channel);
            let plugin = identity
                .get_plugin_info(GetPluginInfoRequest {})
                .await?
                .into_inner();
            let probe = identity.probe(ProbeRequest {}).await?.into_inner();
            let info = node
                .node_get_info(NodeGetInfoRequest {})
                .await?
                .into_inner();
            format!("{plugin:?} {probe:?} {info:?}")
        }
        Call::Stage { volume, staging } => {
            let req = NodeStageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging,
                volume_capability: Some(capability(&volume).map_err(CallError::Usage)?),
                volume_context: map(&volume.attrs),
                secrets: map(&volume.secrets),
                ..Default::default()
            };
            format!("{:?}", node.node_stage_volume(req).await?.into_inner())
        }
        Call::Unstage { volume_id, staging } => {
            let req = NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path: staging,
            };
            format!("{:?}", node.node_unstage_volume(req).await?.into_inner())
        }
        Call::Publish {
            volume,
            staging,
            target,
            readonly,
        } => {
            let req = NodePublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging,
                target_path: target,
                volume_capability: Some(capability(&volume).map_err(CallError::Usage)?),
                readonly,
                volume_context: map(&volume.attrs),
                secrets: map(&volume.secrets),
                ..Default::default()
            };
            format!("{:?}", node.node_publish_volume(req).await?.into_inner())
        }
        Call::Unpublish { volume_id, target } => {
            let req = NodeUnpublishVolumeRequest {
                volume_id,
                target_path: target,
            };
            format!("{:?}", node.node_unpublish_volume(req).await?.into_inner())
        }
        Call::Stats { volume_id, path } => {
            let req = NodeGetVolumeStatsRequest {
                volume_id,
                volume_path: path,
                ..Default::default()
            };
            format!("{:?}", node.node_get_volume_stats(req).await?.into_inner())
        }
        Call::Expand {
            volume_id,
            path,
            required_bytes,
        } => {
            let req = NodeExpandVolumeRequest {
                volume_id,
                volume_path: path,
                capacity_range: Some(CapacityRange {
                    required_bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            format!("{:?}", node.node_expand_volume(req).await?.into_inner())
        }
        Call::DraPrepare {
            namespace,
            name,
            uid,
        } => {
            let resp = dra::dra_plugin_client::DraPluginClient::new(channel)
                .node_prepare_resources(dra::NodePrepareResourcesRequest {
                    claims: vec![dra::Claim {
                        namespace,
                        name,
                        uid: uid.clone(),
                    }],
                })
                .await?
                .into_inner();
            // A per-claim error is the DRA API's way to fail; report it like a status.
            match resp.claims.get(&uid) {
                Some(r) if !r.error.is_empty() => {
                    return Err(CallError::Status(tonic::Status::unknown(r.error.clone())));
                }
                Some(r) => format!("{:?}", r.devices),
                None => {
                    return Err(CallError::Status(tonic::Status::unknown(
                        "no result for the claim",
                    )));
                }
            }
        }
        Call::DraHealth => {
            use hybridlet_proto::dra_health::v1alpha1 as health;
            let mut stream =
                health::dra_resource_health_client::DraResourceHealthClient::new(channel)
                    .node_watch_resources(health::NodeWatchResourcesRequest {})
                    .await?
                    .into_inner();
            let first = stream
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unknown("the health stream ended at once"))?;
            first
                .devices
                .iter()
                .map(|d| {
                    let id = d.device.clone().unwrap_or_default();
                    let status = health::HealthStatus::try_from(d.health)
                        .map(|h| h.as_str_name())
                        .unwrap_or("INVALID");
                    format!("{}/{} {status} {}", id.pool_name, id.device_name, d.message)
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Call::DraUnprepare {
            namespace,
            name,
            uid,
        } => {
            let resp = dra::dra_plugin_client::DraPluginClient::new(channel)
                .node_unprepare_resources(dra::NodeUnprepareResourcesRequest {
                    claims: vec![dra::Claim {
                        namespace,
                        name,
                        uid: uid.clone(),
                    }],
                })
                .await?
                .into_inner();
            match resp.claims.get(&uid) {
                Some(r) if !r.error.is_empty() => {
                    return Err(CallError::Status(tonic::Status::unknown(r.error.clone())));
                }
                _ => "unprepared".to_string(),
            }
        }
    };
    Ok(answer)
}

enum CallError {
    Connect(String),
    Usage(String),
    Status(tonic::Status),
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError::Status(s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let deadline = Duration::from_secs(args.timeout);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e-kubelet: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(async { tokio::time::timeout(deadline, call(args)).await }) {
        Ok(Ok(answer)) => {
            println!("OK {answer}");
            ExitCode::SUCCESS
        }
        Ok(Err(CallError::Status(s))) => {
            println!("ERR {:?} {}", s.code(), s.message());
            ExitCode::from(3)
        }
        Ok(Err(CallError::Connect(e))) => {
            println!("CONNECT {e}");
            ExitCode::from(1)
        }
        Ok(Err(CallError::Usage(e))) => {
            eprintln!("e2e-kubelet: {e}");
            ExitCode::from(64)
        }
        Err(_) => {
            println!("DEADLINE no answer within {deadline:?}");
            ExitCode::from(1)
        }
    }
}
