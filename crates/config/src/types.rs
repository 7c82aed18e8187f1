//! Wire types. Field names, nesting and defaults follow nodeadm's `node.eks.aws/v1alpha1`
//! API exactly for `NodeConfig`; `AgentConfig` is ours.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::GoDuration;

/// nodeadm's `NodeConfig` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    /// Always `node.eks.aws/v1alpha1`.
    pub api_version: String,
    /// Always `NodeConfig`.
    pub kind: String,
    /// Kubernetes object metadata; accepted because nodeadm accepts it, otherwise unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// The node's desired configuration.
    #[serde(default)]
    pub spec: NodeConfigSpec,
}

/// `NodeConfig.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfigSpec {
    /// `spec.cluster`.
    #[serde(default)]
    pub cluster: ClusterDetails,
    /// `spec.containerd`.
    #[serde(default)]
    pub containerd: ContainerdOptions,
    /// `spec.kubelet`.
    #[serde(default)]
    pub kubelet: KubeletOptions,
    /// `spec.hybrid`: required for hybrid nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<HybridOptions>,
    /// `spec.instance`: EC2-only options that nodeadm's schema carries; accepted so that
    /// shared files load, and ignored (with a warning) on hybrid nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Map<String, Value>>,
}

/// `spec.cluster`: the coordinates of the EKS cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterDetails {
    /// EKS cluster name (required).
    #[serde(default)]
    pub name: String,
    /// AWS region of the cluster, also used for SSM, IAM Roles Anywhere, STS and ECR
    /// (required).
    #[serde(default)]
    pub region: String,
    /// The API server URL; looked up with DescribeCluster when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server_endpoint: Option<String>,
    /// Base64 of the cluster CA bundle (PEM); looked up with DescribeCluster when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<String>,
    /// The cluster's service IPv4 CIDR (cluster DNS is its `.10`); looked up with
    /// DescribeCluster when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// EC2 Outposts only; accepted for compatibility, ignored on hybrid nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_outpost: Option<bool>,
    /// EC2 Outposts only; accepted for compatibility, ignored on hybrid nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A cluster CA as EKS gives it (`certificateAuthority.data`: the PEM bundle in base64,
/// sometimes wrapped over lines): the PEM bytes.
pub fn decode_certificate_authority(b64: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact.as_bytes())
}

impl ClusterDetails {
    /// The CA bundle (PEM) from `certificateAuthority`, when set and valid base64.
    pub fn ca_pem(&self) -> Option<Vec<u8>> {
        decode_certificate_authority(self.certificate_authority.as_ref()?).ok()
    }
}

/// `spec.containerd`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerdOptions {
    /// Inline containerd TOML, written as an import beside the generated config.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config: String,
}

impl fmt::Debug for ContainerdOptions {
    // The inline TOML can carry registry credentials: show only its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerdOptions")
            .field("config", &format_args!("<{} bytes>", self.config.len()))
            .finish()
    }
}

/// `spec.kubelet`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeletOptions {
    /// Inline KubeletConfiguration fields, merged over hybridlet's defaults.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub config: Map<String, Value>,
    /// Extra kubelet command-line flags, appended last (so they win). Drop-in files append
    /// to this list rather than replace it, as nodeadm does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// `spec.hybrid`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HybridOptions {
    /// Expose the node's AWS credentials at `/eks-hybrid/.aws/credentials` for pods.
    #[serde(default)]
    pub enable_credentials_file: bool,
    /// SSM hybrid activation credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm: Option<SsmOptions>,
    /// IAM Roles Anywhere credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_roles_anywhere: Option<IamRolesAnywhereOptions>,
}

/// Which credential provider a hybrid node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialProvider {
    /// SSM hybrid activation (node name = managed instance ID `mi-…`).
    Ssm,
    /// IAM Roles Anywhere (node name = `nodeName`).
    IamRolesAnywhere,
}

impl CredentialProvider {
    /// The name nodeadm uses in labels and flags: `ssm` or `iam-ra`.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialProvider::Ssm => "ssm",
            CredentialProvider::IamRolesAnywhere => "iam-ra",
        }
    }
}

impl HybridOptions {
    /// The configured provider, if exactly one is set.
    pub fn credential_provider(&self) -> Option<CredentialProvider> {
        match (&self.ssm, &self.iam_roles_anywhere) {
            (Some(_), None) => Some(CredentialProvider::Ssm),
            (None, Some(_)) => Some(CredentialProvider::IamRolesAnywhere),
            _ => None,
        }
    }
}

/// `spec.hybrid.ssm`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SsmOptions {
    /// The activation code (a secret; never logged).
    #[serde(default)]
    pub activation_code: String,
    /// The activation ID (a UUID).
    #[serde(default)]
    pub activation_id: String,
}

impl fmt::Debug for SsmOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsmOptions")
            .field("activation_code", &"<redacted>")
            .field("activation_id", &self.activation_id)
            .finish()
    }
}

/// Default `spec.hybrid.iamRolesAnywhere.certificatePath`.
pub const DEFAULT_IAM_RA_CERTIFICATE_PATH: &str = "/etc/iam/pki/server.pem";
/// Default `spec.hybrid.iamRolesAnywhere.privateKeyPath`.
pub const DEFAULT_IAM_RA_PRIVATE_KEY_PATH: &str = "/etc/iam/pki/server.key";
/// Default `spec.hybrid.iamRolesAnywhere.awsConfigPath`.
pub const DEFAULT_IAM_RA_AWS_CONFIG_PATH: &str = "/etc/aws/hybrid/config";

/// `spec.hybrid.iamRolesAnywhere`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IamRolesAnywhereOptions {
    /// The node name; must equal the certificate's CN (the role session name), ≤ 64 chars.
    #[serde(default)]
    pub node_name: String,
    /// ARN of the Roles Anywhere trust anchor.
    #[serde(default)]
    pub trust_anchor_arn: String,
    /// ARN of the Roles Anywhere profile.
    #[serde(default)]
    pub profile_arn: String,
    /// ARN of the IAM role to assume.
    #[serde(default)]
    pub role_arn: String,
    /// PEM certificate of this node.
    #[serde(default = "default_certificate_path")]
    pub certificate_path: String,
    /// PEM private key of this node.
    #[serde(default = "default_private_key_path")]
    pub private_key_path: String,
    /// Where the AWS config with the `credential_process` is written.
    #[serde(default = "default_aws_config_path")]
    pub aws_config_path: String,
}

impl Default for IamRolesAnywhereOptions {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            trust_anchor_arn: String::new(),
            profile_arn: String::new(),
            role_arn: String::new(),
            certificate_path: default_certificate_path(),
            private_key_path: default_private_key_path(),
            aws_config_path: default_aws_config_path(),
        }
    }
}

fn default_certificate_path() -> String {
    DEFAULT_IAM_RA_CERTIFICATE_PATH.to_string()
}
fn default_private_key_path() -> String {
    DEFAULT_IAM_RA_PRIVATE_KEY_PATH.to_string()
}
fn default_aws_config_path() -> String {
    DEFAULT_IAM_RA_AWS_CONFIG_PATH.to_string()
}

/// hybridlet's `AgentConfig` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentConfig {
    /// Always `hybridlet.io/v1alpha1`.
    pub api_version: String,
    /// Always `AgentConfig`.
    pub kind: String,
    /// Kubernetes-style metadata; accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// The agent's settings.
    #[serde(default)]
    pub spec: AgentSpec,
}

/// Default log level of the daemon.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default admin (metrics, health) listen address: loopback only.
pub const DEFAULT_ADMIN_LISTEN_ADDRESS: &str = "127.0.0.1:9464";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hybridlet";
/// Default kubelet root directory.
pub const DEFAULT_KUBELET_ROOT_DIR: &str = "/var/lib/kubelet";
/// Default GPU DRA driver name.
pub const DEFAULT_GPU_DRIVER_NAME: &str = "gpu.hybridlet.io";
/// Default SR-IOV DRA driver name.
pub const DEFAULT_SRIOV_DRIVER_NAME: &str = "sriov.hybridlet.io";
/// Default PCI DRA driver name.
pub const DEFAULT_PCI_DRIVER_NAME: &str = "pci.hybridlet.io";
/// Default CSI driver name.
pub const DEFAULT_CSI_DRIVER_NAME: &str = "csi.hybridlet.io";

/// `AgentConfig.spec`. Every field has a default; see `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentSpec {
    /// What the daemon logs: a level (`error`, `warn`, `info`, `debug`, `trace`) or
    /// comma-separated `target=level` directives. `--log-level`/`HYBRIDLET_LOG` win when
    /// given. Default `info`.
    pub log_level: String,
    /// The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
    pub admin: AdminSpec,
    /// Where hybridlet keeps its state (checkpoints). Default `/var/lib/hybridlet`.
    pub state_dir: String,
    /// The kubelet's root directory (plugin sockets live under it). Default
    /// `/var/lib/kubelet`.
    pub kubelet_root_dir: String,
    /// How long `hybridlet run` waits for subsystems to stop after SIGTERM. Default `30s`.
    pub shutdown_grace_period: GoDuration,
    /// How long a kubelet plugin (CSI, each DRA driver) may stay unregistered after it
    /// starts before `hybridlet_kubelet_plugin_registration_overdue` is raised (and a
    /// warning logged). Readiness never waits for the kubelet. Default `5m`.
    pub plugin_registration_timeout: GoDuration,
    /// Dynamic Resource Allocation drivers.
    pub dra: DraSpec,
    /// The CSI node plugin.
    pub csi: CsiSpec,
    /// SR-IOV provisioning done at start-up.
    pub sriov: SriovSpec,
    /// Registry mirrors written into containerd's `certs.d` host files.
    pub registry_mirrors: Vec<RegistryMirror>,
    /// HTTP proxy for hybridlet, containerd and the kubelet.
    pub proxy: ProxySpec,
    /// The cluster's remote node and pod networks, for `init` and `check` to judge the
    /// node's IP and pod CIDRs against when DescribeCluster cannot be asked. Default: ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_networks: Option<RemoteNetworksSpec>,
    /// Capacity labels on the node's own Node object (free devices per DRA driver, the
    /// site), for placement and bursting decisions. Default off.
    pub node_labels: NodeLabelsSpec,
    /// Images on the node: the pod sandbox image, registry credentials (served to the
    /// kubelet as an image credential provider), images kept pulled and pinned.
    pub images: ImagesSpec,
}

/// containerd's socket (CRI and its own API), where the distributions put it.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// `spec.images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ImagesSpec {
    /// The pod sandbox (pause) image containerd runs for every pod. Default: EKS's
    /// `eks/pause:3.5` in the ECR registry of the cluster's region (FIPS aware), pulled
    /// with an ECR token. Set it for air-gapped sites (a Harbor copy, or an image imported
    /// with `hybridlet images import`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// containerd's socket. Default `/run/containerd/containerd.sock`.
    pub containerd_socket: String,
    /// Images pulled at `init`, kept present and pinned (never garbage-collected by the
    /// kubelet) by the daemon.
    pub pre_pull: Vec<PrePullImage>,
    /// How often the daemon checks that every `prePull` image is present and pinned (a
    /// local call; a missing image is pulled again). Default `5m`.
    pub check_interval: GoDuration,
    /// Registry logins (a Harbor robot account, ...), used for hybridlet's own pulls and
    /// served to the kubelet by `hybridlet credential-provider`.
    pub credentials: Vec<RegistryCredentials>,
}

impl Default for ImagesSpec {
    fn default() -> Self {
        Self {
            sandbox: None,
            containerd_socket: DEFAULT_CONTAINERD_SOCKET.to_string(),
            pre_pull: Vec::new(),
            check_interval: GoDuration(std::time::Duration::from_secs(300)),
            credentials: Vec::new(),
        }
    }
}

/// `spec.images.prePull[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrePullImage {
    /// An image reference: `harbor.example.com/ml/triton:24.08`, `nvcr.io/nvidia/cuda@sha256:…`.
    pub image: String,
    /// A login for this image's registry only (same file format as
    /// `spec.images.credentials[].file`), instead of the registry's entry there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
}

/// `spec.images.credentials[]`: one registry's login, kept in a root-only file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryCredentials {
    /// The registry host (`harbor.example.com`, `HOST:PORT`), as image references name it.
    pub registry: String,
    /// A file readable by root only (mode 0600 or stricter) holding the login as JSON:
    /// `{"username": …, "password": …}`, or a Harbor robot account as Harbor exports it
    /// (`{"name": "robot$…", "secret": …}`).
    pub file: String,
    /// How long the kubelet may cache the login. Default `5m`.
    #[serde(default = "default_credential_cache")]
    pub cache_duration: GoDuration,
}

fn default_credential_cache() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(300))
}

/// `spec.nodeLabels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NodeLabelsSpec {
    /// Write `hybridlet.io/<kind>.free` (coarse buckets of free devices per DRA driver),
    /// `hybridlet.io/gpu.product` and `hybridlet.io/site`. Default `false`.
    pub enabled: bool,
    /// The value of `hybridlet.io/site` (a label value such as `fra1`). Default: no label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Fewest time between two writes of the labels (they are written only on a change).
    /// Default `1m`.
    pub min_interval: GoDuration,
}

impl Default for NodeLabelsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            site: None,
            min_interval: GoDuration(std::time::Duration::from_secs(60)),
        }
    }
}

/// `spec.remoteNetworks`: the cluster's `remoteNetworkConfig`, as CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RemoteNetworksSpec {
    /// `remoteNodeNetworks[].cidrs`.
    pub node_cidrs: Vec<String>,
    /// `remotePodNetworks[].cidrs`.
    pub pod_cidrs: Vec<String>,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            admin: AdminSpec::default(),
            state_dir: DEFAULT_STATE_DIR.to_string(),
            kubelet_root_dir: DEFAULT_KUBELET_ROOT_DIR.to_string(),
            shutdown_grace_period: GoDuration(std::time::Duration::from_secs(30)),
            plugin_registration_timeout: GoDuration(std::time::Duration::from_secs(300)),
            dra: DraSpec::default(),
            csi: CsiSpec::default(),
            sriov: SriovSpec::default(),
            registry_mirrors: Vec::new(),
            proxy: ProxySpec::default(),
            remote_networks: None,
            node_labels: NodeLabelsSpec::default(),
            images: ImagesSpec::default(),
        }
    }
}

/// `spec.admin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AdminSpec {
    /// `IP:PORT` to listen on. Default `127.0.0.1:9464` (loopback only).
    #[serde(deserialize_with = "socket_addr")]
    pub listen_address: SocketAddr,
    /// Serve HTTPS with this certificate and key instead of plain HTTP. Default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<AdminTls>,
}

/// `spec.admin.tls`: PEM files (the chain leaf first; the key PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminTls {
    /// Absolute path of the certificate chain.
    pub cert_file: String,
    /// Absolute path of the private key.
    pub key_file: String,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 9464)),
            tls: None,
        }
    }
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP:PORT address (e.g. 127.0.0.1:9464 or [::1]:9464; host names are not accepted)"
        ))
    })
}

/// `spec.dra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DraSpec {
    /// The GPU driver (NVML). Default off, driver name `gpu.hybridlet.io`.
    pub gpu: GpuDriverSpec,
    /// The SR-IOV VF driver. Default off, driver name `sriov.hybridlet.io`.
    pub sriov: SriovDriverSpec,
    /// The PCI driver: allowlisted PCI functions (FPGAs, other accelerators), whole IOMMU
    /// groups to vfio-pci. Default off, driver name `pci.hybridlet.io`.
    pub pci: PciDriverSpec,
    /// How long a prepared claim's ResourceClaim must be gone (and its pods off the node)
    /// before the driver releases its devices itself. Default `5m`.
    pub orphaned_claim_grace_period: GoDuration,
}

impl Default for DraSpec {
    fn default() -> Self {
        Self {
            gpu: GpuDriverSpec::default(),
            sriov: SriovDriverSpec::default(),
            pci: PciDriverSpec::default(),
            orphaned_claim_grace_period: GoDuration(std::time::Duration::from_secs(300)),
        }
    }
}

/// `spec.dra.gpu`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct GpuDriverSpec {
    /// Whether the driver runs. Default `false`.
    pub enabled: bool,
    /// The DRA driver name registered with the kubelet. Default `gpu.hybridlet.io`.
    pub driver_name: String,
    /// Dynamic MIG: a GPU in MIG mode offers every placement of every MIG profile (and
    /// itself), consuming its counter set; the instance is created at prepare and
    /// destroyed at unprepare, and instances no prepared claim holds are destroyed at
    /// start. Off (default): the MIG devices that exist are offered as they are.
    pub dynamic_mig: bool,
}

impl Default for GpuDriverSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            driver_name: DEFAULT_GPU_DRIVER_NAME.to_string(),
            dynamic_mig: false,
        }
    }
}

/// `spec.dra.sriov`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SriovDriverSpec {
    /// Whether the driver runs. Default `false`.
    pub enabled: bool,
    /// The DRA driver name registered with the kubelet. Default `sriov.hybridlet.io`.
    pub driver_name: String,
}

impl Default for SriovDriverSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            driver_name: DEFAULT_SRIOV_DRIVER_NAME.to_string(),
        }
    }
}

/// `spec.dra.pci`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PciDriverSpec {
    /// Whether the driver runs. Default `false`.
    pub enabled: bool,
    /// The DRA driver name registered with the kubelet. Default `pci.hybridlet.io`.
    pub driver_name: String,
    /// Which PCI functions the driver publishes and may move between drivers: a function
    /// matching any rule. Nothing else on the host is ever touched. Required when enabled.
    pub allow: Vec<PciAllowRule>,
}

impl Default for PciDriverSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            driver_name: DEFAULT_PCI_DRIVER_NAME.to_string(),
            allow: Vec::new(),
        }
    }
}

/// One allowlist rule (`spec.dra.pci.allow[]`): every field given must match. At least
/// one of `vendor`, `class` or `driver`; `device` needs `vendor`, `subsystemDevice`
/// needs `subsystemVendor`. IDs are hex (`0x10ee`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PciAllowRule {
    /// PCI vendor ID, e.g. `0x10ee` (AMD/Xilinx), `0x8086` (Intel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// PCI device ID, e.g. `0x505c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Subsystem vendor ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem_vendor: Option<String>,
    /// Subsystem device ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem_device: Option<String>,
    /// PCI class: `0x12` (processing accelerators), `0x1200` (class and subclass) or
    /// `0x120000` (with the programming interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The kernel driver the function is bound to at discovery, e.g. `xclmgmt`, `dfl-pci`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The `deviceClass` attribute of matching devices (a DNS label such as `fpga` or
    /// `accelerator`), for DeviceClass selectors. Default `accelerator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<String>,
}

/// `spec.csi`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CsiSpec {
    /// The CSI driver name. Default `csi.hybridlet.io`.
    pub driver_name: String,
    /// NFS volumes. Default off.
    pub nfs: Toggle,
    /// iSCSI volumes. Default off.
    pub iscsi: Toggle,
    /// Topology segments NodeGetInfo reports, e.g. `topology.hybridlet.io/site: fra1`, so
    /// PVs can carry node affinity to the site whose storage they live on. Default none.
    pub topology: std::collections::BTreeMap<String, String>,
    /// How long one mount helper (mount.nfs, iscsiadm login) may run before it and
    /// everything it started are killed and the call fails. Default `100s`.
    pub mount_timeout: GoDuration,
}

impl Default for CsiSpec {
    fn default() -> Self {
        Self {
            driver_name: DEFAULT_CSI_DRIVER_NAME.to_string(),
            nfs: Toggle::default(),
            iscsi: Toggle::default(),
            topology: std::collections::BTreeMap::new(),
            mount_timeout: GoDuration(std::time::Duration::from_secs(100)),
        }
    }
}

/// An on/off switch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toggle {
    /// Default `false`.
    #[serde(default)]
    pub enabled: bool,
}

/// `spec.sriov`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SriovSpec {
    /// Physical functions whose VF count hybridlet sets at start-up. Default: none (VFs
    /// are left as the host has them).
    pub physical_functions: Vec<PfProvisioning>,
}

/// One PF to provision (`spec.sriov.physicalFunctions[]`): name it by exactly one of
/// `pciAddress` or `interface`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PfProvisioning {
    /// The PF's PCI address, e.g. `0000:81:00.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// The PF's network interface, e.g. `ens2f0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// How many VFs it should have (written to `sriov_numvfs`; 0 removes them).
    pub num_vfs: u32,
}

/// One registry mirror (`spec.registryMirrors[]`), rendered as containerd `hosts.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryMirror {
    /// The upstream registry host (`docker.io`, `registry.k8s.io`, `HOST:PORT`), or
    /// `_default` for every registry.
    pub registry: String,
    /// Mirror endpoints, tried in order: `https://harbor.example.com`.
    pub endpoints: Vec<String>,
    /// CA bundle to trust for the endpoints (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Skip TLS verification for the endpoints (not recommended).
    #[serde(default)]
    pub skip_verify: bool,
    /// The endpoint path already includes the `/v2` API prefix (Harbor proxy-cache
    /// projects need this).
    #[serde(default)]
    pub override_path: bool,
}

/// `spec.proxy`. The URLs may carry credentials (`http://user:password@proxy:3128`):
/// `Debug` shows them as `***@`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProxySpec {
    /// `http://proxy:3128` for plain HTTP traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// `http://proxy:3128` for HTTPS traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// Hosts, domains (`.internal`) and CIDRs that bypass the proxy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub no_proxy: Vec<String>,
}

impl fmt::Debug for ProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxySpec")
            .field(
                "http_proxy",
                &self.http_proxy.as_deref().map(redact_userinfo),
            )
            .field(
                "https_proxy",
                &self.https_proxy.as_deref().map(redact_userinfo),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxySpec {
    /// Whether a proxy URL carries credentials (`user:password@`).
    pub fn has_credentials(&self) -> bool {
        [&self.http_proxy, &self.https_proxy]
            .into_iter()
            .flatten()
            .any(|u| redact_userinfo(u) != *u)
    }
}

/// `scheme://user:password@host` → `scheme://***@host` (unchanged without userinfo), for
/// messages and logs.
pub fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    #[test]
    fn proxy_credentials_are_redacted() {
        assert_eq!(
            redact_userinfo("http://svc:p%40ss@proxy.corp:3128"),
            "http://***@proxy.corp:3128"
        );
        assert_eq!(
            redact_userinfo("http://proxy.corp:3128/"),
            "http://proxy.corp:3128/"
        );
        assert_eq!(redact_userinfo("http://proxy/a@b"), "http://proxy/a@b");
        let p = ProxySpec {
            https_proxy: Some("http://svc:hunter2@proxy:3128".into()),
            ..ProxySpec::default()
        };
        assert!(p.has_credentials());
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(!ProxySpec::default().has_credentials());
    }
}
