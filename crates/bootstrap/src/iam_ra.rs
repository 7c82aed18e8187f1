//! IAM Roles Anywhere: the AWS config whose `credential_process` runs the signing helper,
//! and the unit that keeps the pods' credentials file fresh.

use std::fmt::Write as _;

use hybridlet_config::IamRolesAnywhereOptions;

/// Where `install` puts the IAM Roles Anywhere signing helper.
pub const SIGNING_HELPER: &str = "/usr/local/bin/aws_signing_helper";
/// The unit that keeps `/eks-hybrid/.aws/credentials` fresh for pods
/// (`spec.hybrid.enableCredentialsFile` with IAM Roles Anywhere).
pub const SIGNING_HELPER_UPDATE_UNIT: &str = "aws_signing_helper_update.service";
/// The credentials file pods may mount (`spec.hybrid.enableCredentialsFile`).
pub const POD_CREDENTIALS_FILE: &str = "/eks-hybrid/.aws/credentials";

/// A word for `sh -c` (the SDKs run `credential_process` through the shell) and for
/// systemd's ExecStart: bare when it is made of safe characters, else single-quoted.
pub(crate) fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r#"'\''"#))
    }
}

/// The signing helper's arguments for `mode` (`credential-process` or `update`).
pub(crate) fn signing_helper_args(
    ra: &IamRolesAnywhereOptions,
    mode: &str,
    with_proxy: bool,
) -> String {
    let mut words = vec![
        SIGNING_HELPER.to_string(),
        mode.to_string(),
        "--certificate".into(),
        ra.certificate_path.clone(),
        "--private-key".into(),
        ra.private_key_path.clone(),
        "--trust-anchor-arn".into(),
        ra.trust_anchor_arn.clone(),
        "--profile-arn".into(),
        ra.profile_arn.clone(),
        "--role-arn".into(),
        ra.role_arn.clone(),
        // The session name is the node's Kubernetes user (system:node:<name>).
        "--role-session-name".into(),
        ra.node_name.clone(),
    ];
    if with_proxy {
        words.push("--with-proxy".into());
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The AWS config file whose `credential_process` runs the signing helper: `default`
/// for everything that runs as root, `hybrid` for tools written for nodeadm.
pub(crate) fn iam_ra_aws_config(
    ra: &IamRolesAnywhereOptions,
    region: &str,
    with_proxy: bool,
) -> String {
    let process = signing_helper_args(ra, "credential-process", with_proxy);
    let mut out = String::from("# Written by hybridlet init from spec.hybrid.iamRolesAnywhere.\n");
    for profile in ["default", "profile hybrid"] {
        let _ = write!(
            out,
            "[{profile}]\nregion = {region}\ncredential_process = {process}\n\n"
        );
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// The refresher for pods' credentials file (nodeadm's unit of the same name).
pub(crate) fn signing_helper_update_unit(
    ra: &IamRolesAnywhereOptions,
    region: &str,
    with_proxy: bool,
) -> String {
    format!(
        "# Written by hybridlet init (spec.hybrid.enableCredentialsFile).\n[Unit]\nDescription=Keep {POD_CREDENTIALS_FILE} fresh with IAM Roles Anywhere\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nEnvironment=AWS_SHARED_CREDENTIALS_FILE={POD_CREDENTIALS_FILE}\nEnvironment=AWS_REGION={region}\nExecStart={}\nRestart=always\nRestartSec=10\n\n[Install]\nWantedBy=multi-user.target\n",
        signing_helper_args(ra, "update", with_proxy)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `credential_process` goes through `sh -c`: a path with a space or a quote must stay
    /// one word and must not run anything.
    #[test]
    fn signing_helper_words_survive_the_shell() {
        assert_eq!(
            shell_word("/etc/iam/pki/server.pem"),
            "/etc/iam/pki/server.pem"
        );
        assert_eq!(shell_word("/etc/my pki/a.pem"), "'/etc/my pki/a.pem'");
        assert_eq!(shell_word("x';reboot;'"), r#"'x'\'';reboot;'\'''"#);
        assert_eq!(shell_word(""), "''");
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf '%s|' {}", shell_word("a b'c;$(id)"))])
            .output();
        if let Ok(out) = out {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "a b'c;$(id)|");
        }
    }
}
