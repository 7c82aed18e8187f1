//! The dependency graph in Cargo.lock keeps one TLS stack and no banned crates. (cargo-deny
//! enforces licences and bans in CI too; this test keeps the TLS invariant visible in the
//! ordinary test run.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::collections::BTreeMap;
use std::path::Path;

fn lock_packages() -> BTreeMap<String, Vec<String>> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .expect("Cargo.lock is committed");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ")
            && let Some(n) = name.take()
        {
            out.entry(n)
                .or_default()
                .push(v.trim_matches('"').to_string());
        }
    }
    out
}

#[test]
fn one_tls_stack() {
    let pkgs = lock_packages();
    for banned in [
        "aws-lc-rs",
        "aws-lc-sys",
        "aws-lc-fips-sys",
        "openssl",
        "openssl-sys",
        "native-tls",
        "s2n-tls",
    ] {
        assert!(
            !pkgs.contains_key(banned),
            "{banned} is in Cargo.lock: a second TLS/crypto stack"
        );
    }
    for single in ["rustls", "hyper", "hyper-rustls", "tokio-rustls", "ring"] {
        let versions = pkgs.get(single).cloned().unwrap_or_default();
        assert_eq!(
            versions.len(),
            1,
            "{single} must appear exactly once, found {versions:?}"
        );
    }
    assert!(
        pkgs["rustls"][0].starts_with("0.23."),
        "rustls {:?}",
        pkgs["rustls"]
    );
    assert!(
        pkgs["hyper"][0].starts_with("1."),
        "hyper {:?}",
        pkgs["hyper"]
    );
}

#[test]
fn banned_yaml_crates_are_absent() {
    let pkgs = lock_packages();
    for banned in ["serde_yaml", "serde_yml", "libyml"] {
        assert!(
            !pkgs.contains_key(banned),
            "{banned} is archived or unsound; use serde-saphyr"
        );
    }
}
