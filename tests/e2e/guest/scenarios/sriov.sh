# Scenario 5: SR-IOV on an emulated igb NIC (QEMU >= 8, behind an emulated Intel IOMMU):
# hybridlet's numVfs setting creates the VFs at start-up; `hybridlet devices` sees the PF,
# its VFs (bound to igbvf) and their PCIe topology; the SR-IOV DRA driver publishes them to
# a fake API server, and a prepared VF moves to vfio-pci (and back at unprepare); a VF count
# changed by hand reaches the slice through the kernel's uevents.
. /mnt/share/guest/lib.sh

pf=""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x8086 ] && [ "$(cat "$d/device")" = 0x10c9 ]; then pf=$(basename "$d"); fi
done
[ -n "$pf" ] || fail "no igb (8086:10c9) device in the VM; is QEMU >= 8 with -device igb?"
# Right after boot udev may not have bound igb yet (sriov_numvfs answers ENOENT then).
modprobe igb
wait_for 60 "igb bound to the PF" test -e "/sys/bus/pci/devices/$pf/driver"
echo "    igb PF at $pf, sriov_totalvfs=$(cat /sys/bus/pci/devices/$pf/sriov_totalvfs)"
expect_eq "VFs before" 0 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"
# Start from a non-zero count, so hybridlet's change is N -> M, which the kernel refuses
# unless it goes through 0 (EBUSY): shown here first, then hybridlet must manage it.
echo 1 > /sys/bus/pci/devices/$pf/sriov_numvfs
if err=$(sh -c "echo 3 > /sys/bus/pci/devices/$pf/sriov_numvfs" 2>&1); then
  fail "the kernel accepted 1 -> 3 VFs without going through 0"
fi
echo "    ok: the kernel refuses 1 -> 3 directly ($err)"
expect_eq "VFs before hybridlet" 1 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"

cat > /tmp/sriov.yaml <<YAML
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  sriov:
    physicalFunctions:
      - pciAddress: "$pf"
        numVfs: 2
YAML

step "hybridlet changes the VF count at start-up (1 -> 0 -> 2)"
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

step "SR-IOV DRA: VFs in a ResourceSlice; prepare moves a VF to vfio-pci, unprepare gives it back"
modprobe vfio-pci
start_fake_apiserver rig
cat >> /etc/hybridlet/config.d/50-e2e.yaml <<'YAML'
  dra:
    sriov:
      enabled: true
YAML
expect_ok hybridlet check --config-only
expect_ok systemctl restart hybridlet
wait_for 60 "a ResourceSlice with both VFs" sh -c \
  "[ \$(curl -fsS $api/apis/resource.k8s.io/v1/resourceslices | grep -o '\"name\":\"vf-' | wc -l) -ge 2 ]"
slices=$(curl -fsS "$api/apis/resource.k8s.io/v1/resourceslices")
echo "$slices" | grep -q '"driver":"sriov.hybridlet.io"' || fail "slice driver: $slices"
echo "$slices" | grep -q "\"pfPciAddress\":{\"string\":\"$pf\"}" || fail "no pfPciAddress $pf in the slice: $slices"
echo "$slices" | grep -q '"resource.kubernetes.io/pcieRoot":{"string":"pci0000:00"}' || fail "no pcieRoot in the slice"
vf=$(basename "$(readlink -f /sys/bus/pci/devices/$pf/virtfn0)")
device="vf-$(echo "$vf" | tr ':.' '--')"
echo "    ok: slice lists $device (PF $pf)"
claim=$(curl -fsS -X POST -H 'Content-Type: application/json' -d "{\"apiVersion\":\"resource.k8s.io/v1\",\"kind\":\"ResourceClaim\",\"metadata\":{\"name\":\"dpdk\",\"namespace\":\"net\"},\"spec\":{},\"status\":{\"allocation\":{\"devices\":{\"results\":[{\"request\":\"vf\",\"driver\":\"sriov.hybridlet.io\",\"pool\":\"rig\",\"device\":\"$device\"}]}}}}" \
  "$api/apis/resource.k8s.io/v1/namespaces/net/resourceclaims")
uid=$(echo "$claim" | grep -o '"uid":"[^"]*"' | head -n 1 | cut -d'"' -f4)
dra_sock=/var/lib/kubelet/plugins/sriov.hybridlet.io/dra.sock
expect_ok "$artifacts/e2e-kubelet" --socket "$dra_sock" dra-prepare --namespace net --name dpdk --uid "$uid"
expect_eq "VF driver after prepare" vfio-pci "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver)")"
group=$(basename "$(readlink /sys/bus/pci/devices/$vf/iommu_group)")
[ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group does not exist"
grep -q "/dev/vfio/$group" "/var/run/cdi/sriov_hybridlet_io-$uid.json" || fail "CDI spec lacks /dev/vfio/$group"
echo "    ok: /dev/vfio/$group in the CDI spec"
# A real CDI consumer: podman (Debian 4.3) injects the device by the name the kubelet got.
cdi_name=$("$artifacts/e2e-kubelet" --socket "$dra_sock" dra-prepare --namespace net --name dpdk --uid "$uid" | grep -o 'sriov\.hybridlet\.io/claim=[A-Za-z0-9_.:-]*' | head -n 1)
[ -n "$cdi_name" ] || fail "no CDI name in the prepare answer"
podman_with_cdi "$cdi_name" sh -c "ls /dev/vfio; echo PCI=\$PCIDEVICE_SRIOV_HYBRIDLET_IO"
inside=$podman_out
echo "$inside" | grep -qx "$group" || fail "/dev/vfio/$group not in the container: $inside"
echo "$inside" | grep -qx vfio || fail "/dev/vfio/vfio not in the container: $inside"
echo "$inside" | grep -qx "PCI=$vf" || fail "PCIDEVICE_SRIOV_HYBRIDLET_IO is not $vf in the container: $inside"
echo "    ok: podman ran a container with $cdi_name: /dev/vfio/$group, /dev/vfio/vfio, PCIDEVICE_SRIOV_HYBRIDLET_IO=$vf"
expect_ok "$artifacts/e2e-kubelet" --socket "$dra_sock" dra-prepare --namespace net --name dpdk --uid "$uid"
expect_ok "$artifacts/e2e-kubelet" --socket "$dra_sock" dra-unprepare --namespace net --name dpdk --uid "$uid"
wait_for 10 "VF back on igbvf" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$vf/driver)\")\" = igbvf ]"
[ ! -e "/var/run/cdi/sriov_hybridlet_io-$uid.json" ] || fail "CDI spec left after unprepare"

step "netdev mode: the claim's config keeps the VF on igbvf and hands over its interface"
wait_for 10 "VF on igbvf with a netdev" sh -c "ls /sys/bus/pci/devices/$vf/net/ | grep -q ."
ifname=$(ls "/sys/bus/pci/devices/$vf/net/" | head -n 1)
claim=$(curl -fsS -X POST -H 'Content-Type: application/json' -d "{\"apiVersion\":\"resource.k8s.io/v1\",\"kind\":\"ResourceClaim\",\"metadata\":{\"name\":\"netdev\",\"namespace\":\"net\"},\"spec\":{},\"status\":{\"allocation\":{\"devices\":{\"results\":[{\"request\":\"vf\",\"driver\":\"sriov.hybridlet.io\",\"pool\":\"rig\",\"device\":\"$device\"}],\"config\":[{\"source\":\"FromClass\",\"requests\":[],\"opaque\":{\"driver\":\"sriov.hybridlet.io\",\"parameters\":{\"mode\":\"netdev\"}}}]}}}}" \
  "$api/apis/resource.k8s.io/v1/namespaces/net/resourceclaims")
uid=$(echo "$claim" | grep -o '"uid":"[^"]*"' | head -n 1 | cut -d'"' -f4)
expect_ok "$artifacts/e2e-kubelet" --socket "$dra_sock" dra-prepare --namespace net --name netdev --uid "$uid"
expect_eq "VF driver in netdev mode" igbvf "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver)")"
grep -q "SRIOV_HYBRIDLET_IO_NETDEV=$ifname" "/var/run/cdi/sriov_hybridlet_io-$uid.json" || fail "CDI spec lacks the netdev $ifname: $(cat /var/run/cdi/sriov_hybridlet_io-$uid.json)"
grep -q '/dev/vfio' "/var/run/cdi/sriov_hybridlet_io-$uid.json" && fail "netdev mode injected vfio nodes"
cdi_name=$("$artifacts/e2e-kubelet" --socket "$dra_sock" dra-prepare --namespace net --name netdev --uid "$uid" | grep -o 'sriov\.hybridlet\.io/claim=[A-Za-z0-9_.:-]*' | head -n 1)
podman_with_cdi "$cdi_name" sh -c 'echo NETDEV=$SRIOV_HYBRIDLET_IO_NETDEV; ls /dev/vfio 2>&1 || true'
inside=$podman_out
echo "$inside" | grep -qx "NETDEV=$ifname" || fail "SRIOV_HYBRIDLET_IO_NETDEV is not $ifname in the container: $inside"
echo "$inside" | grep -q 'vfio$' && fail "netdev mode gave the container /dev/vfio: $inside"
echo "    ok: podman ran a container with $cdi_name: SRIOV_HYBRIDLET_IO_NETDEV=$ifname, no /dev/vfio"
expect_ok "$artifacts/e2e-kubelet" --socket "$dra_sock" dra-unprepare --namespace net --name netdev --uid "$uid"
expect_eq "VF driver after unprepare" igbvf "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver)")"
echo "    ok: $ifname handed over, VF left on igbvf"

step "sriov_numvfs changed by hand: the slice follows the kernel's uevents, not a timer"
# The device walk's timer is 10-15 minutes; only the uevents of the VFs coming and going
# can bring the slice up to date in seconds.
for n in 4 2; do
  echo 0 > "/sys/bus/pci/devices/$pf/sriov_numvfs"
  # The write returns once the kernel has created the VFs (and sent their uevents).
  echo "$n" > "/sys/bus/pci/devices/$pf/sriov_numvfs"
  start=$(date +%s%N)
  wait_for 30 "a ResourceSlice with $n VFs" sh -c "[ \$(curl -fsS $api/apis/resource.k8s.io/v1/resourceslices | grep -o '\"name\":\"vf-' | wc -l) -eq $n ]"
  echo "    ok: the slice lists $n VFs $(( ($(date +%s%N) - start) / 1000000 )) ms after the VFs were created (under TCG emulation)"
done
journalctl -u hybridlet --no-pager -o short-precise | grep -E "came or went|restarting it|ResourceSlices published" | tail -n 6 | sed 's/^/      /'
journalctl -u hybridlet --no-pager | grep -q "its devices came or went; restarting it" \
  || fail "no restart of the SR-IOV driver after the VF change: $(journalctl -u hybridlet --no-pager | tail -n 30)"
for i in 0 1; do
  vf=$(basename "$(readlink -f /sys/bus/pci/devices/$pf/virtfn$i)")
  wait_for 30 "VF $vf bound to igbvf" sh -c "[ \"\$(basename \"\$(readlink /sys/bus/pci/devices/$vf/driver)\")\" = igbvf ]"
done
kill %1 2>/dev/null || true

step "a restart with the same setting keeps the VFs (no 0 -> N churn)"
vf0=$(readlink -f /sys/bus/pci/devices/$pf/virtfn0)
wait_for 10 "VF 0 with a netdev" sh -c "ls $vf0/net/ | grep -q ."
# A VF destroyed and created again gets a new netdev, with a new ifindex.
ifindex_before=$(cat "$vf0"/net/*/ifindex)
expect_ok systemctl restart hybridlet
expect_eq "sriov_numvfs after restart" 2 "$(cat /sys/bus/pci/devices/$pf/sriov_numvfs)"
expect_eq "VF 0 is the same device" "$vf0" "$(readlink -f /sys/bus/pci/devices/$pf/virtfn0)"
expect_eq "VF 0's netdev ifindex (unchanged: not recreated)" "$ifindex_before" "$(cat "$vf0"/net/*/ifindex)"
remove_hybridlet
