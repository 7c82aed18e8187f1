//! `cargo bench -p hybridlet --bench join`: the join commands as an operator runs them,
//! each a fresh `hybridlet` process (release build), so the figures include process
//! start, configuration load and every file read and written:
//!
//! 1. `hybridlet init --no-start` with the cluster in the configuration (no AWS call) on
//!    a host where the artifacts are installed: the first join (11 files written
//!    atomically with backups) and reruns (everything compared, nothing written);
//! 2. a full `hybridlet check` against loopback peers: the API server (TLS with the
//!    cluster CA, `Date` for the clock), the IAM Roles Anywhere endpoint (TLS with the
//!    system roots, here the test CA through SSL_CERT_FILE) and STS GetCallerIdentity
//!    (an answering stand-in), plus the kernel checks.
//!
//! Best of 5 rounds of 20 runs each; results in docs/benchmarks.md.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 20;
const ROUNDS: usize = 5;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn hybridlet(root: &Path, args: &[&str], env: &[(&str, String)]) -> Duration {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
    cmd.arg("--root").arg(root).args(args);
    for k in ["AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SESSION_TOKEN"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("run hybridlet");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "hybridlet {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn report(what: &str, mut rounds: Vec<Vec<Duration>>) {
    for r in &mut rounds {
        r.sort();
    }
    rounds.sort_by_key(|r| pct(r, 0.5));
    let best = &rounds[0];
    println!(
        "{what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} runs, best of {} rounds)",
        pct(best, 0.5).as_secs_f64() * 1e3,
        pct(best, 0.99).as_secs_f64() * 1e3,
        best.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        best.len(),
        rounds.len()
    );
}

/// The fixture NodeConfig (IAM Roles Anywhere, cluster fields set) with the API server
/// moved to `endpoint` and its CA to `ca_pem`, and no proxy (the peers are on loopback).
fn config(dir: &Path, endpoint: &str, ca_pem: &[u8]) -> PathBuf {
    use base64::Engine as _;
    let text = std::fs::read_to_string(
        manifest_dir().join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml"),
    )
    .expect("fixture");
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("apiServerEndpoint:") {
            out.push_str(&format!("    apiServerEndpoint: {endpoint}\n"));
        } else if t.starts_with("certificateAuthority:") {
            out.push_str(&format!(
                "    certificateAuthority: {}\n",
                base64::engine::general_purpose::STANDARD.encode(ca_pem)
            ));
        } else if t.starts_with("proxy:")
            || t.starts_with("httpsProxy:")
            || t.starts_with("noProxy:")
        {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    // The cluster's remote networks in the configuration: init and check judge the node
    // against them without asking EKS (no AWS call at all).
    out.push_str("  remoteNetworks:\n    nodeCidrs: [10.80.0.0/16]\n");
    let path = dir.join("config.yaml");
    std::fs::write(&path, out).expect("write config");
    path
}

fn tls_fixture(name: &str) -> PathBuf {
    manifest_dir().join("../metrics/tests/fixtures").join(name)
}

/// A TLS peer answering every request with 401 and the current `Date`.
fn tls_peer(rt: &tokio::runtime::Runtime) -> String {
    let config = hybridlet_metrics::tls_config(&tls_fixture("cert.pem"), &tls_fixture("key.pem"))
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 401 Unauthorized\r\nDate: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    httpdate::fmt_http_date(std::time::SystemTime::now())
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    format!("https://127.0.0.1:{port}")
}

/// STS on plain HTTP answering GetCallerIdentity as the service does.
fn sts_peer() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = vec![0u8; 16384];
            let _ = s.read(&mut buf);
            let body = "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><GetCallerIdentityResult><Arn>arn:aws:sts::111122223333:assumed-role/AmazonEKSHybridNodesRole/fra1-r12-n07</Arn><UserId>AROAEXAMPLE:fra1-r12-n07</UserId><Account>111122223333</Account></GetCallerIdentityResult><ResponseMetadata><RequestId>b</RequestId></ResponseMetadata></GetCallerIdentityResponse>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ca = std::fs::read(tls_fixture("cert.pem")).expect("ca");
    let api = tls_peer(&rt);
    let rolesanywhere = tls_peer(&rt);
    let sts = sts_peer();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &api, &ca);
    let cfg = cfg.to_str().expect("utf-8 path");

    // 1. init: the first join on a fresh root, then reruns on it.
    let mut first = Vec::new();
    let mut again = Vec::new();
    for _ in 0..ROUNDS {
        let mut f = Vec::new();
        let mut a = Vec::new();
        for _ in 0..RUNS {
            let root = tempfile::tempdir().expect("root");
            // What `install` leaves: the kubelet and its unit.
            std::fs::create_dir_all(root.path().join("usr/bin")).expect("mkdir");
            std::fs::write(root.path().join("usr/bin/kubelet"), b"kubelet").expect("kubelet");
            hybridlet_fixtures::place_iam_ra_pki(root.path(), "fra1-r12-n07").expect("pki");
            f.push(hybridlet(
                root.path(),
                &["init", "--no-start", "--config", cfg],
                &[],
            ));
            a.push(hybridlet(
                root.path(),
                &["init", "--no-start", "--config", cfg],
                &[],
            ));
        }
        first.push(f);
        again.push(a);
    }
    report("init --no-start, first join (every file written)", first);
    report("init --no-start, rerun (nothing to write)", again);

    // 2. a full check against the loopback peers.
    let root = tempfile::tempdir().expect("root");
    let env = [
        ("AWS_ENDPOINT_URL_STS", sts.clone()),
        ("AWS_ENDPOINT_URL_ROLESANYWHERE", rolesanywhere.clone()),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
        (
            "SSL_CERT_FILE",
            tls_fixture("cert.pem").display().to_string(),
        ),
    ];
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let mut r = Vec::new();
        for _ in 0..RUNS {
            // Host checks may fail on this machine (swap, modules); the timing is what
            // matters, so judge only that the network checks ran.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridlet"));
            cmd.arg("--root")
                .arg(root.path())
                .args(["check", "-o", "json", "--config", cfg]);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            let started = Instant::now();
            let out = cmd.output().expect("run check");
            r.push(started.elapsed());
            let text = String::from_utf8_lossy(&out.stdout);
            for want in [
                "\"API server\"",
                "\"IAM Roles Anywhere endpoint\"",
                "\"AWS credentials\"",
            ] {
                assert!(text.contains(want), "check did not run {want}: {text}");
            }
            assert!(
                !text.contains("\"status\":\"fail\",\"check\":\"AWS credentials\"")
                    && text.contains("STS says this node is arn:aws:sts::111122223333"),
                "credentials check: {text}"
            );
        }
        rounds.push(r);
    }
    report(
        "check, full run (API server TLS + clock, Roles Anywhere endpoint TLS, STS GetCallerIdentity, kernel)",
        rounds,
    );
}
