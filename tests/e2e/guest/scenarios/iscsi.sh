# Scenario 3: iSCSI through hybridlet's CSI socket against a LIO target on 127.0.0.1
# (one process of targetcli: an open target with a loop-backed LUN 0, which can grow,
# and a file-backed LUN 1; a second target that demands CHAP). Stage formats a blank LUN
# once; data survives unstage and stage; raw block publish; logout only after the last
# LUN of a target is unstaged; NodeExpandVolume grows ext4 online; CHAP from secrets.
. /mnt/share/guest/lib.sh

open_iqn=iqn.2024-01.io.example.rig:open
chap_iqn=iqn.2024-01.io.example.rig:chap
by_path() { echo "/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-$1-lun-$2"; }
# Sessions to a target. iscsiadm exits 21 (ISCSI_ERR_NO_OBJS_FOUND) when there are none;
# any other failure is a failure, never "0 sessions".
session_count() {
  local out rc=0
  out=$(iscsiadm -m session 2>&1) || rc=$?
  case "$rc" in
    0) printf '%s\n' "$out" | grep -c " $1 " || true ;;
    21) echo 0 ;;
    *) fail "iscsiadm -m session exited $rc: $out" ;;
  esac
}

step "LIO target"
# multipathd runs only in the multipath step, with its own configuration: left to its
# defaults it could claim the single-path LUNs of the other steps.
systemctl stop multipathd.socket multipathd >/dev/null 2>&1 || true
modprobe loop
truncate -s 256M /var/tmp/lun0.img
truncate -s 64M /var/tmp/lun1.img
truncate -s 64M /var/tmp/lun2.img
loopdev=$(losetup -f --show /var/tmp/lun0.img)
targetcli >/tmp/targetcli.log 2>&1 <<TCLI
/backstores/block create name=lun0 dev=$loopdev
/backstores/fileio create name=lun1 file_or_dev=/var/tmp/lun1.img size=64M
/backstores/fileio create name=lun2 file_or_dev=/var/tmp/lun2.img size=64M
/iscsi create $open_iqn
/iscsi/$open_iqn/tpg1/luns create /backstores/block/lun0
/iscsi/$open_iqn/tpg1/luns create /backstores/fileio/lun1
/iscsi/$open_iqn/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
/iscsi create $chap_iqn
/iscsi/$chap_iqn/tpg1/luns create /backstores/fileio/lun2
/iscsi/$chap_iqn/tpg1 set attribute authentication=1 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
/iscsi/$chap_iqn/tpg1 set auth userid=rig password=rig-chap-secret
/iscsi set discovery_auth enable=1 userid=disc password=disc-chap-secret
exit
TCLI
tail -n 3 /tmp/targetcli.log | sed 's/^/    /'
systemctl start iscsid

cat > /tmp/csi.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  csi:
    iscsi:
      enabled: true
YAML
install_hybridlet /tmp/csi.yaml
wait_for 30 "CSI socket" test -S "$csi_socket"
csi_ok info

base=/var/lib/kubelet/plugins/kubernetes.io/csi/$csi_driver
pods=/var/lib/kubelet/pods/0b1c2d3e-0000-4000-8000-000000000003
st0=$base/v0/globalmount; st1=$base/v1/globalmount; st2=$base/v2/globalmount
mkdir -p "$st0" "$st1" "$st2" "$pods/volumes/kubernetes.io~csi/pv0" "$pods/volumeDevices"
t0=$pods/volumes/kubernetes.io~csi/pv0/mount
t1=$pods/volumeDevices/pv1
lun0=(--attr targetPortal=127.0.0.1 --attr iqn=$open_iqn --attr lun=0 --mode single-writer)
lun1=(--attr targetPortal=127.0.0.1 --attr iqn=$open_iqn --attr lun=1 --mode single-writer --block)

step "stage formats the blank LUN once (twice: idempotent)"
csi_ok stage --volume-id v0 --staging "$st0" "${lun0[@]}"
csi_ok stage --volume-id v0 --staging "$st0" "${lun0[@]}"
dev0=$(readlink -f "$(by_path $open_iqn 0)")
expect_eq "filesystem on LUN 0" ext4 "$(blkid -o value -s TYPE "$dev0")"
expect_eq "one mount at the staging path" 1 "$(awk -v p="$st0" '$5 == p' /proc/self/mountinfo | wc -l)"
expect_eq "node.startup of the record" manual "$(iscsiadm -m node -T $open_iqn -p 127.0.0.1:3260 | awk '$1 == "node.startup" {print $3}')"

step "publish, write a marker, unpublish, unstage (logs out), stage again: marker kept"
csi_ok publish --volume-id v0 --staging "$st0" --target "$t0" "${lun0[@]}"
echo marker-1 > "$t0/marker"; sync
csi_ok unpublish --volume-id v0 --target "$t0"
csi_ok unstage --volume-id v0 --staging "$st0"
csi_ok unstage --volume-id v0 --staging "$st0"
expect_eq "sessions to the open target after the last unstage" 0 "$(session_count $open_iqn)"
csi_ok stage --volume-id v0 --staging "$st0" "${lun0[@]}"
expect_eq "marker survived (not reformatted)" marker-1 "$(cat "$st0/marker")"

step "raw block volume on LUN 1"
csi_ok stage --volume-id v1 --staging "$st1" "${lun1[@]}"
expect_eq "block stage mounts nothing" 0 "$(awk -v p="$st1" '$5 == p' /proc/self/mountinfo | wc -l)"
csi_ok publish --volume-id v1 --staging "$st1" --target "$t1" "${lun1[@]}"
csi_ok publish --volume-id v1 --staging "$st1" --target "$t1" "${lun1[@]}"
[ -b "$t1" ] || fail "the published block target is not the device"
expect_eq "block device size through the target" 67108864 "$(blockdev --getsize64 "$t1")"
printf 'raw-block-data' | dd of="$t1" bs=512 conv=fsync status=none
expect_eq "read back through the device" raw-block-data "$(dd if="$(by_path $open_iqn 1)" bs=14 count=1 status=none)"
csi_ok stats --volume-id v1 --path "$t1"
csi_ok unpublish --volume-id v1 --target "$t1"
[ ! -e "$t1" ] || fail "block target file left behind"

step "unstage LUN 1 keeps the session LUN 0 needs"
csi_ok unstage --volume-id v1 --staging "$st1"
expect_eq "sessions to the open target" 1 "$(session_count $open_iqn)"
[ ! -e "$(by_path $open_iqn 1)" ] || fail "LUN 1's disk is still there"
echo ok > "$st0/still-writable" || fail "LUN 0 broke when LUN 1 was unstaged"
echo "    ok: LUN 0 still in use"

step "NodeExpandVolume grows ext4 online"
before=$(df -B1 --output=size "$st0" | tail -n 1)
truncate -s 512M /var/tmp/lun0.img
losetup -c "$loopdev"
csi_ok expand --volume-id v0 --path "$st0" --required-bytes 536870912
after=$(df -B1 --output=size "$st0" | tail -n 1)
echo "    filesystem size: $before -> $after bytes"
[ "$after" -gt $(( before + 200000000 )) ] || fail "filesystem did not grow"
csi_ok unstage --volume-id v0 --staging "$st0"
expect_eq "logged out" 0 "$(session_count $open_iqn)"

step "CHAP from the node-stage secret (discovery and session)"
chap=(--attr targetPortal=127.0.0.1 --attr iqn=$chap_iqn --attr lun=0 --attr sessionCHAPAuth=true --attr discoveryCHAPAuth=true --mode single-writer)
disc=(--secret discovery.sendtargets.auth.username=disc --secret discovery.sendtargets.auth.password=disc-chap-secret)
csi_code InvalidArgument stage --volume-id v2 --staging "$st2" "${chap[@]}"
# A wrong discovery password: SendTargets discovery (iscsiadm -m discoverydb) is refused.
out=$(kubelet stage --volume-id v2 --staging "$st2" "${chap[@]}" --secret node.session.auth.username=rig --secret node.session.auth.password=rig-chap-secret --secret discovery.sendtargets.auth.username=disc --secret discovery.sendtargets.auth.password=wrong-discovery 2>&1) || true
echo "    $out" | head -c 300; echo
case "$out" in "ERR "*) ;; *) fail "wrong discovery CHAP password: $out" ;; esac
case "$out" in *wrong-discovery*) fail "the discovery password was echoed" ;; esac
out=$(kubelet stage --volume-id v2 --staging "$st2" "${chap[@]}" "${disc[@]}" --secret node.session.auth.username=rig --secret node.session.auth.password=wrong-password 2>&1) || true
echo "    $out" | head -c 300; echo
case "$out" in "ERR FailedPrecondition "*) ;; *) fail "wrong CHAP password: $out" ;; esac
case "$out" in *wrong-password*) fail "the password was echoed" ;; esac
if journalctl -u hybridlet --no-pager | grep -q -e wrong-password -e rig-chap-secret -e disc-chap-secret -e wrong-discovery; then fail "a CHAP password reached the journal"; fi
csi_ok stage --volume-id v2 --staging "$st2" "${chap[@]}" "${disc[@]}" --secret node.session.auth.username=rig --secret node.session.auth.password=rig-chap-secret
grep -rq -e rig-chap-secret -e disc-chap-secret /var/lib/hybridlet && fail "a CHAP password was written to the state directory"
csi_ok unstage --volume-id v2 --staging "$st2"
expect_eq "no sessions left" 0 "$(iscsiadm -m session 2>/dev/null | wc -l)"
expect_eq "no mounts left" 0 "$(mounts_under /var/lib/kubelet)"

step "multipath: one target through two portals, the dm-multipath map staged and torn down map first"
mp_iqn=iqn.2024-01.io.example.rig:multipath
truncate -s 96M /var/tmp/lun3.img
loop3=$(losetup -f --show /var/tmp/lun3.img)
targetcli >>/tmp/targetcli.log 2>&1 <<TCLI
/backstores/block create name=lun3 dev=$loop3
/iscsi create $mp_iqn
/iscsi/$mp_iqn/tpg1/luns create /backstores/block/lun3
/iscsi/$mp_iqn/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
exit
TCLI
# The target listens on 0.0.0.0:3260, so 127.0.0.1 and 127.0.0.2 are two paths to it.
cat > /etc/multipath.conf <<'CONF'
defaults {
    user_friendly_names yes
    find_multipaths yes
}
CONF
systemctl restart multipathd
st3=$base/v3/globalmount; mkdir -p "$st3"
mp=(--attr targetPortal=127.0.0.1 --attr 'portals=["127.0.0.2:3260"]' --attr iqn=$mp_iqn --attr lun=0 --mode single-writer)
csi_ok stage --volume-id v3 --staging "$st3" "${mp[@]}"
csi_ok stage --volume-id v3 --staging "$st3" "${mp[@]}"
expect_eq "sessions to the target (one per portal)" 2 "$(session_count $mp_iqn)"
src=$(findmnt -n -o SOURCE --mountpoint "$st3")
dmsetup table "$src" | grep -q ' multipath ' || fail "staged on $src, not a multipath map: $(dmsetup table "$src" 2>&1)"
map=$(dmsetup info -c --noheadings -o name "$src")
case "$src" in /dev/mapper/*) echo "    ok: staged on $src" ;; *) fail "staged on $src, not the map's stable /dev/mapper name ($map)" ;; esac
expect_eq "paths in the map" 2 "$(multipath -ll "$map" | grep -c 'active ready running')"
expect_eq "filesystem on the map" ext4 "$(blkid -o value -s TYPE "$src")"
echo before > "$st3/marker"; sync

step "multipath: NodeExpandVolume rescans both paths, resizes the map, grows ext4"
before=$(df -B1 --output=size "$st3" | tail -n 1)
truncate -s 256M /var/tmp/lun3.img
losetup -c "$loop3"
csi_ok expand --volume-id v3 --path "$st3" --required-bytes 268435456
expect_eq "map size after expand" 268435456 "$(blockdev --getsize64 "$src")"
after=$(df -B1 --output=size "$st3" | tail -n 1)
echo "    filesystem size: $before -> $after bytes"
[ "$after" -gt $(( before + 100000000 )) ] || fail "filesystem on the map did not grow"

step "multipath: one path goes away, I/O carries on through the other (direct I/O)"
iscsiadm -m node -T $mp_iqn -p 127.0.0.2:3260 -u >/dev/null
expect_eq "active paths in the map after logging out one" 1 "$(multipath -ll "$map" | grep -c 'active ready running')"
# Direct I/O with the page cache dropped: the block goes to the LUN and comes back from it.
head -c 4096 /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of="$st3/marker2" oflag=direct conv=fsync bs=4096 count=1 status=none \
  || fail "direct write with one path left failed"
sync; echo 3 > /proc/sys/vm/drop_caches
dd if="$st3/marker2" iflag=direct bs=4096 count=1 status=none > /tmp/readback \
  || fail "direct read with one path left failed"
cmp -s /tmp/pattern /tmp/readback || fail "the block read back (direct) differs from the one written"
echo "    ok: 4 KiB written and read back with O_DIRECT through the one remaining path"
csi_ok unstage --volume-id v3 --staging "$st3"
csi_ok unstage --volume-id v3 --staging "$st3"
expect_eq "sessions to the multipath target" 0 "$(session_count $mp_iqn)"
[ -z "$(dmsetup ls --target multipath 2>/dev/null | grep -v 'No devices found')" ] || fail "multipath map left: $(dmsetup ls --target multipath)"
systemctl stop multipathd.socket multipathd >/dev/null 2>&1 || true
rm -f /etc/multipath.conf
remove_hybridlet
targetcli /iscsi set discovery_auth enable=0 >/dev/null 2>&1 || true
