//! `hybridlet init`: resolve the cluster's coordinates and the node's identity, render
//! every file a join writes (hybridlet-bootstrap), and write them as one change
//! (hybridlet-sys fileset: atomic writes, a backup of every replaced file first, the
//! written files put back if a later write fails), then reload systemd and enable and
//! restart containerd and the kubelet where their files changed or they are not running.
//! A unit that fails to restart rolls the files back and restarts it on the old ones.
//! Running it again changes nothing and restarts nothing when nothing changed.
//!
//! `--dry-run` shows each file as new, changed or unchanged and writes nothing.
//! Registering SSM credentials is not in this build: an SSM node must be registered with
//! the SSM agent first (init says so).

use std::time::Duration;

use hybridlet_aws::{AwsSettings, describe_cluster, eks_client, resolve_credentials, sdk_config};
use hybridlet_bootstrap::{ClusterCoordinates, NodeIdentity, RenderedFile, render};
use hybridlet_config::{Config, CredentialProvider, NodeConfig};
use hybridlet_sys::HostRoot;
use hybridlet_sys::fileset::{self, DesiredFile, FileState};
use hybridlet_sys::ssm_agent::{AgentCli, SsmRegistrar};
use hybridlet_sys::systemd::{ServiceManager, Systemctl};
use std::path::{Path, PathBuf};

use crate::Error;
use crate::Outcome;
use crate::remote_networks::RemoteNetworks;
use crate::{Context, InitArgs};

const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

fn node_config(config: &Config) -> Result<&NodeConfig, Error> {
    config.node.as_ref().ok_or_else(|| Error::Unsupported {
        field: "apiVersion",
        message: "init needs nodeadm's NodeConfig (apiVersion: node.eks.aws/v1alpha1, kind: NodeConfig) in the configuration".into(),
    })
}

/// DescribeCluster with the node's credentials.
fn describe(
    ctx: &Context,
    node: &NodeConfig,
    why: &str,
) -> Result<hybridlet_aws::ClusterInfo, Error> {
    let c = &node.spec.cluster;
    let info = ctx.block_on(async {
            let sdk = sdk_config(&AwsSettings {
                region: c.region.clone(),
                config_file: crate::preflight::iam_ra_config_file(node),
                ..AwsSettings::default()
            })
            .await;
            if let Err(e) = resolve_credentials(&sdk).await {
                return Err(Error::Failed(format!(
                    "{why}, so init asks EKS (DescribeCluster), but there are no AWS credentials: {e}"
                )));
            }
            Ok(describe_cluster(&eks_client(&sdk), &c.name, DESCRIBE_TIMEOUT).await)
        })?
        .map_err(|e| {
            let text = e.to_string();
            if signature_time_refused(&text) {
                return Error::Failed(format!(
                    "{text}. AWS refused the request's signature time: this host's clock is probably more than 5 minutes off, which also breaks the kubelet's EKS token. Enable time sync (`timedatectl set-ntp true`, or chrony with a reachable NTP server) and run init again; `hybridlet check` measures the offset"
                ));
            }
            Error::Failed(format!("{text}. {why}"))
        })?;
    if info.status != "ACTIVE" {
        return Err(Error::Failed(format!(
            "cluster {} is {}, not ACTIVE; wait for it before joining nodes",
            info.name, info.status
        )));
    }
    Ok(info)
}

/// The cluster from the configuration when it has endpoint, CA and CIDR; otherwise from
/// DescribeCluster, with configured values taking precedence. Then the node's IP and pod
/// CIDRs against the cluster's remote networks, whenever they can be had:
/// `spec.remoteNetworks`, else DescribeCluster's answer (asked for them alone when the
/// configuration is complete and credentials allow; a warning says when they could not be).
fn coordinates(
    ctx: &Context,
    config: &Config,
    node: &NodeConfig,
    root: &HostRoot,
) -> Result<ClusterCoordinates, Error> {
    let c = &node.spec.cluster;
    let configured = config
        .agent
        .remote_networks
        .as_ref()
        .map(|n| RemoteNetworks {
            node_cidrs: n.node_cidrs.clone(),
            pod_cidrs: n.pod_cidrs.clone(),
            source: "spec.remoteNetworks",
        });
    let from_eks = |info: &hybridlet_aws::ClusterInfo| RemoteNetworks {
        node_cidrs: info.remote_node_cidrs.clone(),
        pod_cidrs: info.remote_pod_cidrs.clone(),
        source: "DescribeCluster",
    };
    let (cluster, nets) = if let (Some(endpoint), Some(ca), Some(cidr)) =
        (&c.api_server_endpoint, &c.certificate_authority, &c.cidr)
    {
        let cluster = ClusterCoordinates {
            name: c.name.clone(),
            region: c.region.clone(),
            endpoint: endpoint.clone(),
            certificate_authority: ca.clone(),
            service_cidr: cidr.clone(),
        };
        let nets = match configured {
            Some(n) => Some(n),
            None => match describe(
                ctx,
                node,
                "the remote networks to check the node against are not in spec.remoteNetworks",
            ) {
                Ok(info) => Some(from_eks(&info)),
                Err(e) => {
                    outln!(
                        "warning: the node's IP and pod CIDRs were not checked against the cluster's remote networks ({}); set spec.remoteNetworks to check them without EKS",
                        e.to_string().trim_end_matches('.')
                    );
                    None
                }
            },
        };
        (cluster, nets)
    } else {
        let info = describe(
            ctx,
            node,
            "spec.cluster.apiServerEndpoint, certificateAuthority or cidr is not set; set the three fields, or give the node credentials with eks:DescribeCluster (SSM: register the agent; IAM Roles Anywhere: AWS_CONFIG_FILE with its credential_process)",
        )?;
        let missing = |what: &str| {
            Error::Failed(format!("DescribeCluster returned no {what} for {}", c.name))
        };
        let nets = configured.unwrap_or_else(|| from_eks(&info));
        let cluster = ClusterCoordinates {
            name: c.name.clone(),
            region: c.region.clone(),
            endpoint: c
                .api_server_endpoint
                .clone()
                .or(info.endpoint)
                .ok_or_else(|| missing("endpoint"))?,
            certificate_authority: c
                .certificate_authority
                .clone()
                .or(info.certificate_authority)
                .ok_or_else(|| missing("certificate authority"))?,
            service_cidr: c
                .cidr
                .clone()
                .or(info.service_ipv4_cidr)
                .ok_or_else(|| missing("service CIDR"))?,
        };
        (cluster, Some(nets))
    };
    if let Some(nets) = nets {
        for (name, outcome) in crate::remote_networks::judge(node, root, &nets) {
            match outcome {
                Outcome::Ok(_) => {}
                Outcome::Warn(d) => outln!("warning: {name}: {d}"),
                Outcome::Fail(d) => return Err(Error::Failed(d.to_string())),
            }
        }
    }
    Ok(cluster)
}

/// AWS's answers when a SigV4 signature's time is too far from its own.
fn signature_time_refused(error: &str) -> bool {
    [
        "Signature expired",
        "RequestTimeTooSkewed",
        "InvalidSignatureException: Signature not yet current",
        "Signature not yet current",
    ]
    .iter()
    .any(|m| error.contains(m))
}

/// The API server's clock against ours, on the machine being joined: far off (> 5 min),
/// the EKS token the kubelet presents is refused, so the join is refused before anything
/// is written; a smaller offset is a warning; an API server that does not answer yet is
/// only mentioned (the kubelet keeps trying).
fn check_clock(ctx: &Context, cluster: &ClusterCoordinates) -> Result<(), Error> {
    let ca = hybridlet_config::decode_certificate_authority(&cluster.certificate_authority).ok();
    let probed = ctx.block_on(hybridlet_kube::probe(
        &cluster.endpoint,
        ca.as_deref(),
        Duration::from_secs(3),
    ));
    let date = match probed {
        Ok(p) => p.date,
        Err((_, e)) => {
            outln!(
                "note: the API server does not answer yet ({e}); the clock was not compared with it"
            );
            return Ok(());
        }
    };
    let Some(date) = date else {
        return Ok(());
    };
    match crate::preflight::skew_outcome(date, std::time::SystemTime::now(), &cluster.endpoint) {
        crate::Outcome::Fail(m) => Err(Error::Failed(format!("{m}. Nothing was changed"))),
        crate::Outcome::Warn(m) => {
            outln!("warning: {m}");
            Ok(())
        }
        crate::Outcome::Ok(_) => Ok(()),
    }
}

/// The node's certificate and key must be in place, the certificate's CN must be the node
/// name (the trust policy compares the role session name with it) and it must be valid
/// now; a certificate close to expiry is a warning.
fn check_iam_ra_pki(
    ra: &hybridlet_config::IamRolesAnywhereOptions,
    root: &HostRoot,
) -> Result<(), Error> {
    match crate::x509::check_iam_ra_files(ra, root, std::time::SystemTime::now()) {
        Ok(cert) => {
            if let Some(w) = cert.warning {
                outln!("warning: {w}");
            }
            Ok(())
        }
        Err(p) if p.in_configuration => Err(Error::Unsupported {
            field: p.field,
            message: p.message,
        }),
        Err(p) => Err(Error::Failed(p.message)),
    }
}

fn identity(node: &NodeConfig, root: &HostRoot) -> Result<NodeIdentity, Error> {
    let hybrid = node
        .spec
        .hybrid
        .as_ref()
        .ok_or_else(|| Error::Unsupported {
            field: "spec.hybrid",
            message: "required".into(),
        })?;
    match hybrid.credential_provider() {
        Some(CredentialProvider::IamRolesAnywhere) => {
            let ra = hybrid
                .iam_roles_anywhere
                .as_ref()
                .ok_or_else(|| Error::failed("spec.hybrid.iamRolesAnywhere is missing (validation should have refused this configuration)"))?;
            check_iam_ra_pki(ra, root)?;
            Ok(NodeIdentity {
                node_name: ra.node_name.clone(),
                credential_provider: "iam-ra".into(),
                aws_config_file: Some(ra.aws_config_path.clone()),
                ssm_agent_unit: None,
                ecr_credential_provider: false,
            })
        }
        // SSM identities come from the agent's registration (crate::ssm::prepare).
        Some(CredentialProvider::Ssm) | None => Err(Error::Unsupported {
            field: "spec.hybrid",
            message: "set exactly one of ssm or iamRolesAnywhere".into(),
        }),
    }
}

pub fn init(ctx: &Context, args: &InitArgs) -> Result<(), Error> {
    let loaded = &ctx.loaded;
    let node = node_config(&loaded.config)?;
    let root = ctx.root.clone();
    let backups = root
        .resolve(format!(
            "{}/init-backups",
            loaded.config.agent.state_dir.trim_end_matches('/')
        ))
        .map_err(|e| Error::Failed(format!("{e}")))?;
    let manage_services = !args.dry_run && !args.no_start && root.is_system();
    if !args.dry_run && !args.no_start && !manage_services {
        outln!("--root is not /: writing files only; containerd and the kubelet are left alone");
    }
    let systemctl = Systemctl::default();
    let services: Option<&dyn ServiceManager> = manage_services.then_some(&systemctl as _);
    let who = match node.spec.hybrid.as_ref().and_then(|h| h.ssm.as_ref()) {
        Some(ssm) => {
            // Registering acts on this machine: only when init runs for it, for real.
            let agent = (!args.dry_run && root.is_system())
                .then(|| hybridlet_sys::ssm_agent::find_agent(&root))
                .flatten()
                .map(|a| AgentCli::new(a.program, Duration::from_secs(90)));
            crate::ssm::prepare(
                &crate::ssm::Prepare {
                    root: &root,
                    config: &loaded.config,
                    ssm,
                    region: &node.spec.cluster.region,
                    services,
                    registrar: agent.as_ref().map(|a| a as &dyn SsmRegistrar),
                    dry_run: args.dry_run,
                    backups: &backups,
                    credentials_wait: crate::ssm::CREDENTIALS_WAIT,
                    register_pause: crate::ssm::REGISTER_PAUSE,
                },
                &mut |line| outln!("{line}"),
            )?
        }
        None => identity(node, &root)?,
    };
    let mut who = who;
    who.ecr_credential_provider = root
        .resolve(hybridlet_bootstrap::ECR_CREDENTIAL_PROVIDER)
        .is_ok_and(|p| p.is_file());
    let cluster = coordinates(ctx, &loaded.config, node, &root)?;
    if root.is_system() {
        // Only on the machine itself: under --root the API server is someone else's
        // concern (and tests stay on loopback).
        check_clock(ctx, &cluster)?;
    }
    let installed = crate::images::installed(&root);
    if let Some((name, crate::Outcome::Fail(why))) =
        crate::images::cdi_check(&loaded.config, installed.as_ref())
    {
        return Err(Error::Failed(format!("{name}: {why}. Nothing was changed")));
    }
    let sandbox = crate::images::sandbox(&root, &loaded.config, node);
    let target = crate::images::target(&sandbox, installed.as_ref());
    let rendered = render(&loaded.config, &cluster, &who, &target).map_err(crate::fail)?;
    outln!(
        "cluster {} ({}), API server {}, node {} ({} credentials)",
        cluster.name,
        cluster.region,
        cluster.endpoint,
        who.node_name,
        who.credential_provider
    );
    outln!(
        "containerd: {} (config version {}); sandbox image {}",
        installed
            .as_ref()
            .map_or("not installed", |(line, _)| line.as_str()),
        target.config_version,
        sandbox.image
    );
    let files = hybridlet_bootstrap::desired_files(&rendered, &root).map_err(crate::fail)?;
    if args.dry_run {
        return dry_run(&rendered, &files);
    }
    let report = join(&rendered, &files, &backups, services, SETTLE)?;
    for (f, state) in rendered.iter().zip(&report.states) {
        outln!("{:>9}  {:o}  {}", state.as_str(), f.mode, f.path);
    }
    for action in &report.actions {
        outln!("{action}");
    }
    match &report.backup {
        Some(dir) => outln!(
            "init: {} file(s) written; the previous versions are in {}",
            report.written(),
            dir.display()
        ),
        None => outln!("init: every file already up to date; nothing written"),
    }
    if manage_services {
        // containerd runs on its new config: the sandbox image now, with a login (nodeadm's
        // step), then the images to keep.
        crate::images::pull_after_start(ctx, &loaded.config, node, &sandbox, &mut |line| {
            outln!("{line}")
        })?;
    }
    if let Some(limit) = args.wait {
        let kubeconfig = root
            .resolve(format!(
                "{}/kubeconfig",
                loaded.config.agent.kubelet_root_dir.trim_end_matches('/')
            ))
            .map_err(|e| Error::Failed(format!("{e}")))?;
        ctx.block_on(async {
            let client = hybridlet_kube::client_from_kubeconfig(&kubeconfig)
                .await
                .map_err(crate::fail)?;
            wait_ready(
                &client,
                &who.node_name,
                limit,
                Duration::from_secs(2),
                &mut |line| outln!("{line}"),
            )
            .await
            .map_err(|e| Error::Failed(e.to_string()))
        })?;
    }
    Ok(())
}

/// Poll the Node until it is Ready, telling `say` each new state; an error after `limit`
/// names the last state and where to look.
pub(crate) async fn wait_ready(
    client: &hybridlet_kube::Client,
    node: &str,
    limit: Duration,
    every: Duration,
    say: &mut dyn FnMut(String),
) -> Result<(), String> {
    use hybridlet_kube::NodeState;
    let started = std::time::Instant::now();
    let mut last = String::new();
    loop {
        let now = match hybridlet_kube::node_state(client, node).await {
            Ok(NodeState::Ready) => {
                say(format!(
                    "node {node}: Ready after {}s",
                    started.elapsed().as_secs()
                ));
                return Ok(());
            }
            Ok(NodeState::Missing) => "not registered yet (the kubelet is starting)".to_string(),
            Ok(NodeState::NotReady(why)) => format!("registered, not Ready ({why})"),
            Err(e) => format!("the API server does not answer the node ({e})"),
        };
        if now != last {
            say(format!("node {node}: {now}"));
            last = now;
        }
        if started.elapsed() >= limit {
            return Err(format!(
                "node {node} is not Ready after {}s: {last}. `journalctl -u kubelet` on the node says why (CNI not installed yet is common: the node stays NotReady until a CNI runs)",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(every).await;
    }
}

fn dry_run(rendered: &[RenderedFile], files: &[DesiredFile]) -> Result<(), Error> {
    let states = fileset::plan(files).map_err(crate::fail)?;
    for (f, state) in rendered.iter().zip(&states) {
        outln!("{:>9}  {:o}  {}", state.as_str(), f.mode, f.path);
    }
    for f in rendered {
        outln!("\n--- {} ---\n{}", f.path, f.shown().trim_end());
    }
    let changes = states
        .iter()
        .filter(|s| **s != FileState::Unchanged)
        .count();
    outln!(
        "\ndry run: {} files, {changes} would be written; nothing was changed",
        rendered.len()
    );
    Ok(())
}

const CONTAINERD: &str = hybridlet_bootstrap::CONTAINERD_UNIT;
/// How long a restarted unit must stay active to count as started.
const SETTLE: Duration = Duration::from_secs(3);
const KUBELET: &str = hybridlet_bootstrap::KUBELET_UNIT;

/// What [`join`] did.
#[derive(Debug)]
pub(crate) struct JoinReport {
    pub states: Vec<FileState>,
    pub backup: Option<PathBuf>,
    pub actions: Vec<String>,
}

impl JoinReport {
    fn written(&self) -> usize {
        self.states
            .iter()
            .filter(|s| **s != FileState::Unchanged)
            .count()
    }
}

/// Write the files as one change and bring the services in line with them.
///
/// Preflight first, so that a host without containerd or the kubelet is refused before
/// anything is written. With `services` = `None` only the files are written.
pub(crate) fn join(
    rendered: &[RenderedFile],
    files: &[DesiredFile],
    backups: &Path,
    services: Option<&dyn ServiceManager>,
    settle: Duration,
) -> Result<JoinReport, Error> {
    let runtime = |e: Error| e;
    if let Some(sm) = services {
        for unit in [CONTAINERD, KUBELET] {
            let state = sm
                .state(unit)
                .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
            if !state.exists {
                let how = if unit == KUBELET {
                    "run `hybridlet install <kubernetes-version>` first"
                } else {
                    "install your distribution's containerd package first"
                };
                return Err(runtime(Error::Failed(format!(
                    "{unit} is not installed on this host, so the node cannot join: {how}, or run `hybridlet init --no-start` to write the files only. Nothing was changed"
                ))));
            }
        }
    }
    let applied = fileset::apply(files, backups).map_err(crate::fail)?;
    let mut report = JoinReport {
        states: applied.states,
        backup: applied.backup,
        actions: Vec::new(),
    };
    let Some(sm) = services else {
        return Ok(report);
    };
    // Each rendered file names the units that read it (the renderer knows).
    let changed = |unit: &str| {
        rendered
            .iter()
            .zip(&report.states)
            .any(|(f, s)| *s != FileState::Unchanged && f.owners.iter().any(|o| o == unit))
    };
    // Credential units (the SSM agent's drop-in, the signing helper's refresher) before
    // the runtime and the kubelet that depend on them.
    let mut units: Vec<String> = Vec::new();
    for u in rendered.iter().flat_map(|f| &f.owners) {
        if u != CONTAINERD && u != KUBELET && !units.contains(u) {
            units.push(u.clone());
        }
    }
    units.extend([CONTAINERD.to_string(), KUBELET.to_string()]);
    let mut plan = Vec::new();
    for unit in &units {
        let state = sm
            .state(unit)
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
        if changed(unit) || !state.active {
            plan.push((unit.as_str(), state.active));
        }
    }
    if report.backup.is_some() {
        sm.daemon_reload()
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
        report.actions.push("systemd: daemon-reload".into());
    }
    // Kernel settings take effect now, not only at the next boot: systemd's own one-shot
    // units read the .d directories init wrote into. A failure is reported, not fatal:
    // `hybridlet check` names what is still missing.
    for (path, unit) in [
        (
            hybridlet_bootstrap::MODULES_LOAD_PATH,
            "systemd-modules-load.service",
        ),
        (hybridlet_bootstrap::SYSCTL_PATH, "systemd-sysctl.service"),
    ] {
        let wrote = rendered
            .iter()
            .zip(&report.states)
            .any(|(f, s)| f.path == path && *s != FileState::Unchanged);
        if wrote {
            match sm.restart(unit) {
                Ok(()) => report
                    .actions
                    .push(format!("systemd: {unit} applied {path}")),
                Err(e) => report
                    .actions
                    .push(format!("warning: {unit} could not apply {path}: {e}")),
            }
        }
    }
    let mut restarted = Vec::new();
    for (unit, was_active) in plan {
        let result = sm
            .enable(unit)
            .and_then(|()| sm.restart_and_settle(unit, settle));
        match result {
            Ok(()) => {
                report.actions.push(format!(
                    "systemd: {unit} enabled and {}",
                    if was_active { "restarted" } else { "started" }
                ));
                restarted.push(unit);
            }
            Err(e) => {
                let undo = undo_after_failure(sm, report.backup.as_deref(), &restarted, unit);
                return Err(runtime(Error::Failed(format!(
                    "{unit} did not start with the new configuration: {e}. {undo}"
                ))));
            }
        }
    }
    Ok(report)
}

/// Put the previous files back and restart what was restarted, so the node runs as
/// before the failed init. Returns a sentence saying what happened.
fn undo_after_failure(
    sm: &dyn ServiceManager,
    backup: Option<&Path>,
    restarted: &[&str],
    failed: &str,
) -> String {
    let Some(backup) = backup else {
        return "No file had changed.".into();
    };
    if let Err(e) = fileset::rollback(backup) {
        return format!(
            "Putting the previous files back failed too ({e}); they are in {}",
            backup.display()
        );
    }
    let _ = sm.daemon_reload();
    let mut problems = Vec::new();
    for unit in restarted.iter().chain(std::iter::once(&failed)) {
        if let Err(e) = sm.restart(unit) {
            problems.push(format!("{unit}: {e}"));
        }
    }
    if problems.is_empty() {
        format!(
            "The previous files were put back (from {}) and the units restarted on them.",
            backup.display()
        )
    } else {
        format!(
            "The previous files were put back (from {}), but restarting on them failed: {}.",
            backup.display(),
            problems.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {

    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_sys::systemd::FakeServiceManager;

    /// An HTTPS server (the metrics test certificate, for 127.0.0.1) whose `Date` is
    /// `offset` seconds from now; its URL. Runs on its own thread and runtime.
    fn dated_server(offset: i64) -> (String, String) {
        use base64::Engine as _;
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../metrics/tests/fixtures");
        let config =
            hybridlet_metrics::tls_config(&fixtures.join("cert.pem"), &fixtures.join("key.pem"))
                .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                while let Ok((tcp, _)) = listener.accept().await {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let now = std::time::SystemTime::now();
                    let when = if offset >= 0 {
                        now + Duration::from_secs(offset as u64)
                    } else {
                        now - Duration::from_secs(offset.unsigned_abs())
                    };
                    let reply = format!(
                        "HTTP/1.1 401 Unauthorized\r\nDate: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        httpdate::fmt_http_date(when)
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        });
        let ca = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(fixtures.join("cert.pem")).unwrap());
        (url, ca)
    }

    fn coordinates_at(endpoint: &str, ca: &str) -> ClusterCoordinates {
        ClusterCoordinates {
            name: "c".into(),
            region: "eu-west-1".into(),
            endpoint: endpoint.into(),
            certificate_authority: ca.into(),
            service_cidr: "172.16.0.0/16".into(),
        }
    }

    #[test]
    fn a_clock_far_off_the_api_servers_refuses_the_join() {
        let (url, ca) = dated_server(-900);
        let e = check_clock(
            &Context::for_tests(std::path::Path::new("/")),
            &coordinates_at(&url, &ca),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ahead of the API server's") && e.contains("timedatectl"),
            "{e}"
        );
        let (url, ca) = dated_server(0);
        assert!(
            check_clock(
                &Context::for_tests(std::path::Path::new("/")),
                &coordinates_at(&url, &ca)
            )
            .is_ok()
        );
        // Nobody answers: only a note.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        assert!(
            check_clock(
                &Context::for_tests(std::path::Path::new("/")),
                &coordinates_at(&url, &ca)
            )
            .is_ok()
        );
        assert!(signature_time_refused(
            "eks:DescribeCluster c: InvalidSignatureException: Signature expired: 20261126T000000Z is now earlier than ..."
        ));
        assert!(!signature_time_refused(
            "ResourceNotFoundException: No cluster found"
        ));
    }

    #[tokio::test]
    async fn wait_ready_reports_each_state_until_ready() {
        let api = hybridlet_fixtures::apiserver::FakeApiServer::start()
            .await
            .unwrap();
        let client = hybridlet_kube::client_for(&api.url(), None).unwrap();
        let mut said = Vec::new();
        let err = wait_ready(
            &client,
            "n1",
            Duration::from_millis(50),
            Duration::from_millis(10),
            &mut |l| said.push(l),
        )
        .await
        .unwrap_err();
        assert!(err.contains("not registered yet"), "{err}");
        assert_eq!(said.len(), 1, "one line per change: {said:?}");

        let node = |status: &str, reason: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": status, "reason": reason,
                    "message": "container runtime network not ready"}]}})
        };
        api.put("/api/v1/nodes/n1", node("False", "KubeletNotReady"));
        let (api2, done) = (
            api.clone(),
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let flag = done.clone();
        let becomes_ready = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            api2.put("/api/v1/nodes/n1", node("True", "KubeletReady"));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut said = Vec::new();
        wait_ready(
            &client,
            "n1",
            Duration::from_secs(10),
            Duration::from_millis(10),
            &mut |l| said.push(l),
        )
        .await
        .unwrap();
        becomes_ready.await.unwrap();
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            said[0].contains(
                "registered, not Ready (KubeletNotReady: container runtime network not ready)"
            ),
            "{said:?}"
        );
        assert!(said.last().unwrap().contains("Ready after"), "{said:?}");
    }

    fn fixture(dir: &Path) -> (Vec<RenderedFile>, Vec<DesiredFile>) {
        let rendered = vec![
            RenderedFile::new("/etc/containerd/config.toml", 0o644, "version = 3\n")
                .owned_by(CONTAINERD),
            RenderedFile::new("/etc/kubernetes/kubelet/config.json", 0o644, "{}\n")
                .owned_by(KUBELET),
        ];
        let files = rendered
            .iter()
            .map(|f| DesiredFile {
                path: dir.join(f.path.trim_start_matches('/')),
                mode: f.mode,
                contents: f.contents.clone().into_bytes(),
            })
            .collect();
        (rendered, files)
    }

    #[test]
    fn first_join_starts_both_then_a_rerun_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (rendered, files) = fixture(dir.path());
        let sm = FakeServiceManager::with_units(&[CONTAINERD, KUBELET]);
        let backups = dir.path().join("backups");
        let first = join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        assert_eq!(first.written(), 2);
        assert_eq!(
            sm.calls(),
            [
                "daemon-reload",
                "enable containerd.service",
                "restart containerd.service",
                "enable kubelet.service",
                "restart kubelet.service"
            ]
        );
        let second = join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        assert_eq!(second.written(), 0);
        assert!(second.actions.is_empty(), "{:?}", second.actions);
        assert_eq!(sm.calls().len(), 5, "a rerun restarted something");

        // Only the kubelet's file changes: only the kubelet restarts.
        let mut rendered2 = rendered.clone();
        rendered2[1].contents = "{\"maxPods\": 110}\n".into();
        let (_, mut files2) = fixture(dir.path());
        files2[1].contents = rendered2[1].contents.clone().into_bytes();
        join(&rendered2, &files2, &backups, Some(&sm), Duration::ZERO).unwrap();
        assert_eq!(
            &sm.calls()[5..],
            [
                "daemon-reload",
                "enable kubelet.service",
                "restart kubelet.service"
            ]
        );
    }

    /// A new proxy password changes only the root-only environment file; every unit
    /// whose drop-in reads it restarts all the same.
    #[test]
    fn a_proxy_env_file_change_restarts_the_units_that_use_it() {
        let dir = tempfile::tempdir().unwrap();
        let render = |password: &str| {
            let rendered = vec![
                RenderedFile::new(
                    "/etc/systemd/system/kubelet.service.d/http-proxy.conf",
                    0o644,
                    "[Service]\nEnvironmentFile=/etc/hybridlet/proxy.env\n",
                )
                .owned_by(KUBELET),
                RenderedFile::new(
                    hybridlet_bootstrap::PROXY_ENV_FILE,
                    0o600,
                    format!("HTTPS_PROXY=http://u:{password}@proxy:3128\n"),
                )
                .owned_by(KUBELET)
                .secret(),
            ];
            let files: Vec<DesiredFile> = rendered
                .iter()
                .map(|f| DesiredFile {
                    path: dir.path().join(f.path.trim_start_matches('/')),
                    mode: f.mode,
                    contents: f.contents.clone().into_bytes(),
                })
                .collect();
            (rendered, files)
        };
        let sm = FakeServiceManager::with_units(&[CONTAINERD, KUBELET]);
        sm.restart(CONTAINERD).unwrap();
        sm.restart(KUBELET).unwrap();
        let backups = dir.path().join("backups");
        let (rendered, files) = render("one");
        join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        let before = sm.calls().len();
        let (rendered, files) = render("two");
        let report = join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        assert_eq!(report.written(), 1);
        assert_eq!(
            &sm.calls()[before..],
            [
                "daemon-reload",
                "enable kubelet.service",
                "restart kubelet.service"
            ],
            "containerd has no proxy drop-in here, so it stays"
        );
    }

    #[test]
    fn kernel_settings_are_applied_when_written_and_not_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rendered, mut files) = fixture(dir.path());
        for (path, contents) in [
            (hybridlet_bootstrap::MODULES_LOAD_PATH, "overlay\n"),
            (
                hybridlet_bootstrap::SYSCTL_PATH,
                "net.ipv4.ip_forward = 1\n",
            ),
        ] {
            rendered.push(RenderedFile::new(path, 0o644, contents));
            files.push(DesiredFile {
                path: dir.path().join(path.trim_start_matches('/')),
                mode: 0o644,
                contents: contents.as_bytes().to_vec(),
            });
        }
        let sm = FakeServiceManager::with_units(&[
            CONTAINERD,
            KUBELET,
            "systemd-modules-load.service",
            "systemd-sysctl.service",
        ]);
        let backups = dir.path().join("backups");
        let first = join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        let calls = sm.calls();
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
        // Before the kubelet starts, after systemd has reloaded.
        assert!(at("daemon-reload") < at("restart systemd-modules-load.service"));
        assert!(at("restart systemd-sysctl.service") < at("restart kubelet.service"));
        assert!(
            first
                .actions
                .iter()
                .any(|a| a.contains("applied /etc/sysctl.d/99-hybridlet.conf"))
        );
        join(&rendered, &files, &backups, Some(&sm), Duration::ZERO).unwrap();
        assert_eq!(sm.calls().len(), calls.len(), "a rerun applied again");
    }

    #[test]
    fn a_unit_that_exits_right_after_start_counts_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (rendered, files) = fixture(dir.path());
        let sm = FakeServiceManager::with_units(&[CONTAINERD, KUBELET]);
        sm.exit_after_start(KUBELET);
        let err = join(
            &rendered,
            &files,
            &dir.path().join("b"),
            Some(&sm),
            Duration::from_millis(300),
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("stopped right after starting"), "{text}");
        assert!(
            !files[1].path.exists(),
            "the new kubelet config survived the rollback"
        );
    }

    #[test]
    fn missing_kubelet_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (rendered, files) = fixture(dir.path());
        let sm = FakeServiceManager::with_units(&[CONTAINERD]);
        let err = join(
            &rendered,
            &files,
            &dir.path().join("b"),
            Some(&sm),
            Duration::ZERO,
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("kubelet.service is not installed"), "{text}");
        assert!(!files[0].path.exists(), "files written despite the refusal");
    }

    #[test]
    fn a_unit_that_fails_to_restart_rolls_the_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let (rendered, files) = fixture(dir.path());
        std::fs::create_dir_all(files[1].path.parent().unwrap()).unwrap();
        std::fs::write(&files[1].path, "{\"old\": true}\n").unwrap();
        let sm = FakeServiceManager::with_units(&[CONTAINERD, KUBELET]);
        sm.fail_restart(KUBELET);
        let err = join(
            &rendered,
            &files,
            &dir.path().join("b"),
            Some(&sm),
            Duration::ZERO,
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("kubelet.service did not start"), "{text}");
        assert!(text.contains("previous files were put back"), "{text}");
        assert_eq!(
            std::fs::read_to_string(&files[1].path).unwrap(),
            "{\"old\": true}\n"
        );
        assert!(!files[0].path.exists(), "a new file survived the rollback");
        let calls = sm.calls();
        assert!(
            calls.ends_with(&[
                "daemon-reload".to_string(),
                "restart containerd.service".to_string(),
                "restart kubelet.service".to_string()
            ]),
            "{calls:?}"
        );
    }
}
