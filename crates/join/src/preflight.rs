//! The node checks of `hybridlet check` for a joined (or joining) node: what the kubelet
//! needs from the host (no swap, cgroup v2, kernel modules, IP forwarding, free ports,
//! containerd and the kubelet running) and from the network (the API server resolves,
//! accepts TCP, verifies with the cluster CA, and keeps a clock close to ours — EKS tokens
//! are presigned, so skew breaks authentication). Each failure says what is wrong and the
//! exact fix. Host files are read under `--root`; services and ports only on the real host.
//! The AWS endpoints the node's agents call (SSM or IAM Roles Anywhere, EKS) are reached
//! as those agents reach them, through `spec.proxy` when it is set.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, SystemTime};

use hybridlet_config::Config;
use hybridlet_sys::HostRoot;
use hybridlet_sys::systemd::ServiceManager;

use crate::Outcome;

/// Beyond this the AWS signature (and with it the EKS token) is refused.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Beyond this a warning: NTP is probably not running.
pub const WARN_SKEW: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const MODULES: &[(&str, &str)] = &[
    ("overlay", "containerd's overlayfs snapshotter"),
    (
        "br_netfilter",
        "pod traffic through bridges seen by iptables",
    ),
];

fn read(root: &HostRoot, path: &str) -> Option<String> {
    std::fs::read_to_string(root.resolve(path).ok()?).ok()
}

/// Swap, cgroup version, modules and IP forwarding, from files under the root.
pub fn kernel(root: &HostRoot) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    out.push((
        "swap",
        match read(root, "/proc/swaps") {
            None => Outcome::Warn("/proc/swaps cannot be read".into()),
            Some(text) => {
                let active: Vec<&str> = text
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next())
                    .collect();
                if active.is_empty() {
                    Outcome::Ok("off".into())
                } else {
                    Outcome::Fail(format!(
                        "swap is on ({}); the kubelet refuses to start with swap (failSwapOn): run `swapoff -a` and remove the swap lines from /etc/fstab",
                        active.join(", ")
                    ))
                }
            }
        },
    ));
    let v2 = root
        .resolve("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|p| p.exists());
    out.push((
        "cgroup",
        if v2 {
            Outcome::Ok("v2 (unified hierarchy)".into())
        } else {
            Outcome::Warn(
                "cgroup v1: Kubernetes keeps it only in maintenance mode and newer kubelets refuse it; boot with systemd.unified_cgroup_hierarchy=1 (the default on Debian 11+, Ubuntu 21.10+, RHEL 9)"
                    .into(),
            )
        },
    ));
    for (module, why) in MODULES {
        let loaded = root
            .resolve(format!("/sys/module/{module}"))
            .is_ok_and(|p| p.exists());
        out.push((
            "kernel module",
            if loaded {
                Outcome::Ok(format!("{module} loaded"))
            } else {
                Outcome::Fail(format!(
                    "{module} is not loaded ({why}): run `modprobe {module}` and add it to /etc/modules-load.d/hybridlet.conf"
                ))
            },
        ));
    }
    out.push((
        "IP forwarding",
        match read(root, "/proc/sys/net/ipv4/ip_forward").as_deref().map(str::trim) {
            Some("1") => Outcome::Ok("net.ipv4.ip_forward = 1".into()),
            Some(v) => Outcome::Fail(format!(
                "net.ipv4.ip_forward = {v}; pods cannot reach anything off the node: run `sysctl -w net.ipv4.ip_forward=1` and set it in /etc/sysctl.d/99-hybridlet.conf"
            )),
            None => Outcome::Warn("net.ipv4.ip_forward cannot be read".into()),
        },
    ));
    out
}

/// The sysctls init writes besides forwarding, with the value the kubelet's
/// `protectKernelDefaults` insists on.
const KERNEL_DEFAULTS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
];

/// The sysctls the kubelet checks when `protectKernelDefaults` is on (a mismatch makes it
/// refuse to start): warnings, since it is off unless configured.
pub fn kernel_defaults(root: &HostRoot) -> Vec<(&'static str, Outcome)> {
    let mut wrong = Vec::new();
    for (key, want) in KERNEL_DEFAULTS {
        if let Some(v) = read(root, &format!("/proc/sys/{key}"))
            && v.trim() != *want
        {
            wrong.push(format!(
                "{} = {} (want {want})",
                key.replace('/', "."),
                v.trim()
            ));
        }
    }
    vec![(
        "sysctls",
        if wrong.is_empty() {
            Outcome::Ok(
                "vm.overcommit_memory, kernel.panic, kernel.panic_on_oops as the kubelet expects"
                    .into(),
            )
        } else {
            Outcome::Warn(format!(
                "{}: a kubelet with protectKernelDefaults refuses to start. `hybridlet init` writes /etc/sysctl.d/99-hybridlet.conf; `sysctl --system` applies it",
                wrong.join(", ")
            ))
        },
    )]
}

fn executable(root: &HostRoot, path: &str) -> Option<Result<(), String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let p = root.resolve(path).ok()?;
    let meta = std::fs::metadata(&p).ok()?;
    Some(
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            Ok(())
        } else {
            Err(format!("{path} is not an executable file"))
        },
    )
}

/// The programs a joined node runs: the kubelet, containerd, the credential provider's
/// tool (the IAM Roles Anywhere signing helper or the SSM agent) and CNI plugins. Not
/// installed yet is a warning with the command that installs it; present but not
/// executable is a failure.
pub fn binaries(config: &Config, root: &HostRoot) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    let mut program = |name: &'static str, paths: &[&str], install: &str| {
        let found = paths
            .iter()
            .find_map(|p| executable(root, p).map(|r| (*p, r)));
        out.push((
            name,
            match found {
                Some((p, Ok(()))) => Outcome::Ok(p.to_string()),
                Some((_, Err(e))) => Outcome::Fail(format!("{e}: {install}")),
                None => Outcome::Warn(format!(
                    "not installed yet ({}): {install}",
                    paths.join(" or ")
                )),
            },
        ));
    };
    program(
        "program: kubelet",
        &["/usr/bin/kubelet"],
        "run `hybridlet install <version>`",
    );
    program(
        "program: containerd",
        &[
            "/usr/bin/containerd",
            "/usr/local/bin/containerd",
            "/usr/sbin/containerd",
        ],
        "install your distribution's containerd package",
    );
    let hybrid = config.node.as_ref().and_then(|n| n.spec.hybrid.as_ref());
    if hybrid.is_some_and(|h| h.iam_roles_anywhere.is_some()) {
        program(
            "program: IAM Roles Anywhere signing helper",
            &[hybridlet_bootstrap::SIGNING_HELPER],
            "run `hybridlet install <version> --credential-provider iam-ra`; every credential request runs it",
        );
    }
    if hybrid.is_some_and(|h| h.ssm.is_some()) {
        program(
            "program: SSM agent",
            &[
                "/usr/bin/amazon-ssm-agent",
                "/snap/amazon-ssm-agent/current/amazon-ssm-agent",
            ],
            "install amazon-ssm-agent (or `hybridlet install <version> --credential-provider ssm` from a mirror that carries it)",
        );
    }
    let plugins = root
        .resolve("/opt/cni/bin")
        .ok()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0);
    out.push((
        "CNI plugins",
        if plugins > 0 {
            Outcome::Ok(format!("{plugins} in /opt/cni/bin"))
        } else {
            Outcome::Warn(
                "/opt/cni/bin is empty: pods get no network until plugins are there (`hybridlet install` puts the standard ones; your CNI's DaemonSet adds its own)".into(),
            )
        },
    ));
    out
}

/// Whether `addr` can be listened on now.
pub fn port_free(addr: SocketAddr) -> Result<(), std::io::Error> {
    TcpListener::bind(addr).map(drop)
}

/// containerd and the kubelet, and the kubelet's ports (a port in use is fine when the
/// kubelet itself holds it).
pub fn services(sm: &dyn ServiceManager) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    let mut kubelet_active = false;
    for (unit, fix) in [
        (
            "containerd.service",
            "install your distribution's containerd package",
        ),
        ("kubelet.service", "run `hybridlet install <version>`"),
    ] {
        out.push((
            "service",
            match sm.state(unit) {
                Err(e) => Outcome::Warn(format!("{unit}: {e}")),
                Ok(s) if !s.exists => Outcome::Warn(format!(
                    "{unit} is not installed yet ({fix}, then `hybridlet init`)"
                )),
                Ok(s) if s.active => {
                    kubelet_active |= unit == "kubelet.service";
                    Outcome::Ok(format!("{unit} active"))
                }
                Ok(_) => Outcome::Fail(format!(
                    "{unit} is not running: `systemctl status {unit}` and `journalctl -u {unit}` say why; `hybridlet init` starts it"
                )),
            },
        ));
    }
    for (port, what) in [
        (10250, "the kubelet's API"),
        (10256, "kube-proxy's health check"),
    ] {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        out.push((
            "port",
            match port_free(addr) {
                Ok(()) => Outcome::Ok(format!("{port}/tcp free ({what})")),
                Err(_) if kubelet_active && port == 10250 => {
                    Outcome::Ok(format!("{port}/tcp held by the running kubelet"))
                }
                Err(_) if port == 10256 => Outcome::Ok(format!(
                    "{port}/tcp in use (kube-proxy or the CNI's replacement, when it runs on this node)"
                )),
                Err(e) => Outcome::Fail(format!(
                    "{port}/tcp is taken ({e}) and {what} needs it: `ss -ltnp 'sport = :{port}'` shows by what"
                )),
            },
        ));
    }
    out
}

/// The API server from the configuration, or else from the files `init` wrote.
fn api_server(config: &Config, root: &HostRoot) -> Option<(String, Option<Vec<u8>>)> {
    let cluster = &config.node.as_ref()?.spec.cluster;
    if let Some(endpoint) = &cluster.api_server_endpoint {
        return Some((endpoint.clone(), cluster.ca_pem()));
    }
    let kubeconfig = read(
        root,
        &Path::new(&config.agent.kubelet_root_dir)
            .join("kubeconfig")
            .display()
            .to_string(),
    )?;
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))?
        .trim()
        .trim_matches('"')
        .to_string();
    let ca = root
        .resolve("/etc/kubernetes/pki/ca.crt")
        .ok()
        .and_then(|p| std::fs::read(p).ok());
    Some((server, ca))
}

/// IAM Roles Anywhere's AWS config file (its `credential_process` profile), when the
/// node uses it and the file exists: read like `AWS_CONFIG_FILE` for the node's own AWS
/// calls.
pub fn iam_ra_config_file(node: &hybridlet_config::NodeConfig) -> Option<std::path::PathBuf> {
    let ra = node.spec.hybrid.as_ref()?.iam_roles_anywhere.as_ref()?;
    let path = std::path::PathBuf::from(&ra.aws_config_path);
    path.exists().then_some(path)
}

/// IAM Roles Anywhere: the node's certificate and key are in place, the certificate's CN
/// is the node name, and it is valid (30 days before expiry: a warning).
pub fn iam_ra_certificate(config: &Config, root: &HostRoot) -> Option<(&'static str, Outcome)> {
    let ra = config
        .node
        .as_ref()?
        .spec
        .hybrid
        .as_ref()?
        .iam_roles_anywhere
        .as_ref()?;
    let outcome = match crate::x509::check_iam_ra_files(ra, root, SystemTime::now()) {
        Ok(cert) => match cert.warning {
            Some(w) => Outcome::Warn(w),
            None => Outcome::Ok(format!(
                "{}: CN {} = nodeName, valid until {}",
                ra.certificate_path,
                ra.node_name,
                crate::x509::show(cert.not_after)
            )),
        },
        Err(p) => Outcome::Fail(format!("{} ({})", p.message, p.field)),
    };
    Some(("IAM Roles Anywhere certificate", outcome))
}

/// Whether the node's AWS credentials work: STS GetCallerIdentity.
pub fn credentials_check(ctx: &crate::Context, config: &Config) -> Option<(&'static str, Outcome)> {
    let node = config.node.as_ref()?;
    let answer = ctx.block_on(async {
        let sdk = hybridlet_aws::sdk_config(&hybridlet_aws::AwsSettings {
            region: node.spec.cluster.region.clone(),
            config_file: iam_ra_config_file(node),
            ..hybridlet_aws::AwsSettings::default()
        })
        .await;
        hybridlet_aws::caller_identity(&sdk, PROBE_TIMEOUT * 2).await
    });
    Some((
        "AWS credentials",
        match answer {
            Ok(arn) => Outcome::Ok(format!("STS says this node is {arn}")),
            Err(e) => Outcome::Fail(format!(
                "{e}; the EKS token and DescribeCluster need them. SSM: register the agent (it writes /root/.aws/credentials); IAM Roles Anywhere: the certificate, key and {} with the signing helper's credential_process",
                node.spec
                    .hybrid
                    .as_ref()
                    .and_then(|h| h.iam_roles_anywhere.as_ref())
                    .map_or("/etc/aws/hybrid/config", |ra| ra.aws_config_path.as_str())
            )),
        },
    ))
}

/// The node IP and pod CIDRs against the cluster's remote networks: `spec.remoteNetworks`
/// when set (checked offline too), else DescribeCluster's answer when the node's
/// credentials get one; a warning says when neither is available.
pub fn remote_network_checks(
    ctx: &crate::Context,
    config: &Config,
    root: &HostRoot,
    offline: bool,
) -> Vec<(&'static str, Outcome)> {
    let Some(node) = config.node.as_ref() else {
        return Vec::new();
    };
    if let Some(n) = &config.agent.remote_networks {
        let nets = crate::remote_networks::RemoteNetworks {
            node_cidrs: n.node_cidrs.clone(),
            pod_cidrs: n.pod_cidrs.clone(),
            source: "spec.remoteNetworks",
        };
        return crate::remote_networks::judge(node, root, &nets);
    }
    if offline {
        return Vec::new();
    }
    let c = &node.spec.cluster;
    let answer = ctx.block_on(async {
        let sdk = hybridlet_aws::sdk_config(&hybridlet_aws::AwsSettings {
            region: c.region.clone(),
            config_file: iam_ra_config_file(node),
            ..hybridlet_aws::AwsSettings::default()
        })
        .await;
        hybridlet_aws::resolve_credentials(&sdk).await?;
        hybridlet_aws::describe_cluster(
            &hybridlet_aws::eks_client(&sdk),
            &c.name,
            PROBE_TIMEOUT * 2,
        )
        .await
        .map_err(|e| e.to_string())
    });
    match answer {
        Ok(info) => crate::remote_networks::judge(
            node,
            root,
            &crate::remote_networks::RemoteNetworks {
                node_cidrs: info.remote_node_cidrs,
                pod_cidrs: info.remote_pod_cidrs,
                source: "DescribeCluster",
            },
        ),
        Err(e) => vec![(
            "remote node network",
            Outcome::Warn(format!(
                "not checked: DescribeCluster {} did not answer ({e}); set spec.remoteNetworks to check the node IP and pod CIDRs without EKS",
                c.name
            )),
        )],
    }
}

/// The regional endpoint of `service` (`ssm`, `rolesanywhere`, `eks`), or the standard
/// `AWS_ENDPOINT_URL_<SERVICE>` / `AWS_ENDPOINT_URL` override the node's tools honour.
fn aws_endpoint(service: &str, env_name: &str, region: &str) -> String {
    hybridlet_aws::endpoint_from_env(env_name)
        .unwrap_or_else(|| format!("https://{}", hybridlet_aws::regional_host(service, region)))
}

/// With a proxy: whether init's drop-ins (and the root-only environment file they may
/// read) are in place for containerd, the kubelet and the SSM agent.
pub fn proxy_settings(config: &Config, root: &HostRoot) -> Option<(&'static str, Outcome)> {
    config.agent.proxy.https_proxy.as_ref()?;
    let node = config.node.as_ref()?;
    let mut missing = Vec::new();
    let mut units = vec!["containerd.service", "kubelet.service"];
    let agent = hybridlet_sys::ssm_agent::find_agent(root);
    if node.spec.hybrid.as_ref().is_some_and(|h| h.ssm.is_some()) {
        units.push(
            agent
                .as_ref()
                .map_or("amazon-ssm-agent.service", |a| a.unit.as_str()),
        );
    }
    for unit in units {
        let path = format!("/etc/systemd/system/{unit}.d/http-proxy.conf");
        match read(root, &path) {
            None => missing.push(path),
            // A drop-in that reads the root-only file needs the file.
            Some(text)
                if text.contains(hybridlet_bootstrap::PROXY_ENV_FILE)
                    && !root
                        .resolve(hybridlet_bootstrap::PROXY_ENV_FILE)
                        .is_ok_and(|p| p.exists())
                    && !missing
                        .iter()
                        .any(|m| m == hybridlet_bootstrap::PROXY_ENV_FILE) =>
            {
                missing.push(hybridlet_bootstrap::PROXY_ENV_FILE.to_string());
            }
            Some(_) => {}
        }
    }
    Some((
        "proxy settings",
        if missing.is_empty() {
            Outcome::Ok("the proxy drop-ins init writes are in place".into())
        } else {
            Outcome::Warn(format!(
                "spec.proxy is set but {} missing, so those services go direct: run `hybridlet init`",
                missing.join(", ")
            ))
        },
    ))
}

/// The AWS endpoints this node's agents call, reached the way they will reach them
/// (through `spec.proxy` unless `noProxy` exempts the host): the credential provider's
/// (SSM or IAM Roles Anywhere) and EKS when init needs DescribeCluster. With a proxy,
/// also whether init's proxy drop-ins are in place.
pub fn aws_endpoint_checks(
    ctx: &crate::Context,
    config: &Config,
    root: &HostRoot,
) -> Vec<(&'static str, Outcome)> {
    let Some(node) = config.node.as_ref() else {
        return Vec::new();
    };
    let region = &node.spec.cluster.region;
    let mut targets: Vec<(&'static str, String)> = Vec::new();
    match node
        .spec
        .hybrid
        .as_ref()
        .and_then(|h| h.credential_provider())
    {
        Some(hybridlet_config::CredentialProvider::Ssm) => {
            targets.push(("SSM endpoint", aws_endpoint("ssm", "SSM", region)));
        }
        Some(hybridlet_config::CredentialProvider::IamRolesAnywhere) => targets.push((
            "IAM Roles Anywhere endpoint",
            aws_endpoint("rolesanywhere", "ROLESANYWHERE", region),
        )),
        None => {}
    }
    let c = &node.spec.cluster;
    if c.api_server_endpoint.is_none() || c.certificate_authority.is_none() || c.cidr.is_none() {
        targets.push(("EKS endpoint", aws_endpoint("eks", "EKS", region)));
    }
    let proxy = &config.agent.proxy;
    let https_proxy = proxy.https_proxy.as_deref();
    let mut out = Vec::new();
    out.extend(proxy_settings(config, root));
    for (name, url) in targets {
        let reached = ctx.block_on(hybridlet_aws::reach(
            &url,
            https_proxy,
            &proxy.no_proxy,
            hybridlet_aws::system_roots(),
            PROBE_TIMEOUT,
        ));
        let via = |p: &Option<String>| {
            p.as_ref()
                .map(|p| format!(" through the proxy {p}"))
                .unwrap_or_default()
        };
        out.push((
            name,
            match reached {
                Ok(r) => Outcome::Ok(format!(
                    "{} reachable over TLS{}",
                    r.endpoint,
                    via(&r.via_proxy)
                )),
                Err((step, e)) => {
                    use hybridlet_aws::ReachStep;
                    let fix = match step {
                        ReachStep::Address => "check spec.proxy and the AWS_ENDPOINT_URL_* settings".to_string(),
                        ReachStep::Dns => "the node's resolver must answer for it (with a VPC interface endpoint, forward the name to a Route 53 inbound resolver)".to_string(),
                        ReachStep::Tcp if https_proxy.is_some() => "the proxy in spec.proxy.httpsProxy must be reachable from the node".to_string(),
                        ReachStep::Tcp => "allow outbound 443/tcp to it (firewall, the route over VPN or Direct Connect), or set spec.proxy.httpsProxy".to_string(),
                        ReachStep::Proxy => "the proxy must allow CONNECT to it on 443 (allow-list *.amazonaws.com), or list it in spec.proxy.noProxy when the node reaches it directly".to_string(),
                        ReachStep::Tls => "something presented a certificate this host does not trust: TLS inspection? Exempt the AWS endpoints from inspection, or add the inspecting CA to the system trust store (update-ca-certificates / update-ca-trust)".to_string(),
                    };
                    Outcome::Fail(format!("{url}: {} failed: {e}; {fix}", step.as_str()))
                }
            },
        ));
    }
    out
}

/// Clock skew against a server's `Date`, as a check outcome.
pub fn skew_outcome(server_date: SystemTime, now: SystemTime, server: &str) -> Outcome {
    let (skew, ahead) = match now.duration_since(server_date) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let said = format!(
        "this host's clock is {}s {} the API server's",
        skew.as_secs(),
        if ahead { "ahead of" } else { "behind" }
    );
    if skew > MAX_SKEW {
        Outcome::Fail(format!(
            "{said} ({server}); AWS refuses signatures more than 5 minutes off, so the node's EKS token and STS calls fail: enable time sync (`timedatectl set-ntp true`, or chrony with a reachable NTP server; `chronyc tracking` shows the offset)"
        ))
    } else if skew > WARN_SKEW {
        Outcome::Warn(format!(
            "{said}; is time sync running? (`timedatectl`, `chronyc tracking`)"
        ))
    } else {
        Outcome::Ok(format!("within {}s of the API server", WARN_SKEW.as_secs()))
    }
}

/// DNS, TCP, TLS with the cluster CA, and the clock against the API server.
pub fn api_server_checks(
    ctx: &crate::Context,
    config: &Config,
    root: &HostRoot,
) -> Vec<(&'static str, Outcome)> {
    let Some((server, ca)) = api_server(config, root) else {
        return vec![(
            "API server",
            Outcome::Warn(
                "not checked: spec.cluster.apiServerEndpoint is not set and init has not written a kubeconfig yet (init looks it up with DescribeCluster)"
                    .into(),
            ),
        )];
    };
    let probed = ctx.block_on(hybridlet_kube::probe(&server, ca.as_deref(), PROBE_TIMEOUT));
    match probed {
        Err((stage, e)) => {
            use hybridlet_kube::ProbeStage;
            let (name, fix) = match stage {
                ProbeStage::Dns => (
                    "API server DNS",
                    "the node's resolver must answer for the cluster endpoint; a private endpoint needs on-premises DNS forwarding to a Route 53 inbound resolver",
                ),
                ProbeStage::Tcp => (
                    "API server reachable",
                    "check the route over the VPN or Direct Connect to the cluster's VPC and that the cluster security group allows 443/tcp from the node network",
                ),
                ProbeStage::Https => (
                    "API server TLS",
                    "the server must be the cluster's API server and verify with its CA: check spec.cluster.apiServerEndpoint and spec.cluster.certificateAuthority (aws eks describe-cluster)",
                ),
            };
            vec![(name, Outcome::Fail(format!("{server}: {e}; {fix}")))]
        }
        Ok(p) => {
            let mut out = vec![(
                "API server",
                Outcome::Ok(format!(
                    "{server} answers over TLS verified with the cluster CA (GET /healthz: {}; {} address{})",
                    p.status,
                    p.addresses.len(),
                    if p.addresses.len() == 1 { "" } else { "es" }
                )),
            )];
            out.push((
                "clock",
                match p.date {
                    Some(date) => skew_outcome(date, SystemTime::now(), &server),
                    None => {
                        Outcome::Warn("the API server sent no Date header; skew not checked".into())
                    }
                },
            ));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_checks_read_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let write = |p: &str, text: &str| {
            let path = dir.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "/proc/swaps",
            "Filename\tType\tSize\tUsed\tPriority\n/swap.img file 4194300 0 -2\n",
        );
        write("/proc/sys/net/ipv4/ip_forward", "0\n");
        write("/sys/module/overlay/refcnt", "1\n");
        let got = kernel(&root);
        let text = format!("{got:?}");
        assert!(
            matches!(&got[0].1, Outcome::Fail(m) if m.contains("/swap.img") && m.contains("swapoff -a")),
            "{text}"
        );
        assert!(
            matches!(&got[1].1, Outcome::Warn(m) if m.contains("cgroup v1")),
            "{text}"
        );
        assert!(
            matches!(&got[2].1, Outcome::Ok(m) if m == "overlay loaded"),
            "{text}"
        );
        assert!(
            matches!(&got[3].1, Outcome::Fail(m) if m.contains("modprobe br_netfilter")),
            "{text}"
        );
        assert!(
            matches!(&got[4].1, Outcome::Fail(m) if m.contains("sysctl -w net.ipv4.ip_forward=1")),
            "{text}"
        );

        write("/proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n");
        write("/proc/sys/net/ipv4/ip_forward", "1\n");
        write("/sys/fs/cgroup/cgroup.controllers", "cpu memory\n");
        write("/sys/module/br_netfilter/refcnt", "1\n");
        assert!(
            kernel(&root)
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Ok(_)))
        );
    }

    #[test]
    fn programs_and_kernel_defaults_are_read_under_the_root() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let put = |p: &str, text: &str, mode: u32| {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let config = hybridlet_config::load(&hybridlet_config::ConfigSources {
            file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
            file_required: true,
            drop_in_dir: None,
        })
        .unwrap()
        .config;
        let got = binaries(&config, &root);
        let text = format!("{got:?}");
        assert!(
            got.iter().all(|(_, o)| matches!(o, Outcome::Warn(_))),
            "{text}"
        );
        assert!(
            text.contains("signing helper") && text.contains("--credential-provider iam-ra"),
            "{text}"
        );
        put("usr/bin/kubelet", "", 0o755);
        put("usr/local/bin/containerd", "", 0o755);
        put("usr/local/bin/aws_signing_helper", "", 0o644);
        put("opt/cni/bin/bridge", "", 0o755);
        let got = binaries(&config, &root);
        assert!(
            matches!(&got[0].1, Outcome::Ok(p) if p == "/usr/bin/kubelet"),
            "{got:?}"
        );
        assert!(
            matches!(&got[1].1, Outcome::Ok(p) if p == "/usr/local/bin/containerd"),
            "{got:?}"
        );
        assert!(
            matches!(&got[2].1, Outcome::Fail(m) if m.contains("not an executable")),
            "{got:?}"
        );
        assert!(
            matches!(&got[3].1, Outcome::Ok(m) if m == "1 in /opt/cni/bin"),
            "{got:?}"
        );

        put("proc/sys/vm/overcommit_memory", "0\n", 0o644);
        put("proc/sys/kernel/panic", "10\n", 0o644);
        let got = kernel_defaults(&root);
        assert!(
            matches!(&got[0].1, Outcome::Warn(m) if m.contains("vm.overcommit_memory = 0 (want 1)") && !m.contains("kernel.panic =")),
            "{got:?}"
        );
        put("proc/sys/vm/overcommit_memory", "1\n", 0o644);
        assert!(matches!(&kernel_defaults(&root)[0].1, Outcome::Ok(_)));
    }

    #[test]
    fn proxy_drop_ins_and_their_env_file_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let config = hybridlet_config::load(&hybridlet_config::ConfigSources {
            file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/config/good/ssm-proxy.yaml"),
            file_required: true,
            drop_in_dir: None,
        })
        .unwrap()
        .config;
        let (_, o) = proxy_settings(&config, &root).unwrap();
        assert!(
            matches!(&o, Outcome::Warn(m) if m.contains("containerd.service.d") && m.contains("amazon-ssm-agent.service.d")),
            "{o:?}"
        );
        for unit in ["containerd", "kubelet", "amazon-ssm-agent"] {
            let d = dir
                .path()
                .join(format!("etc/systemd/system/{unit}.service.d"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("http-proxy.conf"),
                "[Service]\nEnvironmentFile=/etc/hybridlet/proxy.env\n",
            )
            .unwrap();
        }
        let (_, o) = proxy_settings(&config, &root).unwrap();
        assert!(
            matches!(&o, Outcome::Warn(m) if m.contains("/etc/hybridlet/proxy.env missing") || m.contains("but /etc/hybridlet/proxy.env")),
            "{o:?}"
        );
        std::fs::create_dir_all(dir.path().join("etc/hybridlet")).unwrap();
        std::fs::write(
            dir.path().join("etc/hybridlet/proxy.env"),
            "HTTPS_PROXY=x\n",
        )
        .unwrap();
        assert!(matches!(
            proxy_settings(&config, &root).unwrap().1,
            Outcome::Ok(_)
        ));
        // The proxy's password never appears in the verdicts.
        assert!(!format!("{o:?}").contains("s3cr"));
    }

    #[test]
    fn skew_is_judged_both_ways() {
        let now = SystemTime::now();
        assert!(matches!(skew_outcome(now, now, "s"), Outcome::Ok(_)));
        assert!(matches!(
            skew_outcome(now - Duration::from_secs(60), now, "s"),
            Outcome::Warn(m) if m.contains("60s ahead of")
        ));
        assert!(matches!(
            skew_outcome(now + Duration::from_secs(600), now, "s"),
            Outcome::Fail(m) if m.contains("600s behind") && m.contains("timedatectl set-ntp true")
        ));
    }

    #[test]
    fn a_taken_port_is_seen() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(port_free(held.local_addr().unwrap()).is_err());
        let addr = held.local_addr().unwrap();
        drop(held);
        assert!(port_free(addr).is_ok());
    }
}
