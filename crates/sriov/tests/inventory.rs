//! The SR-IOV inventory on the fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use hybridlet_sriov::discover;
use hybridlet_sys::{HostRoot, PciAddress, Sysfs};

fn inventory(build: impl Fn(&std::path::Path)) -> (tempfile::TempDir, hybridlet_sriov::Inventory) {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let sysfs = Sysfs::new(&HostRoot::new(dir.path()));
    let (devices, _) = sysfs.pci_devices().unwrap();
    let inv = discover(&sysfs, &devices);
    (dir, inv)
}

#[test]
fn dgx_has_ten_pfs_and_128_vfs() {
    let (_d, inv) = inventory(|p| {
        hybridlet_fixtures::dgx_h200(p, 16).unwrap();
    });
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert_eq!(inv.pfs.len(), 10);
    assert_eq!(inv.vf_count(), 128);
    let pf = inv
        .pfs
        .iter()
        .find(|p| p.device.address.as_str() == "0000:19:00.0")
        .unwrap();
    assert_eq!(pf.netdev.as_deref(), Some("enp25s0np0"));
    assert_eq!(pf.link_speed_mbps, Some(400_000));
    assert_eq!((pf.total_vfs, pf.num_vfs), (16, 16));
    assert_eq!(pf.device.numa_node, Some(0));
    let vf = &pf.vfs[3];
    assert_eq!(vf.index, 3);
    assert_eq!(
        vf.device.address,
        PciAddress::parse("0000:19:00.5").unwrap()
    );
    assert_eq!(vf.device.driver.as_deref(), Some("mlx5_core"));
    assert_eq!(vf.device.net_names, ["enp25s0v3"]);
    assert_eq!(vf.device.rdma_devices, ["mlx5_4"]);
    assert!(!vf.is_vfio());
    assert_eq!(
        vf.device.topology.pcie_switch,
        PciAddress::parse("0000:16:00.0")
    );
    let storage = inv
        .pfs
        .iter()
        .find(|p| p.device.address.as_str() == "0000:ab:00.0")
        .unwrap();
    assert!(storage.vfs.is_empty());
    assert_eq!(storage.link_speed_mbps, Some(200_000));
}

#[test]
fn e810_with_vfio_vfs() {
    let (_d, inv) = inventory(|p| hybridlet_fixtures::e810_server(p).unwrap());
    assert_eq!(inv.pfs.len(), 1);
    let pf = &inv.pfs[0];
    assert_eq!(pf.vfs.len(), 64);
    assert_eq!(pf.vfs.iter().filter(|v| v.is_vfio()).count(), 4);
    assert_eq!(pf.vfs[63].device.address.as_str(), "0000:81:08.1");
    assert!(pf.vfs[63].device.iommu_group.is_some());
}

#[test]
fn broken_tree_warns_and_keeps_what_is_readable() {
    let (_d, inv) = inventory(|p| hybridlet_fixtures::broken(p).unwrap());
    let addrs: Vec<&str> = inv.pfs.iter().map(|p| p.device.address.as_str()).collect();
    assert_eq!(addrs, ["0000:3b:00.0", "0000:3f:00.0"]);
    assert_eq!(inv.pfs[1].vfs.len(), 1);
    let all = inv.warnings.join("\n");
    assert!(
        all.contains("0000:3f:00.0/virtfn1: VF link without a device"),
        "{all}"
    );
    assert!(
        all.contains("0000:3f:00.0: sriov_numvfs is 2 but 1 VFs were found"),
        "{all}"
    );
}
