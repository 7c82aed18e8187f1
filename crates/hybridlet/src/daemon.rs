//! The wiring of `hybridlet run`: which subsystems run for a configuration, how each is
//! built and started, and how a reload changes them. Every metric family is registered
//! once, before anything starts, so a subsystem enabled by a reload reports into the same
//! registry; each subsystem can be started and stopped on its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hybridlet_config::Config;
use hybridlet_metrics::{AdminListener, AdminServer, AdminTls, AgentMetrics, Registry};
use hybridlet_runtime::{Readiness, Stopped, Supervisor};
use hybridlet_sys::HostRoot;

use crate::exit::Failure;
use crate::reload::{Change, Plan};
use crate::settings::{CSI, DRA_GPU, DRA_PCI, DRA_SRIOV};
use hybridlet_devices::{DeviceMetrics, DriverKind, Holders};

/// The admin server's subsystem.
const ADMIN: &str = "admin";

/// Metric families of subsystems that may start later (at a reload); registered up front.
pub struct Families {
    /// Every plugin's registration verdicts.
    pub registrations: hybridlet_kubelet_plugin::PluginMetrics,
    /// CSI calls and volumes.
    pub csi: hybridlet_csi::CsiMetrics,
    /// DRA calls, claims and slices.
    pub dra: hybridlet_dra::DraMetrics,
    /// The PCI driver's functions: presence, AER errors, link.
    pub pci: hybridlet_pci::PciMetrics,
    /// Device inventory and telemetry.
    pub devices: DeviceMetrics,
    /// Who holds each prepared device (for the telemetry's labels).
    pub holders: Holders,
    /// Each DRA driver's device counts, for the node's capacity labels.
    pub capacity: hybridlet_dra::CapacityBoard,
    /// Pre-pulled images.
    pub images: hybridlet_images::prepull::ImageMetrics,
}

impl Families {
    /// Register them all in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let holders = Holders::default();
        // The DRA drivers are what talks to the API server; observe their clients.
        hybridlet_kube::register_metrics(registry);
        Self {
            registrations: hybridlet_kubelet_plugin::PluginMetrics::register(registry),
            csi: hybridlet_csi::CsiMetrics::register(registry),
            dra: hybridlet_dra::DraMetrics::register(registry),
            pci: hybridlet_pci::PciMetrics::register(registry),
            devices: DeviceMetrics::register(registry, holders.clone()),
            holders,
            capacity: hybridlet_dra::CapacityBoard::default(),
            images: hybridlet_images::prepull::ImageMetrics::register(registry),
        }
    }
}

/// What the daemon's subsystems share, and the handles a reload needs.
pub struct Daemon {
    pub root: HostRoot,
    pub node: String,
    pub kubelet_root: PathBuf,
    pub state_dir: PathBuf,
    pub sysfs: hybridlet_sys::Sysfs,
    /// One GPU source (one NVML session) for the metrics sampler and the GPU DRA driver.
    pub gpus: Option<Arc<dyn hybridlet_gpu::GpuSource>>,
    /// Why NVML did not start, when it failed (the GPU driver cannot run without it).
    pub nvml_error: Option<String>,
    pub families: Families,
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    pub metrics: AgentMetrics,
    pub admin_tls: AdminTls,
    /// `--log-level`/`HYBRIDLET_LOG` was given: it wins over spec.logLevel.
    pub log_level_pinned: bool,
    /// Shared by every CSI instance (a restart must not forget a volume still busy).
    pub volume_guard: hybridlet_csi::VolumeGuard,
    /// The running plugin subsystems: the plugin's name (the driver), and for a DRA
    /// driver the flag that withdraws its slices when it stops.
    pub plugins: BTreeMap<&'static str, (String, Option<Arc<AtomicBool>>)>,
    pub dra_timing: hybridlet_dra::WatchTiming,
    pub slice_watch: hybridlet_dra::NodeSliceWatch,
}

/// What a reload needs ready before it changes anything: everything that can be refused.
struct Prepared {
    tls: Option<Arc<rustls::ServerConfig>>,
    listener: Option<std::net::TcpListener>,
    /// hosts.toml files to write and those to remove.
    mirrors: Option<(Vec<hybridlet_sys::fileset::DesiredFile>, Vec<PathBuf>)>,
}

/// Resolve a host path under the root, naming the field.
fn resolve(root: &HostRoot, path: &str) -> Result<PathBuf, Failure> {
    root.resolve(path)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("{e}")))
}

impl Daemon {
    /// The admin server's TLS setting for `config`: its certificate and key read now.
    pub fn tls_for(&self, config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, Failure> {
        let Some(tls) = &config.agent.admin.tls else {
            return Ok(None);
        };
        let tls_config = hybridlet_metrics::tls_config(
            &resolve(&self.root, &tls.cert_file)?,
            &resolve(&self.root, &tls.key_file)?,
        )
        .map_err(|e| match e {
            hybridlet_metrics::AdminServerError::Tls { message } => Failure::Unsupported {
                field: "spec.admin.tls",
                message,
            },
            other => Failure::Runtime(other.into()),
        })?;
        Ok(Some(tls_config))
    }

    /// Start the subsystems `config` enables, in order: plugins, the device sampler (after
    /// the DRA drivers: their health policies must see the first sample), the admin server.
    pub fn start_all(
        &mut self,
        supervisor: &mut Supervisor,
        config: &Config,
        sample_interval: Duration,
        startup_delay: Option<Duration>,
    ) -> Result<(), Failure> {
        if crate::settings::csi_enabled(config) {
            self.start_csi(supervisor, config);
        }
        for which in [DRA_SRIOV, DRA_GPU, DRA_PCI] {
            if crate::settings::dra_driver(config, which).0 {
                self.start_dra(supervisor, config, which)?;
            }
        }
        if config.agent.node_labels.enabled {
            let labeler = hybridlet_dra::NodeLabeler {
                kubeconfig: self.kubelet_root.join("kubeconfig"),
                node: self.node.clone(),
                site: config.agent.node_labels.site.clone(),
                board: self.families.capacity.clone(),
                min_interval: config.agent.node_labels.min_interval.get(),
                expected: crate::settings::DRA_KINDS
                    .iter()
                    .filter(|(which, _)| crate::settings::dra_driver(config, which).0)
                    .map(|(_, kind)| kind.to_string())
                    .collect(),
            };
            supervisor.spawn("node-labels", move |ctx| labeler.subsystem(ctx));
        }
        if !config.agent.images.pre_pull.is_empty() {
            let socket = resolve(&self.root, &config.agent.images.containerd_socket)?;
            let (images, metrics) = (config.agent.clone(), self.families.images.clone());
            supervisor.spawn("images", move |ctx| {
                hybridlet_images::prepull::subsystem(socket, images, metrics, ctx)
            });
        }
        {
            let device_metrics = self.families.devices.clone();
            let (sysfs, gpus) = (self.sysfs.clone(), self.gpus.clone());
            let uevents = hybridlet_devices::kernel_uevents();
            supervisor.spawn("devices", move |ctx| {
                device_metrics.run(sysfs, gpus, sample_interval, uevents, ctx)
            });
        }
        self.admin_tls.set(self.tls_for(config)?);
        self.start_admin(
            supervisor,
            AdminListener::Address(config.agent.admin.listen_address),
            startup_delay,
        );
        Ok(())
    }

    fn start_csi(&mut self, supervisor: &mut Supervisor, config: &Config) {
        let settings = crate::settings::csi(config, &self.node, &self.state_dir);
        let driver = settings.driver_name.clone();
        let plugin = hybridlet_csi::CsiPlugin::new(
            settings,
            &self.kubelet_root,
            self.families.registrations.clone(),
            self.families.csi.clone(),
            self.volume_guard.clone(),
            config.agent.plugin_registration_timeout.get(),
        );
        self.plugins.insert(CSI, (driver, None));
        supervisor.spawn(CSI, move |ctx| plugin.run(ctx));
    }

    /// Start one DRA driver over the devices on the host now.
    fn start_dra(
        &mut self,
        supervisor: &mut Supervisor,
        config: &Config,
        which: &'static str,
    ) -> Result<(), Failure> {
        let found = hybridlet_devices::discover(&self.sysfs, self.gpus.as_deref())?;
        let boot_id = hybridlet_sys::read_boot_id(&self.root.dir().join("proc"))
            .or_else(|_| hybridlet_sys::read_boot_id(std::path::Path::new("/proc")))
            .context("reading the kernel boot ID")?;
        let paths = hybridlet_dra::PluginPaths {
            kubeconfig: self.kubelet_root.join("kubeconfig"),
            kubelet_root: self.kubelet_root.clone(),
            state_dir: self.state_dir.clone(),
            cdi_dir: resolve(&self.root, "/var/run/cdi")?,
            boot_id,
        };
        let (dev_dir, sys_dir) = (resolve(&self.root, "/dev")?, resolve(&self.root, "/sys")?);
        let agent = &config.agent;
        let f = &self.families;
        let (_, driver) = crate::settings::dra_driver(config, which);
        let kind = match which {
            DRA_SRIOV => DriverKind::Sriov,
            DRA_PCI => DriverKind::Pci(hybridlet_pci::rules(&config.agent.dra.pci), f.pci.clone()),
            _ => DriverKind::Gpu(hybridlet_gpu::dra::GpuOptions {
                dynamic_mig: agent.dra.gpu.dynamic_mig,
                proc_dir: resolve(&self.root, "/proc")?,
                source: self.gpus.clone(),
            }),
        };
        let devices = hybridlet_devices::driver_devices(
            kind,
            &driver,
            &self.node,
            found,
            &self.sysfs,
            sys_dir,
            dev_dir,
        );
        let keys = devices.parts.keys.clone();
        let plugin = hybridlet_dra::DraPlugin::new(
            devices.label,
            &driver,
            &self.node,
            paths,
            devices.parts,
            f.registrations.clone(),
        )
        .observe_claims(hybridlet_devices::holders_observer(f.holders.clone(), keys))
        .report_capacity(f.capacity.clone(), which.trim_start_matches("dra-"));
        let policy = (devices.policy)(plugin.health());
        let plugin = plugin
            .with_metrics(&f.dra)
            .watch_timing(self.dra_timing.clone())
            .share_slice_watch(&self.slice_watch)
            .registration_timeout(agent.plugin_registration_timeout.get())
            .orphan_grace(agent.dra.orphaned_claim_grace_period.get());
        f.devices.set_health_policy(which, Some(policy));
        self.plugins
            .insert(which, (driver, Some(plugin.withdraw_flag())));
        supervisor.spawn(which, move |ctx| plugin.run(ctx));
        Ok(())
    }

    /// A walk after uevents found the devices of DRA kinds changed (VFs, GPUs or PCI
    /// functions came or went): restart each running driver of them alone, as a reload
    /// would, so it publishes what is there now (its prepared claims stay).
    pub async fn devices_changed(&mut self, sup: &mut Supervisor, config: &Config, kinds: &[&str]) {
        for (which, kind) in crate::settings::DRA_KINDS {
            if kinds.contains(&kind) && self.plugins.contains_key(which) {
                tracing::info!(subsystem = which, "its devices came or went; restarting it");
                let grace = config.agent.shutdown_grace_period.get();
                self.stop_plugin(sup, which, false, grace).await;
                if let Err(e) = self.start_dra(sup, config, which) {
                    tracing::error!(subsystem = which, "restarting after a device change: {e}");
                }
            }
        }
    }

    /// Stop one plugin subsystem; `for_good` (disabled, not restarted) also withdraws a
    /// DRA driver's slices and drops the plugin's gauges.
    async fn stop_plugin(
        &mut self,
        supervisor: &mut Supervisor,
        which: &'static str,
        for_good: bool,
        grace: Duration,
    ) {
        let running = self.plugins.remove(which);
        if for_good && let Some((_, Some(withdraw))) = &running {
            withdraw.store(true, Ordering::Relaxed);
        }
        match supervisor.stop(which, grace).await {
            Stopped::Cleanly | Stopped::NotRunning => {}
            Stopped::Failed(e) => {
                tracing::warn!(subsystem = which, "subsystem failed while stopping: {e}");
            }
            Stopped::Aborted => {
                tracing::warn!(
                    subsystem = which,
                    ?grace,
                    "subsystem did not stop within the grace period; aborted"
                );
            }
        }
        if which != CSI {
            self.families.devices.set_health_policy(which, None);
        }
        if for_good && let Some((plugin, withdraw)) = running {
            self.families.registrations.forget(&plugin);
            if withdraw.is_some() {
                self.families.dra.for_driver(&plugin).forget();
            }
            if which == DRA_PCI {
                self.families.pci.clear();
            }
        }
    }

    fn start_admin(
        &self,
        supervisor: &mut Supervisor,
        listener: AdminListener,
        startup_delay: Option<Duration>,
    ) {
        let parts = hybridlet_metrics::AdminParts {
            registry: self.registry.clone(),
            readiness: self.readiness.clone(),
            metrics: self.metrics.clone(),
            tls: self.admin_tls.clone(),
        };
        supervisor.spawn(ADMIN, move |ctx| {
            AdminServer::subsystem(listener, parts, startup_delay, ctx)
        });
    }

    /// SIGHUP: load the configuration again and apply what changed (see `reload`). An
    /// invalid configuration, or one whose certificate, address or devices cannot be used,
    /// is refused before anything changes; the running one stays in force.
    pub async fn reload(
        &mut self,
        supervisor: &mut Supervisor,
        load: impl FnOnce() -> Result<hybridlet_config::LoadedConfig, Failure>,
        running: &mut Config,
    ) {
        let refuse = |metrics: &AgentMetrics, why: String| {
            metrics.config_reloaded("invalid");
            tracing::error!(
                "configuration reload rejected; keeping the running configuration: {why}"
            );
        };
        let new = match load() {
            Ok(loaded) => loaded.config,
            Err(failure) => {
                // One line in the journal: the field path and the message.
                let why = match failure {
                    Failure::Unsupported { field, message } => format!("{field}: {message}"),
                    other => other.to_string(),
                };
                return refuse(&self.metrics, why);
            }
        };
        let plan = crate::reload::plan(running, &new);
        let prepared = match self.prepare(&new, &plan).await {
            Ok(p) => p,
            Err(why) => return refuse(&self.metrics, why),
        };
        let grace = running.agent.shutdown_grace_period.get();
        let mut done: Vec<String> = Vec::new();
        let mut failed: Vec<String> = Vec::new();

        if let Some(level) = &plan.log_level {
            if self.log_level_pinned {
                done.push("spec.logLevel ignored: --log-level/HYBRIDLET_LOG wins".into());
            } else {
                match crate::logging::set_filter(level) {
                    Ok(()) => done.push(format!("log level {level}")),
                    Err(e) => failed.push(format!("spec.logLevel: {e}")),
                }
            }
        }
        let had_tls = self.admin_tls.current().is_some();
        let has_tls = prepared.tls.is_some();
        self.admin_tls.set(prepared.tls);
        match (had_tls, has_tls) {
            (_, true) => done.push("admin TLS certificate read again".into()),
            (true, false) => done.push("admin server on plain HTTP".into()),
            (false, false) => {}
        }
        if let Some(listener) = prepared.listener {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Stopped::Aborted = supervisor.stop(ADMIN, grace).await {
                tracing::warn!("the admin server did not stop within the grace period; aborted");
            }
            self.start_admin(supervisor, AdminListener::Bound(listener), None);
            done.push(format!("admin server moved to {addr}"));
        }
        if let Some((files, remove)) = prepared.mirrors {
            let backups = self.state_dir.join("init-backups");
            match hybridlet_sys::fileset::apply_and_remove(&files, &remove, &backups) {
                Ok(applied) => {
                    let written = applied
                        .states
                        .iter()
                        .filter(|s| **s != hybridlet_sys::fileset::FileState::Unchanged)
                        .count();
                    done.push(format!(
                        "registry mirrors: {written} hosts.toml written, {} removed",
                        applied.removed.len()
                    ));
                }
                Err(e) => failed.push(format!("spec.registryMirrors: {e}")),
            }
        }
        for (which, change) in &plan.subsystems {
            let which = *which;
            if matches!(change, Change::Stop | Change::Restart) {
                self.stop_plugin(supervisor, which, *change == Change::Stop, grace)
                    .await;
            }
            if matches!(change, Change::Start | Change::Restart) {
                let started = if which == CSI {
                    self.start_csi(supervisor, &new);
                    Ok(())
                } else {
                    self.start_dra(supervisor, &new, which)
                };
                if let Err(e) = started {
                    failed.push(format!("{which}: {e}"));
                    continue;
                }
            }
            done.push(format!(
                "{which} {}",
                match change {
                    Change::Start => "started",
                    Change::Stop => "stopped",
                    Change::Restart => "restarted",
                }
            ));
        }
        for field in &plan.applied {
            done.push(format!("{field} applied"));
        }
        let later = |fields: &[&str], when: &str| {
            (!fields.is_empty()).then(|| format!("{} {when}", fields.join(", ")))
        };
        let pending: Vec<String> = [
            later(
                &plan.at_restart,
                "take effect at the next restart (systemctl restart hybridlet)",
            ),
            later(
                &plan.for_init,
                "are read by init and check, not by the daemon (run hybridlet init to apply them)",
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        *running = new;
        if failed.is_empty() {
            self.metrics.config_reloaded("ok");
            if plan.is_empty() {
                let tls = if has_tls {
                    " (admin TLS certificate read again)"
                } else {
                    ""
                };
                tracing::info!("configuration reloaded: unchanged{tls}");
            } else {
                // The summary is in the message too: `journalctl -o cat` shows only that.
                let what = if done.is_empty() {
                    "nothing to do now".to_string()
                } else {
                    done.join("; ")
                };
                tracing::info!(
                    applied = %done.join("; "),
                    pending = %pending.join("; "),
                    "configuration reloaded: {what}"
                );
            }
        } else {
            self.metrics.config_reloaded("failed");
            tracing::error!(
                failed = %failed.join("; "),
                applied = %done.join("; "),
                pending = %pending.join("; "),
                "configuration reloaded, but applying part of it failed: {}",
                failed.join("; ")
            );
        }
        for line in pending {
            tracing::warn!("configuration reloaded: {line}");
        }
    }

    /// Everything a reload can be refused for, checked before anything changes: the log
    /// filter, the admin certificate (read again at every reload: rotation keeps the
    /// paths), a new admin address (bound now), a DRA driver that cannot start, the
    /// mirror files (rendered now).
    async fn prepare(&self, new: &Config, plan: &Plan) -> Result<Prepared, String> {
        if let Some(level) = &plan.log_level {
            crate::logging::check_filter(level).map_err(|e| format!("spec.logLevel: {e}"))?;
        }
        let tls = self.tls_for(new).map_err(|e| match e {
            Failure::Unsupported { field, message } => format!("{field}: {message}"),
            other => other.to_string(),
        })?;
        let listener =
            match plan.listen_address {
                Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(|e| {
                    format!("spec.admin.listenAddress: cannot listen on {addr}: {e}")
                })?),
                None => None,
            };
        for (which, change) in &plan.subsystems {
            if *which == CSI || *change == Change::Stop {
                continue;
            }
            if *which == DRA_GPU
                && let Some(e) = &self.nvml_error
            {
                return Err(format!(
                    "spec.dra.gpu.enabled: NVML did not start when the daemon did ({e}); fix it and restart the daemon"
                ));
            }
            hybridlet_kube::client_from_kubeconfig(&self.kubelet_root.join("kubeconfig"))
                .await
                .map_err(|e| {
                    format!("{which}: the DRA driver talks to the API server with the kubelet's kubeconfig: {e}")
                })?;
        }
        let mirrors = match plan.mirrors {
            true => Some(hybridlet_join::mirror_files(new, &self.root)?),
            false => None,
        };
        Ok(Prepared {
            tls,
            listener,
            mirrors,
        })
    }
}
