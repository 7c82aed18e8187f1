//! `hybridlet upgrade <k8s-version>`: move the node's kubelet and kubectl to another
//! Kubernetes version, the way an on-call operator would do it by hand, with the checks
//! they forget:
//!
//! - the version skew policy: the kubelet may not be newer than the control plane, nor
//!   more than three minor versions older; a downgrade is refused (`--force` overrides
//!   all checks, saying what it skipped);
//! - the node must be cordoned and drained (only DaemonSet, static and finished pods
//!   left), read from the API server with the kubelet's kubeconfig;
//! - every new binary is downloaded and verified next to its destination before any is
//!   swapped; each swap is one `rename(2)`; the replaced binaries are kept under
//!   `<stateDir>/rollback/<version>/` and recorded, so `upgrade --rollback` restores them;
//! - the kubelet is restarted and watched; if it does not stay up, the old binaries go
//!   back and it is restarted again.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hybridlet_artifacts::Fetcher;
use hybridlet_sys::systemd::{ServiceManager, Systemctl};

use crate::Error;
use crate::install::{Installed, InstalledFile, Previous};
use crate::{Context, UpgradeArgs};

const KUBELET: &str = "kubelet.service";
/// How long the restarted kubelet must stay up.
const SETTLE: Duration = Duration::from_secs(3);
/// The kubelet may be this many minor versions older than the API server.
const MAX_KUBELET_SKEW: u32 = 3;

fn runtime<E: std::error::Error + 'static>(e: E) -> Error {
    crate::fail(e)
}

/// `major.minor[.patch]`, from `1.32`, `v1.32.4` or `v1.32.4-eks-1234`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct KubeVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
}

impl KubeVersion {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let core = text.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.patch {
            Some(p) => write!(f, "{}.{}.{p}", self.major, self.minor),
            None => write!(f, "{}.{}", self.major, self.minor),
        }
    }
}

/// The version-skew verdict for moving the kubelet from `current` to `target` under a
/// control plane at `control_plane` (`None`: unknown). `Err` says why not and what to do.
pub(crate) fn skew_check(
    current: KubeVersion,
    target: KubeVersion,
    control_plane: KubeVersion,
) -> Result<(), String> {
    let (t, cp) = (
        (target.major, target.minor),
        (control_plane.major, control_plane.minor),
    );
    if t > cp {
        return Err(format!(
            "the kubelet may not be newer than the control plane: {target} > {control_plane}; upgrade the cluster first (aws eks update-cluster-version)"
        ));
    }
    if target.major != control_plane.major || target.minor + MAX_KUBELET_SKEW < control_plane.minor
    {
        return Err(format!(
            "a {target} kubelet is more than {MAX_KUBELET_SKEW} minor versions older than the control plane ({control_plane}); choose {}.{} or newer",
            control_plane.major,
            control_plane.minor.saturating_sub(MAX_KUBELET_SKEW)
        ));
    }
    let below = |a: KubeVersion, b: KubeVersion| {
        (a.major, a.minor, a.patch.unwrap_or(0)) < (b.major, b.minor, b.patch.unwrap_or(0))
    };
    if below(target, current) {
        return Err(format!(
            "{target} is older than the installed {current}: downgrading a kubelet in place is not supported by Kubernetes (its state may not be readable by the older version); use `hybridlet upgrade --rollback` right after an upgrade, or --force"
        ));
    }
    Ok(())
}

/// One binary to replace.
struct Swap {
    /// The host path, as recorded (`/usr/bin/kubelet`).
    path: String,
    /// That path under the root.
    dest: PathBuf,
    /// The verified new file, next to `dest` (same filesystem, so the swap is a rename).
    staged: PathBuf,
    sha256: String,
}

fn staged_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.hybridlet-upgrade"))
}

/// Copy `from` to `to` atomically, executable.
fn copy_atomic(from: &Path, to: &Path) -> Result<(), Error> {
    let bytes = std::fs::read(from)
        .map_err(|e| runtime(Error::Failed(format!("reading {}: {e}", from.display()))))?;
    hybridlet_sys::atomic_write(to, &bytes, 0o755).map_err(runtime)
}

/// Keep the binaries about to be replaced under `dir`, returning what was kept.
fn keep_old(
    root: &hybridlet_sys::HostRoot,
    installed: &Installed,
    swaps: &[Swap],
    dir: &Path,
) -> Result<Vec<InstalledFile>, Error> {
    hybridlet_sys::ensure_dir(dir, 0o700).map_err(runtime)?;
    let mut kept = Vec::new();
    for swap in swaps {
        let Some(old) = installed.files.iter().find(|f| f.path == swap.path) else {
            continue; // new in this release: nothing to keep, rollback removes it
        };
        let current = root
            .resolve(&old.path)
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
        if !current.exists() {
            continue;
        }
        copy_atomic(&current, &dir.join(file_key(&old.path)))?;
        kept.push(InstalledFile {
            path: old.path.clone(),
            sha256: hybridlet_artifacts::sha256_file(&current).map_err(runtime)?,
        });
    }
    Ok(kept)
}

/// `/usr/local/bin/kubectl` → `usr_local_bin_kubectl`: one flat name per host path.
fn file_key(path: &str) -> String {
    path.trim_start_matches('/').replace('/', "_")
}

/// Put the kept binaries of `previous` back (each through a staged copy and a rename).
fn restore(root: &hybridlet_sys::HostRoot, previous: &Previous, dir: &Path) -> Result<(), Error> {
    for f in &previous.files {
        let kept = dir.join(file_key(&f.path));
        let sum = hybridlet_artifacts::sha256_file(&kept).map_err(|e| {
            runtime(Error::Failed(format!(
                "the kept copy of {} ({}) cannot be read: {e}",
                f.path,
                kept.display()
            )))
        })?;
        if sum != f.sha256 {
            return Err(runtime(Error::Failed(format!(
                "the kept copy of {} ({}) has SHA-256 {sum}, not the recorded {}; refusing to restore it",
                f.path,
                kept.display(),
                f.sha256
            ))));
        }
        let dest = root
            .resolve(&f.path)
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
        let staged = staged_path(&dest);
        copy_atomic(&kept, &staged)?;
        std::fs::rename(&staged, &dest)
            .map_err(|e| runtime(Error::Failed(format!("replacing {}: {e}", dest.display()))))?;
    }
    Ok(())
}

/// Restart the kubelet (when it is a unit here) and watch it for `settle`.
fn restart_kubelet(sm: &dyn ServiceManager, settle: Duration) -> Result<bool, String> {
    let state = sm.state(KUBELET).map_err(|e| e.to_string())?;
    if !state.exists {
        return Ok(false);
    }
    sm.restart_and_settle(KUBELET, settle)
        .map(|()| true)
        .map_err(|e| e.to_string())
}

fn write_tracker(state_dir: &Path, installed: &Installed) -> Result<(), Error> {
    let json = serde_json::to_vec_pretty(installed).map_err(runtime)?;
    hybridlet_sys::atomic_write(&crate::install::tracker_path(state_dir), &json, 0o600)
        .map_err(runtime)
}

/// Swap the staged binaries in, record the new version, restart the kubelet; on a kubelet
/// that does not stay up, restore the kept binaries and the record and restart again.
fn commit(
    root: &hybridlet_sys::HostRoot,
    state_dir: &Path,
    installed: &Installed,
    next: &Installed,
    swaps: &[Swap],
    services: Option<&dyn ServiceManager>,
    settle: Duration,
) -> Result<(), Error> {
    for swap in swaps {
        std::fs::rename(&swap.staged, &swap.dest).map_err(|e| {
            runtime(Error::Failed(format!(
                "replacing {}: {e}",
                swap.dest.display()
            )))
        })?;
        outln!("{:>9}  {}", "replaced", swap.path);
    }
    write_tracker(state_dir, next)?;
    let Some(sm) = services else {
        outln!("kubelet: not restarted (--root is not /)");
        return Ok(());
    };
    match restart_kubelet(sm, settle) {
        Ok(true) => {
            outln!("kubelet: restarted on {} and stayed up", next.version);
            Ok(())
        }
        Ok(false) => {
            outln!("kubelet: no {KUBELET} here yet (run hybridlet init)");
            Ok(())
        }
        Err(why) => {
            let Some(previous) = &next.previous else {
                return Err(runtime(Error::Failed(why.to_string())));
            };
            let dir = PathBuf::from(&previous.dir);
            let undone = restore(root, previous, &dir)
                .and_then(|()| {
                    // Files new in this release (none kept) are removed again.
                    for swap in swaps {
                        if !previous.files.iter().any(|f| f.path == swap.path) {
                            let _ = std::fs::remove_file(&swap.dest);
                        }
                    }
                    write_tracker(state_dir, installed)
                })
                .map(|()| restart_kubelet(sm, settle));
            let outcome = match undone {
                Ok(Ok(_)) => format!(
                    "rolled back to {}, and the kubelet runs again",
                    previous.version
                ),
                Ok(Err(again)) => format!(
                    "rolled back to {}, but the kubelet does not stay up on it either: {again}",
                    previous.version
                ),
                Err(e) => format!(
                    "rolling back failed too ({e}); the previous binaries are in {}",
                    dir.display()
                ),
            };
            Err(runtime(Error::Failed(format!(
                "the kubelet did not stay up on {}: {why}; {outcome}",
                next.version
            ))))
        }
    }
}

/// What the API server says: the control plane's version and the node's drain state.
async fn cluster_facts(
    kubeconfig: &Path,
    node: &str,
) -> Result<(KubeVersion, hybridlet_kube::DrainState), String> {
    let client = hybridlet_kube::client_from_kubeconfig(kubeconfig)
        .await
        .map_err(|e| e.to_string())?;
    let version = hybridlet_kube::server_version(&client)
        .await
        .map_err(|e| e.to_string())?;
    let parsed = KubeVersion::parse(&version).ok_or_else(|| {
        format!("the API server reports version {version:?}, which does not parse")
    })?;
    let drain = hybridlet_kube::drain_state(&client, node)
        .await
        .map_err(|e| e.to_string())?;
    Ok((parsed, drain))
}

pub fn upgrade(ctx: &Context, args: &UpgradeArgs) -> Result<(), Error> {
    let loaded = &ctx.loaded;
    let root = ctx.root.clone();
    let resolve = |p: &str| {
        root.resolve(p)
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))
    };
    let state_dir = resolve(&loaded.config.agent.state_dir)?;
    let Some(installed) = crate::install::read_tracker(&state_dir)? else {
        return Err(runtime(Error::Failed(format!(
            "no Kubernetes components installed by hybridlet here ({} is missing); run `hybridlet install <version>` first",
            crate::install::tracker_path(&state_dir).display()
        ))));
    };
    let services: Option<Box<dyn ServiceManager>> = if root.is_system() {
        Some(Box::new(Systemctl::default()))
    } else {
        None
    };
    if args.rollback {
        return rollback(&root, &state_dir, &installed, services.as_deref());
    }
    let Some(wanted) = args.kubernetes_version.as_deref() else {
        return Err(Error::Usage(
            "upgrade needs a Kubernetes version (e.g. `hybridlet upgrade 1.33`) or --rollback"
                .into(),
        ));
    };
    let Some(target) = KubeVersion::parse(wanted) else {
        return Err(Error::Usage(format!(
            "{wanted:?} is not a Kubernetes version (expected 1.33 or 1.33.2)"
        )));
    };
    let current = KubeVersion::parse(&installed.version).ok_or_else(|| {
        runtime(Error::Failed(format!(
            "the install record names version {:?}, which does not parse",
            installed.version
        )))
    })?;
    let node = crate::node_name(&loaded.config, &root);
    let kubeconfig = resolve(&loaded.config.agent.kubelet_root_dir)?.join("kubeconfig");
    ctx.block_on(async {
        let fetcher = Fetcher::new().map_err(runtime)?;
        let manifest = crate::install::fetch_manifest(&fetcher, &args.manifest).await?;
        let release = manifest.release(wanted).map_err(runtime)?;
        let resolved = KubeVersion::parse(&release.version).unwrap_or(target);
        if release.version == installed.version {
            outln!("upgrade: Kubernetes {} is already installed; nothing to do", release.version);
            return Ok(());
        }
        outln!("upgrade: kubelet {} → {} on node {node}", installed.version, release.version);

        // The checks an operator must not skip by accident.
        let mut refusals = Vec::new();
        match cluster_facts(&kubeconfig, &node).await {
            Ok((control_plane, drain)) => {
                outln!("control plane: {control_plane}");
                if let Err(why) = skew_check(current, resolved, control_plane) {
                    refusals.push(why);
                }
                if !drain.cordoned {
                    refusals.push(format!(
                        "node {node} is not cordoned; run `kubectl drain {node} --ignore-daemonsets --delete-emptydir-data` first"
                    ));
                } else if !drain.evictable_pods.is_empty() {
                    let shown: Vec<&str> = drain.evictable_pods.iter().take(10).map(String::as_str).collect();
                    refusals.push(format!(
                        "node {node} is cordoned but not drained: {} pod(s) still run there ({}{}); run `kubectl drain {node} --ignore-daemonsets --delete-emptydir-data`",
                        drain.evictable_pods.len(),
                        shown.join(", "),
                        if drain.evictable_pods.len() > shown.len() { ", …" } else { "" }
                    ));
                } else {
                    outln!("node {node}: cordoned and drained");
                }
            }
            Err(e) => {
                if let Err(why) = skew_check(current, resolved, resolved) {
                    refusals.push(why);
                }
                refusals.push(format!(
                    "the control plane's version and the node's drain state cannot be read with {}: {e}",
                    kubeconfig.display()
                ));
            }
        }
        if !refusals.is_empty() {
            if !args.force {
                return Err(Error::Refused(format!(
                    "upgrade refused, nothing was changed:\n  - {}\n(--force skips these checks)",
                    refusals.join("\n  - ")
                )));
            }
            for why in &refusals {
                outln!("warning (--force): {why}");
            }
        }

        let arch = crate::install::arch();
        let mut planned = Vec::new();
        for (name, dest, required) in crate::install::PLACES {
            match release.artifact(name, arch) {
                Ok(a) => planned.push((a.clone(), *dest)),
                Err(e) if *required => return Err(runtime(e)),
                Err(_) => outln!("{name}: not in this release; left as it is"),
            }
        }
        if args.dry_run {
            for (a, dest) in &planned {
                outln!("would replace {dest} with {} {} (from {})", a.name, release.version, a.uri);
            }
            outln!("dry run: nothing was changed");
            return Ok(());
        }

        // Everything is downloaded and verified before anything is replaced.
        let tty = std::io::stderr().is_terminal();
        let mut swaps = Vec::new();
        for (artifact, path) in &planned {
            let dest = resolve(path)?;
            let staged = staged_path(&dest);
            let fetched =
                crate::install::fetch_verified(&fetcher, artifact, &release.version, &staged, tty).await;
            let (sha256, _) = match fetched {
                Ok(ok) => ok,
                Err(e) => {
                    for s in &swaps {
                        let s: &Swap = s;
                        let _ = std::fs::remove_file(&s.staged);
                    }
                    let _ = std::fs::remove_file(&staged);
                    return Err(e);
                }
            };
            outln!("{:>9}  {} (SHA-256 verified)", "fetched", artifact.name);
            swaps.push(Swap {
                path: (*path).to_string(),
                dest,
                staged,
                sha256,
            });
        }

        let keep_dir = state_dir.join("rollback").join(&installed.version);
        let kept = keep_old(&root, &installed, &swaps, &keep_dir)?;
        let mut next = installed.clone();
        next.version = release.version.clone();
        for swap in &swaps {
            match next.files.iter_mut().find(|f| f.path == swap.path) {
                Some(f) => f.sha256 = swap.sha256.clone(),
                None => next.files.push(InstalledFile {
                    path: swap.path.clone(),
                    sha256: swap.sha256.clone(),
                }),
            }
        }
        next.previous = Some(Previous {
            version: installed.version.clone(),
            dir: keep_dir.display().to_string(),
            files: kept,
        });
        let older = installed
            .previous
            .as_ref()
            .map(|p| PathBuf::from(&p.dir))
            .filter(|dir| *dir != keep_dir);
        if let Err(e) = commit(&root, &state_dir, &installed, &next, &swaps, services.as_deref(), SETTLE) {
            // Back on the installed version, whose own rollback copy (if any) still stands.
            if installed.previous.as_ref().is_none_or(|p| Path::new(&p.dir) != keep_dir) {
                let _ = hybridlet_sys::tree::remove_tree_on_one_fs(&keep_dir);
            }
            return Err(e);
        }
        // One generation is kept: the one before the previous upgrade goes, now that this
        // one stands.
        if let Some(older) = older {
            let _ = hybridlet_sys::tree::remove_tree_on_one_fs(&older);
        }
        outln!(
            "upgrade: Kubernetes {} installed; {} kept in {} (`hybridlet upgrade --rollback` restores it); next: kubectl uncordon {node}",
            release.version,
            installed.version,
            keep_dir.display()
        );
        Ok(())
    })
}

/// Restore the binaries the last upgrade replaced.
fn rollback(
    root: &hybridlet_sys::HostRoot,
    state_dir: &Path,
    installed: &Installed,
    services: Option<&dyn ServiceManager>,
) -> Result<(), Error> {
    let Some(previous) = &installed.previous else {
        return Err(Error::Refused(format!(
            "nothing to roll back to: Kubernetes {} was not put here by `hybridlet upgrade` (or was already rolled back)",
            installed.version
        )));
    };
    let dir = PathBuf::from(&previous.dir);
    restore(root, previous, &dir)?;
    let mut back = Installed {
        version: previous.version.clone(),
        files: installed.files.clone(),
        previous: None,
        ssm_agent_package: installed.ssm_agent_package.clone(),
        region: installed.region.clone(),
    };
    for f in &mut back.files {
        if let Some(old) = previous.files.iter().find(|p| p.path == f.path) {
            f.sha256 = old.sha256.clone();
        }
    }
    // Binaries new in the upgraded release go.
    back.files.retain(|f| {
        let placed_by_upgrade = crate::install::PLACES.iter().any(|(_, p, _)| *p == f.path)
            && !previous.files.iter().any(|p| p.path == f.path);
        if placed_by_upgrade && let Ok(path) = root.resolve(&f.path) {
            let _ = std::fs::remove_file(path);
        }
        !placed_by_upgrade
    });
    for f in &previous.files {
        outln!("{:>9}  {} ({})", "restored", f.path, previous.version);
    }
    write_tracker(state_dir, &back)?;
    let _ = hybridlet_sys::tree::remove_tree_on_one_fs(&dir);
    if let Some(sm) = services {
        match restart_kubelet(sm, SETTLE) {
            Ok(true) => outln!("kubelet: restarted on {} and stayed up", previous.version),
            Ok(false) => {}
            Err(why) => {
                return Err(runtime(Error::Failed(format!(
                    "rolled back to {}, but {why}",
                    previous.version
                ))));
            }
        }
    }
    outln!("rollback: Kubernetes {} is back", previous.version);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hybridlet_sys::systemd::FakeServiceManager;

    fn v(s: &str) -> KubeVersion {
        KubeVersion::parse(s).unwrap()
    }

    #[test]
    fn versions_parse_from_every_form_the_cluster_and_the_operator_use() {
        assert_eq!(
            v("1.32"),
            KubeVersion {
                major: 1,
                minor: 32,
                patch: None
            }
        );
        assert_eq!(
            v("v1.32.4-eks-1234"),
            KubeVersion {
                major: 1,
                minor: 32,
                patch: Some(4)
            }
        );
        assert_eq!(v("1.33.0+k3s1").patch, Some(0));
        for bad in ["", "1", "one.two", "1.32.x", "1.2.3.4"] {
            assert!(KubeVersion::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn skew_policy() {
        assert!(skew_check(v("1.31.3"), v("1.32.1"), v("1.32.5")).is_ok());
        assert!(skew_check(v("1.31.3"), v("1.31.4"), v("1.34.0")).is_ok());
        let newer = skew_check(v("1.31.3"), v("1.33.0"), v("1.32.5")).unwrap_err();
        assert!(newer.contains("newer than the control plane"), "{newer}");
        let old = skew_check(v("1.28.0"), v("1.29.0"), v("1.33.1")).unwrap_err();
        assert!(
            old.contains("more than 3 minor versions older") && old.contains("1.30"),
            "{old}"
        );
        let down = skew_check(v("1.32.4"), v("1.32.1"), v("1.32.5")).unwrap_err();
        assert!(down.contains("older than the installed"), "{down}");
    }

    /// A kubelet that dies after the swap: the old binary comes back, the record too, and
    /// the kubelet is restarted on it.
    #[test]
    fn a_kubelet_that_does_not_stay_up_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = hybridlet_sys::HostRoot::new(dir.path());
        let state = dir.path().join("var/lib/hybridlet");
        let bin = dir.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(bin.join("kubelet"), b"old kubelet").unwrap();
        let old_sum = hybridlet_artifacts::sha256_file(&bin.join("kubelet")).unwrap();
        let installed = Installed {
            version: "1.31.3".into(),
            files: vec![InstalledFile {
                path: "/usr/bin/kubelet".into(),
                sha256: old_sum.clone(),
            }],
            previous: None,
            ssm_agent_package: None,
            region: None,
        };
        write_tracker(&state, &installed).unwrap();
        let staged = staged_path(&bin.join("kubelet"));
        std::fs::write(&staged, b"new kubelet").unwrap();
        let swaps = vec![Swap {
            path: "/usr/bin/kubelet".into(),
            dest: bin.join("kubelet"),
            staged,
            sha256: hybridlet_artifacts::sha256_file(
                &dir.path().join("usr/bin/.kubelet.hybridlet-upgrade"),
            )
            .unwrap(),
        }];
        let keep = state.join("rollback/1.31.3");
        let kept = keep_old(&root, &installed, &swaps, &keep).unwrap();
        let mut next = installed.clone();
        next.version = "1.32.1".into();
        next.files[0].sha256 = swaps[0].sha256.clone();
        next.previous = Some(Previous {
            version: "1.31.3".into(),
            dir: keep.display().to_string(),
            files: kept,
        });

        let sm = FakeServiceManager::with_units(&[KUBELET]);
        sm.exit_after_start(KUBELET);
        let err = commit(
            &root,
            &state,
            &installed,
            &next,
            &swaps,
            Some(&sm),
            Duration::from_millis(300),
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(
            text.contains("did not stay up on 1.32.1") && text.contains("rolled back to 1.31.3"),
            "{text}"
        );
        assert_eq!(std::fs::read(bin.join("kubelet")).unwrap(), b"old kubelet");
        let record = crate::install::read_tracker(&state).unwrap().unwrap();
        assert_eq!(record, installed);
        assert!(
            sm.calls()
                .iter()
                .filter(|c| c.starts_with("restart"))
                .count()
                >= 2,
            "{:?}",
            sm.calls()
        );
    }
}
