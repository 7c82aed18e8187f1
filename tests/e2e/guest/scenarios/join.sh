# Scenario: `hybridlet install`, `init` and `uninstall` under real systemd. containerd is
# Debian's (1.6, with CRI): install imports the sandbox image from an archive the mirror
# carries (verified, then `ctr images import`, pinned); init writes containerd's config,
# restarts it, finds the sandbox image through CRI and pins it. The
# kubelet is a stand-in binary installed by `hybridlet install` from a file:// mirror with
# its real unit (no kubelet package exists here); the stand-in refuses to start
# without init's arguments and files, or with maxPods 7, so a bad join is visible. init writes the files, reloads
# systemd, starts both; a rerun restarts nothing; a kubelet-only change restarts only the
# kubelet; a change the kubelet refuses is rolled back and the kubelet runs on the old files;
# a reload with new registry mirrors writes their hosts.toml and restarts nothing;
# uninstall refuses over a bind mount of /etc under the kubelet's directory, then undoes it all.
. /mnt/share/guest/lib.sh

containerd_and_pause_archive
# A release mirror on file:// with a stand-in kubelet binary; `hybridlet install` places
# it and its real unit. The stand-in starts only with the arguments init writes
# (--config, --kubeconfig), a kubeconfig, a CA, and a config whose maxPods is not 7.
mkdir -p /tmp/mirror
cp /tmp/pause.tar /tmp/mirror/pause.tar && (cd /tmp/mirror && sha256sum pause.tar > pause.tar.sha256)
cat > /tmp/mirror/kubelet <<'SH'
#!/bin/sh
case "$*" in *--config=/etc/kubernetes/kubelet/config.json*--kubeconfig=/var/lib/kubelet/kubeconfig*) ;; *) echo "bad args: $*" >&2; exit 1;; esac
test -s /var/lib/kubelet/kubeconfig || { echo "no kubeconfig" >&2; exit 1; }
test -s /etc/kubernetes/pki/ca.crt || { echo "no CA" >&2; exit 1; }
if grep -Eq '"maxPods": 7([^0-9]|$)' /etc/kubernetes/kubelet/config.json; then echo "maxPods 7 refused" >&2; exit 1; fi
exec sleep infinity
SH
printf '#!/bin/sh\necho aws_signing_helper stand-in\n' > /tmp/mirror/aws_signing_helper
printf '#!/bin/sh\necho ecr-credential-provider stand-in\n' > /tmp/mirror/ecr-credential-provider
# The CNI plugins tarball as upstream lays it out (./ and the programs at the top).
mkdir -p /tmp/cni && printf '#!/bin/sh\necho bridge\n' > /tmp/cni/bridge && printf '#!/bin/sh\necho host-local\n' > /tmp/cni/host-local
chmod 755 /tmp/cni/bridge /tmp/cni/host-local
tar -C /tmp/cni -czf /tmp/mirror/cni-plugins.tgz .
# For `upgrade`: 1.32.1 is the same stand-in (another build), 1.33.0 a kubelet that dies.
mkdir -p /tmp/mirror/1.32.1 /tmp/mirror/1.33.0
{ cat /tmp/mirror/kubelet; echo "# 1.32.1"; } > /tmp/mirror/1.32.1/kubelet
printf '#!/bin/sh\necho "kubelet 1.33.0: unsupported flag" >&2\nexit 1\n' > /tmp/mirror/1.33.0/kubelet
(cd /tmp/mirror && sha256sum kubelet > kubelet.sha256 && sha256sum aws_signing_helper > aws_signing_helper.sha256 \
  && sha256sum ecr-credential-provider > ecr-credential-provider.sha256 && sha256sum cni-plugins.tgz > cni-plugins.tgz.sha256 \
  && sha256sum 1.32.1/kubelet > 1.32.1/kubelet.sha256 && sha256sum 1.33.0/kubelet > 1.33.0/kubelet.sha256)
cat > /tmp/mirror/manifest.yaml <<'YAML'
supported_eks_releases:
- major_minor_version: "1.31"
  latest_patch_version: "3"
  patch_releases:
  - version: 1.31.3
    patch_version: "3"
    release_date: "2025-02-01"
    artifacts:
    - {name: kubelet, arch: amd64, os: linux, uri: "file:///tmp/mirror/kubelet", checksum_uri: "file:///tmp/mirror/kubelet.sha256"}
    - {name: ecr-credential-provider, arch: amd64, os: linux, uri: "file:///tmp/mirror/ecr-credential-provider", checksum_uri: "file:///tmp/mirror/ecr-credential-provider.sha256"}
    - {name: cni-plugins, arch: amd64, os: linux, uri: "file:///tmp/mirror/cni-plugins.tgz", checksum_uri: "file:///tmp/mirror/cni-plugins.tgz.sha256"}
- major_minor_version: "1.32"
  latest_patch_version: "1"
  patch_releases:
  - version: 1.32.1
    patch_version: "1"
    release_date: "2025-06-01"
    artifacts:
    - {name: kubelet, arch: amd64, os: linux, uri: "file:///tmp/mirror/1.32.1/kubelet", checksum_uri: "file:///tmp/mirror/1.32.1/kubelet.sha256"}
- major_minor_version: "1.33"
  latest_patch_version: "0"
  patch_releases:
  - version: 1.33.0
    patch_version: "0"
    release_date: "2025-09-01"
    artifacts:
    - {name: kubelet, arch: amd64, os: linux, uri: "file:///tmp/mirror/1.33.0/kubelet", checksum_uri: "file:///tmp/mirror/1.33.0/kubelet.sha256"}
iam_roles_anywhere_releases:
- version: 1.4.0
  artifacts:
  - {name: aws_signing_helper, arch: amd64, os: linux, uri: "file:///tmp/mirror/aws_signing_helper", checksum_uri: "file:///tmp/mirror/aws_signing_helper.sha256"}
image_archives:
- {name: eks-pause, arch: amd64, os: linux, uri: "file:///tmp/mirror/pause.tar", checksum_uri: "file:///tmp/mirror/pause.tar.sha256"}
YAML
systemctl daemon-reload

write_config() {
  mkdir -p /etc/hybridlet
  { node_config_head; cat <<YAML
  kubelet:
    config:
      maxPods: $1
  hybrid:
    iamRolesAnywhere:
      nodeName: rig-node-1
      trustAnchorArn: arn:aws:rolesanywhere:eu-west-1:111122223333:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001
      profileArn: arn:aws:rolesanywhere:eu-west-1:111122223333:profile/0a1b2c3d-0000-4000-8000-000000000002
      roleArn: arn:aws:iam::111122223333:role/AmazonEKSHybridNodesRole
---
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  images:
    sandbox: $PAUSE_IMAGE
YAML
  } > /etc/hybridlet/config.yaml
}
pid() { systemctl show -p MainPID --value "$1"; }

# The node's IAM Roles Anywhere certificate (init checks that its CN is the node name).
mkdir -p /etc/iam/pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj /CN=rig-node-1 \
  -keyout /etc/iam/pki/server.key -out /etc/iam/pki/server.pem 2>/dev/null

step "init before install: refused, nothing changed"
DEBIAN_FRONTEND=noninteractive dpkg -i "$artifacts/hybridlet.deb" >/dev/null
cp /etc/containerd/config.toml /tmp/containerd-config.toml.debian
write_config 110
if out=$(hybridlet init 2>&1); then fail "init succeeded without kubelet.service"; fi
echo "    $out" | tail -n 1 | head -c 300; echo
echo "$out" | grep -q 'kubelet.service is not installed' || fail "no clear message: $out"
[ ! -e /etc/kubernetes/kubelet/config.json ] || fail "files written despite the refusal"

step "hybridlet install from a file:// mirror: verified kubelet and its unit, the pause image imported"
out=$(hybridlet install 1.31 --manifest file:///tmp/mirror/manifest.yaml 2>&1) || fail "install: $out"
echo "$out" | grep -q "imported $PAUSE_IMAGE" || fail "install did not import the mirror's pause image: $out"
# Read whole, then matched: `cmd | grep -q` under pipefail fails when grep exits first.
images=$(ctr -n k8s.io images ls -q)
grep -qx "$PAUSE_IMAGE" <<< "$images" || fail "containerd does not have $PAUSE_IMAGE: $images"
cmp /tmp/mirror/kubelet /usr/bin/kubelet || fail "kubelet not placed"
expect_eq "kubelet mode" 755 "$(stat -c %a /usr/bin/kubelet)"
[ -x /usr/local/bin/aws_signing_helper ] || fail "the IAM Roles Anywhere signing helper was not installed"
[ -x /etc/eks/image-credential-provider/ecr-credential-provider ] || fail "the ECR credential provider was not installed"
cmp /tmp/cni/bridge /opt/cni/bin/bridge && [ -x /opt/cni/bin/host-local ] || fail "the CNI plugins were not unpacked into /opt/cni/bin"
systemctl cat kubelet.service | grep -q 'ExecStart=/usr/bin/kubelet $NODEADM_KUBELET_ARGS' || fail "kubelet unit not installed"
echo "tampered" >> /tmp/mirror/kubelet
rc=0; out=$(hybridlet install 1.31 --manifest file:///tmp/mirror/manifest.yaml 2>&1) || rc=$?
[ "$rc" -eq 0 ] || fail "the install rerun exited $rc: $out"
echo "$out" | grep -q 'already this version' || fail "rerun did not see the installed kubelet: $out"
rm -f /usr/bin/kubelet
if out=$(hybridlet install 1.31 --manifest file:///tmp/mirror/manifest.yaml 2>&1); then fail "a tampered kubelet was installed"; fi
echo "$out" | grep -q 'does not match the published' || fail "no checksum error: $out"
[ ! -e /usr/bin/kubelet ] || fail "the tampered kubelet was placed"
sed -i '$ d' /tmp/mirror/kubelet
expect_ok hybridlet install 1.31 --manifest file:///tmp/mirror/manifest.yaml

step "init: files, daemon-reload, containerd and kubelet started, the sandbox image found and pinned"
out=$(hybridlet init 2>&1) || fail "init: $out"
echo "$out" | grep -q "sandbox image $PAUSE_IMAGE already on the node" || fail "init did not find the sandbox image through CRI: $out"
echo "$out" | grep -q "containerd: containerd github.com/containerd/containerd 1.6" || fail "init did not read containerd's version: $out"
expect_eq "containerd" active "$(systemctl is-active containerd)"
dump=$(containerd config dump)
grep -q "sandbox_image = \"$PAUSE_IMAGE\"" <<< "$dump" || fail "containerd does not read init's sandbox image"
images=$(ctr -n k8s.io images ls)
grep -q "^$PAUSE_IMAGE .*io.cri-containerd.pinned=pinned" <<< "$images" || fail "the sandbox image is not labelled pinned: $images"
expect_eq "kubelet" active "$(systemctl is-active kubelet)"
expect_eq "kubelet enabled" enabled "$(systemctl is-enabled kubelet)"
grep -q '"providerID": "eks-hybrid:///eu-west-1/e2e/rig-node-1"' /etc/kubernetes/kubelet/config.json \
  || fail "kubelet config lacks the providerID"
grep -q 'credential_process = /usr/local/bin/aws_signing_helper credential-process .*--role-session-name rig-node-1' /etc/aws/hybrid/config \
  || fail "no IAM Roles Anywhere AWS config"
grep -q -- '--image-credential-provider-config=/etc/eks/image-credential-provider/config.json' /etc/eks/kubelet/environment \
  || fail "the kubelet does not use the ECR credential provider"
tr '\0' '\n' < "/proc/$(systemctl show -p MainPID --value kubelet)/environ" | grep -q '^NODEADM_KUBELET_ARGS=' \
  || fail "the kubelet did not get /etc/eks/kubelet/environment"
c_pid=$(pid containerd); k_pid=$(pid kubelet)

step "check on the joined node: init applied its modules and sysctls; services and ports from the real host"
out=$(hybridlet check --offline 2>&1) || fail "check fails on the joined node: $out"
for want in "ok: IAM Roles Anywhere certificate: /etc/iam/pki/server.pem: CN rig-node-1 = nodeName" "ok: swap: off" "ok: cgroup: v2" "ok: kernel module: overlay loaded" "ok: kernel module: br_netfilter loaded" \
            "ok: IP forwarding" "ok: service: containerd.service active" "ok: sandbox image: $PAUSE_IMAGE is on the node" "ok: service: kubelet.service active" "ok: port: 10250/tcp"; do
  echo "$out" | grep -qF "$want" || fail "check: no '$want' in: $out"
done
expect_eq "net.ipv4.ip_forward" 1 "$(cat /proc/sys/net/ipv4/ip_forward)"
hybridlet check --offline -o json | grep -q '"ok":true' || fail "check -o json does not say ok"
echo "    ok: swap, cgroup v2, modules and forwarding applied by init, both services, ports"

step "init again: nothing written, nothing restarted"
out=$(hybridlet init)
echo "$out" | grep -q 'nothing written' || fail "rerun wrote something: $out"
expect_eq "containerd not restarted" "$c_pid" "$(pid containerd)"
expect_eq "kubelet not restarted" "$k_pid" "$(pid kubelet)"

step "systemctl reload with new registry mirrors: hosts.toml written, nothing restarted"
expect_ok systemctl start hybridlet
h_pid=$(pid hybridlet)
mkdir -p /etc/hybridlet/config.d
cat > /etc/hybridlet/config.d/70-mirrors.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  registryMirrors:
    - registry: registry.k8s.io
      endpoints: ["https://harbor.example.internal/v2/k8s"]
      overridePath: true
YAML
expect_ok systemctl reload hybridlet
wait_for 30 "hosts.toml for registry.k8s.io" grep -q 'harbor.example.internal/v2/k8s' /etc/containerd/certs.d/registry.k8s.io/hosts.toml
journalctl -u hybridlet --no-pager -o cat | grep -q 'configuration reloaded: registry mirrors: 1 hosts.toml written, 0 removed' || fail "the reload did not report the mirror file: $(journalctl -u hybridlet --no-pager -o cat | tail -n 5)"
expect_eq "containerd not restarted" "$c_pid" "$(pid containerd)"
expect_eq "kubelet not restarted" "$k_pid" "$(pid kubelet)"
expect_eq "hybridlet not restarted" "$h_pid" "$(pid hybridlet)"
expect_ok systemctl stop hybridlet

step "a kubelet-only change restarts only the kubelet"
write_config 120
expect_ok hybridlet init
expect_eq "containerd not restarted" "$c_pid" "$(pid containerd)"
[ "$(pid kubelet)" != "$k_pid" ] || fail "kubelet was not restarted"
grep -q '"maxPods": 120' /etc/kubernetes/kubelet/config.json || fail "maxPods not 120"
k_pid=$(pid kubelet)

step "a change the kubelet refuses is rolled back"
write_config 7
if out=$(hybridlet init 2>&1); then fail "init succeeded although the kubelet failed"; fi
echo "$out" | tail -n 2 | sed 's/^/    /' | head -c 600; echo
echo "$out" | grep -q 'kubelet.service did not start' || fail "failure not named: $out"
echo "$out" | grep -q 'previous files were put back' || fail "no rollback reported: $out"
grep -q '"maxPods": 120' /etc/kubernetes/kubelet/config.json || fail "config.json not rolled back"
wait_for 20 "kubelet running on the previous files" systemctl is-active -q kubelet

step "upgrade: refused while the control plane cannot be asked; forced, swaps and restarts the kubelet"
k_pid=$(pid kubelet)
set +e; out=$(hybridlet upgrade 1.32 --manifest file:///tmp/mirror/manifest.yaml 2>&1); rc=$?; set -e
expect_eq "upgrade without an API server: exit" 75 "$rc"
echo "$out" | grep -q 'cannot be read with' || fail "refusal not explained: $out"
cmp -s /tmp/mirror/kubelet /usr/bin/kubelet || fail "the refused upgrade changed the kubelet"
expect_ok hybridlet upgrade 1.32 --force --manifest file:///tmp/mirror/manifest.yaml
cmp /tmp/mirror/1.32.1/kubelet /usr/bin/kubelet || fail "kubelet 1.32.1 not placed"
[ "$(pid kubelet)" != "$k_pid" ] || fail "the kubelet was not restarted on 1.32.1"
expect_eq "kubelet on 1.32.1" active "$(systemctl is-active kubelet)"
[ -s /var/lib/hybridlet/rollback/1.31.3/usr_bin_kubelet ] || fail "1.31.3 not kept for rollback"

step "upgrade to a kubelet that dies: rolled back to the running version"
set +e; out=$(hybridlet upgrade 1.33 --force --manifest file:///tmp/mirror/manifest.yaml 2>&1); rc=$?; set -e
expect_eq "failed upgrade: exit" 1 "$rc"
echo "$out" | tail -n 1 | head -c 400 | sed 's/^/    /'; echo
echo "$out" | grep -q 'did not stay up on 1.33.0' || fail "failure not named: $out"
echo "$out" | grep -q 'rolled back to 1.32.1, and the kubelet runs again' || fail "no rollback reported: $out"
cmp /tmp/mirror/1.32.1/kubelet /usr/bin/kubelet || fail "kubelet 1.32.1 not restored"
wait_for 20 "kubelet running on 1.32.1 again" systemctl is-active -q kubelet

step "upgrade --rollback: back to 1.31.3"
expect_ok hybridlet upgrade --rollback
cmp /tmp/mirror/kubelet /usr/bin/kubelet || fail "kubelet 1.31.3 not restored"
expect_eq "kubelet on 1.31.3" active "$(systemctl is-active kubelet)"
[ ! -e /var/lib/hybridlet/rollback/1.31.3 ] || fail "the kept copy outlived the rollback"

step "uninstall refuses while /etc is bind-mounted under the kubelet's directory (eks-hybrid #664)"
vol=/var/lib/kubelet/pods/p1/volumes/kubernetes.io~host-path/etc
mkdir -p "$vol"
mount --bind /etc "$vol"
if out=$(hybridlet uninstall 2>&1); then umount "$vol"; fail "uninstall went ahead over a bind mount"; fi
umount "$vol"
echo "$out" | tail -n 1 | head -c 300 | sed 's/^/    /'; echo
echo "$out" | grep -q 'mount point(s) are still inside' || fail "refusal not explained: $out"
[ -s /etc/passwd ] && [ -f /etc/kubernetes/kubelet/config.json ] || fail "something was deleted"
expect_eq "kubelet untouched by the refusal" active "$(systemctl is-active kubelet)"

step "uninstall: kubelet stopped and disabled, files gone, containerd left alone"
expect_ok hybridlet uninstall
expect_eq "kubelet" inactive "$(systemctl is-active kubelet || true)"
[ ! -e /etc/systemd/system/multi-user.target.wants/kubelet.service ] || fail "kubelet still enabled"
systemctl cat kubelet.service >/dev/null 2>&1 && fail "systemd still knows kubelet.service (no daemon-reload after removing it)"
for f in /etc/kubernetes/kubelet/config.json /etc/eks/kubelet/environment /var/lib/kubelet \
         /etc/sysctl.d/99-hybridlet.conf /etc/modules-load.d/hybridlet.conf \
         /usr/bin/kubelet /usr/local/bin/aws_signing_helper /etc/systemd/system/kubelet.service \
         /opt/cni/bin/bridge /etc/eks/image-credential-provider/ecr-credential-provider /etc/aws/hybrid/config \
         /etc/containerd/certs.d/registry.k8s.io/hosts.toml; do
  [ ! -e "$f" ] || fail "$f is still there"
done
# Debian's containerd ships its own config.toml, which init replaced: it is put back.
cmp -s /etc/containerd/config.toml /tmp/containerd-config.toml.debian || fail "containerd's own config.toml was not put back"
expect_eq "containerd left running" active "$(systemctl is-active containerd)"
[ -s /etc/passwd ] || fail "/etc/passwd is gone"

systemctl disable --now containerd  # kubelet.service went with uninstall
rm -f /etc/systemd/system/containerd.service
rm -rf /etc/kubernetes /etc/containerd /etc/eks /etc/iam /etc/systemd/system/*.service.d
systemctl daemon-reload
remove_hybridlet
