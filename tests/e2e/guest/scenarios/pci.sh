# Scenario 6: the PCI DRA driver on real emulated PCI functions behind the emulated Intel
# IOMMU: QEMU's `edu` device (1234:11e8, no kernel driver) and a virtio-rng function
# (1af4, on virtio-pci) share one slot behind a PCIe switch, so one IOMMU group. The
# driver publishes both; a claim for the edu device moves the whole group to vfio-pci
# (both functions), /dev/vfio/<group> is in the CDI spec and podman injects it;
# unprepare gives each function back its own driver. kill -9 in the middle of moving the
# group (vfio-pci not loaded yet, so the first function sits unbound) is undone when
# systemd restarts the daemon.
. /mnt/share/guest/lib.sh

edu="" rng=""
for d in /sys/bus/pci/devices/*; do
  case "$(cat "$d/vendor"):$(cat "$d/device")" in
    0x1234:0x11e8) edu=$(basename "$d") ;;
    0x1af4:*) [ "$(cat "$d/class")" = 0x00ff00 ] && rng=$(basename "$d") ;;
  esac
done
[ -n "$edu" ] || fail "no edu (1234:11e8) device in the VM; is the VM started with -device edu?"
[ -n "$rng" ] || fail "no virtio-rng function in the VM"
group=$(basename "$(readlink /sys/bus/pci/devices/$edu/iommu_group)")
members=$(ls /sys/kernel/iommu_groups/$group/devices | tr '\n' ' ')
echo "    edu at $edu, virtio-rng at $rng; IOMMU group $group: $members"
echo "$members" | grep -q "$rng" || fail "the two functions are not in one IOMMU group: $members"
drv() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null || true; }
wait_for 30 "virtio-pci bound to $rng" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$rng/driver)\")\" = virtio-pci ]"
expect_eq "edu driver before" "" "$(drv "$edu")"

# Start with vfio-pci unloaded (the SR-IOV scenario loads it): a bind to it then leaves
# the function unbound for the 2 s the daemon waits, the window the kill below needs.
modprobe -r vfio_pci 2>/dev/null || true
[ ! -d /sys/bus/pci/drivers/vfio-pci ] || fail "vfio-pci is still loaded; cannot open the crash window"

start_fake_apiserver rig
cat > /tmp/pci.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  dra:
    pci:
      enabled: true
      allow:
        - {vendor: "0x1234", device: "0x11e8", deviceClass: fpga}
        - {vendor: "0x1af4", class: "0x00ff"}
YAML
step "the PCI driver publishes the allowlisted functions"
install_hybridlet /tmp/pci.yaml
expect_ok hybridlet check --config-only
edu_dev="pci-$(echo "$edu" | tr ':.' '--')"
wait_for 60 "a ResourceSlice with $edu_dev" sh -c \
  "curl -fsS $api/apis/resource.k8s.io/v1/resourceslices | grep -q '\"name\":\"$edu_dev\"'"
slices=$(curl -fsS "$api/apis/resource.k8s.io/v1/resourceslices")
echo "$slices" | grep -q '"driver":"pci.hybridlet.io"' || fail "slice driver: $slices"
echo "$slices" | grep -q '"deviceClass":{"string":"fpga"}' || fail "no deviceClass fpga: $slices"
echo "$slices" | grep -q "\"iommuGroup\":{\"int\":$group}" || fail "no iommuGroup $group: $slices"
echo "$slices" | grep -q '"hybridlet.io/pcieSwitch":{"string":"' || fail "no pcieSwitch attribute: $slices"
echo "$slices" | grep -q "\"resource.kubernetes.io/pciBusID\":{\"string\":\"$edu\"}" || fail "no pciBusID $edu: $slices"
echo "$slices" | grep -q '"capacity":{"bar0"' || fail "no BAR capacity: $slices"
echo "    ok: $edu_dev published (fpga, group $group, on a PCIe switch, bar0 capacity)"

claim_json() {
  echo "{\"apiVersion\":\"resource.k8s.io/v1\",\"kind\":\"ResourceClaim\",\"metadata\":{\"name\":\"$1\",\"namespace\":\"fpga\"},\"spec\":{},\"status\":{\"allocation\":{\"devices\":{\"results\":[{\"request\":\"fpga\",\"driver\":\"pci.hybridlet.io\",\"pool\":\"rig\",\"device\":\"$edu_dev\"}]}}}}"
}
new_claim() {
  curl -fsS -X POST -H 'Content-Type: application/json' -d "$(claim_json "$1")" \
    "$api/apis/resource.k8s.io/v1/namespaces/fpga/resourceclaims" | grep -o '"uid":"[^"]*"' | head -n 1 | cut -d'"' -f4
}
dra_sock=/var/lib/kubelet/plugins/pci.hybridlet.io/dra.sock
dra() { "$artifacts/e2e-kubelet" --socket "$dra_sock" "$@"; }

step "kill -9 while the group moves; the restarted daemon puts it back"
uid=$(new_claim crash)
pid=$(main_pid)
dra dra-prepare --namespace fpga --name crash --uid "$uid" > /tmp/crash.out 2>&1 &
caller=$!
# The first function leaves virtio-pci for a vfio-pci that is not there.
# A tight loop, not wait_for: the window is the 2 s the daemon waits for the driver.
for _ in $(seq 3000); do
  if [ ! -e "/sys/bus/pci/devices/$rng/driver" ] && [ "$(cat "/sys/bus/pci/devices/$rng/driver_override")" = vfio-pci ]; then
    break
  fi
  sleep 0.01
done
[ ! -e "/sys/bus/pci/devices/$rng/driver" ] || fail "$rng never left virtio-pci: $(cat /tmp/crash.out)"
kill -9 "$pid"
echo "    ok: killed the daemon with $rng unbound and its override set to vfio-pci"
wait "$caller" || true
echo "    prepare during the kill: $(tr '\n' ' ' < /tmp/crash.out | head -c 300)"
wait_for 60 "systemd restarted hybridlet" sh -c "[ \"\$(systemctl show -p MainPID --value hybridlet)\" != 0 ] && [ \"\$(systemctl show -p MainPID --value hybridlet)\" != $pid ] && systemctl is-active -q hybridlet"
wait_for 30 "$rng back on virtio-pci" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$rng/driver)\")\" = virtio-pci ]"
expect_eq "$rng driver_override after restart" "(null)" "$(cat /sys/bus/pci/devices/$rng/driver_override)"
expect_eq "edu driver after restart" "" "$(drv "$edu")"
grep -q '"attaching"' /var/lib/hybridlet/dra-pci.hybridlet.io.json && fail "the intent is still in the checkpoint"
journalctl -u hybridlet --no-pager | grep -q "released the devices of a prepare interrupted by a crash" \
  || fail "the restarted daemon did not say it undid the interrupted prepare"
echo "    ok: the interrupted prepare was undone at start"
dra dra-unprepare --namespace fpga --name crash --uid "$uid" >/dev/null 2>&1 || true

step "prepare: the whole group on vfio-pci, /dev/vfio/$group in the CDI spec and in a container"
modprobe vfio-pci
uid=$(new_claim edu)
wait_for 30 "the PCI DRA socket" test -S "$dra_sock"
expect_ok dra dra-prepare --namespace fpga --name edu --uid "$uid"
expect_eq "edu driver after prepare" vfio-pci "$(drv "$edu")"
expect_eq "virtio-rng driver after prepare (same group)" vfio-pci "$(drv "$rng")"
[ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group does not exist"
spec=/var/run/cdi/pci_hybridlet_io-$uid.json
grep -q "/dev/vfio/$group" "$spec" || fail "CDI spec lacks /dev/vfio/$group: $(cat "$spec")"
grep -q "PCI_RESOURCE_PCI_HYBRIDLET_IO=$edu" "$spec" || fail "CDI spec lacks the bus ID: $(cat "$spec")"
cdi_name=$(dra dra-prepare --namespace fpga --name edu --uid "$uid" | grep -o 'pci\.hybridlet\.io/claim=[A-Za-z0-9_.:-]*' | head -n 1)
[ -n "$cdi_name" ] || fail "no CDI name in the prepare answer"
podman_with_cdi "$cdi_name" sh -c "ls /dev/vfio; echo BUS=\$PCI_RESOURCE_PCI_HYBRIDLET_IO"
inside=$podman_out
echo "$inside" | grep -qx "$group" || fail "/dev/vfio/$group not in the container: $inside"
echo "$inside" | grep -qx "BUS=$edu" || fail "PCI_RESOURCE_PCI_HYBRIDLET_IO is not $edu in the container: $inside"
echo "    ok: podman ran a container with $cdi_name: /dev/vfio/$group, PCI_RESOURCE_PCI_HYBRIDLET_IO=$edu"
curl -fsS http://127.0.0.1:9464/metrics | grep -q "hybridlet_pci_device_info{.*pci_bus_id=\"$edu\".*kernel_driver=\"vfio-pci\"" \
  || wait_for 90 "the info series showing vfio-pci" sh -c "curl -fsS http://127.0.0.1:9464/metrics | grep -q 'pci_bus_id=\"$edu\".*kernel_driver=\"vfio-pci\"'"

step "unprepare: each function back as it was"
expect_ok dra dra-unprepare --namespace fpga --name edu --uid "$uid"
wait_for 10 "$rng back on virtio-pci" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$rng/driver)\")\" = virtio-pci ]"
expect_eq "edu driver after unprepare" "" "$(drv "$edu")"
expect_eq "edu driver_override after unprepare" "(null)" "$(cat /sys/bus/pci/devices/$edu/driver_override)"
[ ! -e "$spec" ] || fail "CDI spec left after unprepare"
kill "$api_pid" 2>/dev/null || true
remove_hybridlet
