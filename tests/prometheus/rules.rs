//! What promtool (Debian `prometheus`) says of the shipped alert and recording rules:
//! `check rules`
//! (syntax, PromQL, templates) and `test rules` on tests/prometheus/alerts.test.yaml, the
//! alerts' unit tests. Every alert must have a case there in which it fires with its
//! labels and annotations; the same cases fix when it must not fire (promtool compares the
//! whole set of firing alerts of that name at each evaluation time).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): `bash .ci/run` installs it (Debian package `prometheus`)")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {said}");
    said
}

fn yaml(path: &Path) -> serde_json::Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn promtool_checks_the_rules() {
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/bursting/recording-rules.yaml",
    ] {
        let said = promtool(&["check", "rules", file], &repo());
        assert!(said.contains("SUCCESS"), "{file}: {said}");
    }
}

/// The burst decision of deploy/bursting (on-prem first, EC2 when full, cloud first on the
/// way down) on a day of the agents' series: tests/prometheus/bursting.test.yaml.
#[test]
fn the_burst_decision_passes_its_unit_tests() {
    let said = promtool(
        &["test", "rules", "bursting.test.yaml"],
        &repo().join("tests/prometheus"),
    );
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn every_alert_passes_its_unit_tests() {
    let dir = repo().join("tests/prometheus");
    let said = promtool(&["test", "rules", "alerts.test.yaml"], &dir);
    assert!(said.contains("SUCCESS"), "{said}");

    let rules = yaml(&repo().join("deploy/prometheus/alerts.yaml"));
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    let tests = yaml(&dir.join("alerts.test.yaml"));
    let mut firing = BTreeSet::new();
    for case in tests["tests"].as_array().unwrap() {
        for t in case["alert_rule_test"].as_array().unwrap() {
            let fired = t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            if fired {
                firing.insert(t["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    let untested: Vec<_> = alerts.difference(&firing).collect();
    assert!(
        untested.is_empty(),
        "alerts without a case in which they fire: {untested:?}"
    );
    let unknown: Vec<_> = firing.difference(&alerts).collect();
    assert!(
        unknown.is_empty(),
        "tests for alerts that do not exist: {unknown:?}"
    );
}
