# Scenario 2: real NFS through hybridlet's CSI node socket, driven like the kubelet:
# stage, publish rw and ro, I/O through the published paths, stats, unpublish, unstage,
# each call repeated (idempotency); then a dead NFS server must not hang the calls.
. /mnt/share/guest/lib.sh

cat > /tmp/csi.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  csi:
    nfs:
      enabled: true
    # A hung mount helper is killed after 20 s (the default, 100 s, is too slow a test).
    mountTimeout: 20s
YAML

step "NFS server in the VM"
start_nfs_server
echo hello-from-server > /srv/export/server-file

step "hybridlet with CSI NFS"
install_hybridlet /tmp/csi.yaml
wait_for 30 "CSI socket" test -S "$csi_socket"
wait_for 30 "registration socket" test -S "$csi_reg_socket"
expect_ok "$artifacts/e2e-kubelet" --socket "$csi_reg_socket" register
csi_ok info

vol="127.0.0.1#/srv/export#pv-e2e"
staging=/var/lib/kubelet/plugins/kubernetes.io/csi/$csi_driver/e2e0001/globalmount
pod=/var/lib/kubelet/pods/0b1c2d3e-0000-4000-8000-000000000001/volumes/kubernetes.io~csi
target_rw=$pod/pv-rw/mount
target_ro=$pod/pv-ro/mount
mkdir -p "$staging" "$pod/pv-rw" "$pod/pv-ro"
attrs=(--attr server=127.0.0.1 --attr share=/srv/export --attr subDir=pv-e2e)
mkdir -p /srv/export/pv-e2e

step "validation happens before any mount"
csi_code InvalidArgument stage --volume-id "$vol" --staging "$staging" --attr server=127.0.0.1 --attr share=/srv/export,rw
csi_code InvalidArgument stage --volume-id "$vol" --staging "$staging" --attr server=127.0.0.1 --attr share=/srv/export --attr subDir=../etc
csi_code FailedPrecondition publish --volume-id "$vol" --staging "$staging" --target "$target_rw" "${attrs[@]}"
expect_eq "nothing mounted by refused calls" 0 "$(mounts_under /var/lib/kubelet)"

step "stage (twice)"
csi_ok stage --volume-id "$vol" --staging "$staging" "${attrs[@]}" --mount-flag nfsvers=4.1
csi_ok stage --volume-id "$vol" --staging "$staging" "${attrs[@]}" --mount-flag nfsvers=4.1
expect_eq "one NFS mount at the staging path" 1 "$(awk -v p="$staging" '$5 == p' /proc/self/mountinfo | wc -l)"
grep -q " $staging .* - nfs4 127.0.0.1:/srv/export/pv-e2e " /proc/self/mountinfo \
  || fail "staging path is not an nfs4 mount of 127.0.0.1:/srv/export/pv-e2e: $(grep "$staging" /proc/self/mountinfo)"

step "publish read-write (twice) and write through it"
csi_ok publish --volume-id "$vol" --staging "$staging" --target "$target_rw" "${attrs[@]}"
csi_ok publish --volume-id "$vol" --staging "$staging" --target "$target_rw" "${attrs[@]}"
echo written-by-pod > "$target_rw/pod-file"
sync
expect_eq "file reached the server" written-by-pod "$(cat /srv/export/pv-e2e/pod-file)"

step "publish read-only (twice); writes fail with EROFS"
csi_ok publish --volume-id "$vol" --staging "$staging" --target "$target_ro" --readonly "${attrs[@]}"
csi_ok publish --volume-id "$vol" --staging "$staging" --target "$target_ro" --readonly "${attrs[@]}"
expect_eq "read through ro" written-by-pod "$(cat "$target_ro/pod-file")"
if err=$(sh -c "echo x > '$target_ro/nope'" 2>&1); then fail "write through the read-only publish succeeded"; fi
case "$err" in *"Read-only file system"*) echo "    ok: EROFS" ;; *) fail "unexpected error: $err" ;; esac
csi_code AlreadyExists publish --volume-id "$vol" --staging "$staging" --target "$target_ro" "${attrs[@]}"

step "stats"
csi_ok stats --volume-id "$vol" --path "$target_rw"
kubelet stats --volume-id "$vol" --path "$target_rw" | grep -q 'abnormal: false' || fail "volume condition not normal"
csi_code NotFound stats --volume-id "$vol" --path /var/lib/kubelet/pods/none

step "unpublish (twice each), unstage (twice)"
for t in "$target_rw" "$target_ro"; do
  csi_ok unpublish --volume-id "$vol" --target "$t"
  csi_ok unpublish --volume-id "$vol" --target "$t"
  [ ! -e "$t" ] || fail "target $t left behind"
done
csi_ok unstage --volume-id "$vol" --staging "$staging"
csi_ok unstage --volume-id "$vol" --staging "$staging"
expect_eq "no mounts left under /var/lib/kubelet" 0 "$(mounts_under /var/lib/kubelet)"
expect_eq "the data stays on the server" written-by-pod "$(cat /srv/export/pv-e2e/pod-file)"

step "NFS server stops while the volume is staged"
csi_ok stage --volume-id "$vol" --staging "$staging" "${attrs[@]}" --mount-flag nfsvers=4.1
csi_ok publish --volume-id "$vol" --staging "$staging" --target "$target_rw" "${attrs[@]}"
systemctl stop nfs-server
t0=$(date +%s)
out=$(kubelet --timeout 60 stats --volume-id "$vol" --path "$target_rw" 2>&1) || true
echo "    stats: $(echo "$out" | head -c 300)"
[ $(( $(date +%s) - t0 )) -le 30 ] || fail "stats took more than 30 s with the server down"
echo "$out" | grep -q 'abnormal: true' || fail "stats with a dead server did not report an abnormal volume"
echo "    ok: stats answered in $(( $(date +%s) - t0 ))s with an abnormal condition"
# A stage that runs mount(8) against the dead server: mount.nfs hangs (it retries for
# minutes) until spec.csi.mountTimeout, then it and everything it started are killed.
staging_hung=/var/lib/kubelet/plugins/kubernetes.io/csi/$csi_driver/e2e0002/globalmount
mkdir -p "$staging_hung"
t0=$(date +%s)
out=$(kubelet --timeout 90 stage --volume-id "127.0.0.1#/srv/export#pv-hung" --staging "$staging_hung" \
  --attr server=127.0.0.1 --attr share=/srv/export 2>&1) || true
echo "    hung stage: $(echo "$out" | head -c 300) ($(( $(date +%s) - t0 ))s)"
case "$out" in "ERR DeadlineExceeded "*) ;; *) fail "a stage against a dead server did not time out: $out" ;; esac
sleep 1
left=$(pgrep -a -f 'mount(\.nfs)? ' || true)
[ -z "$left" ] || fail "the hung stage left mount helpers running: $left"
echo "    ok: the hung stage's mount(8) and mount.nfs are gone"
expect_eq "nothing mounted by the hung stage" 0 "$(awk -v p="$staging_hung" '$5 == p' /proc/self/mountinfo | wc -l)"
t0=$(date +%s)
out=$(kubelet --timeout 150 publish --volume-id "$vol" --staging "$staging" --target "$target_ro" --readonly "${attrs[@]}" 2>&1) || true
echo "    publish: $(echo "$out" | head -c 300) ($(( $(date +%s) - t0 ))s)"
case "$out" in OK*|ERR*) ;; *) fail "publish with a dead server did not answer: $out" ;; esac
t0=$(date +%s)
for t in "$target_rw" "$target_ro"; do
  out=$(kubelet --timeout 150 unpublish --volume-id "$vol" --target "$t" 2>&1) || true
  echo "    unpublish $t: $(echo "$out" | head -c 300)"
  # The mount table, not lstat (which blocks on a dead hard mount), finds the bind mount,
  # and the unmount detaches it lazily: OK, not a timeout.
  case "$out" in OK*) ;; *) fail "unpublish with a dead server did not succeed: $out" ;; esac
done
out=$(kubelet --timeout 200 unstage --volume-id "$vol" --staging "$staging" 2>&1) || true
echo "    unstage: $(echo "$out" | head -c 300) ($(( $(date +%s) - t0 ))s for unpublish+unstage)"
case "$out" in OK*) ;; *) fail "unstage with a dead server did not succeed: $out" ;; esac
sleep 1
left=$(pgrep -a 'mount|umount' || true)
[ -z "$left" ] || fail "mount helpers left running: $left"
echo "    ok: no mount helper left running"
expect_eq "still active" active "$(systemctl is-active hybridlet)"

step "server back: the volume converges (retried as the kubelet retries)"
systemctl start nfs-server
for t in "$target_rw" "$target_ro"; do
  csi_retry 120 unpublish --volume-id "$vol" --target "$t"
done
csi_retry 120 unstage --volume-id "$vol" --staging "$staging"
expect_eq "no mounts left under /var/lib/kubelet" 0 "$(mounts_under /var/lib/kubelet)"
remove_hybridlet
