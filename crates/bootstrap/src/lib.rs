//! Join: everything `hybridlet init` writes on a host, rendered from one typed model — the
//! validated configuration plus the cluster's coordinates and the node's identity — as
//! pure functions (no IO here; writing is the binary's job, atomically, under `--root`).
//!
//! Files, as nodeadm lays them out so that existing tooling keeps working:
//!
//! | path | what |
//! |---|---|
//! | `/etc/containerd/config.toml` | containerd v2 config: systemd cgroups, sandbox image, CDI on, `config_path` for registry hosts, imports of `config.d` |
//! | `/etc/containerd/config.d/00-nodeadm.toml` | the user's `spec.containerd.config`, verbatim (when set) |
//! | `/etc/containerd/certs.d/<registry>/hosts.toml` | one per `spec.registryMirrors[]` |
//! | `/etc/kubernetes/pki/ca.crt` | the cluster CA |
//! | `/etc/kubernetes/kubelet/config.json` | KubeletConfiguration; the user's `spec.kubelet.config` merged over ours, user values win |
//! | `/var/lib/kubelet/kubeconfig` | API server, CA, and `hybridlet token` as the exec credential plugin |
//! | `/etc/eks/image-credential-provider/config.json` | the kubelet's CredentialProviderConfig for the ECR credential provider (when `install` placed it) |
//! | `/etc/eks/kubelet/environment` | `NODEADM_KUBELET_ARGS`: our flags, then the user's `spec.kubelet.flags` (they win) |
//! | `/etc/systemd/system/{containerd,kubelet,<SSM agent>}.service.d/http-proxy.conf` | from `spec.proxy` (the SSM agent's unit only with SSM) |
//! | `spec.hybrid.iamRolesAnywhere.awsConfigPath` (`/etc/aws/hybrid/config`) | IAM Roles Anywhere: profiles `default` and `hybrid` whose `credential_process` runs the signing helper |
//! | `/etc/systemd/system/aws_signing_helper_update.service` | IAM Roles Anywhere with `enableCredentialsFile`: keeps `/eks-hybrid/.aws/credentials` fresh |
//!
//! `hybridlet install` adds `/etc/systemd/system/kubelet.service` ([`kubelet_unit`]).
//!
//! What this crate must never do: touch the host, call AWS, or overwrite a value the user
//! set with a computed one.

mod containerd;
mod file;
mod iam_ra;
mod kernel;
mod kubeconfig;
mod kubelet;
mod model;
mod proxy;
mod render;
mod units;

pub use containerd::{MIRROR_MARKER, hosts_toml_path, registry_mirror_files};
pub use file::{CONTAINERD_UNIT, KUBELET_UNIT, RenderedFile, desired_files};
pub use iam_ra::{POD_CREDENTIALS_FILE, SIGNING_HELPER, SIGNING_HELPER_UPDATE_UNIT};
pub use kernel::{MODULES_LOAD_PATH, SYSCTL_PATH};
pub use kubelet::{
    ECR_CREDENTIAL_PROVIDER, HYBRIDLET_CREDENTIAL_PROVIDER, IMAGE_CREDENTIAL_PROVIDER_DIR,
    cluster_dns,
};
pub use model::{ClusterCoordinates, ContainerdTarget, NodeIdentity, RenderError};
pub use proxy::{PROXY_ENV_FILE, proxy_dropin_for, proxy_env, proxy_files_for};
pub use render::render;
pub use units::kubelet_unit;

/// The pause image in EKS's commercial registry (used where a region has none of its own).
pub const DEFAULT_SANDBOX_IMAGE: &str =
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5";
