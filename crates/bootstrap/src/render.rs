use std::fmt::Write as _;

use hybridlet_config::{Config, IamRolesAnywhereOptions, RegistryMirror};
use serde_json::{Map, Value, json};

/// What the cluster looks like (from the config, or from DescribeCluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCoordinates {
    /// Cluster name.
    pub name: String,
    /// Region.
    pub region: String,
    /// API server URL.
    pub endpoint: String,
    /// Base64 PEM CA bundle.
    pub certificate_authority: String,
    /// Service CIDR.
    pub service_cidr: String,
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Kubernetes node name (IAM-RA `nodeName`, or the SSM managed instance ID).
    pub node_name: String,
    /// `ssm` or `iam-ra`.
    pub credential_provider: String,
    /// Extra environment for the exec credential plugin (IAM-RA: the AWS config file).
    pub aws_config_file: Option<String>,
    /// The SSM agent's systemd unit (SSM only): it gets the proxy drop-in too.
    pub ssm_agent_unit: Option<String>,
    /// The host has [`ECR_CREDENTIAL_PROVIDER`] (`install` puts it there): the kubelet
    /// pulls ECR images (the pause image among them) with it. Without the program the
    /// kubelet would refuse to start with the flags, so they come only with it.
    pub ecr_credential_provider: bool,
}

/// Where the kubelet finds image credential provider programs.
pub const IMAGE_CREDENTIAL_PROVIDER_DIR: &str = "/etc/eks/image-credential-provider";
/// The ECR credential provider program.
pub const ECR_CREDENTIAL_PROVIDER: &str =
    "/etc/eks/image-credential-provider/ecr-credential-provider";
const IMAGE_CREDENTIAL_PROVIDER_CONFIG: &str = "/etc/eks/image-credential-provider/config.json";

/// The containerd unit.
pub const CONTAINERD_UNIT: &str = "containerd.service";
/// The kubelet unit.
pub const KUBELET_UNIT: &str = "kubelet.service";

/// One file to write, and who it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Absolute host path (the binary resolves it under `--root`).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub contents: String,
    /// The systemd units that read it: they restart when it changes.
    pub owners: Vec<String>,
    /// It may hold credentials (a proxy password, registry credentials): its contents
    /// are shown nowhere — not in `--dry-run`, not in logs, not in `Debug` — and it is
    /// readable by root only.
    pub secret: bool,
}

impl std::fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RenderedFile");
        d.field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode));
        if self.secret {
            d.field(
                "contents",
                &format_args!("<{} bytes, secret>", self.contents.len()),
            );
        } else {
            d.field("contents", &self.contents);
        }
        d.field("owners", &self.owners).finish()
    }
}

impl RenderedFile {
    /// A file no service owns and without secrets.
    pub fn new(path: impl Into<String>, mode: u32, contents: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            mode,
            contents: contents.into(),
            owners: Vec::new(),
            secret: false,
        }
    }

    /// `unit` reads it.
    pub fn owned_by(mut self, unit: &str) -> Self {
        if !self.owners.iter().any(|o| o == unit) {
            self.owners.push(unit.to_string());
        }
        self
    }

    /// It may hold credentials (and is then readable by root only).
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self.mode &= 0o700;
        self
    }

    /// The contents as `--dry-run` and diffs may show them: a secret file's never.
    pub fn shown(&self) -> std::borrow::Cow<'_, str> {
        if self.secret {
            format!(
                "<{} bytes: may hold credentials, not shown>",
                self.contents.len()
            )
            .into()
        } else {
            self.contents.as_str().into()
        }
    }
}

/// The files as `hybridlet-sys::fileset` writes them: each path resolved under `root`.
pub fn desired_files(
    rendered: &[RenderedFile],
    root: &hybridlet_sys::HostRoot,
) -> Result<Vec<hybridlet_sys::fileset::DesiredFile>, hybridlet_sys::RootError> {
    rendered
        .iter()
        .map(|f| {
            Ok(hybridlet_sys::fileset::DesiredFile {
                path: root.resolve(&f.path)?,
                mode: f.mode,
                contents: f.contents.clone().into_bytes(),
            })
        })
        .collect()
}

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The service CIDR cannot give a cluster DNS address.
    #[error("spec.cluster.cidr: {0}")]
    Cidr(String),
    /// The CA is not base64.
    #[error("spec.cluster.certificateAuthority: {0}")]
    CertificateAuthority(String),
}

/// The cluster DNS address of a service CIDR: `.10` for IPv4, `::a` for IPv6 (as the EKS
/// CoreDNS service is placed).
pub fn cluster_dns(service_cidr: &str) -> Result<String, RenderError> {
    let net: ipnet::IpNet = service_cidr
        .parse()
        .map_err(|_| RenderError::Cidr(format!("{service_cidr:?} is not a CIDR")))?;
    Ok(match net {
        ipnet::IpNet::V4(v4) => {
            let base = u32::from(v4.network());
            std::net::Ipv4Addr::from(base + 10).to_string()
        }
        ipnet::IpNet::V6(v6) => {
            let base = u128::from(v6.network());
            std::net::Ipv6Addr::from(base + 10).to_string()
        }
    })
}

/// Merge `overlay` into `base`; overlay (the user's) wins, objects merge recursively.
fn merge_user(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => merge_user(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn kubelet_config(
    cluster: &ClusterCoordinates,
    node: &NodeIdentity,
    user: &Map<String, Value>,
) -> Result<String, RenderError> {
    let mut cfg = json!({
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "address": "0.0.0.0",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true, "cacheTTL": "2m0s"},
            "x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}
        },
        "authorization": {
            "mode": "Webhook",
            "webhook": {"cacheAuthorizedTTL": "5m0s", "cacheUnauthorizedTTL": "30s"}
        },
        "cgroupDriver": "systemd",
        "cgroupRoot": "/",
        "clusterDNS": [cluster_dns(&cluster.service_cidr)?],
        "clusterDomain": "cluster.local",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "10%", "nodefs.inodesFree": "5%"},
        "featureGates": {"RotateKubeletServerCertificate": true},
        "hairpinMode": "hairpin-veth",
        "kubeReservedCgroup": "/runtime",
        "systemReservedCgroup": "/system",
        "logging": {"verbosity": 2},
        "protectKernelDefaults": true,
        "providerID": format!("eks-hybrid:///{}/{}/{}", cluster.region, cluster.name, node.node_name),
        "readOnlyPort": 0,
        "serializeImagePulls": false,
        "serverTLSBootstrap": true,
        "tlsCipherSuites": [
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_RSA_WITH_AES_128_GCM_SHA256"
        ]
    });
    merge_user(&mut cfg, &Value::Object(user.clone()));
    // serde_json without preserve_order sorts keys: stable output, stable diffs.
    Ok(serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n")
}

/// A TOML document, serialized (keys in the order they were inserted) after `header`
/// comment lines. Values are quoted and escaped by the serializer, never by hand.
fn toml_document(header: &str, doc: &toml::Table) -> String {
    // A Table of strings, arrays and tables always serializes.
    format!("{header}{}", toml::to_string(doc).unwrap_or_default())
}

/// `key = value` pairs as a table, in this order.
fn table<const N: usize>(pairs: [(&str, toml::Value); N]) -> toml::Value {
    toml::Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn strings(values: &[&str]) -> toml::Value {
    toml::Value::Array(values.iter().map(|v| toml::Value::from(*v)).collect())
}

fn containerd_config(sandbox_image: &str) -> String {
    use toml::Value;
    let runc = table([
        ("runtime_type", "io.containerd.runc.v2".into()),
        ("options", table([("SystemdCgroup", true.into())])),
    ]);
    let cri = table([
        ("sandbox_image", sandbox_image.into()),
        ("enable_cdi", true.into()),
        ("cdi_spec_dirs", strings(&["/etc/cdi", "/var/run/cdi"])),
        (
            "registry",
            table([(
                "config_path",
                "/etc/containerd/certs.d:/etc/docker/certs.d".into(),
            )]),
        ),
        (
            "containerd",
            table([
                ("default_runtime_name", "runc".into()),
                ("discard_unpacked_layers", true.into()),
                ("runtimes", table([("runc", runc)])),
            ]),
        ),
        (
            "cni",
            table([
                ("bin_dir", "/opt/cni/bin".into()),
                ("conf_dir", "/etc/cni/net.d".into()),
            ]),
        ),
    ]);
    let Value::Table(doc) = table([
        ("version", Value::Integer(2)),
        ("root", "/var/lib/containerd".into()),
        ("state", "/run/containerd".into()),
        ("imports", strings(&["/etc/containerd/config.d/*.toml"])),
        (
            "grpc",
            table([("address", "/run/containerd/containerd.sock".into())]),
        ),
        ("plugins", table([("io.containerd.grpc.v1.cri", cri)])),
    ]) else {
        return String::new();
    };
    toml_document(
        "# Written by hybridlet init. Local additions belong in /etc/containerd/config.d/*.toml.\n\
         # CDI is on: DRA drivers hand devices to containers as CDI specs. Registry mirrors\n\
         # live in /etc/containerd/certs.d/<registry>/hosts.toml.\n",
        &doc,
    )
}

/// The first line of every `hosts.toml` hybridlet writes: a file without it is the
/// operator's own, and is never replaced or removed by a reload.
pub const MIRROR_MARKER: &str = "# Written by hybridlet init from spec.registryMirrors.";

/// Where containerd reads the mirrors of `registry` (a host, `HOST:PORT` or `_default`).
pub fn hosts_toml_path(registry: &str) -> String {
    format!("/etc/containerd/certs.d/{registry}/hosts.toml")
}

/// One `hosts.toml` per `spec.registryMirrors` entry. containerd reads these at each pull
/// (its `config_path`), so changing them needs no restart; the owner is named for `init`,
/// which restarts containerd with the rest of its files.
pub fn registry_mirror_files(config: &Config) -> Vec<RenderedFile> {
    config
        .agent
        .registry_mirrors
        .iter()
        .map(|mirror| {
            RenderedFile::new(hosts_toml_path(&mirror.registry), 0o644, hosts_toml(mirror))
                .owned_by(CONTAINERD_UNIT)
        })
        .collect()
}

fn hosts_toml(mirror: &RegistryMirror) -> String {
    let upstream = match mirror.registry.as_str() {
        "docker.io" => Some("https://registry-1.docker.io".to_string()),
        "_default" => None,
        other => Some(format!("https://{other}")),
    };
    let mut doc = toml::Table::new();
    if let Some(upstream) = upstream {
        // The upstream stays the fallback when every mirror fails.
        doc.insert("server".into(), upstream.into());
    }
    // containerd tries the hosts in the order they appear: the table keeps it.
    let mut hosts = toml::Table::new();
    for endpoint in &mirror.endpoints {
        let mut host = toml::Table::new();
        host.insert("capabilities".into(), strings(&["pull", "resolve"]));
        if let Some(ca) = &mirror.ca_file {
            host.insert("ca".into(), ca.as_str().into());
        }
        if mirror.skip_verify {
            host.insert("skip_verify".into(), true.into());
        }
        if mirror.override_path {
            host.insert("override_path".into(), true.into());
        }
        hosts.insert(endpoint.clone(), toml::Value::Table(host));
    }
    doc.insert("host".into(), toml::Value::Table(hosts));
    toml_document(&format!("{MIRROR_MARKER}\n"), &doc)
}

fn kubeconfig(cluster: &ClusterCoordinates, node: &NodeIdentity) -> String {
    let mut env = String::new();
    if let Some(file) = &node.aws_config_file {
        let _ = write!(
            env,
            "\n      env:\n      - name: AWS_CONFIG_FILE\n        value: {file}\n      - name: AWS_PROFILE\n        value: default"
        );
    }
    format!(
        r#"# Written by hybridlet init. No secrets: the token comes from `hybridlet token`.
apiVersion: v1
kind: Config
clusters:
- name: kubernetes
  cluster:
    server: {endpoint}
    certificate-authority: /etc/kubernetes/pki/ca.crt
contexts:
- name: kubelet
  context:
    cluster: kubernetes
    user: kubelet
current-context: kubelet
users:
- name: kubelet
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: /usr/bin/hybridlet
      args: [token, --cluster-id, {name}, --region, {region}]
      interactiveMode: Never{env}
"#,
        endpoint = cluster.endpoint,
        name = cluster.name,
        region = cluster.region,
    )
}

fn kubelet_env(node: &NodeIdentity, user_flags: &[String]) -> String {
    // The kubelet keeps only the last --node-labels flag, so the user's labels are merged
    // into ours (theirs win per key) instead of replacing the hybrid labels that EKS needs to
    // approve the node's serving certificates.
    let mut labels: Vec<(String, String)> = vec![
        ("eks.amazonaws.com/compute-type".into(), "hybrid".into()),
        (
            "eks.amazonaws.com/hybrid-credential-provider".into(),
            node.credential_provider.clone(),
        ),
    ];
    let mut rest = Vec::new();
    for flag in user_flags {
        match flag.strip_prefix("--node-labels=") {
            Some(list) => {
                for pair in list.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    match labels.iter_mut().find(|(key, _)| key == k) {
                        Some(existing) => existing.1 = v.to_string(),
                        None => labels.push((k.to_string(), v.to_string())),
                    }
                }
            }
            None => rest.push(flag.clone()),
        }
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec![
        "--cloud-provider=".to_string(),
        format!("--hostname-override={}", node.node_name),
        format!("--node-labels={}", labels.join(",")),
        "--config=/etc/kubernetes/kubelet/config.json".to_string(),
        "--kubeconfig=/var/lib/kubelet/kubeconfig".to_string(),
    ];
    if node.ecr_credential_provider {
        args.push(format!(
            "--image-credential-provider-bin-dir={IMAGE_CREDENTIAL_PROVIDER_DIR}"
        ));
        args.push(format!(
            "--image-credential-provider-config={IMAGE_CREDENTIAL_PROVIDER_CONFIG}"
        ));
    }
    // The user's other flags come last so that they win.
    args.extend(rest);
    let quoted: Vec<String> = args
        .iter()
        .map(|a| a.replace('\\', "\\\\").replace('"', "\\\""))
        .collect();
    format!("NODEADM_KUBELET_ARGS=\"{}\"\n", quoted.join(" "))
}

/// The kubelet's CredentialProviderConfig for the ECR credential provider: every ECR
/// registry host pattern (commercial, China, FIPS, the isolated partitions), a 12 h
/// cache, and with IAM Roles Anywhere the AWS config file whose `credential_process`
/// signs for the node.
fn image_credential_provider_config(node: &NodeIdentity) -> String {
    let mut provider = json!({
        "name": "ecr-credential-provider",
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "matchImages": [
            "*.dkr.ecr.*.amazonaws.com",
            "*.dkr.ecr.*.amazonaws.com.cn",
            "*.dkr.ecr-fips.*.amazonaws.com",
            "*.dkr.ecr.*.c2s.ic.gov",
            "*.dkr.ecr.*.sc2s.sgov.gov"
        ],
        "defaultCacheDuration": "12h",
    });
    if let Some(file) = &node.aws_config_file {
        provider["env"] = json!([
            {"name": "AWS_CONFIG_FILE", "value": file},
            {"name": "AWS_PROFILE", "value": "default"}
        ]);
    }
    let config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [provider],
    });
    // A Value of strings always serializes.
    let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
    text.push('\n');
    text
}

/// `spec.proxy` as a drop-in for `unit` (`None` without a proxy).
pub fn proxy_dropin_for(config: &Config, unit: &str) -> Option<RenderedFile> {
    proxy_dropin(config).map(|contents| {
        RenderedFile::new(
            format!("/etc/systemd/system/{unit}.d/http-proxy.conf"),
            0o644,
            contents,
        )
        .owned_by(unit)
    })
}

/// Everything `unit` needs to run behind `spec.proxy`: its drop-in, and the root-only
/// environment file the drop-in points at when the settings cannot be inline.
pub fn proxy_files_for(config: &Config, unit: &str) -> Vec<RenderedFile> {
    let mut files: Vec<RenderedFile> = proxy_dropin_for(config, unit).into_iter().collect();
    if !files.is_empty() {
        files.extend(proxy_env_file(config).map(|f| f.owned_by(unit)));
    }
    files
}

/// `spec.proxy` as environment variables for a program init runs itself.
pub fn proxy_env(config: &Config) -> Vec<(String, String)> {
    let p = &config.agent.proxy;
    let mut env = Vec::new();
    if let Some(v) = &p.http_proxy {
        env.push(("HTTP_PROXY".to_string(), v.clone()));
    }
    if let Some(v) = &p.https_proxy {
        env.push(("HTTPS_PROXY".to_string(), v.clone()));
    }
    if !p.no_proxy.is_empty() {
        env.push(("NO_PROXY".to_string(), p.no_proxy.join(",")));
    }
    env
}

/// Where the proxy settings go when they cannot be inline in a unit (see
/// [`proxy_needs_env_file`]): readable by root only.
pub const PROXY_ENV_FILE: &str = "/etc/hybridlet/proxy.env";

/// A proxy URL with credentials must not sit in a world-readable drop-in (nor show in
/// `systemctl show`), and a `%` (percent-encoded credentials) would be taken as a
/// systemd specifier in `Environment=`; both go to a root-only `EnvironmentFile=`.
fn proxy_needs_env_file(config: &Config) -> bool {
    let p = &config.agent.proxy;
    p.has_credentials()
        || [&p.http_proxy, &p.https_proxy]
            .into_iter()
            .flatten()
            .any(|u| u.contains('%'))
}

/// The root-only environment file for the proxy, when the drop-ins point at one.
fn proxy_env_file(config: &Config) -> Option<RenderedFile> {
    if !proxy_needs_env_file(config) {
        return None;
    }
    let mut contents = String::from(
        "# Written by hybridlet init from spec.proxy (root only: it may hold credentials).\n",
    );
    for (k, v) in proxy_env(config) {
        let _ = writeln!(contents, "{k}={v}");
    }
    Some(RenderedFile::new(PROXY_ENV_FILE, 0o600, contents).secret())
}

fn proxy_dropin(config: &Config) -> Option<String> {
    let p = &config.agent.proxy;
    if p.http_proxy.is_none() && p.https_proxy.is_none() {
        return None;
    }
    if proxy_needs_env_file(config) {
        return Some(format!(
            "# Written by hybridlet init from spec.proxy.\n[Service]\nEnvironmentFile={PROXY_ENV_FILE}\n"
        ));
    }
    let mut out = String::from("# Written by hybridlet init from spec.proxy.\n[Service]\n");
    if let Some(v) = &p.http_proxy {
        let _ = writeln!(out, "Environment=\"HTTP_PROXY={v}\"");
    }
    if let Some(v) = &p.https_proxy {
        let _ = writeln!(out, "Environment=\"HTTPS_PROXY={v}\"");
    }
    if !p.no_proxy.is_empty() {
        let _ = writeln!(out, "Environment=\"NO_PROXY={}\"", p.no_proxy.join(","));
    }
    Some(out)
}

/// Where `install` puts the IAM Roles Anywhere signing helper.
pub const SIGNING_HELPER: &str = "/usr/local/bin/aws_signing_helper";
/// The unit that keeps `/eks-hybrid/.aws/credentials` fresh for pods
/// (`spec.hybrid.enableCredentialsFile` with IAM Roles Anywhere).
pub const SIGNING_HELPER_UPDATE_UNIT: &str = "aws_signing_helper_update.service";
/// The credentials file pods may mount (`spec.hybrid.enableCredentialsFile`).
pub const POD_CREDENTIALS_FILE: &str = "/eks-hybrid/.aws/credentials";

/// A word for `sh -c` (the SDKs run `credential_process` through the shell) and for
/// systemd's ExecStart: bare when it is made of safe characters, else single-quoted.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r#"'\''"#))
    }
}

/// The signing helper's arguments for `mode` (`credential-process` or `update`).
fn signing_helper_args(ra: &IamRolesAnywhereOptions, mode: &str, with_proxy: bool) -> String {
    let mut words = vec![
        SIGNING_HELPER.to_string(),
        mode.to_string(),
        "--certificate".into(),
        ra.certificate_path.clone(),
        "--private-key".into(),
        ra.private_key_path.clone(),
        "--trust-anchor-arn".into(),
        ra.trust_anchor_arn.clone(),
        "--profile-arn".into(),
        ra.profile_arn.clone(),
        "--role-arn".into(),
        ra.role_arn.clone(),
        // The session name is the node's Kubernetes user (system:node:<name>).
        "--role-session-name".into(),
        ra.node_name.clone(),
    ];
    if with_proxy {
        words.push("--with-proxy".into());
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The AWS config file whose `credential_process` runs the signing helper: `default`
/// for everything that runs as root, `hybrid` for tools written for nodeadm.
fn iam_ra_aws_config(ra: &IamRolesAnywhereOptions, region: &str, with_proxy: bool) -> String {
    let process = signing_helper_args(ra, "credential-process", with_proxy);
    let mut out = String::from("# Written by hybridlet init from spec.hybrid.iamRolesAnywhere.\n");
    for profile in ["default", "profile hybrid"] {
        let _ = write!(
            out,
            "[{profile}]\nregion = {region}\ncredential_process = {process}\n\n"
        );
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// The refresher for pods' credentials file (nodeadm's unit of the same name).
fn signing_helper_update_unit(
    ra: &IamRolesAnywhereOptions,
    region: &str,
    with_proxy: bool,
) -> String {
    format!(
        "# Written by hybridlet init (spec.hybrid.enableCredentialsFile).\n[Unit]\nDescription=Keep {POD_CREDENTIALS_FILE} fresh with IAM Roles Anywhere\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nEnvironment=AWS_SHARED_CREDENTIALS_FILE={POD_CREDENTIALS_FILE}\nEnvironment=AWS_REGION={region}\nExecStart={}\nRestart=always\nRestartSec=10\n\n[Install]\nWantedBy=multi-user.target\n",
        signing_helper_args(ra, "update", with_proxy)
    )
}

/// Kernel modules the node needs at every boot (systemd-modules-load reads this).
pub const MODULES_LOAD_PATH: &str = "/etc/modules-load.d/hybridlet.conf";
/// Sysctls the node needs (systemd-sysctl and `sysctl --system` read this).
pub const SYSCTL_PATH: &str = "/etc/sysctl.d/99-hybridlet.conf";
const MODULES_LOAD: &str = "# Written by hybridlet init; removed by hybridlet uninstall.\n# containerd's overlayfs snapshotter\noverlay\n# pod traffic through Linux bridges seen by iptables\nbr_netfilter\n";
const SYSCTL: &str = "# Written by hybridlet init; removed by hybridlet uninstall.\n# Pods reach anything off the node only with forwarding on.\nnet.ipv4.ip_forward = 1\n# What the kubelet's protectKernelDefaults expects (as nodeadm sets them).\nvm.overcommit_memory = 1\nkernel.panic = 10\nkernel.panic_on_oops = 1\n";

/// Every file `init` writes for this configuration, cluster and node, sorted by path.
pub fn render(
    config: &Config,
    cluster: &ClusterCoordinates,
    node: &NodeIdentity,
    sandbox_image: &str,
) -> Result<Vec<RenderedFile>, RenderError> {
    let spec = config.node.as_ref().map(|n| &n.spec);
    let user_kubelet = spec.map(|s| s.kubelet.config.clone()).unwrap_or_default();
    let user_flags = spec.map(|s| s.kubelet.flags.clone()).unwrap_or_default();
    let ca = hybridlet_config::decode_certificate_authority(&cluster.certificate_authority)
        .map_err(|e| RenderError::CertificateAuthority(format!("not valid base64: {e}")))?;
    let mut files = vec![
        RenderedFile::new(
            "/etc/containerd/config.toml",
            0o644,
            containerd_config(sandbox_image),
        )
        .owned_by(CONTAINERD_UNIT),
        RenderedFile::new(
            "/etc/kubernetes/pki/ca.crt",
            0o644,
            String::from_utf8_lossy(&ca).into_owned(),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/etc/kubernetes/kubelet/config.json",
            0o644,
            kubelet_config(cluster, node, &user_kubelet)?,
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/var/lib/kubelet/kubeconfig",
            0o644,
            kubeconfig(cluster, node),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(
            "/etc/eks/kubelet/environment",
            0o644,
            kubelet_env(node, &user_flags),
        )
        .owned_by(KUBELET_UNIT),
        RenderedFile::new(MODULES_LOAD_PATH, 0o644, MODULES_LOAD),
        RenderedFile::new(SYSCTL_PATH, 0o644, SYSCTL),
    ];
    if let Some(user_toml) = spec.map(|s| &s.containerd.config).filter(|c| !c.is_empty()) {
        // The user's TOML may hold registry credentials.
        files.push(
            RenderedFile::new(
                "/etc/containerd/config.d/00-nodeadm.toml",
                0o600,
                user_toml.clone(),
            )
            .owned_by(CONTAINERD_UNIT)
            .secret(),
        );
    }
    files.extend(registry_mirror_files(config));
    if node.ecr_credential_provider {
        // The kubelet reads its credential provider configuration at start.
        files.push(
            RenderedFile::new(
                IMAGE_CREDENTIAL_PROVIDER_CONFIG,
                0o644,
                image_credential_provider_config(node),
            )
            .owned_by(KUBELET_UNIT),
        );
    }
    let mut units = vec!["containerd.service", "kubelet.service"];
    // The agent fetches the node's credentials: behind a proxy it needs it as well.
    units.extend(node.ssm_agent_unit.as_deref());
    let dropins: Vec<RenderedFile> = units
        .iter()
        .filter_map(|u| proxy_dropin_for(config, u))
        .collect();
    // The root-only proxy environment file belongs to every unit whose drop-in reads it.
    if let Some(mut env) = proxy_env_file(config) {
        for d in &dropins {
            env.owners.extend(d.owners.iter().cloned());
        }
        files.push(env);
    }
    files.extend(dropins);
    if let Some(ra) = spec
        .and_then(|s| s.hybrid.as_ref())
        .and_then(|h| h.iam_roles_anywhere.as_ref())
    {
        let with_proxy = config.agent.proxy.https_proxy.is_some();
        files.push(RenderedFile::new(
            ra.aws_config_path.clone(),
            0o644,
            iam_ra_aws_config(ra, &cluster.region, with_proxy),
        ));
        if spec
            .and_then(|s| s.hybrid.as_ref())
            .is_some_and(|h| h.enable_credentials_file)
        {
            files.push(
                RenderedFile::new(
                    format!("/etc/systemd/system/{SIGNING_HELPER_UPDATE_UNIT}"),
                    0o644,
                    signing_helper_update_unit(ra, &cluster.region, with_proxy),
                )
                .owned_by(SIGNING_HELPER_UPDATE_UNIT),
            );
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values TOML must escape (a quote, a backslash, a non-ASCII character, a control
    /// character) come back as written, and the endpoints keep their order (containerd
    /// tries them in file order). Rust's `{:?}` quoting, used before, wrote `\u{1f600}`,
    /// which is not TOML.
    #[test]
    fn hosts_toml_is_toml_whatever_the_values() {
        let mirror = RegistryMirror {
            registry: "registry.example.internal:5000".into(),
            endpoints: vec![
                "https://z.example.internal/v2/\"quoted\"".into(),
                "https://a.example.internal/😀".into(),
            ],
            ca_file: Some("/etc/ssl/ca\\dir/ca\t😀.pem".into()),
            skip_verify: true,
            override_path: false,
        };
        let text = hosts_toml(&mirror);
        let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            doc["server"].as_str(),
            Some("https://registry.example.internal:5000")
        );
        let hosts: Vec<&String> = doc["host"].as_table().unwrap().keys().collect();
        assert_eq!(hosts, [&mirror.endpoints[0], &mirror.endpoints[1]]);
        let first = doc["host"][&mirror.endpoints[0]].as_table().unwrap();
        assert_eq!(first["ca"].as_str(), mirror.ca_file.as_deref());
        assert_eq!(first["skip_verify"].as_bool(), Some(true));
        assert!(!first.contains_key("override_path"));
        assert!(text.starts_with(MIRROR_MARKER));
    }

    /// `credential_process` goes through `sh -c`: a path with a space or a quote must stay
    /// one word and must not run anything.
    #[test]
    fn signing_helper_words_survive_the_shell() {
        assert_eq!(
            shell_word("/etc/iam/pki/server.pem"),
            "/etc/iam/pki/server.pem"
        );
        assert_eq!(shell_word("/etc/my pki/a.pem"), "'/etc/my pki/a.pem'");
        assert_eq!(shell_word("x';reboot;'"), r#"'x'\'';reboot;'\'''"#);
        assert_eq!(shell_word(""), "''");
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf '%s|' {}", shell_word("a b'c;$(id)"))])
            .output();
        if let Ok(out) = out {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "a b'c;$(id)|");
        }
    }

    #[test]
    fn cluster_dns_addresses() {
        assert_eq!(cluster_dns("172.16.0.0/16").unwrap(), "172.16.0.10");
        assert_eq!(cluster_dns("10.100.0.0/16").unwrap(), "10.100.0.10");
        assert_eq!(cluster_dns("fd00:10:96::/108").unwrap(), "fd00:10:96::a");
        assert!(cluster_dns("nope").is_err());
    }

    #[test]
    fn user_values_win_and_objects_merge() {
        let mut base = json!({"a": 1, "evictionHard": {"memory.available": "100Mi", "nodefs.available": "10%"}});
        merge_user(
            &mut base,
            &json!({"a": 2, "evictionHard": {"memory.available": "500Mi"}, "maxPods": 250}),
        );
        assert_eq!(
            base,
            json!({"a": 2, "evictionHard": {"memory.available": "500Mi", "nodefs.available": "10%"}, "maxPods": 250})
        );
    }
}
