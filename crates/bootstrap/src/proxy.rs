//! `spec.proxy` for containerd, the kubelet and the SSM agent: systemd drop-ins, and an
//! environment file (0600) when the URLs carry credentials.

use std::fmt::Write as _;

use hybridlet_config::Config;

use crate::RenderedFile;

/// `spec.proxy` as a drop-in for `unit` (`None` without a proxy).
pub fn proxy_dropin_for(config: &Config, unit: &str) -> Option<RenderedFile> {
    proxy_dropin(config).map(|contents| {
        RenderedFile::new(
            format!("/etc/systemd/system/{unit}.d/http-proxy.conf"),
            0o644,
            contents,
        )
        .owned_by(unit)
    })
}

/// Everything `unit` needs to run behind `spec.proxy`: its drop-in, and the root-only
/// environment file the drop-in points at when the settings cannot be inline.
pub fn proxy_files_for(config: &Config, unit: &str) -> Vec<RenderedFile> {
    let mut files: Vec<RenderedFile> = proxy_dropin_for(config, unit).into_iter().collect();
    if !files.is_empty() {
        files.extend(proxy_env_file(config).map(|f| f.owned_by(unit)));
    }
    files
}

/// `spec.proxy` as environment variables for a program init runs itself.
pub fn proxy_env(config: &Config) -> Vec<(String, String)> {
    let p = &config.agent.proxy;
    let mut env = Vec::new();
    if let Some(v) = &p.http_proxy {
        env.push(("HTTP_PROXY".to_string(), v.clone()));
    }
    if let Some(v) = &p.https_proxy {
        env.push(("HTTPS_PROXY".to_string(), v.clone()));
    }
    if !p.no_proxy.is_empty() {
        env.push(("NO_PROXY".to_string(), p.no_proxy.join(",")));
    }
    env
}

/// Where the proxy settings go when they cannot be inline in a unit (see
/// [`proxy_needs_env_file`]): readable by root only.
pub const PROXY_ENV_FILE: &str = "/etc/hybridlet/proxy.env";

/// A proxy URL with credentials must not sit in a world-readable drop-in (nor show in
/// `systemctl show`), and a `%` (percent-encoded credentials) would be taken as a
/// systemd specifier in `Environment=`; both go to a root-only `EnvironmentFile=`.
pub(crate) fn proxy_needs_env_file(config: &Config) -> bool {
    let p = &config.agent.proxy;
    p.has_credentials()
        || [&p.http_proxy, &p.https_proxy]
            .into_iter()
            .flatten()
            .any(|u| u.contains('%'))
}

/// The root-only environment file for the proxy, when the drop-ins point at one.
pub(crate) fn proxy_env_file(config: &Config) -> Option<RenderedFile> {
    if !proxy_needs_env_file(config) {
        return None;
    }
    let mut contents = String::from(
        "# Written by hybridlet init from spec.proxy (root only: it may hold credentials).\n",
    );
    for (k, v) in proxy_env(config) {
        let _ = writeln!(contents, "{k}={v}");
    }
    Some(RenderedFile::new(PROXY_ENV_FILE, 0o600, contents).secret())
}

pub(crate) fn proxy_dropin(config: &Config) -> Option<String> {
    let p = &config.agent.proxy;
    if p.http_proxy.is_none() && p.https_proxy.is_none() {
        return None;
    }
    if proxy_needs_env_file(config) {
        return Some(format!(
            "# Written by hybridlet init from spec.proxy.\n[Service]\nEnvironmentFile={PROXY_ENV_FILE}\n"
        ));
    }
    let mut out = String::from("# Written by hybridlet init from spec.proxy.\n[Service]\n");
    if let Some(v) = &p.http_proxy {
        let _ = writeln!(out, "Environment=\"HTTP_PROXY={v}\"");
    }
    if let Some(v) = &p.https_proxy {
        let _ = writeln!(out, "Environment=\"HTTPS_PROXY={v}\"");
    }
    if !p.no_proxy.is_empty() {
        let _ = writeln!(out, "Environment=\"NO_PROXY={}\"", p.no_proxy.join(","));
    }
    Some(out)
}
