//! Embeds the build's identity for `hybridlet version` and `hybridlet_build_info`: the git
//! commit (or `HYBRIDLET_GIT_COMMIT` when a packager builds outside a checkout) and the
//! build date, taken from `SOURCE_DATE_EPOCH` or else the commit's own date, so that the
//! same commit always builds the same binary (reproducible packages). Outside a checkout
//! and without the variables both are `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (days to civil date: the proleptic
/// Gregorian calendar's standard conversion).
fn utc(epoch: i64) -> String {
    let (days, secs) = (epoch.div_euclid(86_400), epoch.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

fn main() {
    println!("cargo:rerun-if-env-changed=HYBRIDLET_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit changes HEAD or the branch it points to (loose or packed).
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(&["rev-parse", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={p}");
    }

    let commit = std::env::var("HYBRIDLET_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .or_else(|| git(&["show", "-s", "--format=%ct", "HEAD"])?.parse().ok());
    let date = epoch.map_or_else(|| "unknown".into(), utc);
    println!("cargo:rustc-env=HYBRIDLET_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=HYBRIDLET_BUILD_DATE={date}");
}
