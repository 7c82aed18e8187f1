//! PCI discovery against generated sysfs trees: every attribute of chosen devices.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use hybridlet_fixtures as fx;
use hybridlet_sys::pci::SriovCapability;
use hybridlet_sys::{HostRoot, PciAddress, Sysfs};

fn addr(s: &str) -> PciAddress {
    PciAddress::parse(s).unwrap()
}

#[test]
fn dgx_gpu_pf_and_vf_in_full() {
    let dir = tempfile::tempdir().unwrap();
    fx::dgx_h200(dir.path(), 16).unwrap();
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let (devices, skipped) = sysfs.pci_devices().unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    // 8 switches × (root port, USP, 2 DSPs, GPU, PF, 16 VFs) + 2 × (root port, PF)
    // + NVMe root port and drive.
    assert_eq!(devices.len(), 8 * 22 + 2 * 2 + 2);

    // GPU 5 (NUMA 1, switch under pci0000:bf).
    let gpu = sysfs.pci_device(&addr("0000:c2:00.0")).unwrap();
    assert_eq!(
        (gpu.vendor_id, gpu.device_id, gpu.class),
        (0x10de, 0x2335, 0x030200)
    );
    assert_eq!(gpu.class_code(), 0x0302);
    assert_eq!(gpu.driver.as_deref(), Some("nvidia"));
    assert_eq!(gpu.numa_node, Some(1));
    assert!(gpu.iommu_group.is_some());
    assert_eq!(gpu.sriov, None);
    assert_eq!(gpu.physfn, None);
    assert!(gpu.virtfns.is_empty() && gpu.net_names.is_empty() && gpu.rdma_devices.is_empty());
    assert_eq!(gpu.topology.pcie_root, "pci0000:bf");
    assert_eq!(gpu.topology.pcie_switch, Some(addr("0000:c0:00.0")));
    assert_eq!(
        gpu.topology.path,
        [
            addr("0000:bf:01.0"),
            addr("0000:c0:00.0"),
            addr("0000:c1:00.0"),
            addr("0000:c2:00.0")
        ]
    );

    // Its rail NIC: same switch, same root.
    let pf = sysfs.pci_device(&addr("0000:c3:00.0")).unwrap();
    assert_eq!(
        (pf.vendor_id, pf.device_id, pf.class),
        (0x15b3, 0x1021, 0x020000)
    );
    assert!(pf.is_network());
    assert_eq!(pf.driver.as_deref(), Some("mlx5_core"));
    assert_eq!(pf.numa_node, Some(1));
    assert_eq!(
        pf.sriov,
        Some(SriovCapability {
            total_vfs: 16,
            num_vfs: 16
        })
    );
    assert_eq!(pf.net_names, ["enp195s0np0"]);
    assert_eq!(pf.rdma_devices, ["mlx5_85"]);
    assert_eq!(pf.virtfns.len(), 16);
    assert_eq!(pf.virtfns[0], (0, addr("0000:c3:00.2")));
    assert_eq!(pf.virtfns[15], (15, addr("0000:c3:02.1")));
    assert_eq!(pf.topology.pcie_switch, gpu.topology.pcie_switch);
    assert_eq!(pf.topology.pcie_root, gpu.topology.pcie_root);
    assert_eq!(sysfs.link_speed_mbps("enp195s0np0"), Some(400_000));
    assert_eq!(sysfs.oper_state("enp195s0np0").as_deref(), Some("up"));

    let vf = sysfs.pci_device(&addr("0000:c3:02.1")).unwrap();
    assert_eq!((vf.vendor_id, vf.device_id), (0x15b3, 0x101e));
    assert_eq!(vf.physfn, Some(addr("0000:c3:00.0")));
    assert_eq!(vf.sriov, None);
    assert_eq!(vf.net_names, ["enp195s0v15"]);
    assert_eq!(vf.rdma_devices, ["mlx5_101"]);
    assert_ne!(vf.iommu_group, pf.iommu_group);
    assert_eq!(vf.topology.pcie_switch, gpu.topology.pcie_switch);

    // A storage NIC on a root port: no switch.
    let storage = sysfs.pci_device(&addr("0000:0e:00.0")).unwrap();
    assert_eq!(storage.topology.pcie_root, "pci0000:0d");
    assert_eq!(storage.topology.pcie_switch, None);
    assert_eq!(
        storage.sriov,
        Some(SriovCapability {
            total_vfs: 16,
            num_vfs: 0
        })
    );
    assert_eq!(sysfs.link_speed_mbps("enp14s0np0"), Some(200_000));
}

#[test]
fn e810_vfs_on_vfio_have_no_netdev() {
    let dir = tempfile::tempdir().unwrap();
    fx::e810_server(dir.path()).unwrap();
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let pf = sysfs.pci_device(&addr("0000:81:00.0")).unwrap();
    assert_eq!(
        pf.sriov,
        Some(SriovCapability {
            total_vfs: 128,
            num_vfs: 64
        })
    );
    assert_eq!(pf.virtfns.len(), 64);
    assert_eq!(pf.topology.pcie_switch, None);
    assert_eq!(pf.topology.pcie_root, "pci0000:80");
    let vfio = sysfs.pci_device(&pf.virtfns[61].1).unwrap();
    assert_eq!(vfio.driver.as_deref(), Some("vfio-pci"));
    assert!(vfio.net_names.is_empty());
    let iavf = sysfs.pci_device(&pf.virtfns[7].1).unwrap();
    assert_eq!(iavf.driver.as_deref(), Some("iavf"));
    assert_eq!(iavf.net_names, ["ens2f0v7"]);
    assert_eq!(iavf.numa_node, Some(1));
}

#[test]
fn broken_tree_skips_bad_devices_naming_paths() {
    let dir = tempfile::tempdir().unwrap();
    fx::broken(dir.path()).unwrap();
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let (devices, skipped) = sysfs.pci_devices().unwrap();
    let found: Vec<&str> = devices.iter().map(|d| d.address.as_str()).collect();
    assert_eq!(
        found,
        [
            "0000:3a:00.0",
            "0000:3b:00.0",
            "0000:3b:00.2",
            "0000:3b:00.3",
            "0000:3f:00.0",
            "0000:3f:00.2"
        ]
    );
    // The PF whose second VF vanished is kept, with that VF left out and its link named.
    let pf2 = devices
        .iter()
        .find(|d| d.address.as_str() == "0000:3f:00.0")
        .unwrap();
    assert_eq!(pf2.virtfns, [(0, addr("0000:3f:00.2"))]);
    assert_eq!(pf2.dangling_links.len(), 1);
    assert!(pf2.dangling_links[0].ends_with("0000:3f:00.0/virtfn1"));
    let reasons: Vec<String> = skipped.iter().map(|s| s.error.to_string()).collect();
    assert_eq!(skipped.len(), 4, "{reasons:#?}");
    let all = reasons.join("\n");
    for needle in [
        "0000:3c:00.0/vendor",
        "0000:3d:00.0/class: \"not-a-class\" is not a hex class code",
        "0000:3e:00.0",
        "0000:40:00.0/numa_node: \"many\" is not a NUMA node number",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}

#[test]
fn provisioning_goes_through_zero_and_respects_totalvfs() {
    let dir = tempfile::tempdir().unwrap();
    fx::e810_server(dir.path()).unwrap();
    // The kernel stand-in records each write and refuses 64 → 32 directly (EBUSY).
    let kernel = fx::kernel::KernelStandIn::new(dir.path());
    let sysfs =
        Sysfs::new(&HostRoot::new(dir.path())).with_writer(std::sync::Arc::new(kernel.writer()));
    let pf = addr("0000:81:00.0");
    let numvfs = "devices/pci0000:80/0000:80:02.0/0000:81:00.0/sriov_numvfs";
    let err = sysfs.set_num_vfs(&pf, 129).unwrap_err();
    assert!(err.to_string().contains("at most 128 VFs"), "{err}");
    assert_eq!(kernel.writes(), []);
    sysfs.set_num_vfs(&pf, 32).unwrap();
    assert_eq!(
        kernel.writes(),
        [
            (numvfs.to_string(), "0\n".to_string()),
            (numvfs.to_string(), "32\n".to_string())
        ]
    );
    assert_eq!(sysfs.pci_device(&pf).unwrap().virtfns.len(), 32);
    // Same count: nothing written. From zero: one write.
    sysfs.set_num_vfs(&pf, 32).unwrap();
    sysfs.set_num_vfs(&pf, 0).unwrap();
    sysfs.set_num_vfs(&pf, 4).unwrap();
    let counts: Vec<String> = kernel
        .writes()
        .into_iter()
        .skip(2)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(counts, ["0\n", "4\n"]);
    assert_eq!(sysfs.pci_device(&pf).unwrap().virtfns.len(), 4);
    let err = sysfs.set_num_vfs(&addr("0000:80:02.0"), 1).unwrap_err();
    assert!(err.to_string().contains("does not support SR-IOV"), "{err}");
}

#[test]
fn the_kernel_stand_in_refuses_what_the_kernel_refuses() {
    // The stand-in itself: a direct N → M write is EBUSY, as on a real kernel, so a
    // provisioning that skipped the 0 would fail in the test above.
    let dir = tempfile::tempdir().unwrap();
    fx::e810_server(dir.path()).unwrap();
    let kernel = fx::kernel::KernelStandIn::new(dir.path());
    let write = kernel.writer();
    let numvfs = dir
        .path()
        .join("sys/devices/pci0000:80/0000:80:02.0/0000:81:00.0/sriov_numvfs");
    let err = write(&numvfs, "32\n").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ResourceBusy);
    assert_eq!(std::fs::read_to_string(&numvfs).unwrap(), "64\n");
}

#[test]
fn no_pci_bus_is_empty_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let (devices, skipped) = sysfs.pci_devices().unwrap();
    assert!(devices.is_empty() && skipped.is_empty());
}
