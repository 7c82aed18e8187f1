//! Root tier: the rpm arm of `SystemPackages` with the real rpm(8) (Debian's `rpm`, which
//! `.ci/run` installs), on a package rpmbuild makes here, installed into a scratch root
//! (`rpm --root`, which chroots: root only) so the host's rpm database is never touched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hybridlet_sys::packages::{PackageFormat, PackageManager, SystemPackages};

/// A noarch package `hybridlet-peer-test` with one file, `/opt/hybridlet-peer-test/file`.
fn build_rpm(dir: &Path, version: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let spec = dir.join("test.spec");
    std::fs::write(
        &spec,
        format!(
            "Name: hybridlet-peer-test\nVersion: {version}\nRelease: 1\nSummary: a test package\nLicense: Apache-2.0\nBuildArch: noarch\n%description\nA test package.\n%install\nmkdir -p %{{buildroot}}/opt/hybridlet-peer-test\necho {version} > %{{buildroot}}/opt/hybridlet-peer-test/file\n%files\n/opt/hybridlet-peer-test/file\n"
        ),
    )
    .unwrap();
    let top = dir.join("rpmbuild");
    let out = Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .args(["--quiet", "-bb"])
        .arg(&spec)
        .output()
        .expect("rpmbuild (Debian package rpm) is needed for this tier");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    top.join(format!(
        "RPMS/noarch/hybridlet-peer-test-{version}-1.noarch.rpm"
    ))
}

#[test]
#[ignore = "root tier: rpm --root chroots; run with --run-ignored only"]
fn the_rpm_arm_installs_upgrades_and_removes_with_the_real_rpm() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the root tier needs root (rpm --root chroots)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let ok = Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .arg("--initdb")
        .status()
        .unwrap();
    assert!(ok.success());
    // rpm itself, confined to the scratch root: SystemPackages runs it as it would run
    // /usr/bin/rpm, arguments unchanged.
    let wrapper = dir.path().join("rpm");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec rpm --root '{}' \"$@\"\n", root.display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let packages =
        SystemPackages::with_program(PackageFormat::Rpm, &wrapper, Duration::from_secs(60));
    let file = root.join("opt/hybridlet-peer-test/file");

    // Removing what is not installed is success.
    packages.remove("hybridlet-peer-test").unwrap();
    let v1 = build_rpm(&dir.path().join("v1"), "1.0");
    packages.install_file(&v1).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1.0\n");
    // Again (the same version): --replacepkgs makes it a success, not "already installed".
    packages.install_file(&v1).unwrap();
    let v2 = build_rpm(&dir.path().join("v2"), "2.0");
    packages.install_file(&v2).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "2.0\n");
    packages.remove("hybridlet-peer-test").unwrap();
    assert!(!file.exists());
    // A file that is not a package: rpm's own words, and the command.
    std::fs::write(dir.path().join("bad.rpm"), "not a package").unwrap();
    let e = packages
        .install_file(&dir.path().join("bad.rpm"))
        .unwrap_err();
    assert!(e.to_string().contains("bad.rpm"), "{e}");
}
