//! `e2e-kubelet`: a stand-in for the kubelet in the VM end-to-end suite. It makes one gRPC
//! call on a plugin's Unix socket (registration, CSI Identity or Node, DRA v1), prints the
//! answer on one line and reports the outcome through its exit status, so shell scenarios
//! can assert exact status codes:
//!   0 = OK, 3 = the call returned a gRPC error (printed as `ERR <Code> <message>`),
//!   1 = could not connect or the deadline passed before an answer.
//!
//! It dials the way the kubelet does, with the kubelet's gRPC library: requests are encoded
//! here, and sent by `kubelet-dial` (grpc-go, `tests/peers/kubelet-dial`, found beside this
//! program) with the dial of the kubelet client that makes the call — the plugin watcher's
//! bare-path dial for registration, the DRA client's for DRA (bare path too), the CSI
//! client's (`WithAuthority("localhost")`) for CSI. The bare-path dials send the socket path
//! percent-encoded as `:authority`, as the grpc-go in current kubelets does.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_methods)] // a synchronous test tool whose output is its result

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, Subcommand};
use hybridlet_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use hybridlet_proto::csi::v1::*;
use hybridlet_proto::dra::v1 as dra;
use hybridlet_proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus};
use prost::Message;

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
    /// The grpc-go client (default: `kubelet-dial` beside this program).
    #[arg(long)]
    dialer: Option<PathBuf>,
    /// The `:authority` of the bare-path dials: `percent` (current kubelets' grpc-go) or
    /// `default` (what Debian's older grpc-go sends: the raw path).
    #[arg(long, default_value = "percent")]
    authority: String,
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
    /// The plugin watcher's registration on a registration socket: GetInfo, then
    /// NotifyRegistrationStatus(registered) on the same connection.
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

/// One RPC for `kubelet-dial`.
struct Rpc {
    method: &'static str,
    request: Vec<u8>,
    stream: u32,
}

fn rpc(method: &'static str, request: &impl Message) -> Rpc {
    Rpc {
        method,
        request: request.encode_to_vec(),
        stream: 0,
    }
}

/// What the kubelet's client for a call is: the registration watcher, the DRA client or
/// the CSI client (see `tests/peers/kubelet-dial`).
fn dial_mode(call: &Call) -> &'static str {
    match call {
        Call::Register => "watcher",
        Call::DraPrepare { .. } | Call::DraHealth | Call::DraUnprepare { .. } => "dra-old",
        _ => "csi",
    }
}

/// The RPCs a call makes, in order.
fn rpcs(call: &Call) -> Result<Vec<Rpc>, CallError> {
    let claim = |namespace: &str, name: &str, uid: &str| dra::Claim {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    };
    Ok(match call {
        Call::Register => vec![
            rpc("/pluginregistration.Registration/GetInfo", &InfoRequest {}),
            rpc(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                &RegistrationStatus {
                    plugin_registered: true,
                    error: String::new(),
                },
            ),
        ],
        Call::Info => vec![
            rpc("/csi.v1.Identity/GetPluginInfo", &GetPluginInfoRequest {}),
            rpc("/csi.v1.Identity/Probe", &ProbeRequest {}),
            rpc("/csi.v1.Node/NodeGetInfo", &NodeGetInfoRequest {}),
        ],
        Call::Stage { volume, staging } => vec![rpc(
            "/csi.v1.Node/NodeStageVolume",
            &NodeStageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(capability(volume).map_err(CallError::Usage)?),
                volume_context: map(&volume.attrs),
                secrets: map(&volume.secrets),
                ..Default::default()
            },
        )],
        Call::Unstage { volume_id, staging } => vec![rpc(
            "/csi.v1.Node/NodeUnstageVolume",
            &NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.clone(),
            },
        )],
        Call::Publish {
            volume,
            staging,
            target,
            readonly,
        } => vec![rpc(
            "/csi.v1.Node/NodePublishVolume",
            &NodePublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(capability(volume).map_err(CallError::Usage)?),
                readonly: *readonly,
                volume_context: map(&volume.attrs),
                secrets: map(&volume.secrets),
                ..Default::default()
            },
        )],
        Call::Unpublish { volume_id, target } => vec![rpc(
            "/csi.v1.Node/NodeUnpublishVolume",
            &NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target.clone(),
            },
        )],
        Call::Stats { volume_id, path } => vec![rpc(
            "/csi.v1.Node/NodeGetVolumeStats",
            &NodeGetVolumeStatsRequest {
                volume_id: volume_id.clone(),
                volume_path: path.clone(),
                ..Default::default()
            },
        )],
        Call::Expand {
            volume_id,
            path,
            required_bytes,
        } => vec![rpc(
            "/csi.v1.Node/NodeExpandVolume",
            &NodeExpandVolumeRequest {
                volume_id: volume_id.clone(),
                volume_path: path.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: *required_bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            },
        )],
        Call::DraPrepare {
            namespace,
            name,
            uid,
        } => vec![rpc(
            "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
            &dra::NodePrepareResourcesRequest {
                claims: vec![claim(namespace, name, uid)],
            },
        )],
        Call::DraHealth => vec![Rpc {
            stream: 1,
            ..rpc(
                "/v1alpha1.DRAResourceHealth/NodeWatchResources",
                &hybridlet_proto::dra_health::v1alpha1::NodeWatchResourcesRequest {},
            )
        }],
        Call::DraUnprepare {
            namespace,
            name,
            uid,
        } => vec![rpc(
            "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
            &dra::NodeUnprepareResourcesRequest {
                claims: vec![claim(namespace, name, uid)],
            },
        )],
    })
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, CallError> {
    M::decode(bytes).map_err(|e| CallError::Usage(format!("undecodable answer: {e}")))
}

/// The answer line for a call whose RPCs all succeeded with `responses`.
fn render(call: &Call, responses: &[Vec<u8>]) -> Result<String, CallError> {
    let first = || responses.first().map(Vec::as_slice).unwrap_or_default();
    Ok(match call {
        Call::Register => format!("{:?}", decode::<PluginInfo>(first())?),
        Call::Info => format!(
            "{:?} {:?} {:?}",
            decode::<GetPluginInfoResponse>(&responses[0])?,
            decode::<ProbeResponse>(&responses[1])?,
            decode::<NodeGetInfoResponse>(&responses[2])?
        ),
        Call::Stage { .. } => format!("{:?}", decode::<NodeStageVolumeResponse>(first())?),
        Call::Unstage { .. } => format!("{:?}", decode::<NodeUnstageVolumeResponse>(first())?),
        Call::Publish { .. } => format!("{:?}", decode::<NodePublishVolumeResponse>(first())?),
        Call::Unpublish { .. } => {
            format!("{:?}", decode::<NodeUnpublishVolumeResponse>(first())?)
        }
        Call::Stats { .. } => format!("{:?}", decode::<NodeGetVolumeStatsResponse>(first())?),
        Call::Expand { .. } => format!("{:?}", decode::<NodeExpandVolumeResponse>(first())?),
        Call::DraPrepare { uid, .. } => {
            let resp = decode::<dra::NodePrepareResourcesResponse>(first())?;
            // A per-claim error is the DRA API's way to fail; report it like a status.
            match resp.claims.get(uid) {
                Some(r) if !r.error.is_empty() => {
                    return Err(CallError::Status(2, r.error.clone()));
                }
                Some(r) => format!("{:?}", r.devices),
                None => return Err(CallError::Status(2, "no result for the claim".into())),
            }
        }
        Call::DraHealth => {
            use hybridlet_proto::dra_health::v1alpha1 as health;
            let first = decode::<health::NodeWatchResourcesResponse>(first())?;
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
        Call::DraUnprepare { uid, .. } => {
            let resp = decode::<dra::NodeUnprepareResourcesResponse>(first())?;
            match resp.claims.get(uid) {
                Some(r) if !r.error.is_empty() => {
                    return Err(CallError::Status(2, r.error.clone()));
                }
                _ => "unprepared".to_string(),
            }
        }
    })
}

/// Run the call's RPCs through `kubelet-dial` on one connection.
fn call(args: &Args) -> Result<String, CallError> {
    let rpcs = rpcs(&args.call)?;
    let dialer = match &args.dialer {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(|e| CallError::Usage(format!("locating kubelet-dial: {e}")))?
            .with_file_name("kubelet-dial"),
    };
    let mode = dial_mode(&args.call);
    let authority = if mode == "csi" {
        "default"
    } else {
        &args.authority
    };
    let mut child = Command::new(&dialer)
        .arg("-socket")
        .arg(&args.socket)
        .args(["-dial", mode, "-authority", authority])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CallError::Usage(format!("{}: {e}", dialer.display())))?;
    let timeout_ms = args.timeout * 1000;
    let mut input = String::new();
    for r in &rpcs {
        input.push_str(&format!(
            "{{\"method\":\"{}\",\"request\":\"{}\",\"stream\":{},\"timeout_ms\":{timeout_ms}}}\n",
            r.method,
            B64.encode(&r.request),
            r.stream
        ));
    }
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    // kubelet-dial applies the deadline to each call; this bounds the dial and the rest.
    let deadline = Instant::now() + Duration::from_secs(args.timeout + 5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CallError::Deadline);
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(CallError::Connect(format!(
            "{}: {}",
            args.socket.display(),
            err.trim()
        )));
    }
    let mut responses = Vec::new();
    for line in out.lines() {
        let (code, message, answers) = parse_answer(line)
            .ok_or_else(|| CallError::Usage(format!("kubelet-dial answered {line:?}")))?;
        match code {
            0 => responses.push(answers.into_iter().next().unwrap_or_default()),
            // UNAVAILABLE: nothing serves the socket (yet).
            14 => {
                return Err(CallError::Connect(format!(
                    "{}: {message}",
                    args.socket.display()
                )));
            }
            // grpc-go's own deadline; a server's DEADLINE_EXCEEDED carries its message.
            4 if message == "context deadline exceeded" => return Err(CallError::Deadline),
            code => return Err(CallError::Status(code, message)),
        }
    }
    if responses.len() != rpcs.len() {
        return Err(CallError::Usage(format!(
            "kubelet-dial answered {} of {} calls",
            responses.len(),
            rpcs.len()
        )));
    }
    render(&args.call, &responses)
}

/// `{"code": N, "message": "...", "responses": ["<base64>", ...]}` from kubelet-dial.
fn parse_answer(line: &str) -> Option<(u32, String, Vec<Vec<u8>>)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let code = u32::try_from(v["code"].as_u64()?).ok()?;
    let message = v["message"].as_str().unwrap_or_default().to_string();
    let responses = v["responses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| B64.decode(r.as_str()?).ok())
                .collect()
        })
        .unwrap_or_default();
    Some((code, message, responses))
}

enum CallError {
    Connect(String),
    Usage(String),
    /// A gRPC status code and message.
    Status(u32, String),
    Deadline,
}

/// gRPC status code names as tonic prints them (`NotFound`, `FailedPrecondition`, ...).
fn code_name(code: u32) -> String {
    format!("{:?}", tonic::Code::from_i32(code as i32))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match call(&args) {
        Ok(answer) => {
            println!("OK {answer}");
            ExitCode::SUCCESS
        }
        Err(CallError::Status(code, message)) => {
            println!("ERR {} {message}", code_name(code));
            ExitCode::from(3)
        }
        Err(CallError::Connect(e)) => {
            println!("CONNECT {e}");
            ExitCode::from(1)
        }
        Err(CallError::Usage(e)) => {
            eprintln!("e2e-kubelet: {e}");
            ExitCode::from(64)
        }
        Err(CallError::Deadline) => {
            println!("DEADLINE no answer within {}s", args.timeout);
            ExitCode::from(1)
        }
    }
}
