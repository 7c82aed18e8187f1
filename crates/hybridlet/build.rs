//! Embeds the build's identity for `hybridlet version` and `hybridlet_build_info`: the git
//! commit (or `HYBRIDLET_GIT_COMMIT` when a packager builds outside a checkout) and the
//! build date, taken from `SOURCE_DATE_EPOCH` or else the commit's own date, so that the
//! same commit always builds the same binary (reproducible packages). Outside a checkout
//! and without the variables both are `unknown`.

use std::process::Command;

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .env("TZ", "UTC")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn git(args: &[&str]) -> Option<String> {
    run("git", args)
}

const RFC3339: &str = "%Y-%m-%dT%H:%M:%SZ";

fn main() {
    println!("cargo:rerun-if-env-changed=HYBRIDLET_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit changes HEAD or the branch it points to (loose or packed). Only files
    // that exist are named: cargo reruns the script every build for a missing one.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }

    let commit = std::env::var("HYBRIDLET_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => run(
            "date",
            &[
                "-u",
                "-d",
                &format!("@{}", epoch.trim()),
                &format!("+{RFC3339}"),
            ],
        ),
        Err(_) => git(&[
            "show",
            "-s",
            &format!("--date=format-local:{RFC3339}"),
            "--format=%cd",
            "HEAD",
        ]),
    }
    .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HYBRIDLET_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=HYBRIDLET_BUILD_DATE={date}");
}
