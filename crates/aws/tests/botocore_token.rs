//! The EKS token against botocore, AWS's own SDK for Python (PyPI): botocore presigns the
//! same STS `GetCallerIdentity` request as `aws eks get-token` does
//! (tests/botocore_presign.py), for the same credentials, region, cluster and time, and
//! our token's URL must equal it parameter for parameter, signature included.
//!
//! botocore comes from the Python environment `.ci/run` installs moto into: the `python`
//! next to `HYBRIDLET_MOTO_SERVER`, or `HYBRIDLET_BOTOCORE_PYTHON`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hybridlet_aws::{Credentials, eks_token};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("HYBRIDLET_BOTOCORE_PYTHON") {
        return p.into();
    }
    match std::env::var("HYBRIDLET_MOTO_SERVER") {
        Ok(moto) => Path::new(&moto).with_file_name("python"),
        Err(_) => "python3".into(),
    }
}

fn botocore_url(region: &str, cluster: &str, creds: [&str; 3], epoch: u64) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/botocore_presign.py");
    let python = python();
    let out = std::process::Command::new(&python)
        .arg(script)
        .args([region, cluster, creds[0], creds[1], creds[2]])
        .arg(epoch.to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): `bash .ci/run` installs botocore (with moto)",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "botocore ({}): {}\n`bash .ci/run` installs botocore (with moto)",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Scheme, host and path, and the query parameters decoded.
fn parts(url: &str) -> (String, BTreeMap<String, String>) {
    let (base, query) = url.split_once('?').unwrap();
    let params = query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (decode(k), decode(v))
        })
        .collect();
    (base.to_string(), params)
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn our_token_is_the_url_botocore_presigns() {
    let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let epoch = 1_796_396_752;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    let cases = [
        // Roles Anywhere / SSM credentials carry a session token (with characters that
        // need escaping); a long-term key does not.
        ("us-west-2", "prod-hybrid", "IQoJb3JpZ2luX2VjE/+=token"),
        ("eu-central-1", "gpu-site-a", ""),
        // Other partitions: the host and the credential scope follow the region.
        ("cn-north-1", "cn-cluster", "FwoGZXIvYXdzEBQaDH"),
        ("us-gov-west-1", "gov-cluster", "x"),
        // A local (Outposts-style) cluster is named by its UUID.
        ("ap-southeast-2", "8b1e7c9a-3f2d-4e5b-9a6c-0d1e2f3a4b5c", ""),
    ];
    for (region, cluster, session) in cases {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            secret,
            (!session.is_empty()).then(|| session.to_string()),
            None,
            "test",
        );
        let token = eks_token(&creds, region, cluster, now).unwrap().token;
        let ours = String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.strip_prefix("k8s-aws-v1.").unwrap())
                .unwrap(),
        )
        .unwrap();
        let theirs = botocore_url(region, cluster, ["AKIDEXAMPLE", secret, session], epoch);
        let (our_base, our_params) = parts(&ours);
        let (their_base, their_params) = parts(&theirs);
        assert_eq!(our_base, their_base, "{region}: endpoint");
        for (k, v) in &their_params {
            assert_eq!(
                our_params.get(k),
                Some(v),
                "{region}/{cluster}: parameter {k}\nours:     {ours}\nbotocore: {theirs}"
            );
        }
        let extra: Vec<_> = our_params
            .keys()
            .filter(|k| !their_params.contains_key(*k))
            .collect();
        assert!(
            extra.is_empty(),
            "{region}: parameters botocore does not send: {extra:?}"
        );
    }
}
