//! containerd: its `config.toml` and one `hosts.toml` per registry mirror, through the
//! TOML serializer.

use hybridlet_config::{Config, RegistryMirror};

use crate::{CONTAINERD_UNIT, ContainerdTarget, RenderedFile};

/// A TOML document, serialized (keys in the order they were inserted) after `header`
/// comment lines. Values are quoted and escaped by the serializer, never by hand.
pub(crate) fn toml_document(header: &str, doc: &toml::Table) -> String {
    // A Table of strings, arrays and tables always serializes.
    format!("{header}{}", toml::to_string(doc).unwrap_or_default())
}

/// `key = value` pairs as a table, in this order.
pub(crate) fn table<const N: usize>(pairs: [(&str, toml::Value); N]) -> toml::Value {
    toml::Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

pub(crate) fn strings(values: &[&str]) -> toml::Value {
    toml::Value::Array(values.iter().map(|v| toml::Value::from(*v)).collect())
}

/// containerd's `config.toml` in the version the installed containerd reads natively.
pub(crate) fn containerd_config(target: &ContainerdTarget) -> String {
    use toml::Value;
    let runc = table([
        ("runtime_type", "io.containerd.runc.v2".into()),
        ("options", table([("SystemdCgroup", true.into())])),
    ]);
    let registry = table([(
        "config_path",
        "/etc/containerd/certs.d:/etc/docker/certs.d".into(),
    )]);
    let cni = table([
        ("bin_dir", "/opt/cni/bin".into()),
        ("conf_dir", "/etc/cni/net.d".into()),
    ]);
    let cdi_dirs = strings(&["/etc/cdi", "/var/run/cdi"]);
    let plugins = if target.config_version >= 3 {
        // containerd 2.x: images and runtime are two CRI plugins.
        let images = table([
            ("discard_unpacked_layers", true.into()),
            (
                "pinned_images",
                table([("sandbox", target.sandbox_image.as_str().into())]),
            ),
            ("registry", registry),
        ]);
        let runtime = table([
            ("enable_cdi", true.into()),
            ("cdi_spec_dirs", cdi_dirs),
            (
                "containerd",
                table([
                    ("default_runtime_name", "runc".into()),
                    ("runtimes", table([("runc", runc)])),
                ]),
            ),
            ("cni", cni),
        ]);
        table([
            ("io.containerd.cri.v1.images", images),
            ("io.containerd.cri.v1.runtime", runtime),
        ])
    } else {
        let cri = table([
            ("sandbox_image", target.sandbox_image.as_str().into()),
            ("enable_cdi", true.into()),
            ("cdi_spec_dirs", cdi_dirs),
            ("registry", registry),
            (
                "containerd",
                table([
                    ("default_runtime_name", "runc".into()),
                    ("discard_unpacked_layers", true.into()),
                    ("runtimes", table([("runc", runc)])),
                ]),
            ),
            ("cni", cni),
        ]);
        table([("io.containerd.grpc.v1.cri", cri)])
    };
    let Value::Table(doc) = table([
        ("version", Value::Integer(i64::from(target.config_version))),
        ("root", "/var/lib/containerd".into()),
        ("state", "/run/containerd".into()),
        ("imports", strings(&["/etc/containerd/config.d/*.toml"])),
        (
            "grpc",
            table([("address", "/run/containerd/containerd.sock".into())]),
        ),
        ("plugins", plugins),
    ]) else {
        return String::new();
    };
    toml_document(
        "# Written by hybridlet init. Local additions belong in /etc/containerd/config.d/*.toml.\n\
         # CDI is on: DRA drivers hand devices to containers as CDI specs. Registry mirrors\n\
         # live in /etc/containerd/certs.d/<registry>/hosts.toml.\n",
        &doc,
    )
}

/// The first line of every `hosts.toml` hybridlet writes: a file without it is the
/// operator's own, and is never replaced or removed by a reload.
pub const MIRROR_MARKER: &str = "# Written by hybridlet init from spec.registryMirrors.";

/// Where containerd reads the mirrors of `registry` (a host, `HOST:PORT` or `_default`).
pub fn hosts_toml_path(registry: &str) -> String {
    format!("/etc/containerd/certs.d/{registry}/hosts.toml")
}

/// One `hosts.toml` per `spec.registryMirrors` entry. containerd reads these at each pull
/// (its `config_path`), so changing them needs no restart; the owner is named for `init`,
/// which restarts containerd with the rest of its files.
pub fn registry_mirror_files(config: &Config) -> Vec<RenderedFile> {
    config
        .agent
        .registry_mirrors
        .iter()
        .map(|mirror| {
            RenderedFile::new(hosts_toml_path(&mirror.registry), 0o644, hosts_toml(mirror))
                .owned_by(CONTAINERD_UNIT)
        })
        .collect()
}

pub(crate) fn hosts_toml(mirror: &RegistryMirror) -> String {
    let upstream = match mirror.registry.as_str() {
        "docker.io" => Some("https://registry-1.docker.io".to_string()),
        "_default" => None,
        other => Some(format!("https://{other}")),
    };
    let mut doc = toml::Table::new();
    if let Some(upstream) = upstream {
        // The upstream stays the fallback when every mirror fails.
        doc.insert("server".into(), upstream.into());
    }
    // containerd tries the hosts in the order they appear: the table keeps it.
    let mut hosts = toml::Table::new();
    for endpoint in &mirror.endpoints {
        let mut host = toml::Table::new();
        host.insert("capabilities".into(), strings(&["pull", "resolve"]));
        if let Some(ca) = &mirror.ca_file {
            host.insert("ca".into(), ca.as_str().into());
        }
        if mirror.skip_verify {
            host.insert("skip_verify".into(), true.into());
        }
        if mirror.override_path {
            host.insert("override_path".into(), true.into());
        }
        hosts.insert(endpoint.clone(), toml::Value::Table(host));
    }
    doc.insert("host".into(), toml::Value::Table(hosts));
    toml_document(&format!("{MIRROR_MARKER}\n"), &doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values TOML must escape (a quote, a backslash, a non-ASCII character, a control
    /// character) come back as written, and the endpoints keep their order (containerd
    /// tries them in file order). Rust's `{:?}` quoting, used before, wrote `\u{1f600}`,
    /// which is not TOML.
    #[test]
    fn hosts_toml_is_toml_whatever_the_values() {
        let mirror = RegistryMirror {
            registry: "registry.example.internal:5000".into(),
            endpoints: vec![
                "https://z.example.internal/v2/\"quoted\"".into(),
                "https://a.example.internal/😀".into(),
            ],
            ca_file: Some("/etc/ssl/ca\\dir/ca\t😀.pem".into()),
            skip_verify: true,
            override_path: false,
        };
        let text = hosts_toml(&mirror);
        let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            doc["server"].as_str(),
            Some("https://registry.example.internal:5000")
        );
        let hosts: Vec<&String> = doc["host"].as_table().unwrap().keys().collect();
        assert_eq!(hosts, [&mirror.endpoints[0], &mirror.endpoints[1]]);
        let first = doc["host"][&mirror.endpoints[0]].as_table().unwrap();
        assert_eq!(first["ca"].as_str(), mirror.ca_file.as_deref());
        assert_eq!(first["skip_verify"].as_bool(), Some(true));
        assert!(!first.contains_key("override_path"));
        assert!(text.starts_with(MIRROR_MARKER));
    }
}
