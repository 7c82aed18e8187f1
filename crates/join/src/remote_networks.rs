//! The cluster's remote networks against this node: its IP must lie in a remote node
//! network (else the kubelet's serving certificate stays Pending and logs/exec fail), and
//! the pod CIDRs the node will use — the kubelet's `podCIDR`, host-local IPAM subnets in
//! the CNI configuration — in a remote pod network (else the control plane cannot route to
//! pods: webhooks and metrics break). The networks come from `spec.remoteNetworks` when
//! given (air-gapped sites, nodes without eks:DescribeCluster), else from DescribeCluster.

use std::net::IpAddr;

use ipnet::IpNet;

use hybridlet_config::NodeConfig;
use hybridlet_sys::HostRoot;

use crate::Outcome;

/// Remote node and pod networks, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNetworks {
    /// `remoteNodeNetworks` CIDRs.
    pub node_cidrs: Vec<String>,
    /// `remotePodNetworks` CIDRs.
    pub pod_cidrs: Vec<String>,
    /// `spec.remoteNetworks` or `DescribeCluster`.
    pub source: &'static str,
}

/// `cidr` contains `ip`.
pub fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    cidr.trim()
        .parse::<IpNet>()
        .is_ok_and(|net| net.contains(&ip))
}

/// Every address of `inner` lies in `outer`.
pub fn cidr_within(inner: &str, outer: &str) -> bool {
    match (inner.trim().parse::<IpNet>(), outer.trim().parse::<IpNet>()) {
        (Ok(i), Ok(o)) => o.contains(&i),
        _ => false,
    }
}

/// The IP the kubelet will register: `--node-ip` from spec.kubelet.flags, else the
/// source address of this host's default route (what the kubelet picks without the flag).
/// Finding the route sends nothing: connecting a UDP socket only asks the kernel.
pub fn node_ip(node: &NodeConfig) -> Option<(IpAddr, &'static str)> {
    let flag = node
        .spec
        .kubelet
        .flags
        .iter()
        .rev()
        .find_map(|f| f.strip_prefix("--node-ip="))
        .and_then(|v| v.split(',').find_map(|ip| ip.trim().parse::<IpAddr>().ok()));
    if let Some(ip) = flag {
        return Some((ip, "--node-ip in spec.kubelet.flags"));
    }
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // A documentation address (RFC 5737): any off-link destination selects the default route.
    socket.connect("192.0.2.1:443").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some((ip, "the default route's source address"))
}

/// The pod CIDRs this node will use, with where each was found: the kubelet's `podCIDR`
/// (spec.kubelet.config) and the host-local IPAM subnets of the CNI configurations under
/// `/etc/cni/net.d` (other IPAMs, such as Cilium's cluster pool, are not visible here).
pub fn pod_cidrs(node: &NodeConfig, root: &HostRoot) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(cidr) = node
        .spec
        .kubelet
        .config
        .get("podCIDR")
        .and_then(|v| v.as_str())
    {
        out.push((cidr.to_string(), "spec.kubelet.config.podCIDR".to_string()));
    }
    let Ok(dir) = root.resolve("/etc/cni/net.d") else {
        return out;
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conf" || x == "conflist" || x == "json")
        })
        .collect();
    files.sort();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let plugins: Vec<&serde_json::Value> = match v.get("plugins").and_then(|p| p.as_array()) {
            Some(list) => list.iter().collect(),
            None => vec![&v],
        };
        for plugin in plugins {
            let Some(ipam) = plugin.get("ipam") else {
                continue;
            };
            let mut subnets: Vec<&str> = ipam
                .get("subnet")
                .and_then(|s| s.as_str())
                .into_iter()
                .collect();
            for range_set in ipam
                .get("ranges")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                for range in range_set.as_array().into_iter().flatten() {
                    subnets.extend(range.get("subnet").and_then(|s| s.as_str()));
                }
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for s in subnets {
                out.push((s.to_string(), format!("/etc/cni/net.d/{name}")));
            }
        }
    }
    out
}

/// The node IP and pod CIDRs against `nets`.
pub fn judge(
    node: &NodeConfig,
    root: &HostRoot,
    nets: &RemoteNetworks,
) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    let node_check = if nets.node_cidrs.is_empty() {
        Outcome::Fail(format!(
            "the cluster has no remote node networks ({}); hybrid nodes cannot join it: add the on-premises node CIDRs to its remoteNetworkConfig",
            nets.source
        ))
    } else {
        match node_ip(node) {
            None => Outcome::Warn(format!(
                "could not tell this node's IP (no --node-ip and no default route); make sure it lies in the remote node networks ({})",
                nets.node_cidrs.join(", ")
            )),
            Some((ip, from)) if nets.node_cidrs.iter().any(|c| cidr_contains(c, ip)) => {
                Outcome::Ok(format!(
                    "{ip} ({from}) is in {} ({})",
                    nets.node_cidrs.join(", "),
                    nets.source
                ))
            }
            Some((ip, from)) => Outcome::Fail(format!(
                "this node's IP {ip} ({from}) is not in the cluster's remote node networks ({}; {}): the API server could not reach the kubelet and its serving certificate would stay Pending (no kubectl logs/exec). Add the node's network to the cluster's remoteNetworkConfig, or set --node-ip=<address inside them> in spec.kubelet.flags",
                nets.node_cidrs.join(", "),
                nets.source
            )),
        }
    };
    out.push(("remote node network", node_check));
    let pods = pod_cidrs(node, root);
    if !pods.is_empty() {
        let outside: Vec<String> = pods
            .iter()
            .filter(|(cidr, _)| !nets.pod_cidrs.iter().any(|n| cidr_within(cidr, n)))
            .map(|(cidr, from)| format!("{cidr} ({from})"))
            .collect();
        // The kubelet's own podCIDR outside is a mistake in this node's configuration; a
        // CNI file's pool may belong to something else (podman's default bridge lives in
        // the same directory), so it is only a warning.
        let kubelet_outside = outside
            .iter()
            .any(|o| o.ends_with("(spec.kubelet.config.podCIDR)"));
        let outcome = if nets.pod_cidrs.is_empty() {
            Outcome::Warn(format!(
                "the cluster has no remote pod networks ({}): webhooks and metrics cannot reach pods on this node ({})",
                nets.source,
                pods.iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else if outside.is_empty() {
            Outcome::Ok(format!(
                "{} in {}",
                pods.iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                nets.pod_cidrs.join(", ")
            ))
        } else {
            let text = format!(
                "pod CIDR {} is not inside the cluster's remote pod networks ({}; {}): the control plane could not reach pods there (webhooks, kubectl port-forward, metrics). Add it to the cluster's remoteNetworkConfig.remotePodNetworks or use a pool inside them",
                outside.join(", "),
                nets.pod_cidrs.join(", "),
                nets.source
            );
            if kubelet_outside {
                Outcome::Fail(text)
            } else {
                Outcome::Warn(text)
            }
        };
        out.push(("remote pod network", outcome));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_arithmetic() {
        assert!(cidr_contains("10.80.0.0/16", ip("10.80.4.21")));
        assert!(!cidr_contains("10.80.0.0/16", ip("10.81.0.1")));
        assert!(cidr_contains("0.0.0.0/0", ip("192.0.2.7")));
        assert!(cidr_contains("fd00:80::/32", ip("fd00:80::1")));
        assert!(!cidr_contains("fd00:80::/32", ip("10.80.4.21")));
        for bad in ["10.80.0.0", "10.80.0.0/33", "x/8", ""] {
            assert!(!cidr_contains(bad, ip("10.80.0.1")), "{bad}");
        }
        assert!(cidr_within("10.90.3.0/24", "10.90.0.0/16"));
        assert!(cidr_within("10.90.0.0/16", "10.90.0.0/16"));
        assert!(!cidr_within("10.90.0.0/15", "10.90.0.0/16"));
        assert!(!cidr_within("10.91.0.0/24", "10.90.0.0/16"));
        assert!(!cidr_within("fd00::/64", "10.0.0.0/8"));
    }

    #[test]
    fn node_ip_and_pod_cidrs_are_judged() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let net_d = dir.path().join("etc/cni/net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        std::fs::write(
            net_d.join("10-bridge.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","ipam":{"type":"host-local","ranges":[[{"subnet":"10.90.7.0/24"}]]}},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let mut node: NodeConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "node.eks.aws/v1alpha1", "kind": "NodeConfig",
            "spec": {"kubelet": {"flags": ["--node-ip=10.80.4.21"], "config": {"podCIDR": "10.90.1.0/24"}}}
        }))
        .unwrap();
        let nets = RemoteNetworks {
            node_cidrs: vec!["10.80.0.0/16".into()],
            pod_cidrs: vec!["10.90.0.0/16".into()],
            source: "spec.remoteNetworks",
        };
        let r = judge(&node, &root, &nets);
        assert!(matches!(r[0].1, Outcome::Ok(_)), "{r:?}");
        assert!(
            matches!(&r[1].1, Outcome::Ok(d) if d.contains("10.90.1.0/24") && d.contains("10.90.7.0/24")),
            "{r:?}"
        );
        // A bridge pool outside the remote pod networks, and an IP outside the node ones.
        std::fs::write(
            net_d.join("20-other.conf"),
            r#"{"cniVersion":"0.4.0","name":"x","type":"bridge","ipam":{"type":"host-local","subnet":"172.30.0.0/16"}}"#,
        )
        .unwrap();
        node.spec.kubelet.flags = vec!["--node-ip=10.99.0.1".into()];
        let r = judge(&node, &root, &nets);
        assert!(
            matches!(&r[0].1, Outcome::Fail(d) if d.contains("10.99.0.1") && d.contains("spec.remoteNetworks")),
            "{r:?}"
        );
        assert!(
            matches!(&r[1].1, Outcome::Warn(d) if d.contains("172.30.0.0/16 (/etc/cni/net.d/20-other.conf)")),
            "{r:?}"
        );
        // The kubelet's own podCIDR outside them is this node's mistake.
        node.spec
            .kubelet
            .config
            .insert("podCIDR".into(), "10.91.0.0/24".into());
        let r = judge(&node, &root, &nets);
        assert!(
            matches!(&r[1].1, Outcome::Fail(d) if d.contains("10.91.0.0/24 (spec.kubelet.config.podCIDR)")),
            "{r:?}"
        );
        // No remote node networks at all.
        let empty = RemoteNetworks {
            node_cidrs: vec![],
            pod_cidrs: vec![],
            source: "DescribeCluster",
        };
        assert!(
            matches!(&judge(&node, &root, &empty)[0].1, Outcome::Fail(d) if d.contains("no remote node networks"))
        );
    }
}
