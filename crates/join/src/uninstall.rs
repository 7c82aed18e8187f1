//! `hybridlet uninstall`: undo the join. Refuses before changing anything while any mount
//! point (a pod volume, a CSI staging mount, a host bind mount) is inside the kubelet's
//! directory; then stops and disables the kubelet, puts back every file `init` replaced
//! and deletes every file it created (from init's backups, newest first, so the host ends
//! as it was before the first join), and removes the kubelet's directory without ever
//! crossing a mount point (hybridlet-sys `tree`). What `install` placed goes too: the
//! kubelet unit (restored if it replaced one), and the binaries it recorded, each only if
//! it still has the bytes install put there. containerd is left installed and running:
//! hybridlet never installs it. SSM nodes are deregistered from Systems Manager first
//! (unless `--no-deregister`), then the agent is stopped and its registration, key store
//! and credentials removed.

use std::path::{Path, PathBuf};

use hybridlet_sys::fileset;
use hybridlet_sys::systemd::{ServiceManager, Systemctl};
use hybridlet_sys::tree::{mount_points_under, remove_tree_on_one_fs};

use crate::Error;
use crate::{Context, UninstallArgs};

const KUBELET: &str = "kubelet.service";

/// Backup directories (`<secs>-<n>`) under `dir`, newest first.
fn backups_newest_first(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<((u64, u64), PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (secs, n) = name.split_once('-')?;
            Some(((secs.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().rev().map(|(_, p)| p).collect()
}

pub fn uninstall(ctx: &Context, args: &UninstallArgs) -> Result<(), Error> {
    let loaded = &ctx.loaded;
    let agent = &loaded.config.agent;
    let root = ctx.root.clone();
    let resolve = |p: &str| root.resolve(p).map_err(|e| Error::Failed(format!("{e}")));
    let kubelet_dir = resolve(&agent.kubelet_root_dir)?;
    let state_dir = resolve(&agent.state_dir)?;
    let backups = state_dir.join("init-backups");

    let mounts = mount_points_under(&kubelet_dir).map_err(crate::fail)?;
    if !mounts.is_empty() {
        let shown: Vec<String> = mounts
            .iter()
            .take(5)
            .map(|m| m.display().to_string())
            .collect();
        return Err(Error::Failed(format!(
            "{} mount point(s) are still inside {} ({}{}): pods or volumes are still on this node. Drain it (kubectl drain), make sure the volumes are unmounted, and run uninstall again. Nothing was changed",
            mounts.len(),
            kubelet_dir.display(),
            shown.join(", "),
            if mounts.len() > 5 { ", ..." } else { "" }
        )));
    }

    if args.delete_node {
        // First, while the kubelet's credentials are still here; a failure changes nothing.
        // A running kubelet does not register again (it registers once, at start), and it
        // is stopped next.
        let node = crate::node_name(&loaded.config, &root);
        delete_node(ctx, &kubelet_dir.join("kubeconfig"), &node)?;
    }
    let ssm_region = loaded
        .config
        .node
        .as_ref()
        .filter(|n| n.spec.hybrid.as_ref().is_some_and(|h| h.ssm.is_some()))
        .map(|n| n.spec.cluster.region.clone());
    if let Some(region) = &ssm_region
        && !args.no_deregister
    {
        // Also before any change: the agent's credentials are needed, and a managed
        // instance left behind keeps counting against the activation and the account.
        crate::ssm::deregister(
            ctx,
            &crate::ssm::Deregister {
                root: &root,
                region,
                endpoint: hybridlet_aws::endpoint_from_env("SSM"),
                timeout: std::time::Duration::from_secs(20),
                attempts: 5,
                pause: std::time::Duration::from_secs(2),
            },
            &mut |line| outln!("{line}"),
        )?;
    }
    let systemctl = Systemctl::default();
    let services: Option<&dyn ServiceManager> = root.is_system().then_some(&systemctl as _);
    undo(services, &backups, &kubelet_dir)?;
    if ssm_region.is_some() {
        crate::ssm::forget_registration(&root, services, &mut |line| outln!("{line}"))?;
    }
    remove_installed(&root, &state_dir)?;
    if let Some(sm) = services {
        // install's unit is gone too: systemd must forget it.
        sm.daemon_reload()
            .map_err(|e| Error::Failed(format!("{e}")))?;
    }
    outln!("uninstall: done; containerd was left as it is");
    Ok(())
}

fn delete_node(ctx: &Context, kubeconfig: &Path, node: &str) -> Result<(), Error> {
    let deleted = ctx.block_on(async {
        let client = hybridlet_kube::client_from_kubeconfig(kubeconfig).await?;
        hybridlet_kube::delete_node(&client, node).await
    });
    match deleted {
        Ok(true) => outln!("Node {node}: deleted from the cluster"),
        Ok(false) => outln!("Node {node}: already gone from the cluster"),
        Err(e) => {
            return Err(Error::Failed(format!(
                "deleting Node {node} failed: {e}. Nothing was changed; run uninstall without --delete-node and delete it with kubectl (kubectl delete node {node})"
            )));
        }
    }
    Ok(())
}

/// Undo `install`: its unit (restored from the backup if it replaced one, else deleted)
/// and the binaries it recorded, each only while it still has the bytes install placed.
fn remove_installed(root: &hybridlet_sys::HostRoot, state_dir: &Path) -> Result<(), Error> {
    let runtime = |e: Error| e;
    let unit_backups = state_dir.join("install-backups");
    for dir in backups_newest_first(&unit_backups) {
        fileset::rollback(&dir).map_err(crate::fail)?;
    }
    remove_tree_on_one_fs(&unit_backups).map_err(crate::fail)?;
    let Some(installed) = crate::install::read_tracker(state_dir)? else {
        return Ok(());
    };
    crate::install::remove_ssm_agent_package(root, &installed)?;
    let unit = hybridlet_bootstrap::kubelet_unit().path;
    for f in installed.files.iter().filter(|f| f.path != unit) {
        let path = root
            .resolve(&f.path)
            .map_err(|e| runtime(Error::Failed(format!("{e}"))))?;
        match hybridlet_artifacts::sha256_file(&path) {
            Ok(sum) if sum == f.sha256 => {
                std::fs::remove_file(&path).map_err(|e| {
                    runtime(Error::Failed(format!("removing {}: {e}", path.display())))
                })?;
                outln!("{:>9}  {}", "removed", f.path);
            }
            Ok(_) => outln!(
                "{:>9}  {} (changed since install; left in place)",
                "kept",
                f.path
            ),
            Err(_) => {}
        }
    }
    // The binaries an upgrade kept for rollback go with the install.
    remove_tree_on_one_fs(&state_dir.join("rollback")).map_err(crate::fail)?;
    std::fs::remove_file(crate::install::tracker_path(state_dir))
        .map_err(|e| runtime(Error::Failed(format!("removing the install record: {e}"))))?;
    outln!("Kubernetes {} components removed", installed.version);
    Ok(())
}

/// Everything after the mount check; `services` is `None` under `--root`.
pub(crate) fn undo(
    services: Option<&dyn ServiceManager>,
    backups: &Path,
    kubelet_dir: &Path,
) -> Result<(), Error> {
    let runtime = |e: Error| e;
    if let Some(sm) = services {
        let state = sm.state(KUBELET).map_err(crate::fail)?;
        if state.exists {
            sm.stop(KUBELET).map_err(crate::fail)?;
            sm.disable(KUBELET).map_err(crate::fail)?;
            outln!("systemd: {KUBELET} stopped and disabled");
        }
    }
    let dirs = backups_newest_first(backups);
    let mut restored = 0;
    for dir in &dirs {
        restored += fileset::rollback(dir).map_err(|e| {
            runtime(Error::Failed(format!(
                "{e}; the backups not yet applied are still in {}",
                backups.display()
            )))
        })?;
    }
    outln!(
        "files: {restored} change(s) from {} init run(s) undone (replaced files restored, created files deleted)",
        dirs.len()
    );
    remove_tree_on_one_fs(backups).map_err(crate::fail)?;
    if let Some(sm) = services {
        sm.daemon_reload().map_err(crate::fail)?;
    }
    let removed = remove_tree_on_one_fs(kubelet_dir).map_err(crate::fail)?;
    outln!("{}: removed ({removed} entries)", kubelet_dir.display());
    Ok(())
}
