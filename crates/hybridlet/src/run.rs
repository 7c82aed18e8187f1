//! `hybridlet run`: the daemon.
//!
//! Order matters: signal handlers first (so SIGTERM during start-up is a clean stop, not
//! the default kill), then configuration, then subsystems under the supervisor. READY=1
//! goes to systemd only when every subsystem reports ready; WATCHDOG=1 comes from this
//! loop, so a wedged loop is noticed; SIGHUP applies a new configuration as far as it can
//! be applied live (`reload`, `daemon`) and never replaces a running configuration with
//! an invalid one.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hybridlet_config::LoadedConfig;
use hybridlet_metrics::AgentMetrics;
use hybridlet_runtime::{Readiness, Signal, Signals, SubsystemExit, Supervisor};
use sd_notify::NotifyState;

use crate::cli::{Cli, RunArgs};
use crate::exit::Failure;

enum Stop {
    Signal(Signal),
    Failed(SubsystemExit),
}

pub fn run(cli: &Cli, args: &RunArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hybridlet")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(cli, args))
}

async fn run_async(cli: &Cli, args: &RunArgs) -> Result<(), Failure> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    let loaded = cli.load_config()?;
    let config = loaded.config.clone();
    let root = cli.host_root();
    let mode = config.mode();
    let log_level_pinned = cli.log_level.is_some();
    if !log_level_pinned {
        crate::logging::set_filter(&config.agent.log_level).map_err(|message| {
            Failure::Unsupported {
                field: "spec.logLevel",
                message,
            }
        })?;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = mode.as_str(),
        root = %root.dir().display(),
        config_files = %describe_files(&loaded),
        "starting hybridlet"
    );

    let state_dir = root
        .resolve(&config.agent.state_dir)
        .map_err(|e| anyhow::anyhow!("spec.stateDir: {e}"))?;
    hybridlet_sys::ensure_dir(&state_dir, 0o700)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;

    if !config.agent.sriov.physical_functions.is_empty() {
        notify(&[NotifyState::Status("provisioning SR-IOV virtual functions")]);
        let sysfs = hybridlet_sys::Sysfs::new(&root);
        let pfs = config.agent.sriov.physical_functions.clone();
        let mut task = tokio::task::spawn_blocking(move || provision_vfs(&sysfs, &pfs));
        loop {
            tokio::select! {
                joined = &mut task => {
                    joined.context("the VF provisioning task failed")??;
                    break;
                }
                signal = signals.recv() => {
                    if signal != Signal::Hangup {
                        tracing::info!(signal = signal.name(), "stopping during VF provisioning");
                        return Ok(());
                    }
                }
            }
        }
    }

    let readiness = Readiness::new();
    let mut registry = hybridlet_metrics::new_registry();
    let metrics = AgentMetrics::register(
        &mut registry,
        &crate::build_info(),
        mode.as_str(),
        readiness.clone(),
    );
    let mut supervisor = Supervisor::new(readiness.clone());
    // Subscribe before any subsystem starts, so that no readiness change can be missed.
    let mut ready_changes = readiness.subscribe();
    let kubelet_root = root
        .resolve(&config.agent.kubelet_root_dir)
        .map_err(|e| anyhow::anyhow!("spec.kubeletRootDir: {e}"))?;
    // One GPU source (one NVML session) for the metrics sampler and the DRA driver. Without
    // DRA a broken NVML only costs the GPU metrics; with DRA it stops start-up.
    let mut nvml_error = None;
    let gpus: Option<Arc<dyn hybridlet_gpu::GpuSource>> =
        match hybridlet_devices::gpu_source(args.nvml_fixture.as_deref()) {
            Ok(source) => source.map(Arc::from),
            Err(e) if args.nvml_fixture.is_none() && !config.agent.dra.gpu.enabled => {
                tracing::warn!("NVML failed to initialise: {e}; GPUs are not reported");
                nvml_error = Some(e.to_string());
                None
            }
            Err(other) => return Err(other.into()),
        };
    let families = crate::daemon::Families::register(&mut registry);
    let mut daemon = crate::daemon::Daemon {
        // The Kubernetes node name, as init gave it to the kubelet.
        node: hybridlet_join::node_name(&config, &root),
        sysfs: hybridlet_sys::Sysfs::new(&root),
        root,
        kubelet_root,
        state_dir,
        gpus,
        nvml_error,
        families,
        registry: Arc::new(registry),
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        admin_tls: hybridlet_metrics::AdminTls::default(),
        log_level_pinned,
        volume_guard: hybridlet_csi::VolumeGuard::default(),
        plugins: std::collections::BTreeMap::new(),
        dra_timing: hybridlet_dra::WatchTiming::scaled(args.api_timer_scale),
        slice_watch: hybridlet_dra::NodeSliceWatch::default(),
    };
    daemon.start_all(
        &mut supervisor,
        &config,
        args.device_sample_interval
            .unwrap_or(hybridlet_devices::SAMPLE_INTERVAL),
        args.startup_delay,
    )?;
    let devices_summary = daemon.families.devices.clone();
    let mut device_changes = devices_summary.device_changes();

    let watchdog = sd_notify::watchdog_enabled();
    // systemd's advice: ping at half the interval.
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    let mut announced_ready = false;
    let mut running_config = config;
    notify(&[NotifyState::Status("starting subsystems")]);

    let stop = loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Hangup => {
                    // systemd ≥ 253 (Type=notify-reload) waits for READY=1 after these.
                    let mut reloading = vec![NotifyState::Reloading];
                    reloading.extend(NotifyState::monotonic_usec_now().ok());
                    notify(&reloading);
                    let reload = daemon.reload(&mut supervisor, || cli.load_config(), &mut running_config);
                    tokio::pin!(reload);
                    // Stopping a subsystem may take its grace period: keep systemd's
                    // watchdog fed meanwhile.
                    loop {
                        tokio::select! {
                            () = &mut reload => break,
                            _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
                        }
                    }
                    let status = status_line(&readiness, mode.as_str(), &devices_summary);
                    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
                other => break Stop::Signal(other),
            },
            exit = supervisor.next_exit() => break Stop::Failed(exit),
            Some(kinds) = device_changes.recv() => {
                daemon.devices_changed(&mut supervisor, &running_config, &kinds).await;
            }
            changed = ready_changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                let ready = readiness.is_ready();
                if ready && !announced_ready {
                    announced_ready = true;
                    let status = status_line(&readiness, mode.as_str(), &devices_summary);
                    tracing::info!(status = %status, "ready");
                    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                } else if !ready && announced_ready {
                    let status = status_line(&readiness, mode.as_str(), &devices_summary);
                    tracing::warn!(status = %status, "not ready");
                    notify(&[NotifyState::Status(&status)]);
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                notify(&[NotifyState::Watchdog]);
            }
        }
    };

    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    let grace = running_config.agent.shutdown_grace_period.get();
    let failed = match stop {
        Stop::Signal(signal) => {
            tracing::info!(signal = signal.name(), grace = ?grace, "shutting down");
            None
        }
        Stop::Failed(exit) => {
            let why = match &exit.result {
                Ok(()) => "stopped unexpectedly".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            tracing::error!(subsystem = %exit.name, "subsystem {why}; shutting down");
            Some(anyhow::anyhow!("subsystem {} {why}", exit.name))
        }
    };

    let shutdown = supervisor.shutdown(grace);
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            result = &mut shutdown => break result,
            signal = signals.recv() => {
                if matches!(signal, Signal::Terminate | Signal::Interrupt) {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "{} received again during shutdown; exiting without waiting for subsystems",
                        signal.name()
                    )));
                }
            }
        }
    };
    if let Some(e) = failed {
        return Err(Failure::Runtime(e));
    }
    result.map_err(|e| Failure::Runtime(e.into()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// How long the kernel and the PF driver get to create the VFs of one PF.
const VF_PROVISION_TIMEOUT: Duration = Duration::from_secs(60);

/// Set `sriov_numvfs` for each configured PF, in order, and wait for the VFs.
pub fn provision_vfs(
    sysfs: &hybridlet_sys::Sysfs,
    pfs: &[hybridlet_config::PfProvisioning],
) -> Result<(), Failure> {
    for (i, pf) in pfs.iter().enumerate() {
        let field = format!("spec.sriov.physicalFunctions[{i}]");
        let selector = hybridlet_sriov::PfSelector::from_config(pf).ok_or_else(|| {
            Failure::Runtime(anyhow::anyhow!(
                "{field}: no PF named (validation should have caught this)"
            ))
        })?;
        match hybridlet_sriov::provision(
            sysfs,
            &selector,
            pf.num_vfs,
            VF_PROVISION_TIMEOUT,
            Duration::from_millis(100),
        ) {
            Ok(done) if done.before == done.after => {
                tracing::info!(pf = %done.pf, vfs = done.after, "SR-IOV VFs already as configured");
            }
            Ok(done) => {
                tracing::info!(pf = %done.pf, before = done.before, after = done.after, "SR-IOV VFs provisioned");
            }
            Err(e) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{field} ({selector}): {e}"
                )));
            }
        }
    }
    Ok(())
}

fn describe_files(loaded: &LoadedConfig) -> String {
    if loaded.files.is_empty() {
        "none (embedded defaults)".to_string()
    } else {
        loaded
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// systemd's STATUS=: mode, devices, readiness, e.g.
/// `joined; 8 GPUs, 2 SR-IOV PFs, 64 VFs; 5/5 subsystems ready`.
fn status_line(
    readiness: &Readiness,
    mode: &str,
    devices: &hybridlet_devices::DeviceMetrics,
) -> String {
    let snapshot = readiness.snapshot();
    let ready = snapshot.iter().filter(|c| c.ready).count();
    let mut line = format!("{mode}; ");
    if let Some(summary) = devices.summary() {
        line.push_str(&summary);
        line.push_str("; ");
    }
    line.push_str(&format!("{ready}/{} subsystems ready", snapshot.len()));
    let waiting: Vec<&str> = snapshot
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    if !waiting.is_empty() {
        line.push_str(&format!(" (waiting for {})", waiting.join(", ")));
    }
    line
}

/// Tell systemd; a no-op when not started by systemd (no NOTIFY_SOCKET).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
