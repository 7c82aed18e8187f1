//! Shared harness for the tests that run the real `hybridlet run`: a daemon under a fresh
//! `--root` with the fake API server as its cluster, its log followed as it is written,
//! its admin server scraped. Each test binary uses part of it.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods // the blocking waits are for synchronous tests
)]

pub mod moto;
pub mod peers;
pub mod registry;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hybridlet_fixtures::apiserver::FakeApiServer;

/// The Accept header Prometheus sends by default (2.x and 3.x scrape loop).
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
use serde_json::json;

/// The node name of the IAM Roles Anywhere fixture configuration.
pub const NODE: &str = "fra1-r12-n07";

/// Keep a `hybridlet` command off AWS and the developer's own AWS settings: HOME is `home`,
/// no credentials or profile from the environment, no instance metadata, and every AWS
/// endpoint a closed loopback port, so an unexpected call fails at once and never leaves
/// the machine. A test that wants AWS sets its own variables after this.
pub fn offline_aws(cmd: &mut Command, home: &Path) {
    cmd.env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1");
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ENDPOINT_URL_EKS",
        "AWS_ENDPOINT_URL_SSM",
        "AWS_ENDPOINT_URL_STS",
    ] {
        cmd.env_remove(k);
    }
}

/// Poll `f` every 20 ms for up to 20 s.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `p` is a Unix socket.
pub fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// The IAM Roles Anywhere fixture (NodeConfig + AgentConfig, node `fra1-r12-n07`) with the
/// admin server on an ephemeral loopback port, for `Daemon::start`'s `config` to edit.
pub fn iam_ra_config() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
    )
    .unwrap()
    .replace(
        "listenAddress: 127.0.0.1:19464",
        "listenAddress: 127.0.0.1:0",
    )
}

/// `hybridlet run --log-format json` under `root` as a child process, its stderr lines
/// collected as they are written: what every daemon test starts from.
pub struct Agent {
    pub child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Start it with `args` after `run` and `envs` (the test's own NOTIFY_SOCKET only if
    /// it passes one).
    pub fn spawn(root: &Path, args: &[String], envs: &[(String, String)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
            .args([
                "--root",
                root.to_str().unwrap(),
                "--log-format",
                "json",
                "run",
            ])
            .args(args)
            .env_remove("HYBRIDLET_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// The log so far, one JSON object per line.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Every log line (as JSON) whose `message` starts with `prefix`, so far.
    pub fn logged(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.log()
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|_| serde_json::json!({ "message": l }))
            })
            .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .collect()
    }

    /// The first log line whose `message` starts with `prefix`, waiting up to 20 s
    /// (blocking: for synchronous tests).
    pub fn wait_log_blocking(&self, prefix: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.logged(prefix).into_iter().next() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no log line {prefix:?}; saw: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin server's `IP:PORT`, from its start-up log line (blocking).
    pub fn admin_address_blocking(&self) -> std::net::SocketAddr {
        self.wait_log_blocking("admin server listening")["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Send the signal `name` (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait up to `limit` for it to exit; the log is complete afterwards.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("did not exit within {limit:?}; log: {:#?}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `hybridlet run` under a fresh `--root`, with the fake API server as its cluster (the
/// kubelet's kubeconfig points at it, and the node object exists).
pub struct Daemon {
    pub api: FakeApiServer,
    pub root: tempfile::TempDir,
    pub kubelet: PathBuf,
    pub agent: Agent,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Daemon {
    /// `fixture` writes the host tree under the root, `config` edits the IAM Roles Anywhere
    /// fixture configuration ([`iam_ra_config`]), `extra_args` come after `run`.
    pub async fn start(
        fixture: impl FnOnce(&Path),
        config: impl FnOnce(String) -> String,
        extra_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Self {
        Self::start_with_env(fixture, config, extra_args, Vec::new()).await
    }

    /// As `start`, with extra environment variables for the daemon.
    pub async fn start_with_env(
        fixture: impl FnOnce(&Path),
        config: impl FnOnce(String) -> String,
        extra_args: impl FnOnce(&Path) -> Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Self {
        Self::start_on(
            FakeApiServer::start().await.unwrap(),
            fixture,
            config,
            extra_args,
            envs,
        )
        .await
    }

    /// As `start_with_env`, with `api` (set up by the test) as the cluster.
    pub async fn start_on(
        api: FakeApiServer,
        fixture: impl FnOnce(&Path),
        config: impl FnOnce(String) -> String,
        extra_args: impl FnOnce(&Path) -> Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Self {
        api.put(
            &format!("/api/v1/nodes/{NODE}"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "uid": "node-uid"}}),
        );
        let root = tempfile::tempdir().unwrap();
        fixture(root.path());
        let kubelet = root.path().join("var/lib/kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        std::fs::write(
            kubelet.join("kubeconfig"),
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\ncurrent-context: k\nusers:\n- name: u\n  user:\n    token: node-token\n", api.url()),
        )
        .unwrap();
        let etc = root.path().join("etc/hybridlet");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("config.yaml"), config(iam_ra_config())).unwrap();
        let args = extra_args(root.path());
        let agent = Agent::spawn(root.path(), &args, &envs);
        Self {
            api,
            root,
            kubelet,
            agent,
            args,
            envs,
        }
    }

    /// The log so far, one JSON object per line.
    pub fn log(&self) -> Vec<String> {
        self.agent.log()
    }

    /// The first log line (as JSON) whose `message` starts with `prefix`, waiting for it.
    pub async fn wait_log(&self, prefix: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(&format!("log line {prefix:?}"), || {
            found = self.log().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(prefix))
                    .then_some(v)
            });
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// Every log line (as JSON) whose `message` starts with `prefix`, so far.
    pub fn logged(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.agent.logged(prefix)
    }

    /// Replace the configuration file (`config` edits the IAM Roles Anywhere fixture).
    pub fn write_config(&self, config: impl FnOnce(String) -> String) {
        std::fs::write(
            self.root.path().join("etc/hybridlet/config.yaml"),
            config(iam_ra_config()),
        )
        .unwrap();
    }

    /// SIGHUP, and the reload's verdict: the next log line about the reload (`configuration
    /// reloaded…` or `configuration reload rejected…`).
    pub async fn reload(&self) -> serde_json::Value {
        let before = self.logged("configuration reload").len();
        Command::new("kill")
            .args(["-HUP", &self.agent.child.id().to_string()])
            .status()
            .unwrap();
        let mut verdict = None;
        wait_until("the reload's verdict", || {
            verdict = self.logged("configuration reload").into_iter().nth(before);
            verdict.is_some()
        })
        .await;
        verdict.unwrap()
    }

    /// The admin server's `IP:PORT`, from its start-up log line.
    pub async fn admin_address(&self) -> String {
        self.wait_log("admin server listening").await["address"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// One `GET /metrics` as Prometheus asks for it (OpenMetrics).
    pub async fn scrape(&self) -> String {
        self.scrape_accepting(PROMETHEUS_ACCEPT).await
    }

    /// `/metrics` fetched with this `Accept` header (empty: none); the body.
    pub async fn scrape_accepting(&self, accept: &'static str) -> String {
        let addr = self.admin_address().await;
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let accept = if accept.is_empty() {
                String::new()
            } else {
                format!("Accept: {accept}\r\n")
            };
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).unwrap();
            buf.split_once("\r\n\r\n").unwrap().1.to_string()
        })
        .await
        .unwrap()
    }

    /// SIGKILL (a crash: no clean-up runs), then start again with the same arguments.
    pub fn crash_and_restart(&mut self) {
        let _ = self.agent.child.kill();
        let _ = self.agent.wait_exit(Duration::from_secs(10));
        self.agent = Agent::spawn(self.root.path(), &self.args, &self.envs);
    }

    /// SIGTERM, wait up to 15 s; the exit status and the whole log.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.agent.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.agent.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = self.agent.wait_exit(Duration::from_secs(1));
        (status, self.log().join("\n"))
    }
}

/// A CDI spec the driver wrote, judged by the CDI specification's rules
/// (`hybridlet_fixtures::cdi`), declaring the oldest version its content allows, with every
/// name the kubelet was given found in it.
pub fn cdi_spec(path: &std::path::Path, ids: &[String]) -> serde_json::Value {
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    hybridlet_fixtures::cdi::validate(&spec)
        .unwrap_or_else(|e| panic!("{}: {e}\n{spec:#}", path.display()));
    // The oldest version its content allows, which consumers built with older CDI
    // libraries (podman 4.3, containerd 1.7.0: 0.5.0 at most) still read.
    assert_eq!(
        spec["cdiVersion"],
        hybridlet_fixtures::cdi::minimum_version(&spec).unwrap(),
        "{}",
        path.display()
    );
    for id in ids {
        assert!(
            hybridlet_fixtures::cdi::resolve(&spec, id).is_some(),
            "{id} is not in {}",
            path.display()
        );
    }
    spec
}
