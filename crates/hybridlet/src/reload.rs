//! What `systemctl reload` (SIGHUP) does with a new, valid configuration, field by field:
//! applied at once, applied by restarting the one subsystem that reads it (the others are
//! not touched), or left for the next restart or the next `hybridlet init`. The plan is a
//! pure comparison of the running and the new configuration; `daemon` carries it out.
//! docs/configuration.md has the same table for operators.

use std::net::SocketAddr;

use hybridlet_config::{AgentSpec, Config, Mode};

use crate::settings::{CSI, DRA_GPU, DRA_PCI, DRA_SRIOV};

/// What happens to one plugin subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Enabled by the new configuration.
    Start,
    /// Disabled by it (a DRA driver withdraws its slices on the way out).
    Stop,
    /// Its settings changed: stopped, then started with them (its sockets are created
    /// again, so the kubelet registers it again and reads what changed).
    Restart,
}

/// The reload, worked out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `spec.logLevel`, when it changed.
    pub log_level: Option<String>,
    /// `spec.admin.listenAddress`, when it changed: bound before the old one closes.
    pub listen_address: Option<SocketAddr>,
    /// Plugin subsystems to start, stop or restart.
    pub subsystems: Vec<(&'static str, Change)>,
    /// `spec.registryMirrors` changed on a joined node: containerd's `hosts.toml` files
    /// are written again (containerd reads them at each pull; nothing restarts).
    pub mirrors: bool,
    /// Changed fields that take effect at the next restart of the daemon.
    pub at_restart: Vec<&'static str>,
    /// Changed fields only `init` and `check` read (nothing to do in the daemon).
    pub for_init: Vec<&'static str>,
    /// Changed fields applied as they are (read where they are used).
    pub applied: Vec<&'static str>,
}

impl Plan {
    /// Nothing changed that the daemon acts on or reports.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// Start, stop or restart of one plugin, from whether it runs before and after and
/// whether its own settings changed.
fn change(before: bool, after: bool, settings_changed: bool) -> Option<Change> {
    match (before, after) {
        (false, true) => Some(Change::Start),
        (true, false) => Some(Change::Stop),
        (true, true) if settings_changed => Some(Change::Restart),
        _ => None,
    }
}

/// Compare the running configuration with the new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let (o, n) = (&old.agent, &new.agent);
    let mut plan = Plan::default();
    // Every field is named here, so a new one cannot be forgotten: this does not compile
    // until it is given a place in the plan.
    let AgentSpec {
        log_level,
        admin,
        state_dir,
        kubelet_root_dir,
        shutdown_grace_period,
        plugin_registration_timeout,
        dra,
        csi,
        sriov,
        registry_mirrors,
        proxy,
        remote_networks,
        node_labels,
        images,
    } = n;
    if *log_level != o.log_level {
        plan.log_level = Some(log_level.clone());
    }
    if admin.listen_address != o.admin.listen_address {
        plan.listen_address = Some(admin.listen_address);
    }
    if admin.tls != o.admin.tls {
        plan.applied.push("spec.admin.tls");
    }
    if *shutdown_grace_period != o.shutdown_grace_period {
        plan.applied.push("spec.shutdownGracePeriod");
    }
    for (field, changed) in [
        ("spec.stateDir", *state_dir != o.state_dir),
        (
            "spec.kubeletRootDir",
            *kubelet_root_dir != o.kubelet_root_dir,
        ),
        (
            "spec.pluginRegistrationTimeout",
            *plugin_registration_timeout != o.plugin_registration_timeout,
        ),
        ("spec.sriov.physicalFunctions", *sriov != o.sriov),
        ("spec.nodeLabels", *node_labels != o.node_labels),
        // The pre-puller's (sandbox and logins: init renders them, the provider reads logins).
        ("spec.images", *images != o.images),
        // The node's name and cluster come from it; init renders the rest.
        ("NodeConfig", new.node != old.node),
    ] {
        if changed {
            plan.at_restart.push(field);
        }
    }
    for (field, changed) in [
        ("spec.proxy", *proxy != o.proxy),
        ("spec.remoteNetworks", *remote_networks != o.remote_networks),
    ] {
        if changed {
            plan.for_init.push(field);
        }
    }
    if *registry_mirrors != o.registry_mirrors {
        if new.mode() == Mode::Joined {
            plan.mirrors = true;
        } else {
            plan.for_init.push("spec.registryMirrors");
        }
    }
    let grace = dra.orphaned_claim_grace_period != o.dra.orphaned_claim_grace_period;
    let (was, is) = (&o.dra, dra);
    for (which, changed) in [
        (CSI, *csi != o.csi),
        (DRA_GPU, is.gpu != was.gpu || grace),
        (DRA_SRIOV, is.sriov != was.sriov || grace),
        (DRA_PCI, is.pci != was.pci || grace),
    ] {
        let on = |c: &Config| match which {
            CSI => crate::settings::csi_enabled(c),
            _ => crate::settings::dra_driver(c, which).0,
        };
        if let Some(c) = change(on(old), on(new), changed) {
            plan.subsystems.push((which, c));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        hybridlet_config::load(&hybridlet_config::ConfigSources {
            file: path,
            file_required: true,
            drop_in_dir: None,
        })
        .unwrap()
        .config
    }

    fn agent(spec: &str) -> Config {
        config(&format!(
            "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n{spec}"
        ))
    }

    #[test]
    fn an_unchanged_configuration_plans_nothing() {
        let c = agent("  csi: {nfs: {enabled: true}}\n");
        assert!(plan(&c, &c).is_empty());
    }

    #[test]
    fn each_subsystem_starts_stops_or_restarts_on_its_own() {
        let none = agent("  logLevel: info\n");
        let csi = agent("  csi: {nfs: {enabled: true}}\n");
        let csi_topology =
            agent("  csi: {nfs: {enabled: true}, topology: {topology.hybridlet.io/site: fra1}}\n");
        let both = agent("  csi: {nfs: {enabled: true}, iscsi: {enabled: true}}\n");
        assert_eq!(plan(&none, &csi).subsystems, [(CSI, Change::Start)]);
        assert_eq!(plan(&csi, &none).subsystems, [(CSI, Change::Stop)]);
        assert_eq!(
            plan(&csi, &csi_topology).subsystems,
            [(CSI, Change::Restart)]
        );
        assert_eq!(plan(&csi, &both).subsystems, [(CSI, Change::Restart)]);

        let gpu = agent("  dra: {gpu: {enabled: true}}\n");
        let sriov = agent("  dra: {sriov: {enabled: true}}\n");
        assert_eq!(
            plan(&gpu, &sriov).subsystems,
            [(DRA_GPU, Change::Stop), (DRA_SRIOV, Change::Start)]
        );
        let renamed = agent("  dra: {gpu: {enabled: true, driverName: gpu.example.com}}\n");
        assert_eq!(
            plan(&gpu, &renamed).subsystems,
            [(DRA_GPU, Change::Restart)]
        );
        // A disabled driver's settings changing touches nothing.
        let renamed_off = agent("  dra: {sriov: {driverName: vf.example.com}}\n");
        assert!(plan(&none, &renamed_off).subsystems.is_empty());
        let grace = agent("  dra: {gpu: {enabled: true}, orphanedClaimGracePeriod: 10m}\n");
        assert_eq!(plan(&gpu, &grace).subsystems, [(DRA_GPU, Change::Restart)]);
        // The PCI driver's allowlist is its own: a new rule restarts it alone.
        let pci = agent(
            "  dra: {gpu: {enabled: true}, pci: {enabled: true, allow: [{class: \"0x1200\"}]}}\n",
        );
        let pci_more = agent(
            "  dra: {gpu: {enabled: true}, pci: {enabled: true, allow: [{class: \"0x1200\"}, {vendor: \"0x10ee\"}]}}\n",
        );
        assert_eq!(plan(&gpu, &pci).subsystems, [(DRA_PCI, Change::Start)]);
        assert_eq!(
            plan(&pci, &pci_more).subsystems,
            [(DRA_PCI, Change::Restart)]
        );
        assert_eq!(plan(&pci, &gpu).subsystems, [(DRA_PCI, Change::Stop)]);
    }

    #[test]
    fn fields_are_applied_at_once_at_restart_or_by_init() {
        let old = agent("  logLevel: info\n");
        let new = agent(
            "  logLevel: debug\n  admin: {listenAddress: 127.0.0.1:9999}\n  stateDir: /srv/hybridlet\n  shutdownGracePeriod: 10s\n  proxy: {httpsProxy: http://proxy.example.internal:3128}\n  registryMirrors: [{registry: docker.io, endpoints: [https://harbor.example.internal]}]\n",
        );
        let p = plan(&old, &new);
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        assert_eq!(p.listen_address, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(p.at_restart, ["spec.stateDir"]);
        assert_eq!(p.applied, ["spec.shutdownGracePeriod"]);
        // Standalone: nobody renders mirrors for containerd.
        assert_eq!(p.for_init, ["spec.proxy", "spec.registryMirrors"]);
        assert!(!p.mirrors);
        assert!(p.subsystems.is_empty());
    }

    #[test]
    fn mirrors_are_rendered_again_on_a_joined_node() {
        let node = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
        )
        .unwrap();
        let old = config(&node);
        let new = config(&node.replace(
            "https://harbor.example.internal/v2/dockerhub",
            "https://harbor2.example.internal/v2/dockerhub",
        ));
        let p = plan(&old, &new);
        assert!(p.mirrors, "{p:?}");
        assert!(p.for_init.is_empty() && p.at_restart.is_empty(), "{p:?}");
    }
}
