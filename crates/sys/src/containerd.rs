//! containerd's programs on the host: which version is installed (`containerd --version`),
//! what configuration it really reads (`containerd -c FILE config dump`: a key the
//! installed version does not know is dropped there, silently), and importing an image
//! archive into the CRI plugin's namespace (`ctr images import`) for sites no registry
//! reaches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::HostRoot;
use crate::process::run_with_deadline;

/// Where distributions and containerd's release tarball put the programs.
const DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin"];

/// The path of `program` (`containerd`, `ctr`) under `root`, if installed.
pub fn find(root: &HostRoot, program: &str) -> Option<PathBuf> {
    DIRS.iter().find_map(|dir| {
        let path = root.resolve(format!("{dir}/{program}")).ok()?;
        path.is_file().then_some(path)
    })
}

fn run(mut cmd: Command, what: &str, timeout: Duration) -> Result<String, String> {
    cmd.env("LC_ALL", "C");
    match run_with_deadline(cmd, timeout) {
        Ok(Some(out)) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Some(out)) => Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(None) => Err(format!("{what} did not finish within {timeout:?}")),
        Err(e) => Err(format!("{what} could not run: {e}")),
    }
}

/// `containerd --version`: `containerd github.com/containerd/containerd 1.6.20~ds1 …`.
pub fn version(program: &Path) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.arg("--version");
    run(cmd, "containerd --version", Duration::from_secs(10)).map(|s| s.trim().to_string())
}

/// `containerd -c CONFIG config dump`: the configuration as the installed containerd
/// reads it, defaults filled in and unknown keys gone.
pub fn config_dump(program: &Path, config: &Path) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.arg("-c").arg(config).args(["config", "dump"]);
    run(cmd, "containerd config dump", Duration::from_secs(20))
}

/// `ctr --address SOCKET -n k8s.io images import FILE`; the image names it unpacked.
pub fn import(
    ctr: &Path,
    socket: &Path,
    archive: &Path,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let mut cmd = Command::new(ctr);
    cmd.arg("--address")
        .arg(socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(archive);
    let out = run(cmd, "ctr images import", timeout)?;
    // `unpacking docker.io/library/busybox:1 (sha256:…)...done`
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("unpacking "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}
