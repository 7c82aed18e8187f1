use std::time::Instant;

use std::path::Path;

use hybridlet_sys::mount::MountEntry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::CsiError;

type MethodCode = Vec<(String, String)>;
type Method = Vec<(String, String)>;

/// CSI call counts and latencies, by method and gRPC code.
#[derive(Debug, Clone)]
pub struct CsiMetrics {
    operations: Family<MethodCode, Counter>,
    duration: Family<Method, Histogram>,
    volumes: Family<Vec<(String, String)>, Gauge>,
    iscsi_sessions: Gauge,
    abnormal: Counter,
}

fn new_histogram() -> Histogram {
    // 1 ms .. ~2 min: bind mounts take microseconds, NFS mounts up to the deadline.
    Histogram::new([0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0, 60.0, 120.0])
}

impl Default for CsiMetrics {
    fn default() -> Self {
        Self {
            operations: Family::default(),
            duration: Family::new_with_constructor(new_histogram as fn() -> Histogram),
            volumes: Family::default(),
            iscsi_sessions: Gauge::default(),
            abnormal: Counter::default(),
        }
    }
}

impl CsiMetrics {
    /// Register `csi_operations_total{method,code}` and
    /// `csi_operation_duration_seconds{method}`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "csi_operations",
            "CSI calls served, by method and gRPC status code",
            m.operations.clone(),
        );
        registry.register_with_unit(
            "csi_operation_duration",
            "Time to serve a CSI call, by method",
            Unit::Seconds,
            m.duration.clone(),
        );
        // Every series exists from the start (at 0), so dashboards and the docs check
        // never see the family missing before the first sample.
        for (protocol, state, _) in count_volumes(&[], Path::new("/"), "") {
            m.volumes
                .get_or_create(&vec![
                    ("protocol".to_string(), protocol.to_string()),
                    ("state".to_string(), state.to_string()),
                ])
                .set(0);
        }
        registry.register(
            "csi_volumes",
            "Volumes of this driver mounted on the node, by protocol (nfs, iscsi) and state (staged, published); sampled from the mount table",
            m.volumes.clone(),
        );
        registry.register(
            "csi_iscsi_sessions",
            "iSCSI sessions the node has (all targets), sampled",
            m.iscsi_sessions.clone(),
        );
        registry.register(
            "csi_volume_abnormal",
            "NodeGetVolumeStats answers that reported an abnormal volume (dead server, stale handle, missing device)",
            m.abnormal.clone(),
        );
        m
    }

    /// Count an abnormal volume condition.
    pub(crate) fn abnormal(&self) {
        self.abnormal.inc();
    }

    /// Set the volume gauges from the mount table (`hybridlet_sys::mount::Mounter::mount_table`
    /// never blocks on a dead server, unlike stat) and the session count.
    pub fn set_volumes(
        &self,
        table: &[MountEntry],
        kubelet_root: &Path,
        driver: &str,
        sessions: Option<usize>,
    ) {
        let counts = count_volumes(table, kubelet_root, driver);
        for (protocol, state, n) in counts {
            self.volumes
                .get_or_create(&vec![
                    ("protocol".to_string(), protocol.to_string()),
                    ("state".to_string(), state.to_string()),
                ])
                .set(n as i64);
        }
        if let Some(n) = sessions {
            self.iscsi_sessions.set(n as i64);
        }
    }

    /// Record one call.
    pub(crate) fn observe<T>(&self, method: &str, started: Instant, result: &Result<T, CsiError>) {
        let code = match result {
            Ok(_) => "OK".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        self.operations
            .get_or_create(&vec![
                ("method".to_string(), method.to_string()),
                ("code".to_string(), code),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("method".to_string(), method.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// `(protocol, state, count)` for every combination, zeros included. Staged: mounts under
/// `<kubelet>/plugins/kubernetes.io/csi/<driver>/`; published: mounts under
/// `<kubelet>/pods/*/volumes/kubernetes.io~csi/` and `.../csi/volumeDevices/publish/`
/// whose file system is NFS (nfs) or anything else (iscsi: ext4, xfs, a raw device).
/// Published mounts of other CSI drivers are told apart by their source: NFS sources and
/// devices staged by this driver.
pub fn count_volumes(
    table: &[MountEntry],
    kubelet_root: &Path,
    driver: &str,
) -> [(&'static str, &'static str, usize); 4] {
    let staging_root = kubelet_root.join("plugins/kubernetes.io/csi").join(driver);
    let pods = kubelet_root.join("pods");
    let block_publish = kubelet_root.join("plugins/kubernetes.io/csi/volumeDevices/publish");
    let protocol = |m: &MountEntry| {
        if m.fs_type.starts_with("nfs") {
            "nfs"
        } else {
            "iscsi"
        }
    };
    let staged: Vec<&MountEntry> = table
        .iter()
        .filter(|m| m.mount_point.starts_with(&staging_root))
        .collect();
    let ours = |m: &MountEntry| {
        staged
            .iter()
            .any(|s| s.device == m.device && (s.root == m.root || m.root.starts_with(&s.root)))
            || (m.fs_type == "devtmpfs" && m.mount_point.starts_with(&block_publish))
    };
    let published: Vec<&MountEntry> = table
        .iter()
        .filter(|m| {
            (m.mount_point.starts_with(&pods)
                && m.mount_point
                    .to_string_lossy()
                    .contains("/volumes/kubernetes.io~csi/"))
                || m.mount_point.starts_with(&block_publish)
        })
        .filter(|m| ours(m))
        .collect();
    let n = |list: &[&MountEntry], p: &str| list.iter().filter(|m| protocol(m) == p).count();
    [
        ("nfs", "staged", n(&staged, "nfs")),
        ("nfs", "published", n(&published, "nfs")),
        ("iscsi", "staged", n(&staged, "iscsi")),
        ("iscsi", "published", n(&published, "iscsi")),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_sys::mount::parse_mountinfo;

    #[test]
    fn counts_staged_and_published_volumes_by_protocol() {
        let k = "/var/lib/kubelet";
        let text = format!(
            "100 1 0:50 /pv1 {k}/plugins/kubernetes.io/csi/csi.hybridlet.io/aa/globalmount rw - nfs4 10.0.0.5:/export/pv1 rw\n\
             101 1 0:50 /pv1 {k}/pods/p1/volumes/kubernetes.io~csi/pv1/mount rw - nfs4 10.0.0.5:/export/pv1 rw\n\
             102 1 0:50 /pv1 {k}/pods/p2/volumes/kubernetes.io~csi/pv1/mount ro - nfs4 10.0.0.5:/export/pv1 ro\n\
             103 1 8:16 / {k}/plugins/kubernetes.io/csi/csi.hybridlet.io/bb/globalmount rw - ext4 /dev/sdb rw\n\
             104 1 8:16 / {k}/pods/p3/volumes/kubernetes.io~csi/pv2/mount rw - ext4 /dev/sdb rw\n\
             105 1 0:5 /sdc {k}/plugins/kubernetes.io/csi/volumeDevices/publish/pv3/p4 rw - devtmpfs udev rw\n\
             106 1 0:60 / {k}/pods/p5/volumes/kubernetes.io~csi/other/mount rw - ext4 /dev/sdz rw\n\
             107 1 0:61 / /mnt/elsewhere rw - nfs4 10.0.0.6:/x rw\n"
        );
        let table = parse_mountinfo(&text);
        let counts = count_volumes(&table, Path::new(k), "csi.hybridlet.io");
        assert_eq!(
            counts,
            [
                ("nfs", "staged", 1),
                ("nfs", "published", 2),
                ("iscsi", "staged", 1),
                ("iscsi", "published", 2)
            ]
        );
    }
}
