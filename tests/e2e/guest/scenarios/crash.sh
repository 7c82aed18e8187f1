# Scenario 4: kill -9 hybridlet in the middle of a stage (the NFS server is down, so the
# mount is in flight); systemd restarts it; the kubelet's retry converges to exactly one
# mount, and repeating it changes nothing.
. /mnt/share/guest/lib.sh

cat > /tmp/csi.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  csi:
    nfs:
      enabled: true
YAML
start_nfs_server
mkdir -p /srv/export/pv-crash
install_hybridlet /tmp/csi.yaml
wait_for 30 "CSI socket" test -S "$csi_socket"

vol="127.0.0.1#/srv/export#pv-crash"
staging=/var/lib/kubelet/plugins/kubernetes.io/csi/$csi_driver/e2e0002/globalmount
mkdir -p "$staging"
attrs=(--attr server=127.0.0.1 --attr share=/srv/export --attr subDir=pv-crash)

step "stage while the server is down, kill -9 the daemon mid-call"
systemctl stop nfs-server
pid=$(main_pid)
kubelet --timeout 120 stage --volume-id "$vol" --staging "$staging" "${attrs[@]}" > /tmp/stage1.out 2>&1 &
caller=$!
wait_for 30 "mount helper running" pgrep -f "mount.nfs|mount -t nfs"
kill -9 "$pid"
wait "$caller" || true
echo "    first call: $(cat /tmp/stage1.out)"
wait_for 60 "systemd restarted hybridlet" sh -c "[ \"\$(systemctl show -p MainPID --value hybridlet)\" != 0 ] && [ \"\$(systemctl show -p MainPID --value hybridlet)\" != $pid ] && systemctl is-active -q hybridlet"
echo "    restarts: $(systemctl show -p NRestarts --value hybridlet)"
wait_for 30 "CSI socket back" sh -c "$artifacts/e2e-kubelet --socket $csi_socket info"
left=$(pgrep -a 'mount.nfs' || true)
[ -z "$left" ] || fail "the killed daemon's mount helper survived: $left"

step "server back; the retried stage converges"
systemctl start nfs-server
csi_ok stage --volume-id "$vol" --staging "$staging" "${attrs[@]}"
csi_ok stage --volume-id "$vol" --staging "$staging" "${attrs[@]}"
expect_eq "exactly one mount at the staging path" 1 "$(awk -v p="$staging" '$5 == p' /proc/self/mountinfo | wc -l)"
csi_ok unstage --volume-id "$vol" --staging "$staging"
expect_eq "no mounts left" 0 "$(mounts_under /var/lib/kubelet)"
remove_hybridlet
