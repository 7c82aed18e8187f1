//! Running host programs with a deadline. A helper that hangs (mount.nfs on a dead
//! server, systemctl waiting on a stuck unit) is killed together with everything it
//! started, so nothing is left behind.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run a command in its own process group; kill the whole group at the deadline.
/// `Ok(None)` means the deadline passed.
pub fn run_with_deadline(
    mut cmd: Command,
    timeout: Duration,
) -> io::Result<Option<std::process::Output>> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output().map(Some);
        }
        if started.elapsed() >= timeout {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        // A blocking helper on a blocking thread: short naps keep latency low.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(5));
    }
}
