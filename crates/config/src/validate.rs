//! Semantic rules, after decoding. nodeadm's rules first (so a file nodeadm rejects is
//! rejected here with the same meaning), then ours. Every problem is collected.

use std::path::{Component, Path};

use crate::{AgentSpec, Config, FieldError, IamRolesAnywhereOptions, NodeConfig, SsmOptions};

#[derive(Default)]
struct Report {
    errors: Vec<FieldError>,
    warnings: Vec<String>,
}

impl Report {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            file: None,
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Check the merged configuration. Returns warnings, or every error found.
pub(crate) fn validate(config: &Config) -> Result<Vec<String>, Vec<FieldError>> {
    let mut report = Report::default();
    if let Some(node) = &config.node {
        validate_node(node, &mut report);
    }
    validate_agent(&config.agent, &mut report);
    if report.errors.is_empty() {
        Ok(report.warnings)
    } else {
        Err(report.errors)
    }
}

fn validate_node(node: &NodeConfig, r: &mut Report) {
    let cluster = &node.spec.cluster;
    if cluster.name.is_empty() {
        r.error(
            "spec.cluster.name",
            "required: the name of the EKS cluster to join",
        );
    } else if !is_eks_cluster_name(&cluster.name) {
        r.error(
            "spec.cluster.name",
            format!(
                "{:?} is not a valid EKS cluster name (1-100 characters: letters, digits, '-' and '_', starting with a letter or digit)",
                cluster.name
            ),
        );
    }
    if cluster.region.is_empty() {
        r.error(
            "spec.cluster.region",
            "required: the AWS region of the cluster, e.g. us-west-2",
        );
    } else if !is_region(&cluster.region) {
        r.error(
            "spec.cluster.region",
            format!(
                "{:?} is not an AWS region name (e.g. us-west-2, eu-central-1)",
                cluster.region
            ),
        );
    }
    if let Some(endpoint) = &cluster.api_server_endpoint
        && let Err(why) = check_https_url(endpoint)
    {
        r.error(
            "spec.cluster.apiServerEndpoint",
            format!("{endpoint:?} is not a valid API server URL: {why}"),
        );
    }
    if let Some(ca) = &cluster.certificate_authority
        && let Err(why) = check_ca_bundle(ca)
    {
        r.error("spec.cluster.certificateAuthority", why);
    }
    if let Some(cidr) = &cluster.cidr
        && let Err(why) = check_cidr(cidr)
    {
        r.error("spec.cluster.cidr", why);
    }
    if cluster.enable_outpost.is_some() || cluster.id.is_some() {
        r.warnings.push(
            "spec.cluster.enableOutpost and spec.cluster.id apply to EC2 Outposts only and are ignored on hybrid nodes"
                .to_string(),
        );
    }
    if node.spec.instance.is_some() {
        r.warnings.push(
            "spec.instance applies to EC2 instances only and is ignored on hybrid nodes"
                .to_string(),
        );
    }

    for (i, flag) in node.spec.kubelet.flags.iter().enumerate() {
        let path = format!("spec.kubelet.flags[{i}]");
        let name = flag.split('=').next().unwrap_or_default();
        if name == "--hostname-override" || name == "-hostname-override" {
            r.error(
                path,
                "--hostname-override is not allowed: hybridlet sets the node name from the node's identity \
                 (the SSM managed instance ID, or spec.hybrid.iamRolesAnywhere.nodeName); remove this flag",
            );
        } else if !flag.starts_with('-') {
            r.error(
                path,
                format!("{flag:?} is not a flag; kubelet flags look like --node-labels=site=fra1"),
            );
        }
    }

    match &node.spec.hybrid {
        None => r.error(
            "spec.hybrid",
            "required: set exactly one credential provider, spec.hybrid.ssm or spec.hybrid.iamRolesAnywhere",
        ),
        Some(hybrid) => match (&hybrid.ssm, &hybrid.iam_roles_anywhere) {
            (Some(_), Some(_)) => r.error(
                "spec.hybrid",
                "exactly one credential provider may be set, but both ssm and iamRolesAnywhere are; remove one",
            ),
            (None, None) => r.error(
                "spec.hybrid",
                "no credential provider: set exactly one of spec.hybrid.ssm or spec.hybrid.iamRolesAnywhere",
            ),
            (Some(ssm), None) => validate_ssm(ssm, r),
            (None, Some(iam)) => validate_iam_ra(iam, r),
        },
    }
}

fn validate_ssm(ssm: &SsmOptions, r: &mut Report) {
    // The activation code is a secret: report its length, never its value.
    let len = ssm.activation_code.chars().count();
    if len == 0 {
        r.error(
            "spec.hybrid.ssm.activationCode",
            "required: the activation code printed by `aws ssm create-activation`",
        );
    } else if !(20..=250).contains(&len) {
        r.error(
            "spec.hybrid.ssm.activationCode",
            format!("must be 20 to 250 characters long, got {len}"),
        );
    }
    let id = &ssm.activation_id;
    if id.is_empty() {
        r.error(
            "spec.hybrid.ssm.activationId",
            "required: the activation ID printed by `aws ssm create-activation`",
        );
    } else if !is_uuid(&id.to_ascii_lowercase()) {
        r.error(
            "spec.hybrid.ssm.activationId",
            format!("{id:?} is not a UUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"),
        );
    } else if !is_uuid(id) {
        r.error(
            "spec.hybrid.ssm.activationId",
            format!("{id:?} must be lower case, as `aws ssm create-activation` prints it"),
        );
    }
}

fn validate_iam_ra(iam: &IamRolesAnywhereOptions, r: &mut Report) {
    let base = "spec.hybrid.iamRolesAnywhere";
    let name = &iam.node_name;
    if name.is_empty() {
        r.error(
            format!("{base}.nodeName"),
            "required: the node name, equal to the CN of the node's certificate",
        );
    } else if name.chars().count() > 64 {
        r.error(
            format!("{base}.nodeName"),
            format!(
                "{name:?} is {} characters long; at most 64 are allowed (it is the IAM role session name)",
                name.chars().count()
            ),
        );
    } else if !is_dns_subdomain(name) {
        r.error(
            format!("{base}.nodeName"),
            format!(
                "{name:?} is not a valid Kubernetes node name (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
            ),
        );
    }
    for (field, value) in [
        ("trustAnchorArn", &iam.trust_anchor_arn),
        ("profileArn", &iam.profile_arn),
        ("roleArn", &iam.role_arn),
    ] {
        if value.is_empty() {
            r.error(format!("{base}.{field}"), "required: an ARN (arn:aws:...)");
        } else if !is_arn(value) {
            r.error(
                format!("{base}.{field}"),
                format!("{value:?} is not an ARN (expected arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE)"),
            );
        }
    }
    for (field, value) in [
        ("certificatePath", &iam.certificate_path),
        ("privateKeyPath", &iam.private_key_path),
        ("awsConfigPath", &iam.aws_config_path),
    ] {
        if let Err(why) = check_host_path(value) {
            r.error(format!("{base}.{field}"), why);
        }
    }
}

fn validate_agent(agent: &AgentSpec, r: &mut Report) {
    for (field, value) in [
        ("spec.stateDir", &agent.state_dir),
        ("spec.kubeletRootDir", &agent.kubelet_root_dir),
    ] {
        if let Err(why) = check_host_path(value) {
            r.error(field, why);
        }
    }
    if let Err(why) = check_log_level(&agent.log_level) {
        r.error("spec.logLevel", why);
    }
    if let Some(tls) = &agent.admin.tls {
        for (field, value) in [
            ("spec.admin.tls.certFile", &tls.cert_file),
            ("spec.admin.tls.keyFile", &tls.key_file),
        ] {
            if let Err(why) = check_host_path(value) {
                r.error(field, why);
            }
        }
    }
    let grace = agent.shutdown_grace_period.get();
    if grace.is_zero() || grace > std::time::Duration::from_secs(3600) {
        r.error(
            "spec.shutdownGracePeriod",
            format!(
                "{} is out of range; use between 1s and 1h",
                agent.shutdown_grace_period
            ),
        );
    }
    if let Some(nets) = &agent.remote_networks {
        for (list, field) in [
            (&nets.node_cidrs, "nodeCidrs"),
            (&nets.pod_cidrs, "podCidrs"),
        ] {
            for (i, cidr) in list.iter().enumerate() {
                if cidr.parse::<ipnet::IpNet>().is_err() {
                    r.error(
                        format!("spec.remoteNetworks.{field}[{i}]"),
                        format!("{cidr:?} is not a CIDR (e.g. 10.80.0.0/16 or fd00:80::/48)"),
                    );
                }
            }
        }
        if nets.node_cidrs.is_empty() {
            r.error(
                "spec.remoteNetworks.nodeCidrs",
                "is empty; list the cluster's remote node networks (aws eks describe-cluster --query cluster.remoteNetworkConfig), or leave spec.remoteNetworks out to have them asked of EKS".to_string(),
            );
        }
    }
    let grace = agent.dra.orphaned_claim_grace_period.get();
    if grace < std::time::Duration::from_secs(60) || grace > std::time::Duration::from_secs(86_400)
    {
        r.error(
            "spec.dra.orphanedClaimGracePeriod",
            format!(
                "{} is out of range; use between 1m and 24h (shorter risks releasing a claim the API server is still catching up on)",
                agent.dra.orphaned_claim_grace_period
            ),
        );
    }
    let timeout = agent.plugin_registration_timeout.get();
    if timeout < std::time::Duration::from_secs(1)
        || timeout > std::time::Duration::from_secs(86_400)
    {
        r.error(
            "spec.pluginRegistrationTimeout",
            format!(
                "{} is out of range; use between 1s and 24h (the kubelet registers a plugin within seconds of both running)",
                agent.plugin_registration_timeout
            ),
        );
    }
    for (field, name) in [
        ("spec.dra.gpu.driverName", &agent.dra.gpu.driver_name),
        ("spec.dra.sriov.driverName", &agent.dra.sriov.driver_name),
        ("spec.dra.pci.driverName", &agent.dra.pci.driver_name),
    ] {
        if !is_dns_subdomain(name) || name.len() > 63 {
            r.error(
                field,
                format!(
                    "{name:?} is not a valid DRA driver name (a DNS subdomain of at most 63 characters, e.g. gpu.example.com)"
                ),
            );
        }
    }
    let enabled = [
        (
            "spec.dra.gpu.driverName",
            agent.dra.gpu.enabled,
            &agent.dra.gpu.driver_name,
        ),
        (
            "spec.dra.sriov.driverName",
            agent.dra.sriov.enabled,
            &agent.dra.sriov.driver_name,
        ),
        (
            "spec.dra.pci.driverName",
            agent.dra.pci.enabled,
            &agent.dra.pci.driver_name,
        ),
    ];
    for (i, (field, on, name)) in enabled.iter().enumerate().skip(1) {
        for (other, other_on, other_name) in &enabled[..i] {
            if *on && *other_on && name == other_name {
                r.error(
                    *field,
                    format!(
                        "must differ from {other}: each driver registers its own kubelet socket"
                    ),
                );
            }
        }
    }
    validate_pci_rules(&agent.dra.pci, r);
    let interval = agent.node_labels.min_interval.get();
    if interval < std::time::Duration::from_secs(1)
        || interval > std::time::Duration::from_secs(3600)
    {
        r.error(
            "spec.nodeLabels.minInterval",
            format!(
                "{} is out of range; use between 1s and 1h",
                agent.node_labels.min_interval
            ),
        );
    }
    if let Some(site) = &agent.node_labels.site
        && !is_label_value(site)
    {
        r.error(
            "spec.nodeLabels.site",
            format!("{site:?} is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"),
        );
    }
    if !is_csi_driver_name(&agent.csi.driver_name) {
        r.error(
            "spec.csi.driverName",
            format!(
                "{:?} is not a valid CSI driver name (at most 63 characters of letters, digits, '-' and '.', starting and ending with a letter or digit)",
                agent.csi.driver_name
            ),
        );
    }
    let mount = agent.csi.mount_timeout.get();
    if mount < std::time::Duration::from_secs(5) || mount > std::time::Duration::from_secs(600) {
        r.error(
            "spec.csi.mountTimeout",
            format!(
                "{} is out of range; use between 5s and 10m (the kubelet gives a CSI call about 2m)",
                agent.csi.mount_timeout
            ),
        );
    }
    for (key, value) in &agent.csi.topology {
        let path = format!("spec.csi.topology[{key:?}]");
        if !is_label_key(key) {
            r.error(
                path.clone(),
                "is not a label key (an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.'), e.g. topology.hybridlet.io/site",
            );
        }
        if !is_label_value(value) {
            r.error(
                path,
                format!("{value:?} is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"),
            );
        }
    }
    let mut seen_pfs = std::collections::BTreeSet::new();
    for (i, pf) in agent.sriov.physical_functions.iter().enumerate() {
        let base = format!("spec.sriov.physicalFunctions[{i}]");
        match (&pf.pci_address, &pf.interface) {
            (Some(_), Some(_)) | (None, None) => r.error(
                base.clone(),
                "name the PF by exactly one of pciAddress (e.g. 0000:81:00.0) or interface (e.g. ens2f0)",
            ),
            (Some(addr), None) if !is_pci_address(addr) => r.error(
                format!("{base}.pciAddress"),
                format!("{addr:?} is not a PCI address (DDDD:BB:DD.F, e.g. 0000:81:00.0)"),
            ),
            (None, Some(ifname)) if !is_interface_name(ifname) => r.error(
                format!("{base}.interface"),
                format!("{ifname:?} is not a network interface name (1-15 characters, no '/' or spaces)"),
            ),
            (addr, ifname) => {
                let key = addr.clone().or_else(|| ifname.clone()).unwrap_or_default();
                if !seen_pfs.insert(key.to_ascii_lowercase()) {
                    r.error(base, format!("{key} is listed more than once"));
                }
            }
        }
    }
    for (i, mirror) in agent.registry_mirrors.iter().enumerate() {
        let base = format!("spec.registryMirrors[{i}]");
        if mirror.registry.is_empty() {
            r.error(
                format!("{base}.registry"),
                "required: a registry host such as docker.io, or _default",
            );
        } else if mirror.registry != "_default" && !is_host_port(&mirror.registry) {
            r.error(
                format!("{base}.registry"),
                format!(
                    "{:?} is not a registry host (HOST or HOST:PORT, or _default)",
                    mirror.registry
                ),
            );
        }
        if mirror.endpoints.is_empty() {
            r.error(
                format!("{base}.endpoints"),
                "at least one mirror endpoint URL is required",
            );
        }
        for (j, endpoint) in mirror.endpoints.iter().enumerate() {
            if let Err(why) = check_http_url(endpoint) {
                r.error(
                    format!("{base}.endpoints[{j}]"),
                    format!("{endpoint:?}: {why}"),
                );
            }
        }
        if let Some(ca) = &mirror.ca_file
            && let Err(why) = check_host_path(ca)
        {
            r.error(format!("{base}.caFile"), why);
        }
    }
    validate_images(&agent.images, r);
    for (field, value) in [
        ("spec.proxy.httpProxy", &agent.proxy.http_proxy),
        ("spec.proxy.httpsProxy", &agent.proxy.https_proxy),
    ] {
        if let Some(url) = value
            && let Err(why) = check_proxy_url(url)
        {
            // The URL may hold a password: never repeat it.
            r.error(
                field,
                format!("{:?}: {why}", crate::types::redact_userinfo(url)),
            );
        }
    }
    for (i, entry) in agent.proxy.no_proxy.iter().enumerate() {
        if entry.is_empty() || entry.contains(|c: char| c.is_whitespace() || c == ',') {
            r.error(
                format!("spec.proxy.noProxy[{i}]"),
                format!("{entry:?} must be one host, domain or CIDR per list entry (no spaces or commas)"),
            );
        }
    }
}

/// `spec.dra.pci.allow`: each rule parses and can match something specific; an enabled
/// driver needs at least one (it would publish nothing).
fn validate_images(images: &crate::types::ImagesSpec, r: &mut Report) {
    let image = |path: String, value: &str, r: &mut Report| {
        if let Err(why) = crate::ImageRef::parse(value) {
            r.error(path, format!("{value:?} is not an image reference: {why}"));
        }
    };
    if let Some(sandbox) = &images.sandbox {
        image("spec.images.sandbox".into(), sandbox, r);
    }
    if let Err(why) = check_host_path(&images.containerd_socket) {
        r.error("spec.images.containerdSocket", why);
    }
    if images.check_interval.0 < std::time::Duration::from_secs(10) {
        r.error(
            "spec.images.checkInterval",
            "must be at least 10s (a check asks containerd about every prePull image)",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in images.pre_pull.iter().enumerate() {
        let path = format!("spec.images.prePull[{i}].image");
        image(path.clone(), &p.image, r);
        if !seen.insert(p.image.as_str()) {
            r.error(path, format!("{:?} is listed more than once", p.image));
        }
        if let Some(file) = &p.credentials_file
            && let Err(why) = check_host_path(file)
        {
            r.error(format!("spec.images.prePull[{i}].credentialsFile"), why);
        }
    }
    let mut registries = std::collections::BTreeSet::new();
    for (i, c) in images.credentials.iter().enumerate() {
        let base = format!("spec.images.credentials[{i}]");
        if !is_host_port(&c.registry) {
            r.error(
                format!("{base}.registry"),
                format!(
                    "{:?} is not a registry host (HOST or HOST:PORT)",
                    c.registry
                ),
            );
        } else if !registries.insert(c.registry.to_ascii_lowercase()) {
            r.error(
                format!("{base}.registry"),
                format!("{} has more than one login", c.registry),
            );
        }
        if let Err(why) = check_host_path(&c.file) {
            r.error(format!("{base}.file"), why);
        }
    }
}

fn validate_pci_rules(pci: &crate::types::PciDriverSpec, r: &mut Report) {
    if pci.enabled && pci.allow.is_empty() {
        r.error(
            "spec.dra.pci.allow",
            "is empty, so the driver would publish nothing: list the functions it may take, e.g. [{vendor: \"0x10ee\", device: \"0x505c\", deviceClass: fpga}]",
        );
    }
    for (i, rule) in pci.allow.iter().enumerate() {
        let base = format!("spec.dra.pci.allow[{i}]");
        for (name, value) in [
            ("vendor", &rule.vendor),
            ("device", &rule.device),
            ("subsystemVendor", &rule.subsystem_vendor),
            ("subsystemDevice", &rule.subsystem_device),
        ] {
            if let Some(v) = value
                && parse_pci_id(v).is_none()
            {
                r.error(
                    format!("{base}.{name}"),
                    format!("{v:?} is not a 16-bit hex PCI ID (e.g. \"0x10ee\")"),
                );
            }
        }
        if let Some(class) = &rule.class
            && parse_pci_class(class).is_none()
        {
            r.error(
                format!("{base}.class"),
                format!("{class:?} is not a PCI class: 2, 4 or 6 hex digits (\"0x12\", \"0x1200\", \"0x120000\")"),
            );
        }
        if rule.vendor.is_none() && rule.class.is_none() && rule.driver.is_none() {
            r.error(
                base.clone(),
                "matches every PCI function: give at least one of vendor, class or driver",
            );
        }
        if rule.device.is_some() && rule.vendor.is_none() {
            r.error(
                format!("{base}.device"),
                "needs vendor: a device ID means nothing without its vendor",
            );
        }
        if rule.subsystem_device.is_some() && rule.subsystem_vendor.is_none() {
            r.error(format!("{base}.subsystemDevice"), "needs subsystemVendor");
        }
        if let Some(driver) = &rule.driver
            && (driver.is_empty()
                || driver.len() > 64
                || !driver
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            r.error(
                format!("{base}.driver"),
                format!("{driver:?} is not a kernel driver name (letters, digits, '-' and '_', e.g. xclmgmt)"),
            );
        }
        if let Some(class) = &rule.device_class
            && !is_dns_label(class)
        {
            r.error(
                format!("{base}.deviceClass"),
                format!("{class:?} is not a DNS label (at most 63 lower-case letters, digits and '-', e.g. fpga)"),
            );
        }
    }
}

/// A 16-bit hex PCI ID, `0x` optional.
pub fn parse_pci_id(text: &str) -> Option<u16> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    (!digits.is_empty() && digits.len() <= 4)
        .then(|| u16::from_str_radix(digits, 16).ok())
        .flatten()
}

/// A PCI class prefix: `(value, bits)` for 2, 4 or 6 hex digits (class; class and
/// subclass; with the programming interface).
pub fn parse_pci_class(text: &str) -> Option<(u32, u32)> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if !matches!(digits.len(), 2 | 4 | 6) {
        return None;
    }
    let value = u32::from_str_radix(digits, 16).ok()?;
    Some((value, digits.len() as u32 * 4))
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_eks_cluster_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 100
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

fn is_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
}

fn is_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && !parts[2].is_empty()
        && !parts[5].is_empty()
        && !arn.contains(char::is_whitespace)
}

/// RFC 1123 subdomain, as Kubernetes requires for node and driver names.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// CSI spec: at most 63 characters, begin and end with an alphanumeric character, with
/// dashes, dots and alphanumerics between.
fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(|p| p.len() <= 253 && is_dns_subdomain(p))
        && !name.is_empty()
        && is_label_value(name)
}

fn is_csi_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn is_pci_address(value: &str) -> bool {
    let hex = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    let parts: Vec<&str> = value.split(':').collect();
    match parts.as_slice() {
        [domain, bus, devfn] => match devfn.split_once('.') {
            Some((dev, func)) => {
                hex(domain, 4..=8)
                    && hex(bus, 2..=2)
                    && hex(dev, 2..=2)
                    && matches!(func, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7")
            }
            None => false,
        },
        _ => false,
    }
}

/// Linux interface names: at most 15 bytes, no '/', no whitespace, not "." or "..".
fn is_interface_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 15
        && value != "."
        && value != ".."
        && !value.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

fn is_host_port(value: &str) -> bool {
    let (host, port) = match value.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (value, None),
    };
    port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        && !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

fn check_url(value: &str, schemes: &[&str]) -> Result<http::Uri, String> {
    let uri: http::Uri = value.parse().map_err(|e| format!("{e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if !schemes.contains(&scheme) {
        return Err(format!("the scheme must be {}", schemes.join(" or ")));
    }
    let authority = uri.authority().ok_or("a host is required")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not allowed".to_string());
    }
    if authority.host().is_empty() {
        return Err("a host is required".to_string());
    }
    Ok(uri)
}

fn check_https_url(value: &str) -> Result<(), String> {
    let uri = check_url(value, &["https"])?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("expected https://HOST[:PORT] with no path".to_string());
    }
    Ok(())
}

/// A proxy URL may carry `user:password@` (corporate proxies often want it); init keeps
/// such settings in a root-only file and every message redacts them.
fn check_proxy_url(value: &str) -> Result<(), String> {
    let without = crate::types::redact_userinfo(value).replacen("***@", "", 1);
    check_http_url(&without)
}

fn check_http_url(value: &str) -> Result<(), String> {
    check_url(value, &["http", "https"])
        .map(|_| ())
        .map_err(|why| format!("not a valid URL: {why}"))
}

fn check_ca_bundle(value: &str) -> Result<(), String> {
    let bytes = crate::decode_certificate_authority(value)
        .map_err(|e| {
            format!(
                "not valid base64 ({e}); use the cluster's certificateAuthority.data from `aws eks describe-cluster`"
            )
        })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(
            "decodes from base64 but holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                .to_string(),
        );
    }
    Ok(())
}

fn check_cidr(value: &str) -> Result<(), String> {
    let net: ipnet::IpNet = value.parse().map_err(|_| {
        format!("{value:?} is not a CIDR (expected the cluster's service CIDR, e.g. 172.16.0.0/16)")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{value:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if let ipnet::IpNet::V4(v4) = net
        && v4.prefix_len() > 28
    {
        return Err(format!(
            "{value:?} is too small for a service CIDR (cluster DNS uses its .10 address); use /28 or larger"
        ));
    }
    Ok(())
}

fn check_host_path(value: &str) -> Result<(), String> {
    let path = Path::new(value);
    if value.is_empty() {
        return Err("must not be empty".to_string());
    }
    if !path.is_absolute() {
        return Err(format!("{value:?} must be an absolute path"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{value:?} must not contain '..'"));
    }
    Ok(())
}

/// `spec.logLevel`: a level, or comma-separated `target=level` directives (the subset of
/// tracing's filter syntax an operator needs; span filters are not accepted).
fn check_log_level(value: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let bad = |what: String| {
        Err(format!(
            "{value:?}: {what}; use a level ({}) or target=level pairs, e.g. \"info,hybridlet_csi=debug\"",
            LEVELS.join(", ")
        ))
    };
    if value.trim().is_empty() {
        return bad("is empty".into());
    }
    for directive in value.split(',') {
        let directive = directive.trim();
        let (target, level) = match directive.split_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, directive),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return bad(format!("{level:?} is not a level"));
        }
        if let Some(t) = target
            && (t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        {
            return bad(format!("{t:?} is not a module path"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_levels_or_target_directives() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,hybridlet_csi=debug",
            "hybridlet_dra::driver=trace",
        ] {
            assert!(check_log_level(good).is_ok(), "{good}");
        }
        for bad in ["", "verbose", "info,", "a b=info", "=debug", "info,x=loud"] {
            let err = check_log_level(bad).unwrap_err();
            assert!(err.contains("use a level"), "{bad}: {err}");
        }
    }

    #[test]
    fn names_and_formats() {
        assert!(is_eks_cluster_name("prod-hybrid_1"));
        assert!(!is_eks_cluster_name("-x"));
        assert!(is_region("us-gov-west-1") && is_region("eu-west-1"));
        assert!(!is_region("eu-west") && !is_region("EU-west-1") && !is_region("us--1"));
        assert!(is_uuid("8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d"));
        assert!(!is_uuid("8B7A2D3C-1F2E-4A5B-9C8D-0E1F2A3B4C5D"));
        assert!(is_arn("arn:aws:iam::123456789012:role/Hybrid"));
        assert!(!is_arn("arn:aws:iam"));
        assert!(is_dns_subdomain("fra1-r12-n07") && !is_dns_subdomain("Fra1"));
        assert!(is_csi_driver_name("csi.hybridlet.io") && !is_csi_driver_name("csi."));
        assert!(is_label_key("topology.hybridlet.io/site") && is_label_key("site"));
        assert!(!is_label_key("Bad_Prefix/site") && !is_label_key("a/") && !is_label_key("x/y/z"));
        assert!(is_label_value("fra1") && !is_label_value("-fra1") && !is_label_value("a b"));
        assert!(is_host_port("registry.example.com:5000") && !is_host_port("a b"));
        assert!(check_cidr("10.100.0.0/16").is_ok());
        assert!(
            check_cidr("10.100.0.1/16")
                .unwrap_err()
                .contains("10.100.0.0/16")
        );
        assert!(check_cidr("fd00::/108").is_ok());
        assert!(check_https_url("https://ABC.gr7.eu-west-1.eks.amazonaws.com").is_ok());
        assert!(check_https_url("http://x").is_err());
        assert!(check_https_url("https://u:p@x").is_err());
    }
}
