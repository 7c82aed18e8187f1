use std::path::Path;

use hybridlet_config::{Config, CredentialProvider, Mode};
use hybridlet_sys::HostRoot;

use crate::Error;
use crate::Outcome;
use crate::{CheckArgs, Context};

/// `hybridlet check`: validate the configuration (exit 78 on errors), then the host
/// (exit 1 when a host check fails).
pub fn check(ctx: &Context, args: &CheckArgs) -> Result<(), Error> {
    let loaded = &ctx.loaded;
    let config = &loaded.config;
    let json = args.json;
    let files: Vec<String> = loaded
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if !json {
        if files.is_empty() {
            outln!("configuration: ok (no configuration files; embedded standalone defaults)");
        } else {
            outln!("configuration: ok ({})", files.join(", "));
        }
        outln!("mode: {}", describe_mode(config));
        for warning in &loaded.warnings {
            outln!("warning: {warning}");
        }
    }
    if args.config_only {
        if json {
            outln!(
                "{}",
                serde_json::json!({"ok": true, "configuration": files, "mode": describe_mode(config), "warnings": loaded.warnings})
            );
        }
        return Ok(());
    }

    let root = ctx.root.clone();
    let mut results = host_checks(config, &root);
    if config.mode() == Mode::Joined {
        results.extend(crate::preflight::kernel(&root));
        results.extend(crate::preflight::kernel_defaults(&root));
        results.extend(crate::preflight::binaries(config, &root));
        let installed = crate::images::installed(&root);
        results.extend(crate::images::cdi_check(config, installed.as_ref()));
        results.extend(crate::images::image_checks(ctx, config));
        if root.is_system() {
            results.extend(crate::preflight::services(
                &hybridlet_sys::systemd::Systemctl::default(),
            ));
        }
        results.extend(crate::preflight::remote_network_checks(
            ctx,
            config,
            &root,
            args.offline,
        ));
        if !args.offline {
            results.extend(crate::preflight::api_server_checks(ctx, config, &root));
            results.extend(crate::preflight::aws_endpoint_checks(ctx, config, &root));
            results.extend(crate::preflight::credentials_check(ctx, config));
        }
    }
    let failed = results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Fail(_)))
        .count();
    if json {
        let checks: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, o)| {
                let (status, detail) = match o {
                    Outcome::Ok(d) => ("ok", d),
                    Outcome::Warn(d) => ("warning", d),
                    Outcome::Fail(d) => ("fail", d),
                };
                serde_json::json!({"check": name, "status": status, "detail": detail})
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "ok": failed == 0,
                "failed": failed,
                "configuration": files,
                "mode": describe_mode(config),
                "warnings": loaded.warnings,
                "checks": checks,
            })
        );
    } else {
        for (name, outcome) in &results {
            match outcome {
                Outcome::Ok(detail) => outln!("ok: {name}: {detail}"),
                Outcome::Warn(detail) => outln!("warning: {name}: {detail}"),
                Outcome::Fail(detail) => outln!("FAIL: {name}: {detail}"),
            }
        }
    }
    if failed > 0 {
        return Err(Error::Failed(format!(
            "{failed} host check{} failed (see FAIL lines above)",
            if failed == 1 { "" } else { "s" }
        )));
    }
    if !json {
        outln!("host: ok");
    }
    Ok(())
}

fn describe_mode(config: &Config) -> String {
    match (&config.node, config.mode()) {
        (Some(node), Mode::Joined) => {
            let provider = node
                .spec
                .hybrid
                .as_ref()
                .and_then(|h| h.credential_provider())
                .map(CredentialProvider::as_str)
                .unwrap_or("none");
            format!(
                "joined (cluster {} in {}, credentials {provider})",
                node.spec.cluster.name, node.spec.cluster.region
            )
        }
        _ => "standalone (metrics and health only, no cluster contact)".to_string(),
    }
}

fn host_checks(config: &Config, root: &HostRoot) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    let resolve = |p: &str| root.resolve(p).map_err(|e| e.to_string());

    out.push((
        "state directory",
        match resolve(&config.agent.state_dir) {
            Err(e) => Outcome::Fail(e),
            Ok(path) => dir_state(&path, "created at start-up"),
        },
    ));

    if config.mode() == Mode::Joined {
        out.push((
            "kubelet root directory",
            match resolve(&config.agent.kubelet_root_dir) {
                Err(e) => Outcome::Fail(e),
                Ok(path) if path.is_dir() => Outcome::Ok(path.display().to_string()),
                Ok(path) => Outcome::Warn(format!(
                    "{} does not exist yet (the kubelet has not run on this host)",
                    path.display()
                )),
            },
        ));
    }

    if config.agent.csi.nfs.enabled {
        use hybridlet_sys::mount::Mounter as _;
        let helper = hybridlet_sys::mount::SystemMounter::new().can_mount("nfs");
        out.push((
            "NFS mount helper",
            if helper {
                Outcome::Ok("mount.nfs found".to_string())
            } else {
                Outcome::Fail(
                    "spec.csi.nfs.enabled is true but mount.nfs is not installed; install nfs-common (Debian, Ubuntu) or nfs-utils (RHEL)"
                        .to_string(),
                )
            },
        ));
    }

    out.extend(vfio_checks(config, root));

    if let Some(tls) = &config.agent.admin.tls {
        let loaded = root
            .resolve(&tls.cert_file)
            .and_then(|c| root.resolve(&tls.key_file).map(|k| (c, k)))
            .map_err(|e| e.to_string())
            .and_then(|(c, k)| hybridlet_metrics::tls_config(&c, &k).map_err(|e| e.to_string()));
        out.push((
            "admin TLS certificate",
            match loaded {
                Ok(_) => Outcome::Ok(format!(
                    "{} and {} form a usable pair",
                    tls.cert_file, tls.key_file
                )),
                Err(e) => Outcome::Fail(e),
            },
        ));
    }

    if config.agent.csi.iscsi.enabled {
        use hybridlet_sys::iscsi::Initiator as _;
        let found = hybridlet_sys::iscsi::Iscsiadm::default().available();
        out.push((
            "iSCSI initiator",
            if found {
                Outcome::Ok("iscsiadm found".to_string())
            } else {
                Outcome::Fail(
                    "spec.csi.iscsi.enabled is true but iscsiadm is not installed; install open-iscsi (Debian, Ubuntu) or iscsi-initiator-utils (RHEL)"
                        .to_string(),
                )
            },
        ));
    }

    let sysfs = hybridlet_sys::Sysfs::new(root);
    for (i, pf) in config.agent.sriov.physical_functions.iter().enumerate() {
        let outcome = match hybridlet_sriov::PfSelector::from_config(pf) {
            None => Outcome::Fail(format!("spec.sriov.physicalFunctions[{i}] names no PF")),
            Some(selector) => {
                let address = match &selector {
                    hybridlet_sriov::PfSelector::Address(a) => Ok(a.clone()),
                    hybridlet_sriov::PfSelector::Interface(name) => sysfs
                        .pci_address_of_interface(name)
                        .map_err(|e| e.to_string()),
                };
                match address.and_then(|a| sysfs.pci_device(&a).map_err(|e| e.to_string())) {
                    Err(e) => Outcome::Fail(format!("{selector}: {e}")),
                    Ok(d) => match d.sriov {
                        None => Outcome::Fail(format!(
                            "{selector} ({}) does not support SR-IOV",
                            d.address
                        )),
                        Some(caps) if pf.num_vfs > caps.total_vfs => Outcome::Fail(format!(
                            "{selector} ({}) supports at most {} VFs, spec.sriov.physicalFunctions[{i}].numVfs is {}",
                            d.address, caps.total_vfs, pf.num_vfs
                        )),
                        Some(caps) => Outcome::Ok(format!(
                            "{selector} ({}): {} VFs now, {} configured, at most {}",
                            d.address, caps.num_vfs, pf.num_vfs, caps.total_vfs
                        )),
                    },
                }
            }
        };
        out.push(("SR-IOV PF", outcome));
    }

    out.extend(crate::preflight::iam_ra_certificate(config, root));
    out
}

fn dir_state(path: &Path, missing: &str) -> Outcome {
    if path.is_dir() {
        Outcome::Ok(path.display().to_string())
    } else if path.exists() {
        Outcome::Fail(format!("{} exists but is not a directory", path.display()))
    } else {
        Outcome::Ok(format!("{} (missing; {missing})", path.display()))
    }
}

/// With a driver that hands devices over through vfio (SR-IOV, PCI): the IOMMU is on and
/// vfio-pci is loaded; with the PCI driver, what its allow rules match on this host now
/// (and what they match but the driver leaves alone).
fn vfio_checks(config: &Config, root: &HostRoot) -> Vec<(&'static str, Outcome)> {
    let dra = &config.agent.dra;
    if !dra.sriov.enabled && !dra.pci.enabled {
        return Vec::new();
    }
    let mut out = Vec::new();
    let exists = |p: &str| root.resolve(p).is_ok_and(|p| p.exists());
    let groups = root
        .resolve("/sys/kernel/iommu_groups")
        .ok()
        .and_then(|p| std::fs::read_dir(p).ok())
        .map_or(0, |d| d.count());
    out.push((
        "IOMMU",
        if groups > 0 {
            Outcome::Ok(format!("on ({groups} IOMMU groups)"))
        } else {
            Outcome::Warn(
                "off: no IOMMU groups, so devices cannot be handed to containers through vfio (SR-IOV netdev mode and PCI mode \"driver\" still work); boot with intel_iommu=on (Intel) or amd_iommu=on and enable VT-d/AMD-Vi in the firmware".into(),
            )
        },
    ));
    out.push((
        "vfio-pci",
        if exists("/sys/bus/pci/drivers/vfio-pci") || exists("/sys/module/vfio_pci") {
            Outcome::Ok("vfio-pci loaded".into())
        } else {
            Outcome::Warn(
                "vfio-pci is not loaded, so a claim in vfio mode fails: run `modprobe vfio-pci` and add it to /etc/modules-load.d/hybridlet.conf".into(),
            )
        },
    ));
    if dra.pci.enabled {
        let sysfs = hybridlet_sys::Sysfs::new(root);
        let rules = hybridlet_pci::rules(&dra.pci);
        out.push((
            "PCI allowlist",
            match sysfs.pci_devices() {
                Err(e) => Outcome::Warn(format!("the PCI bus cannot be read: {e}")),
                Ok((devices, _)) => {
                    let inventory = hybridlet_pci::discover(&sysfs, &devices, &rules);
                    let found: Vec<String> = inventory
                        .functions
                        .iter()
                        .map(|f| {
                            format!(
                                "{} ({:04x}:{:04x}, {})",
                                f.device.address,
                                f.device.vendor_id,
                                f.device.device_id,
                                f.device.driver.as_deref().unwrap_or("no driver")
                            )
                        })
                        .collect();
                    let mut text = if found.is_empty() {
                        "spec.dra.pci.allow matches no PCI function on this host: the driver publishes nothing (compare the rules with `lspci -nn`)".to_string()
                    } else {
                        format!("{} function(s): {}", found.len(), found.join(", "))
                    };
                    for w in &inventory.warnings {
                        text.push_str("; ");
                        text.push_str(w);
                    }
                    if found.is_empty() || !inventory.warnings.is_empty() {
                        Outcome::Warn(text)
                    } else {
                        Outcome::Ok(text)
                    }
                }
            },
        ));
    }
    out
}
