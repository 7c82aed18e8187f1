//! The kernel settings the kubelet needs: modules to load and sysctls.

/// Kernel modules the node needs at every boot (systemd-modules-load reads this).
pub const MODULES_LOAD_PATH: &str = "/etc/modules-load.d/hybridlet.conf";
/// Sysctls the node needs (systemd-sysctl and `sysctl --system` read this).
pub const SYSCTL_PATH: &str = "/etc/sysctl.d/99-hybridlet.conf";
pub(crate) const MODULES_LOAD: &str = "# Written by hybridlet init; removed by hybridlet uninstall.\n# containerd's overlayfs snapshotter\noverlay\n# pod traffic through Linux bridges seen by iptables\nbr_netfilter\n";
pub(crate) const SYSCTL: &str = "# Written by hybridlet init; removed by hybridlet uninstall.\n# Pods reach anything off the node only with forwarding on.\nnet.ipv4.ip_forward = 1\n# What the kubelet's protectKernelDefaults expects (as nodeadm sets them).\nvm.overcommit_memory = 1\nkernel.panic = 10\nkernel.panic_on_oops = 1\n";
