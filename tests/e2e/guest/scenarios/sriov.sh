# Scenario 5: SR-IOV on an emulated igb NIC (QEMU >= 8): hybridlet's numVfs setting
# creates the VFs at start-up, and `hybridlet devices` sees the PF, its VFs (bound to
# igbvf, with netdevs) and their PCIe topology.
. /mnt/share/guest/lib.sh

pf=""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x8086 ] && [ "$(cat "$d/device")" = 0x10c9 ]; then pf=$(basename "$d"); fi
done
[ -n "$pf" ] || fail "no igb (8086:10c9) device in the VM; is QEMU >= 8 with -device igb?"
echo "    igb PF at $pf, sriov_totalvfs=$(cat /sys/bus/pci/devices/$pf/sriov_totalvfs)"
expect_eq "VFs before" 0 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"

cat > /tmp/sriov.yaml <<YAML
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  sriov:
    physicalFunctions:
      - pciAddress: "$pf"
        numVfs: 2
YAML

step "hybridlet creates the VFs at start-up"
install_hybridlet /tmp/sriov.yaml
expect_eq "sriov_numvfs" 2 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"
for i in 0 1; do
  vf=$(basename "$(readlink -f /sys/bus/pci/devices/$pf/virtfn$i)")
  wait_for 30 "VF $vf bound to igbvf" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$vf/driver)\")\" = igbvf ]"
done

step "hybridlet devices sees the PF and its VFs"
expect_ok hybridlet devices
hybridlet devices -o json > /tmp/devices.json
grep -q "\"$pf\"" /tmp/devices.json || fail "PF $pf not in devices -o json"
count=$(grep -o '"pciAddress": *"[^"]*"' /tmp/devices.json | grep -vc "\"$pf\"" || true)
[ "$count" -ge 2 ] || fail "expected the 2 VFs in devices -o json: $(cat /tmp/devices.json | head -c 2000)"
grep -q '"pcieRoot": *"pci0000:00"' /tmp/devices.json || fail "no pcieRoot pci0000:00 in devices -o json"
grep -q '"driver": *"igbvf"' /tmp/devices.json || fail "VF driver igbvf not reported"
echo "    ok: PF, 2 VFs, igbvf, pcieRoot"
hybridlet devices | tail -n 1 | grep -q '1 SR-IOV PFs, 2 VFs' || fail "summary line: $(hybridlet devices | tail -n 1)"

step "a restart with the same setting keeps the VFs (no 0 -> N churn)"
vf0=$(readlink -f /sys/bus/pci/devices/$pf/virtfn0)
expect_ok systemctl restart hybridlet
expect_eq "sriov_numvfs after restart" 2 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"
remove_hybridlet
