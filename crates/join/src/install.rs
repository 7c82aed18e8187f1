//! `hybridlet install <k8s-version>`: the kubelet, kubectl, the ECR credential provider,
//! the CNI plugins (the verified tarball unpacked into `/opt/cni/bin`, top-level files
//! only) and (IAM Roles Anywhere) the signing helper from the EKS hybrid release
//! manifest (or a mirror of it), each verified
//! against its published SHA-256 before it is placed, resumable and atomic
//! (hybridlet-artifacts); the kubelet's unit (hybridlet-bootstrap); a record of what was
//! installed (`<stateDir>/install.json`) that `uninstall` reads. containerd is found, not
//! installed: a containerd the operator or the distribution manages is never taken over.
//! SSM: an installed agent (package or snap) is used as it is; else the agent package
//! (`.deb`/`.rpm`) from the manifest's `ssm_releases` (mirrors carry it; the public
//! manifest does not), verified like every artifact and installed with dpkg or rpm.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hybridlet_artifacts::{Downloaded, Fetcher, Manifest, Progress};
use hybridlet_config::CredentialProvider;
use hybridlet_sys::fileset::{self, DesiredFile};
use hybridlet_sys::packages::{PackageFormat, PackageManager as _, SystemPackages, host_format};
use hybridlet_sys::systemd::{ServiceManager, Systemctl};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::{Context, InstallArgs};

/// Where each artifact goes (nodeadm's layout).
pub(crate) const PLACES: &[(&str, &str, bool)] = &[
    ("kubelet", "/usr/bin/kubelet", true),
    ("kubectl", "/usr/local/bin/kubectl", false),
    (
        "ecr-credential-provider",
        "/etc/eks/image-credential-provider/ecr-credential-provider",
        false,
    ),
];
/// The CNI plugins: the release's tarball is kept here and unpacked into [`CNI_BIN`].
const CNI_ARCHIVE: &str = "/opt/cni/plugins/cni-plugins.tgz";
/// Where containerd (`bin_dir` in the config init writes) looks for CNI plugins.
const CNI_BIN: &str = "/opt/cni/bin";
use hybridlet_bootstrap::SIGNING_HELPER;
/// The package install may add for SSM, and uninstall removes again.
const SSM_AGENT_PACKAGE: &str = "amazon-ssm-agent";
const TRACKER: &str = "install.json";

/// What `install` placed, for `uninstall` (and a later `upgrade`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Installed {
    /// The Kubernetes version.
    pub version: String,
    /// Host paths and the SHA-256 each had when placed.
    pub files: Vec<InstalledFile>,
    /// The version `upgrade` replaced, whose binaries are kept for `upgrade --rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// The SSM agent package, when install added it (uninstall removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_agent_package: Option<String>,
    /// The release manifest's `region_config` entry for the node's region, when it had
    /// one: init takes EKS's registry account for the sandbox image from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<hybridlet_artifacts::RegionConfig>,
}

/// The binaries an upgrade replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Previous {
    /// Their Kubernetes version.
    pub version: String,
    /// Where copies of them are kept.
    pub dir: String,
    /// Host paths and the SHA-256 each had.
    pub files: Vec<InstalledFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstalledFile {
    pub path: String,
    pub sha256: String,
}

pub(crate) fn tracker_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TRACKER)
}

pub(crate) fn read_tracker(state_dir: &Path) -> Result<Option<Installed>, Error> {
    let path = tracker_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::Failed(format!(
                "{} is not a valid install record: {e}; move it aside to continue",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Failed(format!("reading {}: {e}", path.display()))),
    }
}

pub(crate) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// A progress bar on a terminal, one line per file otherwise.
struct Bar {
    tty: bool,
    name: String,
    total: Option<u64>,
    started: Option<Instant>,
    last_percent: u64,
}

impl Progress for Bar {
    fn started(&mut self, name: &str, offset: u64, total: Option<u64>) {
        self.name = name.to_string();
        self.total = total;
        self.started = Some(Instant::now());
        self.last_percent = u64::MAX;
        if offset > 0 {
            eprintln!("{name}: resuming at {} MiB", offset >> 20);
        }
    }

    fn advanced(&mut self, done: u64) {
        if !self.tty {
            return;
        }
        let percent = self.total.map(|t| done * 100 / t.max(1)).unwrap_or(0);
        if percent != self.last_percent {
            self.last_percent = percent;
            let filled = (percent / 5) as usize;
            eprint!(
                "\r{:<20} [{}{}] {:>3}% {} MiB",
                self.name,
                "#".repeat(filled),
                " ".repeat(20 - filled.min(20)),
                percent,
                done >> 20
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn finished(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Fetch and parse the release manifest.
pub(crate) async fn fetch_manifest(fetcher: &Fetcher, url: &str) -> Result<Manifest, Error> {
    let text = fetcher
        .get_bytes(url, 16 << 20)
        .await
        .map_err(crate::fail)?;
    Manifest::parse(url, &String::from_utf8_lossy(&text)).map_err(crate::fail)
}

/// Download `artifact` to `target` (temp file, verify, rename), refusing one without a
/// published checksum. Returns the SHA-256 and what happened.
pub(crate) async fn fetch_verified(
    fetcher: &Fetcher,
    artifact: &hybridlet_artifacts::Artifact,
    version: &str,
    target: &Path,
    tty: bool,
) -> Result<(String, Downloaded), Error> {
    if artifact.checksum_uri.is_empty() {
        return Err(Error::Failed(format!(
            "{} {version} has no checksum_uri in the manifest; refusing to install an unverifiable file",
            artifact.name,
        )));
    }
    let sum = fetcher
        .checksum(&artifact.checksum_uri)
        .await
        .map_err(crate::fail)?;
    let mut bar = Bar {
        tty,
        name: artifact.name.clone(),
        total: None,
        started: None,
        last_percent: u64::MAX,
    };
    let got = fetcher
        .download(&artifact.uri, &sum, target, 0o755, &mut bar)
        .await
        .map_err(crate::fail)?;
    Ok((sum, got))
}

pub fn install(ctx: &Context, args: &InstallArgs) -> Result<(), Error> {
    let loaded = &ctx.loaded;
    let root = ctx.root.clone();
    let resolve = |p: &str| root.resolve(p).map_err(|e| Error::Failed(format!("{e}")));
    let state_dir = resolve(&loaded.config.agent.state_dir)?;
    let provider = match args.credential_provider.as_deref() {
        Some("iam-ra") => Some(CredentialProvider::IamRolesAnywhere),
        Some(_) => Some(CredentialProvider::Ssm),
        None => loaded
            .config
            .node
            .as_ref()
            .and_then(|n| n.spec.hybrid.as_ref())
            .and_then(|h| h.credential_provider()),
    };
    let arch = arch();
    ctx.block_on(async {
        let fetcher = Fetcher::new().map_err(crate::fail)?;
        let manifest = fetch_manifest(&fetcher, &args.manifest).await?;
        let release = manifest
            .release(&args.kubernetes_version)
            .map_err(crate::fail)?;
        outln!(
            "Kubernetes {} (released {}) for linux/{arch} from {}",
            release.version,
            release.release_date,
            args.manifest
        );
        let mut plan = Vec::new();
        for (name, dest, required) in PLACES {
            match release.artifact(name, arch) {
                Ok(a) => plan.push((a.clone(), *dest)),
                Err(e) if *required => return Err(crate::fail(e)),
                Err(_) => outln!("{name}: not in this release; skipped"),
            }
        }
        match provider {
            Some(CredentialProvider::IamRolesAnywhere) => match manifest.signing_helper(arch) {
                Some(a) => plan.push((a.clone(), SIGNING_HELPER)),
                None => {
                    return Err(Error::Failed(format!(
                        "the release manifest has no IAM Roles Anywhere signing helper for linux/{arch}"
                    )));
                }
            },
            Some(CredentialProvider::Ssm) => {}
            None => {}
        }
        let cni = match release.artifact("cni-plugins", arch) {
            Ok(a) => Some(a.clone()),
            Err(_) => {
                outln!("cni-plugins: not in this release; skipped");
                None
            }
        };
        let ssm = (provider == Some(CredentialProvider::Ssm)).then(|| ssm_plan(&root, &manifest, arch));
        let archives: Vec<hybridlet_artifacts::Artifact> =
            manifest.image_archives(arch).into_iter().cloned().collect();
        if args.dry_run {
            for (a, dest) in &plan {
                outln!("would install {} → {dest} (from {})", a.name, a.uri);
            }
            for a in &archives {
                outln!("would import the image archive {} into containerd (from {})", a.name, a.uri);
            }
            if let Some(a) = &cni {
                outln!("would install cni-plugins → {CNI_BIN} (unpacked from {})", a.uri);
            }
            if let Some(SsmPlan::Package(format, a)) = &ssm {
                outln!("would install the {SSM_AGENT_PACKAGE} {} package (from {})", format.as_str(), a.uri);
            }
            outln!("dry run: nothing was changed");
            return Ok(());
        }

        let tty = std::io::stderr().is_terminal();
        let mut installed = Installed {
            version: release.version.clone(),
            files: Vec::new(),
            previous: None,
            ssm_agent_package: read_tracker(&state_dir)
                .ok()
                .flatten()
                .and_then(|t| t.ssm_agent_package),
            region: loaded
                .config
                .node
                .as_ref()
                .and_then(|n| manifest.region_config.get(&n.spec.cluster.region))
                .cloned(),
        };
        for (artifact, dest) in &plan {
            let target = resolve(dest)?;
            let (sum, got) = fetch_verified(&fetcher, artifact, &release.version, &target, tty).await?;
            match got {
                Downloaded::AlreadyPresent => outln!("{:>9}  {dest} (already this version)", "unchanged"),
                Downloaded::Fetched { bytes, resumed } => outln!(
                    "{:>9}  {dest} ({} MiB{}, SHA-256 verified)",
                    "installed",
                    bytes >> 20,
                    if resumed { ", resumed" } else { "" }
                ),
            }
            installed.files.push(InstalledFile {
                path: (*dest).to_string(),
                sha256: sum,
            });
        }

        if let Some(artifact) = &cni {
            let archive = resolve(CNI_ARCHIVE)?;
            let (sum, _) = fetch_verified(&fetcher, artifact, &release.version, &archive, tty).await?;
            installed.files.push(InstalledFile {
                path: CNI_ARCHIVE.to_string(),
                sha256: sum,
            });
            let bin = resolve(CNI_BIN)?;
            let unpacked = hybridlet_artifacts::unpack_flat(&archive, &bin)
                .map_err(crate::fail)?;
            let written = unpacked.iter().filter(|u| u.written).count();
            for u in &unpacked {
                let name = u.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                installed.files.push(InstalledFile {
                    path: format!("{CNI_BIN}/{name}"),
                    sha256: u.sha256.clone(),
                });
            }
            outln!(
                "{:>9}  {CNI_BIN} ({} files from the verified cni-plugins archive, {written} written)",
                if written > 0 { "installed" } else { "unchanged" },
                unpacked.len()
            );
        }

        for artifact in &archives {
            let dest = format!(
                "{}/images/{}.tar",
                loaded.config.agent.state_dir.trim_end_matches('/'),
                artifact.name
            );
            let target = resolve(&dest)?;
            let (sum, _) = fetch_verified(&fetcher, artifact, &release.version, &target, tty).await?;
            installed.files.push(InstalledFile {
                path: dest.clone(),
                sha256: sum,
            });
            outln!("{:>9}  {dest} (image archive, SHA-256 verified)", "fetched");
            let socket = Path::new(&loaded.config.agent.images.containerd_socket);
            if root.is_system() && socket.exists() {
                for line in crate::archive::import_archive(&root, socket, &target).await? {
                    outln!("{line}");
                }
            } else {
                outln!("    containerd is not running: `hybridlet images import {dest}` once it runs");
            }
        }

        let unit = hybridlet_bootstrap::kubelet_unit();
        let unit_path = resolve(&unit.path)?;
        let applied = fileset::apply(
            &[DesiredFile {
                path: unit_path.clone(),
                mode: unit.mode,
                contents: unit.contents.clone().into_bytes(),
            }],
            &state_dir.join("install-backups"),
        )
        .map_err(crate::fail)?;
        outln!("{:>9}  {}", applied.states[0].as_str(), unit.path);
        installed.files.push(InstalledFile {
            path: unit.path.clone(),
            sha256: hybridlet_artifacts::sha256_file(&unit_path)
                .map_err(crate::fail)?,
        });

        match ssm {
            Some(SsmPlan::Package(format, artifact)) => {
                let added = install_ssm_agent(&root, &fetcher, &artifact, format, &state_dir, tty).await?;
                installed.ssm_agent_package = added
                    .then(|| SSM_AGENT_PACKAGE.to_string())
                    .or(installed.ssm_agent_package.take());
            }
            Some(SsmPlan::Found(agent)) => outln!(
                "ssm: the SSM agent is installed ({}, {}); left as it is",
                agent.program,
                agent.unit
            ),
            Some(SsmPlan::Missing(why)) => outln!("warning: ssm: {why}"),
            None => {}
        }

        hybridlet_sys::ensure_dir(&state_dir, 0o700).map_err(crate::fail)?;
        let json = serde_json::to_vec_pretty(&installed).map_err(crate::fail)?;
        hybridlet_sys::atomic_write(&tracker_path(&state_dir), &json, 0o600)
            .map_err(crate::fail)?;

        if root.is_system() {
            let sm = Systemctl::default();
            sm.daemon_reload().map_err(crate::fail)?;
            let containerd = sm
                .state("containerd.service")
                .map_err(crate::fail)?;
            if containerd.exists {
                outln!("containerd: found (managed by your distribution or by you; left as it is)");
            } else {
                outln!(
                    "containerd: not installed. Install your distribution's package (apt-get install containerd, dnf install containerd) before `hybridlet init`; hybridlet does not install it"
                );
            }
        }
        outln!("install: Kubernetes {} ready; next: hybridlet init", release.version);
        Ok(())
    })
}

/// What install does about the SSM agent.
enum SsmPlan {
    /// Installed already (package or snap): used as it is.
    Found(hybridlet_sys::ssm_agent::AgentInstall),
    /// Install this package.
    Package(PackageFormat, hybridlet_artifacts::Artifact),
    /// Cannot install it; why and what to do.
    Missing(String),
}

fn ssm_plan(root: &hybridlet_sys::HostRoot, manifest: &Manifest, arch: &str) -> SsmPlan {
    if let Some(agent) = hybridlet_sys::ssm_agent::find_agent(root) {
        return SsmPlan::Found(agent);
    }
    let Some(format) = host_format(root) else {
        return SsmPlan::Missing(
            "the SSM agent is not installed and this host has neither dpkg nor rpm to install it with; install amazon-ssm-agent before `hybridlet init`".into(),
        );
    };
    match manifest.ssm_agent_package(arch, format.as_str()) {
        Some(a) => SsmPlan::Package(format, a.clone()),
        None => SsmPlan::Missing(format!(
            "the SSM agent is not installed and the manifest has no {} package of it for linux/{arch} (AWS ships the agent outside the EKS manifest). Install amazon-ssm-agent from AWS (Systems Manager user guide: manually installing SSM Agent on Linux) before `hybridlet init`, or add it to your mirror's ssm_releases",
            format.as_str()
        )),
    }
}

/// Download the agent package (verified) and install it; `false` when it was not
/// installed because the root is not this machine.
async fn install_ssm_agent(
    root: &hybridlet_sys::HostRoot,
    fetcher: &Fetcher,
    artifact: &hybridlet_artifacts::Artifact,
    format: PackageFormat,
    state_dir: &Path,
    tty: bool,
) -> Result<bool, Error> {
    if !root.is_system() {
        outln!(
            "ssm: not installing the {SSM_AGENT_PACKAGE} package under --root (packages go into this machine's package database)"
        );
        return Ok(false);
    }
    let downloads = state_dir.join("downloads");
    hybridlet_sys::ensure_dir(&downloads, 0o700).map_err(crate::fail)?;
    let file = downloads.join(format!("{SSM_AGENT_PACKAGE}.{}", format.as_str()));
    fetch_verified(fetcher, artifact, "(ssm)", &file, tty).await?;
    let installed = tokio::task::spawn_blocking(move || {
        let result =
            SystemPackages::new(format, std::time::Duration::from_secs(300)).install_file(&file);
        let _ = std::fs::remove_file(&file);
        result
    })
    .await
    .map_err(crate::fail)?;
    installed.map_err(|e| Error::Failed(format!("installing the SSM agent package: {e}")))?;
    let Some(agent) = hybridlet_sys::ssm_agent::find_agent(root) else {
        return Err(Error::Failed(format!(
            "the {SSM_AGENT_PACKAGE} package from {} installed, but there is no /usr/bin/amazon-ssm-agent: is it the agent's package?",
            artifact.uri
        )));
    };
    outln!(
        "{:>9}  {SSM_AGENT_PACKAGE} {} package (SHA-256 verified): {}, {}",
        "installed",
        format.as_str(),
        agent.program,
        agent.unit
    );
    Ok(true)
}

/// Remove the agent package if install added it (uninstall).
pub(crate) fn remove_ssm_agent_package(
    root: &hybridlet_sys::HostRoot,
    installed: &Installed,
) -> Result<(), Error> {
    let Some(name) = &installed.ssm_agent_package else {
        return Ok(());
    };
    if !root.is_system() {
        return Ok(());
    }
    let Some(format) = host_format(root) else {
        return Ok(());
    };
    SystemPackages::new(format, std::time::Duration::from_secs(300))
        .remove(name)
        .map_err(|e| Error::Failed(format!("removing the {name} package: {e}")))?;
    outln!("{:>9}  {name} package", "removed");
    Ok(())
}
