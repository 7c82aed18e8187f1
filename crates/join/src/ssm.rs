//! SSM hybrid activations on the node: registering the agent at `init` (the node's name
//! becomes the managed instance ID it gets), starting it so it writes root's AWS
//! credentials, and deregistering the managed instance at `uninstall`.
//!
//! Registration is not a file and is not rolled back with init's files: a registered
//! agent is what a rerun needs, and the registration file makes the rerun skip it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hybridlet_aws::{AwsSettings, SsmClient, SsmError};
use hybridlet_bootstrap::{NodeIdentity, POD_CREDENTIALS_FILE};
use hybridlet_config::{Config, SsmOptions};
use hybridlet_sys::HostRoot;
use hybridlet_sys::fileset::{self, FileState};
use hybridlet_sys::ssm_agent::{
    AGENT_STATE_DIR, Activation, CREDENTIALS_FILE, REGISTRATION_FILE, RefusalKind, RegisterError,
    SsmRegistrar, find_agent, registered_instance, unit_for,
};
use hybridlet_sys::systemd::ServiceManager;

use crate::Error;

/// How long registration may keep retrying (nodeadm: 10 s apart within 60 s).
const REGISTER_WINDOW: Duration = Duration::from_secs(60);
pub(crate) const REGISTER_PAUSE: Duration = Duration::from_secs(10);
/// How long the agent may take to write the first credentials.
pub(crate) const CREDENTIALS_WAIT: Duration = Duration::from_secs(120);
/// What the dry run shows where the managed instance ID will be.
const UNKNOWN_INSTANCE: &str = "mi-(assigned-at-registration)";

/// What [`prepare`] works with.
pub(crate) struct Prepare<'a> {
    pub root: &'a HostRoot,
    pub config: &'a Config,
    pub ssm: &'a SsmOptions,
    pub region: &'a str,
    /// `None`: register only if asked to and leave the agent's service alone.
    pub services: Option<&'a dyn ServiceManager>,
    /// `None`: registering is not allowed here (dry run, or another root).
    pub registrar: Option<&'a dyn SsmRegistrar>,
    /// Only show what would be done.
    pub dry_run: bool,
    /// Where init's backups go (the agent's proxy drop-in is written before the rest).
    pub backups: &'a Path,
    pub credentials_wait: Duration,
    pub register_pause: Duration,
}

fn runtime(message: String) -> Error {
    Error::Failed(message)
}

/// Make sure the agent is registered, running and writing credentials; the node's
/// identity comes back. Reports each step through `say`.
pub(crate) fn prepare(p: &Prepare<'_>, say: &mut dyn FnMut(String)) -> Result<NodeIdentity, Error> {
    let agent = find_agent(p.root);
    let unit = agent
        .as_ref()
        .map(|a| a.unit.clone())
        .unwrap_or_else(|| unit_for("").to_string());
    let registration = p
        .root
        .resolve(REGISTRATION_FILE)
        .map_err(|e| runtime(e.to_string()))?;
    let mut just_registered = false;
    let instance = match registered_instance(p.root) {
        Some(id) => {
            say(format!("ssm: agent registered as managed instance {id}"));
            id
        }
        None if registration.exists() => {
            return Err(runtime(format!(
                "{} exists but holds no managed instance ID (mi-…): it is damaged or from another tool. Move it away and run init again to register anew",
                registration.display()
            )));
        }
        None => {
            let Some(agent) = &agent else {
                return Err(runtime(
                    "the SSM agent is not installed (no /usr/bin/amazon-ssm-agent and no amazon-ssm-agent snap), so the node cannot register with its hybrid activation: run `hybridlet install <version> --credential-provider ssm` or install amazon-ssm-agent from AWS, then run init again. Nothing was changed".into(),
                ));
            };
            let Some(registrar) = p.registrar else {
                if !p.dry_run {
                    return Err(runtime(format!(
                        "the SSM agent under this --root is not registered ({} is missing), and init registers only the machine it runs on: register it there, or run init without --root",
                        registration.display()
                    )));
                }
                say(format!(
                    "ssm: would register {} with activation {} in {} (the node is then named after the managed instance ID it gets)",
                    agent.program, p.ssm.activation_id, p.region
                ));
                return Ok(identity(UNKNOWN_INSTANCE.into(), unit));
            };
            register(p, registrar, say)?;
            just_registered = true;
            registered_instance(p.root).ok_or_else(|| {
                runtime(format!(
                    "the SSM agent reported success but {} holds no managed instance ID; see `journalctl -u {unit}`",
                    registration.display()
                ))
            })?
        }
    };
    if let Some(sm) = p.services {
        start_agent(p, sm, &unit, just_registered, say)?;
    }
    if p.registrar.is_some()
        && p.config
            .node
            .as_ref()
            .and_then(|n| n.spec.hybrid.as_ref())
            .is_some_and(|h| h.enable_credentials_file)
    {
        link_pod_credentials(p.root, say)?;
    }
    Ok(identity(instance, unit))
}

fn identity(node_name: String, unit: String) -> NodeIdentity {
    NodeIdentity {
        node_name,
        credential_provider: "ssm".into(),
        aws_config_file: None,
        ssm_agent_unit: Some(unit),
        ecr_credential_provider: false,
    }
}

fn register(
    p: &Prepare<'_>,
    registrar: &dyn SsmRegistrar,
    say: &mut dyn FnMut(String),
) -> Result<(), Error> {
    let activation = Activation {
        region: p.region.to_string(),
        id: p.ssm.activation_id.clone(),
        code: p.ssm.activation_code.clone(),
    };
    let env = hybridlet_bootstrap::proxy_env(p.config);
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        say(format!(
            "ssm: registering the agent with activation {} in {} (attempt {attempt})",
            activation.id, activation.region
        ));
        match registrar.register(&activation, &env) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.is_transient() && started.elapsed() + p.register_pause < REGISTER_WINDOW =>
            {
                say(format!("ssm: {e}; retrying in {:?}", p.register_pause));
                #[allow(clippy::disallowed_methods)] // a CLI command, no runtime here
                std::thread::sleep(p.register_pause);
            }
            Err(e) => return Err(registration_failure(&activation, &e)),
        }
    }
}

/// The failure with what to do about it.
fn registration_failure(activation: &Activation, e: &RegisterError) -> Error {
    let fix = match e {
        RegisterError::Refused {
            kind: RefusalKind::Expired,
            ..
        } => {
            return Error::Unsupported {
                field: "spec.hybrid.ssm.activationId",
                message: format!(
                    "activation {} has expired ({e}). Create a new one (aws ssm create-activation --iam-role <hybrid nodes role> --registration-limit <n> --region {}) and put its ID and code in spec.hybrid.ssm",
                    activation.id, activation.region
                ),
            };
        }
        RegisterError::Refused {
            kind: RefusalKind::Invalid,
            ..
        } => {
            return Error::Unsupported {
                field: "spec.hybrid.ssm.activationCode",
                message: format!(
                    "SSM refused activation {} in {} ({e}): the code and ID do not match, the activation is in another region, or its registration limit is used up (aws ssm describe-activations shows RegistrationsCount)",
                    activation.id, activation.region
                ),
            };
        }
        RegisterError::Spawn { .. } => "is the agent installed and executable?",
        _ => {
            "the node must reach ssm.<region>.amazonaws.com on 443 (set spec.proxy if it goes through a proxy); `hybridlet check` tests that"
        }
    };
    runtime(format!("registering the SSM agent failed: {e}. {fix}"))
}

fn start_agent(
    p: &Prepare<'_>,
    sm: &dyn ServiceManager,
    unit: &str,
    just_registered: bool,
    say: &mut dyn FnMut(String),
) -> Result<(), Error> {
    let err = |e: hybridlet_sys::systemd::ServiceError| runtime(format!("{e}"));
    // Behind a proxy the agent needs its drop-in before it starts, not after init's
    // other files (which need the credentials it fetches).
    let mut dropin_changed = false;
    let files = hybridlet_bootstrap::proxy_files_for(p.config, unit);
    if !files.is_empty() {
        let desired = hybridlet_bootstrap::desired_files(&files, p.root).map_err(crate::fail)?;
        let applied = fileset::apply(&desired, p.backups).map_err(crate::fail)?;
        for (f, state) in files.iter().zip(&applied.states) {
            if *state != FileState::Unchanged {
                dropin_changed = true;
                say(format!("{:>9}  {}", state.as_str(), f.path));
            }
        }
        if dropin_changed {
            sm.daemon_reload().map_err(err)?;
        }
    }
    let state = sm.state(unit).map_err(err)?;
    if !state.exists {
        return Err(runtime(format!(
            "systemd has no {unit}: the agent is registered but cannot run; reinstall amazon-ssm-agent"
        )));
    }
    if just_registered || dropin_changed || !state.active {
        sm.enable(unit)
            .and_then(|()| sm.restart(unit))
            .map_err(err)?;
        say(format!("systemd: {unit} enabled and (re)started"));
    }
    let credentials = p
        .root
        .resolve(CREDENTIALS_FILE)
        .map_err(|e| runtime(e.to_string()))?;
    let started = Instant::now();
    loop {
        if std::fs::metadata(&credentials).is_ok_and(|m| m.len() > 0) {
            if started.elapsed() > Duration::from_secs(1) {
                say(format!(
                    "ssm: credentials in {CREDENTIALS_FILE} after {}s",
                    started.elapsed().as_secs()
                ));
            }
            return Ok(());
        }
        if started.elapsed() >= p.credentials_wait {
            return Err(runtime(format!(
                "the SSM agent has not written {CREDENTIALS_FILE} within {}s, so nothing on this node can authenticate to AWS. `journalctl -u {unit}` says why; usual causes: ssm.{}.amazonaws.com unreachable (proxy? `hybridlet check`), a clock off by minutes, or the activation's IAM role not trusting ssm.amazonaws.com",
                p.credentials_wait.as_secs(),
                p.region
            )));
        }
        #[allow(clippy::disallowed_methods)] // a CLI command, no runtime here
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `enableCredentialsFile` with SSM: pods that mount `/eks-hybrid/.aws` see the agent's
/// credentials (a link to root's `.aws`, as nodeadm makes it).
fn link_pod_credentials(root: &HostRoot, say: &mut dyn FnMut(String)) -> Result<(), Error> {
    let dir = Path::new(POD_CREDENTIALS_FILE)
        .parent()
        .unwrap_or(Path::new("/eks-hybrid/.aws"));
    let link = root.resolve(dir).map_err(|e| runtime(e.to_string()))?;
    let target = Path::new(CREDENTIALS_FILE)
        .parent()
        .unwrap_or(Path::new("/root/.aws"));
    match std::fs::read_link(&link) {
        Ok(t) if t == target => return Ok(()),
        Ok(_) | Err(_) if std::fs::symlink_metadata(&link).is_ok() => {
            say(format!(
                "warning: {} exists and is not a link to {}; left as it is (spec.hybrid.enableCredentialsFile)",
                dir.display(),
                target.display()
            ));
            return Ok(());
        }
        _ => {}
    }
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| runtime(format!("{}: {e}", parent.display())))?;
    }
    std::os::unix::fs::symlink(target, &link).map_err(|e| {
        runtime(format!(
            "linking {} → {}: {e}",
            dir.display(),
            target.display()
        ))
    })?;
    say(format!(
        "{:>9}  {} → {}",
        "linked",
        dir.display(),
        target.display()
    ));
    Ok(())
}

/// How uninstall deregisters.
pub(crate) struct Deregister<'a> {
    pub root: &'a HostRoot,
    pub region: &'a str,
    /// The SSM endpoint (an override; else the regional one).
    pub endpoint: Option<String>,
    pub timeout: Duration,
    pub attempts: u32,
    pub pause: Duration,
}

/// Deregister this node's managed instance (if SSM still has it). Changes nothing on
/// the host; the caller removes the registration afterwards ([`forget_registration`]).
pub(crate) fn deregister(
    ctx: &crate::Context,
    d: &Deregister<'_>,
    say: &mut dyn FnMut(String),
) -> Result<Option<String>, Error> {
    let Some(id) = registered_instance(d.root) else {
        say("ssm: the agent is not registered; nothing to deregister".into());
        return Ok(None);
    };
    let credentials_file = d
        .root
        .resolve(CREDENTIALS_FILE)
        .map_err(|e| runtime(e.to_string()))?;
    let manual = format!(
        "Nothing was changed. Give the node's role ssm:DescribeInstanceInformation and ssm:DeregisterManagedInstance, or deregister it yourself (aws ssm deregister-managed-instance --instance-id {id} --region {}) and run uninstall with --no-deregister",
        d.region
    );
    ctx.block_on(async {
        let sdk = hybridlet_aws::sdk_config(&AwsSettings {
            region: d.region.to_string(),
            credentials_file: credentials_file.exists().then_some(credentials_file),
            ..AwsSettings::default()
        })
        .await;
        let creds = hybridlet_aws::resolve_credentials(&sdk)
            .await
            .map_err(|e| {
                runtime(format!(
                    "ssm: no AWS credentials to deregister {id} with: {e}. {manual}"
                ))
            })?;
        let client = SsmClient::new(d.region, d.endpoint.as_deref(), creds, d.timeout)
            .map_err(|e| runtime(format!("{e}")))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let result: Result<bool, SsmError> = async {
                match client.instance_information(&id).await? {
                    None => Ok(false),
                    Some(_) => client.deregister(&id).await,
                }
            }
            .await;
            match result {
                Ok(true) => {
                    say(format!("ssm: managed instance {id} deregistered"));
                    return Ok(Some(id.clone()));
                }
                Ok(false) => {
                    say(format!(
                        "ssm: managed instance {id} was already deregistered"
                    ));
                    return Ok(Some(id.clone()));
                }
                Err(e) if e.is_transient() && tries < d.attempts => {
                    say(format!("ssm: {e}; retrying in {:?}", d.pause * tries));
                    tokio::time::sleep(d.pause * tries).await;
                }
                Err(e) => return Err(runtime(format!("deregistering {id}: {e}. {manual}"))),
            }
        }
    })
}

/// Stop the agent and remove its registration, its key store, the credentials it wrote
/// and the pods' link to them. Each removal is reported.
pub(crate) fn forget_registration(
    root: &HostRoot,
    services: Option<&dyn ServiceManager>,
    say: &mut dyn FnMut(String),
) -> Result<(), Error> {
    let err = |e: String| runtime(e);
    if let Some(sm) = services {
        let unit = find_agent(root)
            .map(|a| a.unit)
            .unwrap_or_else(|| unit_for("").to_string());
        let state = sm.state(&unit).map_err(|e| err(e.to_string()))?;
        if state.exists {
            sm.stop(&unit).map_err(|e| err(e.to_string()))?;
            sm.disable(&unit).map_err(|e| err(e.to_string()))?;
            say(format!("systemd: {unit} stopped and disabled"));
        }
    }
    let resolve = |p: &str| root.resolve(p).map_err(|e| err(e.to_string()));
    for file in [REGISTRATION_FILE, CREDENTIALS_FILE] {
        let path = resolve(file)?;
        match std::fs::remove_file(&path) {
            Ok(()) => say(format!("{:>9}  {file}", "removed")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("removing {}: {e}", path.display()))),
        }
    }
    // The agent's private key for this registration; useless once deregistered.
    let vault: PathBuf = resolve(&format!("{AGENT_STATE_DIR}/Vault"))?;
    if vault.exists() {
        hybridlet_sys::tree::remove_tree_on_one_fs(&vault).map_err(|e| err(e.to_string()))?;
        say(format!("{:>9}  {AGENT_STATE_DIR}/Vault", "removed"));
    }
    let link = resolve("/eks-hybrid/.aws")?;
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("/root/.aws")) {
        std::fs::remove_file(&link).map_err(|e| err(format!("{}: {e}", link.display())))?;
        say(format!("{:>9}  /eks-hybrid/.aws (link)", "removed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_fixtures::ssm::FakeSsm;
    use hybridlet_sys::ssm_agent::FakeRegistrar;
    use hybridlet_sys::systemd::FakeServiceManager;

    const MI: &str = "mi-0123456789abcdef0";
    const UNIT: &str = "amazon-ssm-agent.service";

    fn config(name: &str) -> Config {
        hybridlet_config::load(&hybridlet_config::ConfigSources {
            file: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/config/good")
                .join(name),
            file_required: true,
            drop_in_dir: None,
        })
        .unwrap()
        .config
    }

    fn ssm(config: &Config) -> SsmOptions {
        config
            .node
            .as_ref()
            .unwrap()
            .spec
            .hybrid
            .as_ref()
            .unwrap()
            .ssm
            .clone()
            .unwrap()
    }

    fn with_agent(dir: &Path) -> HostRoot {
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        std::fs::write(dir.join("usr/bin/amazon-ssm-agent"), "").unwrap();
        HostRoot::new(dir)
    }

    fn run(
        root: &HostRoot,
        config: &Config,
        services: Option<&dyn ServiceManager>,
        registrar: Option<&dyn SsmRegistrar>,
        backups: &Path,
    ) -> (Result<NodeIdentity, Error>, Vec<String>) {
        let ssm = ssm(config);
        let mut said = Vec::new();
        let result = prepare(
            &Prepare {
                root,
                config,
                ssm: &ssm,
                region: "us-west-2",
                services,
                registrar,
                dry_run: registrar.is_none(),
                backups,
                credentials_wait: Duration::from_millis(400),
                register_pause: Duration::from_millis(10),
            },
            &mut |l| said.push(l),
        );
        (result, said)
    }

    #[test]
    fn registers_once_behind_the_proxy_and_starts_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let root = with_agent(dir.path());
        let config = config("ssm-proxy.yaml");
        let registrar = FakeRegistrar::new(dir.path(), MI);
        let sm = FakeServiceManager::with_units(&[UNIT]);
        let backups = dir.path().join("backups");
        let (who, said) = run(&root, &config, Some(&sm), Some(&registrar), &backups);
        let who = who.unwrap();
        assert_eq!(who.node_name, MI);
        assert_eq!(who.ssm_agent_unit.as_deref(), Some(UNIT));
        // Registration saw the proxy: it talks to SSM itself.
        let calls = registrar.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0.id, "8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d");
        assert!(
            calls[0].1.contains(&(
                "HTTPS_PROXY".into(),
                "http://svc-hybrid:s3cr%40t@proxy.example.internal:3128".into()
            )),
            "{:?}",
            calls[0].1
        );
        // The agent's proxy drop-in is in place before it starts.
        let dropin = dir
            .path()
            .join("etc/systemd/system/amazon-ssm-agent.service.d/http-proxy.conf");
        // The settings themselves are in the root-only file (the URL holds a password).
        assert!(
            std::fs::read_to_string(&dropin)
                .unwrap()
                .contains("EnvironmentFile=/etc/hybridlet/proxy.env")
        );
        let env = dir.path().join("etc/hybridlet/proxy.env");
        assert!(
            std::fs::read_to_string(&env)
                .unwrap()
                .contains("HTTPS_PROXY=http://svc-hybrid:")
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&env).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !said.join("\n").contains("s3cr"),
            "the proxy password is never shown"
        );
        assert_eq!(
            sm.calls(),
            [
                "daemon-reload",
                "enable amazon-ssm-agent.service",
                "restart amazon-ssm-agent.service"
            ]
        );
        // enableCredentialsFile: pods see root's credentials through the link.
        assert_eq!(
            std::fs::read_link(dir.path().join("eks-hybrid/.aws")).unwrap(),
            Path::new("/root/.aws")
        );
        assert!(
            said.iter().any(|l| l.contains("registering the agent")),
            "{said:?}"
        );
        assert!(
            !said.join("\n").contains("AbCdEfGh"),
            "the activation code is never shown"
        );

        // Again: registered, running, nothing to do.
        let (again, said) = run(&root, &config, Some(&sm), Some(&registrar), &backups);
        assert_eq!(again.unwrap().node_name, MI);
        assert_eq!(registrar.calls().len(), 1, "registered only once");
        assert_eq!(sm.calls().len(), 3, "no restart: {:?}", sm.calls());
        assert_eq!(
            said,
            [format!("ssm: agent registered as managed instance {MI}")]
        );
    }

    #[test]
    fn transient_failures_are_retried_and_final_ones_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let root = with_agent(dir.path());
        let config = config("ssm.yaml");
        let backups = dir.path().join("backups");
        let registrar = FakeRegistrar::new(dir.path(), MI);
        registrar.fail_next(&[RefusalKind::Other, RefusalKind::Other]);
        let (who, said) = run(&root, &config, None, Some(&registrar), &backups);
        assert_eq!(who.unwrap().node_name, MI);
        assert_eq!(registrar.calls().len(), 3);
        assert_eq!(
            said.iter().filter(|l| l.contains("retrying")).count(),
            2,
            "{said:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let root = with_agent(dir.path());
        let registrar = FakeRegistrar::new(dir.path(), MI);
        registrar.fail_next(&[RefusalKind::Expired]);
        let err = run(&root, &config, None, Some(&registrar), &backups)
            .0
            .unwrap_err();
        assert_eq!(
            registrar.calls().len(),
            1,
            "an expired activation is not retried"
        );
        assert_eq!(err.code(), 78);
        let text = err.to_string();
        assert!(
            text.contains("spec.hybrid.ssm.activationId")
                && text.contains("aws ssm create-activation"),
            "{text}"
        );

        registrar.fail_next(&[RefusalKind::Invalid]);
        let text = run(&root, &config, None, Some(&registrar), &backups)
            .0
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("spec.hybrid.ssm.activationCode") && text.contains("registration limit"),
            "{text}"
        );
        assert!(hybridlet_sys::ssm_agent::registered_instance(&root).is_none());
    }

    #[test]
    fn no_agent_no_registration_and_dry_runs_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let config = config("ssm.yaml");
        let backups = dir.path().join("backups");
        let registrar = FakeRegistrar::new(dir.path(), MI);
        let text = run(&root, &config, None, Some(&registrar), &backups)
            .0
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("not installed") && text.contains("--credential-provider ssm"),
            "{text}"
        );
        assert!(registrar.calls().is_empty());

        let root = with_agent(dir.path());
        let (who, said) = run(&root, &config, None, None, &backups);
        assert_eq!(who.unwrap().node_name, UNKNOWN_INSTANCE);
        assert!(
            said[0].starts_with("ssm: would register /usr/bin/amazon-ssm-agent"),
            "{said:?}"
        );
        assert!(!dir.path().join("var/lib/amazon").exists());

        // A registration file that is not one: refused, not overwritten.
        let reg = dir.path().join("var/lib/amazon/ssm/registration");
        std::fs::create_dir_all(reg.parent().unwrap()).unwrap();
        std::fs::write(&reg, "garbage").unwrap();
        let text = run(&root, &config, None, Some(&registrar), &backups)
            .0
            .unwrap_err()
            .to_string();
        assert!(text.contains("holds no managed instance ID"), "{text}");
        assert_eq!(std::fs::read_to_string(&reg).unwrap(), "garbage");
    }

    #[test]
    fn an_agent_that_never_writes_credentials_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = with_agent(dir.path());
        let reg = dir.path().join("var/lib/amazon/ssm/registration");
        std::fs::create_dir_all(reg.parent().unwrap()).unwrap();
        std::fs::write(
            &reg,
            format!(r#"{{"ManagedInstanceID":"{MI}","Region":"us-west-2"}}"#),
        )
        .unwrap();
        let sm = FakeServiceManager::with_units(&[UNIT]);
        let config = config("ssm.yaml");
        let err = run(&root, &config, Some(&sm), None, &dir.path().join("b"))
            .0
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/root/.aws/credentials")
                && text.contains("journalctl -u amazon-ssm-agent.service"),
            "{text}"
        );
        // It was not running: init started it.
        assert!(
            sm.calls()
                .contains(&"restart amazon-ssm-agent.service".to_string())
        );
    }

    /// Deregistration against the stand-in, with short pauses.
    fn deregistering<'a>(root: &'a HostRoot, fake: &FakeSsm) -> Deregister<'a> {
        Deregister {
            root,
            region: "us-west-2",
            endpoint: Some(fake.endpoint.clone()),
            timeout: Duration::from_secs(5),
            attempts: 3,
            pause: Duration::from_millis(10),
        }
    }

    fn registered_root(dir: &Path) -> HostRoot {
        let root = with_agent(dir);
        FakeRegistrar::new(dir, MI)
            .register(
                &Activation {
                    region: "us-west-2".into(),
                    id: "x".into(),
                    code: "y".into(),
                },
                &[],
            )
            .unwrap();
        std::fs::create_dir_all(dir.join("var/lib/amazon/ssm/Vault/Store")).unwrap();
        std::fs::write(
            dir.join("var/lib/amazon/ssm/Vault/Store/RegistrationKey"),
            "k",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("eks-hybrid")).unwrap();
        std::os::unix::fs::symlink("/root/.aws", dir.join("eks-hybrid/.aws")).unwrap();
        root
    }

    #[test]
    fn uninstall_deregisters_then_forgets_the_registration() {
        let dir = tempfile::tempdir().unwrap();
        let root = registered_root(dir.path());
        let fake = FakeSsm::start();
        fake.add_instance(MI, "Online");
        fake.fail_next(&[(400, "ThrottlingException")]);
        let d = deregistering(&root, &fake);
        let mut said = Vec::new();
        assert_eq!(
            deregister(&crate::Context::for_tests(dir.path()), &d, &mut |l| said
                .push(l))
            .unwrap()
            .as_deref(),
            Some(MI)
        );
        assert!(!fake.knows(MI));
        assert!(said.iter().any(|l| l.contains("retrying")), "{said:?}");
        // Again: SSM no longer knows it, which is fine.
        assert!(
            deregister(&crate::Context::for_tests(dir.path()), &d, &mut |l| said
                .push(l))
            .is_ok()
        );
        assert!(
            said.last().unwrap().contains("already deregistered"),
            "{said:?}"
        );

        let sm = FakeServiceManager::with_units(&[UNIT]);
        forget_registration(&root, Some(&sm), &mut |l| said.push(l)).unwrap();
        assert_eq!(
            sm.calls(),
            [
                "stop amazon-ssm-agent.service",
                "disable amazon-ssm-agent.service"
            ]
        );
        for gone in [
            "var/lib/amazon/ssm/registration",
            "root/.aws/credentials",
            "var/lib/amazon/ssm/Vault",
            "eks-hybrid/.aws",
        ] {
            assert!(
                std::fs::symlink_metadata(dir.path().join(gone)).is_err(),
                "{gone} is still there"
            );
        }
        assert_eq!(
            deregister(&crate::Context::for_tests(dir.path()), &d, &mut |l| said
                .push(l))
            .unwrap(),
            None,
            "nothing registered any more"
        );
    }

    #[test]
    fn a_refused_deregistration_changes_nothing_and_says_how_to_finish() {
        let dir = tempfile::tempdir().unwrap();
        let root = registered_root(dir.path());
        let fake = FakeSsm::start();
        fake.add_instance(MI, "ConnectionLost");
        fake.fail_next(&[(400, "AccessDeniedException")]);
        let d = deregistering(&root, &fake);
        let text = deregister(&crate::Context::for_tests(dir.path()), &d, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(text.contains("AccessDeniedException"), "{text}");
        assert!(
            text.contains(&format!(
                "aws ssm deregister-managed-instance --instance-id {MI}"
            )),
            "{text}"
        );
        assert!(text.contains("--no-deregister"), "{text}");
        assert!(fake.knows(MI));
        assert_eq!(
            hybridlet_sys::ssm_agent::registered_instance(&root).as_deref(),
            Some(MI)
        );
    }
}
