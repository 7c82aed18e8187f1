//! `hybridlet run` as a real process: signals, readiness, sd_notify, reload, failures.
//! Every test uses its own temporary root and an ephemeral loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::Agent;

const WAIT: Duration = Duration::from_secs(20);

/// `hybridlet run` under `root` with extra environment variables.
fn start(root: &Path, env: &[(&str, &str)]) -> Agent {
    let envs: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Agent::spawn(root, &[], &envs)
}

fn msg(v: &serde_json::Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf[9..12].parse().unwrap();
    (
        code,
        buf.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

fn write_config(root: &Path, body: &str) {
    let dir = root.join("etc/hybridlet");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.yaml"), body).unwrap();
}

const AGENT: &str = "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  admin:\n    listenAddress: 127.0.0.1:0\n  shutdownGracePeriod: 5s\n";

#[test]
fn steady_state_sigterm_exits_0_and_serves_metrics_until_then() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), AGENT);
    let mut d = start(root.path(), &[]);
    let addr = d.admin_address_blocking();
    d.wait_log_blocking("ready");
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "hybridlet_build_info{version=\"",
        "hybridlet_uptime_seconds ",
        "hybridlet_subsystem_up{subsystem=\"admin\"} 1",
        "hybridlet_subsystem_ready{subsystem=\"admin\"} 1",
        "hybridlet_config_info{mode=\"standalone\"} 1",
        "hybridlet_ready 1",
    ] {
        assert!(body.contains(needle), "missing {needle:?}:\n{body}");
    }
    assert_eq!(
        http_get(addr, "/readyz"),
        (200, "admin: ready\ndevices: ready\n".to_string())
    );
    assert_eq!(http_get(addr, "/healthz").0, 200);
    let state = root.path().join("var/lib/hybridlet");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let asked = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(5 + 5));
    assert_eq!(status.code(), Some(0), "log: {:#?}", d.log());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    d.wait_log_blocking("stopped cleanly");
}

#[test]
fn sigterm_during_startup_exits_0() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), AGENT);
    let mut d = start(root.path(), &[("HYBRIDLET_STARTUP_DELAY", "120s")]);
    let addr = d.admin_address_blocking();
    let (code, body) = http_get(addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("admin: not ready (starting)"), "{body}");
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(5 + 5));
    assert_eq!(status.code(), Some(0), "log: {:#?}", d.log());
    assert!(
        d.logged("").iter().all(|v| msg(v) != "ready"),
        "became ready: {:#?}",
        d.log()
    );
}

#[test]
fn sigint_is_a_clean_stop_too() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), AGENT);
    let mut d = start(root.path(), &[]);
    d.wait_log_blocking("ready");
    d.signal("INT");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), AGENT);
    let sock_path = root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut d = start(
        root.path(),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut recv_until = |needle: &str, got: &mut Vec<String>| {
        let deadline = Instant::now() + WAIT;
        while !got.iter().any(|m: &String| m.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no {needle} within {WAIT:?}; got {got:?}"
            );
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {needle}: {e}; got {got:?}"));
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    recv_until("READY=1", &mut got);
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains("STATUS=standalone; 0 GPUs, 0 SR-IOV PFs, 0 VFs; 2/2 subsystems ready"),
        "{ready}"
    );
    recv_until("WATCHDOG=1", &mut got);
    d.signal("TERM");
    recv_until("STOPPING=1", &mut got);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_failing_subsystem_stops_the_process_with_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let root = tempfile::tempdir().unwrap();
    write_config(
        root.path(),
        &AGENT.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    );
    let mut d = start(root.path(), &[]);
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let all: String = d.logged("").iter().map(|v| format!("{v}\n")).collect();
    assert!(all.contains("spec.admin.listenAddress"), "{all}");
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), AGENT);
    let mut d = start(root.path(), &[]);
    let addr = d.admin_address_blocking();
    d.wait_log_blocking("ready");

    write_config(root.path(), &format!("{AGENT}  bogusField: 1\n"));
    d.signal("HUP");
    let line = d.wait_log_blocking("configuration reload rejected");
    assert!(msg(&line).contains("spec.bogusField"), "{line}");
    assert_eq!(http_get(addr, "/readyz").0, 200);
    let (_, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.contains("hybridlet_config_reloads_total{result=\"invalid\"} 1"),
        "{metrics}"
    );

    write_config(root.path(), &AGENT.replace("5s", "7s"));
    d.signal("HUP");
    let line = d.wait_log_blocking("configuration reloaded");
    assert_eq!(
        line["applied"], "spec.shutdownGracePeriod applied",
        "{line}"
    );

    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn vf_provisioning_at_startup_and_its_failure() {
    let root = tempfile::tempdir().unwrap();
    hybridlet_fixtures::e810_server(root.path()).unwrap();
    // Already at 64: a no-op, then ready.
    write_config(
        root.path(),
        &format!(
            "{AGENT}  sriov:\n    physicalFunctions:\n      - {{interface: ens2f0, numVfs: 64}}\n"
        ),
    );
    let mut d = start(root.path(), &[]);
    let line = d.wait_log_blocking("SR-IOV VFs already as configured");
    assert_eq!(line["pf"], "0000:81:00.0");
    d.wait_log_blocking("ready");
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));

    // More than the PF supports: start-up fails naming the entry and the limit.
    write_config(
        root.path(),
        &format!(
            "{AGENT}  sriov:\n    physicalFunctions:\n      - {{pciAddress: \"0000:81:00.0\", numVfs: 500}}\n"
        ),
    );
    let mut d = start(root.path(), &[]);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(1));
    let all: String = d.logged("").iter().map(|v| format!("{v}\n")).collect();
    assert!(
        all.contains("spec.sriov.physicalFunctions[0] (0000:81:00.0)"),
        "{all}"
    );
    assert!(all.contains("at most 128 VFs"), "{all}");
}
