//! Images in the join: which containerd the host runs (and so which config version init
//! writes), whether it can run what the DRA drivers prepare (CDI needs containerd 1.7),
//! the pod sandbox image pulled through CRI with an ECR token right after containerd
//! starts (as nodeadm does; containerd's own anonymous pull of EKS's pause image fails),
//! the pre-pulled images, and `hybridlet images import`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hybridlet_aws::{AwsSettings, EcrClient, endpoint_from_env};
use hybridlet_bootstrap::ContainerdTarget;
use hybridlet_config::{Config, NodeConfig};
use hybridlet_cri::{Containerd, ImageRuntime, RegistryAuth};
use hybridlet_images::sandbox::{self, Retry, Sandbox};
use hybridlet_sys::HostRoot;

use crate::{Context, Error, Outcome};

/// Bound on one image pull through CRI.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// The containerd installed under `root`: its version line, and its (major, minor).
pub(crate) fn installed(root: &HostRoot) -> Option<(String, Option<(u32, u32)>)> {
    let program = hybridlet_sys::containerd::find(root, "containerd")?;
    let line = hybridlet_sys::containerd::version(&program).ok()?;
    let parsed = hybridlet_cri::major_minor(&line);
    Some((line, parsed))
}

/// What `init` renders containerd's config for.
pub(crate) fn target(
    sandbox: &Sandbox,
    installed: Option<&(String, Option<(u32, u32)>)>,
) -> ContainerdTarget {
    ContainerdTarget::for_major(
        &sandbox.image,
        installed.and_then(|(_, v)| v.map(|(major, _)| major)),
    )
}

/// Whether a DRA driver is on (its devices reach containers as CDI specs).
fn dra_enabled(config: &Config) -> bool {
    let dra = &config.agent.dra;
    dra.gpu.enabled || dra.sriov.enabled || dra.pci.enabled
}

/// CDI support: with a DRA driver on, containerd must be 1.7 or later; 1.6 parses
/// `enable_cdi` and drops it (seen with `containerd config dump` on Debian 12's 1.6.20), and
/// every pod with a claim would then fail to start.
pub(crate) fn cdi_check(
    config: &Config,
    installed: Option<&(String, Option<(u32, u32)>)>,
) -> Option<(&'static str, Outcome)> {
    if !dra_enabled(config) {
        return None;
    }
    let outcome = match installed {
        None => Outcome::Warn(
            "containerd is not installed; the DRA drivers need containerd 1.7 or later (CDI)"
                .into(),
        ),
        Some((line, None)) => Outcome::Warn(format!(
            "cannot read containerd's version from {line:?}; the DRA drivers need 1.7 or later (CDI)"
        )),
        Some((line, Some((major, minor)))) if (*major, *minor) < (1, 7) => Outcome::Fail(format!(
            "containerd {major}.{minor} cannot hand devices to containers (CDI came in 1.7: it reads enable_cdi and drops it), so every pod with a DRA claim would fail to start ({line}). Install containerd 1.7 or later (Debian 13, Ubuntu 24.04, or Docker's containerd.io package), or turn the DRA drivers off (spec.dra.*.enabled)"
        )),
        Some((_, Some((major, minor)))) => Outcome::Ok(format!(
            "containerd {major}.{minor} reads CDI specs (enable_cdi)"
        )),
    };
    Some(("containerd CDI support", outcome))
}

/// `check`: the sandbox image and the pre-pulled images, as containerd has them now (only
/// on the machine itself, and only when containerd's socket is there).
pub(crate) fn image_checks(ctx: &Context, config: &Config) -> Vec<(&'static str, Outcome)> {
    let Some(node) = config.node.as_ref() else {
        return Vec::new();
    };
    let socket = Path::new(&config.agent.images.containerd_socket);
    if !ctx.root.is_system() || !socket.exists() {
        return Vec::new();
    }
    let sandbox = sandbox(&ctx.root, config, node);
    let runtime = Containerd::new(socket, PULL_TIMEOUT);
    let mut out = Vec::new();
    ctx.block_on(async {
        let outcome = match runtime.status(&sandbox.image).await {
            Ok(Some(_)) => Outcome::Ok(format!("{} is on the node", sandbox.image)),
            Ok(None) => Outcome::Fail(format!(
                "{} is not on the node: containerd would pull it anonymously when the first pod starts, and {}. Run `hybridlet init` again (it pulls it with a login), or `hybridlet images import` an archive of it",
                sandbox.image,
                if sandbox.eks.is_some() { "EKS's registry refuses that" } else { "that fails if the registry needs a login" }
            )),
            Err(e) => Outcome::Warn(format!("cannot ask containerd: {e}")),
        };
        out.push(("sandbox image", outcome));
        for p in &config.agent.images.pre_pull {
            let name = hybridlet_config::ImageRef::parse(&p.image).map_or_else(|_| p.image.clone(), |r| r.normalized());
            let outcome = match runtime.status(&name).await {
                Ok(Some(i)) if i.pinned => Outcome::Ok(format!("{} present, pinned", p.image)),
                Ok(Some(_)) => Outcome::Warn(format!("{} present, not pinned (containerd 1.7 or later honours pins; the kubelet may garbage-collect it)", p.image)),
                Ok(None) => Outcome::Warn(format!("{} is not on the node; the daemon pulls it (hybridlet_image_prepull says how that goes)", p.image)),
                Err(e) => Outcome::Warn(format!("cannot ask containerd: {e}")),
            };
            out.push(("pre-pulled image", outcome));
        }
    });
    out
}

/// Whether FIPS mode is on and EKS's FIPS registry host resolves (nodeadm's rule).
fn fips(root: &HostRoot, region: &str) -> bool {
    let on = root
        .resolve("/proc/sys/crypto/fips_enabled")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .is_some_and(|s| s.trim() == "1");
    if !on || !root.is_system() {
        return false;
    }
    let host = hybridlet_aws::eks_registry(region, None, true).host;
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 443))
        .is_ok_and(|mut a| a.next().is_some())
}

/// The sandbox image for this node: EKS's registry account from the release manifest
/// `install` read (its region data, kept in the install record), else AWS's table.
pub(crate) fn sandbox(root: &HostRoot, config: &Config, node: &NodeConfig) -> Sandbox {
    let region = &node.spec.cluster.region;
    let manifest = root
        .resolve(&config.agent.state_dir)
        .ok()
        .and_then(|dir| crate::install::read_tracker(&dir).ok().flatten())
        .and_then(|installed| installed.region)
        .map(|r| hybridlet_aws::RegionData {
            partition: r.partition,
            ecr_account_id: r.ecr_account_id,
        });
    sandbox::resolve(
        &config.agent.images,
        region,
        manifest.as_ref(),
        fips(root, region),
    )
}

/// An ECR login with the node's credentials.
async fn ecr_login(
    node: &NodeConfig,
    credentials_file: Option<std::path::PathBuf>,
) -> Result<RegistryAuth, String> {
    let region = &node.spec.cluster.region;
    let sdk = hybridlet_aws::sdk_config(&AwsSettings {
        region: region.clone(),
        config_file: crate::preflight::iam_ra_config_file(node),
        credentials_file,
        ..AwsSettings::default()
    })
    .await;
    let creds = hybridlet_aws::resolve_credentials(&sdk).await?;
    let client = EcrClient::new(
        region,
        endpoint_from_env("ECR").as_deref(),
        false,
        creds,
        Duration::from_secs(30),
    )
    .map_err(|e| e.to_string())?;
    let token = client
        .authorization_token()
        .await
        .map_err(|e| e.to_string())?;
    Ok(RegistryAuth {
        auth: token.auth,
        ..RegistryAuth::default()
    })
}

/// Pull the sandbox image through CRI: EKS's with an ECR token (nodeadm's step), any
/// other with the configured logins; mirrors first.
async fn pull_sandbox(
    runtime: &dyn ImageRuntime,
    config: &Config,
    node: &NodeConfig,
    sandbox: &Sandbox,
    credentials_file: Option<std::path::PathBuf>,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), Error> {
    let login = match &sandbox.eks {
        Some(registry) => match ecr_login(node, credentials_file).await {
            Ok(login) => Some(login),
            Err(e) => {
                return Err(Error::Failed(format!(
                    "sandbox image {}: no ECR login (ecr:GetAuthorizationToken with the node's credentials): {e}. containerd would pull it anonymously and {} refuses that, so no pod could start. Give the node's role ecr:GetAuthorizationToken, or set spec.images.sandbox to a copy in your registry (or `hybridlet images import` an archive of it)",
                    sandbox.image, registry.host
                )));
            }
        },
        None => None,
    };
    let (id, via) = sandbox::pull(
        runtime,
        &sandbox.image,
        &config.agent.images,
        &config.agent.registry_mirrors,
        login,
        Retry::default(),
        say,
    )
    .await
    .map_err(|e| {
        Error::Failed(format!(
            "{e}. Pods cannot start without it: fix the registry access (or set spec.images.sandbox, or `hybridlet images import` an archive of it) and run init again"
        ))
    })?;
    say(format!(
        "sandbox image {} pulled via {via} ({id})",
        sandbox.image
    ));
    Ok(())
}

/// Pull the sandbox image through CRI (EKS's with an ECR token), then the pre-pulled
/// images; every step said on `say`. Only a failed sandbox pull is an error.
pub(crate) fn pull_after_start(
    ctx: &Context,
    config: &Config,
    node: &NodeConfig,
    sandbox: &Sandbox,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), Error> {
    let socket = &config.agent.images.containerd_socket;
    let runtime: Arc<dyn ImageRuntime> = Arc::new(Containerd::new(socket, PULL_TIMEOUT));
    let credentials_file = ctx
        .root
        .resolve(hybridlet_sys::ssm_agent::CREDENTIALS_FILE)
        .ok()
        .filter(|p| p.exists());
    ctx.block_on(async {
        let name = hybridlet_config::ImageRef::parse(&sandbox.image)
            .map_or_else(|_| sandbox.image.clone(), |r| r.normalized());
        // Already there (imported from an archive, or an earlier init): nothing to ask a
        // registry for; containerd runs what it has.
        if let Ok(Some(info)) = runtime.status(&name).await {
            say(format!("sandbox image {} already on the node ({})", sandbox.image, info.id));
        } else {
            pull_sandbox(&*runtime, config, node, sandbox, credentials_file, say).await?;
        }
        match runtime.pin(&name).await {
            Ok(hybridlet_cri::Pinned::Yes) => say(format!("sandbox image {} pinned", sandbox.image)),
            Ok(hybridlet_cri::Pinned::LabelOnly) => say(format!(
                "sandbox image {} labelled pinned (this containerd does not honour pins: 1.7 or later does)",
                sandbox.image
            )),
            Err(e) => say(format!("warning: pinning the sandbox image {}: {e}", sandbox.image)),
        }
        if !config.agent.images.pre_pull.is_empty() {
            let mut scratch = hybridlet_metrics::prometheus_client::registry::Registry::default();
            let metrics = hybridlet_images::prepull::ImageMetrics::register(&mut scratch);
            let puller = hybridlet_images::prepull::PrePuller::new(
                runtime.clone(),
                &config.agent.images,
                &config.agent.registry_mirrors,
                metrics,
            );
            for o in puller.pass(say).await {
                say(format!("pre-pull {}: {} ({})", o.image, o.state.as_str(), o.detail));
            }
        }
        Ok(())
    })
}

/// `hybridlet images import FILE`: an OCI or docker archive into containerd's CRI
/// namespace, each image pinned.
pub fn import(ctx: &Context, archive: &Path) -> Result<(), Error> {
    if !archive.is_file() {
        return Err(Error::Usage(format!("{}: no such file", archive.display())));
    }
    let socket = Path::new(&ctx.loaded.config.agent.images.containerd_socket);
    for line in ctx.block_on(crate::archive::import_archive(&ctx.root, socket, archive))? {
        outln!("{line}");
    }
    Ok(())
}

/// `hybridlet credential-provider`: one kubelet request on stdin, the answer on stdout.
pub fn credential_provider(ctx: &Context) -> Result<(), Error> {
    use std::io::{Read as _, Write as _};
    let mut request = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut request)
        .map_err(|e| Error::Failed(format!("credential provider: reading stdin: {e}")))?;
    let answer = hybridlet_images::provider::respond(&request, &ctx.loaded.config.agent.images)
        .map_err(|e| Error::Failed(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{answer}")
        .and_then(|()| out.flush())
        .map_err(|e| Error::Failed(format!("credential provider: writing stdout: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(dra: bool) -> Config {
        let mut c = Config::default();
        c.agent.dra.sriov.enabled = dra;
        c
    }

    #[test]
    fn cdi_needs_containerd_1_7_when_a_dra_driver_is_on() {
        let v = |s: &str| Some((s.to_string(), hybridlet_cri::major_minor(s)));
        let debian12 =
            v("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3");
        assert!(cdi_check(&config(false), debian12.as_ref()).is_none());
        let (_, outcome) = cdi_check(&config(true), debian12.as_ref()).unwrap();
        assert!(
            matches!(&outcome, Outcome::Fail(m) if m.contains("1.7 or later")),
            "{outcome:?}"
        );
        for ok in [
            "containerd containerd.io 1.7.27 05044ec",
            "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7",
        ] {
            let (_, outcome) = cdi_check(&config(true), v(ok).as_ref()).unwrap();
            assert!(matches!(outcome, Outcome::Ok(_)), "{ok}: {outcome:?}");
        }
        let (_, outcome) = cdi_check(&config(true), None).unwrap();
        assert!(matches!(outcome, Outcome::Warn(_)));
    }

    #[test]
    fn containerd_2_gets_config_version_3() {
        let s = Sandbox {
            image: "x/pause:1".into(),
            eks: None,
        };
        let two = (
            "containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6".to_string(),
            Some((2, 0)),
        );
        assert_eq!(target(&s, Some(&two)).config_version, 3);
        assert_eq!(target(&s, None).config_version, 2);
    }
}
