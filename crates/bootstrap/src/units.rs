//! systemd units `hybridlet install` places.

use crate::RenderedFile;

/// `/etc/systemd/system/kubelet.service`: the kubelet with the arguments `init` writes to
/// `/etc/eks/kubelet/environment` (`NODEADM_KUBELET_ARGS`, the name nodeadm uses, so the
/// two tools' files stay interchangeable). Ordered after containerd and hybridlet (whose
/// CSI and DRA sockets the kubelet discovers at start).
pub fn kubelet_unit() -> RenderedFile {
    RenderedFile::new(
        "/etc/systemd/system/kubelet.service",
        0o644,
        "\
# Written by `hybridlet install`; `hybridlet uninstall` removes it.
[Unit]
Description=Kubernetes kubelet (EKS Hybrid Nodes)
Documentation=https://kubernetes.io/docs/reference/command-line-tools-reference/kubelet/
Wants=containerd.service
After=containerd.service hybridlet.service network-online.target

[Service]
# Written by `hybridlet init`: NODEADM_KUBELET_ARGS=--config=... --kubeconfig=... and the
# user's spec.kubelet.flags.
EnvironmentFile=/etc/eks/kubelet/environment
ExecStart=/usr/bin/kubelet $NODEADM_KUBELET_ARGS
Restart=on-failure
RestartSec=5
# Only the kubelet itself: containers belong to containerd and must survive a restart.
KillMode=process
CPUAccounting=true
MemoryAccounting=true

[Install]
WantedBy=multi-user.target
",
    )
    .owned_by(crate::KUBELET_UNIT)
}
