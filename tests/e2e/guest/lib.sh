# Helpers for the in-guest scenarios (sourced). Every scenario runs under `bash -eu -o
# pipefail`; a failed check prints what was expected and what was seen, then exits 1.
share=/mnt/share
artifacts=$share/artifacts
scenario_started=$(date +%s.%N)

elapsed() { awk -v s="$scenario_started" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
step() { echo "--- [$(elapsed)s] $*"; }
fail() { echo "FAIL: $*"; exit 1; }

# expect_ok CMD...: the command succeeds; its output is shown.
expect_ok() {
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/    /' | head -n 20
  [ "$rc" -eq 0 ] || fail "'$*' exited $rc"
}

# expect_fail CMD...: the command fails.
expect_fail() {
  if "$@" >/dev/null 2>&1; then fail "'$*' succeeded; expected a failure"; fi
}

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() { [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"; echo "    ok: $1 = $3"; }

# wait_for SECONDS DESCRIPTION CMD...: poll until CMD succeeds.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what: not within ${limit}s"
    sleep 0.5
  done
  echo "    ok: $what"
}

# The kubelet stand-in on hybridlet's CSI socket.
csi_driver=csi.hybridlet.io
csi_socket=/var/lib/kubelet/plugins/$csi_driver/csi.sock
csi_reg_socket=/var/lib/kubelet/plugins_registry/$csi_driver-reg.sock
kubelet() { "$artifacts/e2e-kubelet" --socket "$csi_socket" "$@"; }

# csi_ok CALL ARGS...: the call returns OK.
csi_ok() { expect_ok kubelet "$@"; }

# csi_retry SECONDS CALL ARGS...: repeat the call until it returns OK, as the kubelet
# does (ABORTED while an earlier call's helper still runs, DEADLINE_EXCEEDED, ...).
csi_retry() {
  local limit=$1 out; shift
  local deadline=$(( $(date +%s) + limit ))
  until out=$(kubelet "$@" 2>&1); do
    [ "$(date +%s)" -lt "$deadline" ] || fail "'$1' did not succeed within ${limit}s: $out"
    sleep 1
  done
  echo "    $out" | head -c 300; echo
}

# csi_code CODE CALL ARGS...: the call returns exactly this gRPC code.
csi_code() {
  local want=$1 out rc=0; shift
  out=$(kubelet "$@" 2>&1) || rc=$?
  echo "    $out" | head -c 400; echo
  case "$out" in
    "ERR $want "*) echo "    ok: $1 -> $want" ;;
    *) fail "'$1' expected gRPC $want, got: $out" ;;
  esac
}

# start_fake_apiserver NODE: the fake API server (hybridlet-fixtures) on the guest's
# loopback with the Node object NODE, and the kubelet's kubeconfig pointing at it; sets
# $api (its URL) and $api_pid.
start_fake_apiserver() {
  "$artifacts/fake-apiserver" > /tmp/api.url 2>/tmp/api.err &
  api_pid=$!
  wait_for 10 "fake API server" test -s /tmp/api.url
  api=$(head -n 1 /tmp/api.url)
  curl -fsS -X POST -H 'Content-Type: application/json' \
    -d "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$1\"}}" "$api/api/v1/nodes" >/dev/null
  mkdir -p /var/lib/kubelet
  cat > /var/lib/kubelet/kubeconfig <<KC
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "$api"}}]
contexts: [{name: k, context: {cluster: c, user: u}}]
current-context: k
users: [{name: u, user: {token: node-token}}]
KC
}

# install_hybridlet [CONFIG_FILE]: install the .deb of this commit; optionally put an
# AgentConfig drop-in in place, then start the unit and wait until systemd has READY=1.
install_hybridlet() {
  DEBIAN_FRONTEND=noninteractive dpkg -i "$artifacts/hybridlet.deb" >/dev/null
  if [ $# -gt 0 ]; then
    mkdir -p /etc/hybridlet/config.d
    cp "$1" /etc/hybridlet/config.d/50-e2e.yaml
  fi
  systemctl restart hybridlet   # the config may have changed under a running unit
  expect_eq "hybridlet unit" active "$(systemctl is-active hybridlet)"
}

# remove_hybridlet: stop and purge the package, detach whatever a scenario left mounted
# under the kubelet's directory, so the next scenario starts from a clean node.
remove_hybridlet() {
  DEBIAN_FRONTEND=noninteractive dpkg -P hybridlet >/dev/null 2>&1 || true
  rm -rf /etc/hybridlet
  awk '$5 ~ "^/var/lib/kubelet" { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf /var/lib/kubelet
}

main_pid() { systemctl show -p MainPID --value hybridlet; }

# mounts_under PATH: how many mount table entries are at or below PATH.
mounts_under() { awk -v p="$1" '$5 == p || index($5, p "/") == 1' /proc/self/mountinfo | wc -l; }

metric() { curl -fsS http://127.0.0.1:9464/metrics | awk -v m="$1" '$1 == m { print $2 }'; }

# NFS server inside the VM, exporting /srv/export to 127.0.0.1 only.
start_nfs_server() {
  mkdir -p /srv/export
  chmod 0777 /srv/export
  echo '/srv/export 127.0.0.1(rw,sync,no_subtree_check,no_root_squash,fsid=1)' > /etc/exports
  systemctl restart nfs-server
  exportfs -ra
  wait_for 30 "NFS server exporting /srv/export" sh -c 'showmount -e 127.0.0.1 | grep -q /srv/export'
}

# Join scenarios: a containerd stand-in unit (the image has no containerd).
# The join scenarios' sandbox image: no registry in the VM, so it is imported from an
# archive (an OCI layout with busybox built by tests/images/oci-image.sh) with `hybridlet
# images import`, and spec.images.sandbox names it.
PAUSE_IMAGE=localhost/hybridlet/pause:e2e

# Debian's containerd under its own unit, and the sandbox image's archive in /tmp/pause.tar.
# init then writes containerd's config and restarts it.
containerd_and_pause_archive() {
  rm -f /etc/systemd/system/containerd.service
  systemctl daemon-reload
  systemctl start containerd
  rm -rf /tmp/pause-oci && bash /mnt/share/guest/oci-image.sh /tmp/pause-oci "$PAUSE_IMAGE"
  tar -C /tmp/pause-oci -cf /tmp/pause.tar .
}

# The same, with the archive imported (hybridlet must be installed).
containerd_with_pause() {
  containerd_and_pause_archive
  out=$(hybridlet images import /tmp/pause.tar 2>&1) || fail "images import: $out"
  echo "$out" | grep -q "imported $PAUSE_IMAGE" || fail "images import did not name $PAUSE_IMAGE: $out"
}

# Join scenarios: the start of a NodeConfig whose cluster is fully given (no AWS call),
# up to `spec:` followed by its `cluster:` block; the caller appends the rest of `spec`.
node_config_head() {
  cat <<'YAML'
apiVersion: node.eks.aws/v1alpha1
kind: NodeConfig
spec:
  cluster:
    name: e2e
    region: eu-west-1
    apiServerEndpoint: https://127.0.0.1:6443
    certificateAuthority: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJzekNDQVZtZ0F3SUJBZ0lVWG05amEwTkJabTl5U0hsaWNtbGtiR1YwVkdWemRITXdDZ1lJS29aSXpqMEUKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=
    cidr: 172.16.0.0/16
YAML
}

# podman_with_cdi CDI_NAME CMD...: run CMD in a throwaway container (a busybox root
# filesystem, no image, no network) that gets CDI_NAME injected by podman, which reads
# the CDI specs hybridlet writes in /var/run/cdi as any CDI consumer does. CMD's output
# is left in $podman_out; the scenario fails if podman refuses.
podman_with_cdi() {
  local name=$1; shift
  local rootfs=/tmp/podman-rootfs
  if [ ! -x "$rootfs/bin/busybox" ]; then
    mkdir -p "$rootfs/bin" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    ln -sf busybox "$rootfs/bin/sh"
  fi
  # --rootfs is a flag: the first argument is then the root filesystem, not an image.
  podman_out=$(podman --cgroup-manager=cgroupfs run --rm --network none --device "$name" \
    --rootfs "$rootfs" /bin/busybox "$@" 2>&1) || fail "podman run --device $name: $podman_out"
}
