# Scenario: an SSM hybrid-activation node under real systemd and dpkg. The SSM agent is
# a stand-in packaged as a real .deb (its -register mode checks the arguments hybridlet
# passes and writes the registration file; its service writes root's credentials file
# the way the agent does). `hybridlet install --credential-provider ssm` installs that
# package from a file:// mirror after checking its SHA-256; `init` registers the agent
# with the proxy in its environment, gives the agent's unit the proxy drop-in before
# starting it, waits for the credentials, names the node after the managed instance and
# links /eks-hybrid/.aws; a rerun registers and restarts nothing; an expired activation
# is refused with exit 78 and the fix; `uninstall` deregisters the managed instance from
# a Systems Manager stand-in on loopback with the agent's credentials, removes the
# registration, the credentials and the package.
. /mnt/share/guest/lib.sh

# A scenario before this one that failed half-way may have left a join behind.
rm -rf /etc/kubernetes /etc/containerd /etc/eks /etc/iam /etc/aws /var/lib/hybridlet

step "a release mirror with a kubelet stand-in and the agent stand-in as a .deb"
mkdir -p /tmp/mirror /tmp/pkg/DEBIAN /tmp/pkg/usr/bin /tmp/pkg/lib/systemd/system
printf '#!/bin/sh\nexec sleep infinity\n' > /tmp/mirror/kubelet
cat > /tmp/pkg/usr/bin/amazon-ssm-agent <<'SH'
#!/bin/sh
# amazon-ssm-agent stand-in (the e2e ssm scenario).
if [ "${1:-}" = "-register" ]; then
  printf '%s\n' "$*" >> /var/log/ssm-register.log
  printf 'HTTPS_PROXY=%s\n' "${HTTPS_PROXY:-}" >> /var/log/ssm-register.log
  [ "$2 $3" = "-y -region" ] && [ "$5" = "-code" ] && [ "$7" = "-id" ] || { echo "bad arguments: $*" >&2; exit 2; }
  case "$6" in
    Expired*) echo "Registration failed due to error registering the instance with AWS SSM. ActivationExpired: Activation has expired." >&2; exit 1 ;;
  esac
  mkdir -p /var/lib/amazon/ssm/Vault/Store
  echo key > /var/lib/amazon/ssm/Vault/Store/RegistrationKey
  printf '{"ManagedInstanceID":"mi-0e2e0000000000001","Region":"%s"}' "$4" > /var/lib/amazon/ssm/registration
  exit 0
fi
[ -s /var/lib/amazon/ssm/registration ] || { echo "not registered" >&2; exit 1; }
printf '%s\n' "${HTTPS_PROXY:-}" > /run/ssm-agent.proxy
mkdir -p /root/.aws
printf '[default]\naws_access_key_id = AKIDSSMAGENT\naws_secret_access_key = s\naws_session_token = t\n' > /root/.aws/credentials.new
mv /root/.aws/credentials.new /root/.aws/credentials
exec sleep infinity
SH
chmod 755 /tmp/pkg/usr/bin/amazon-ssm-agent
cat > /tmp/pkg/lib/systemd/system/amazon-ssm-agent.service <<'UNIT'
[Unit]
Description=amazon-ssm-agent stand-in
[Service]
ExecStart=/usr/bin/amazon-ssm-agent
Restart=always
RestartSec=1
[Install]
WantedBy=multi-user.target
UNIT
cat > /tmp/pkg/DEBIAN/control <<'CTL'
Package: amazon-ssm-agent
Version: 3.3.0.0-e2e
Architecture: amd64
Maintainer: hybridlet e2e <e2e@hybridlet.invalid>
Description: amazon-ssm-agent stand-in for the hybridlet VM suite
CTL
dpkg-deb --root-owner-group --build /tmp/pkg /tmp/mirror/amazon-ssm-agent.deb >/dev/null
(cd /tmp/mirror && sha256sum kubelet > kubelet.sha256 && sha256sum amazon-ssm-agent.deb > amazon-ssm-agent.deb.sha256)
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
ssm_releases:
- version: 3.3.0.0
  artifacts:
  - {name: amazon-ssm-agent, arch: amd64, os: linux, uri: "file:///tmp/mirror/amazon-ssm-agent.deb", checksum_uri: "file:///tmp/mirror/amazon-ssm-agent.deb.sha256"}
YAML
systemctl daemon-reload
DEBIAN_FRONTEND=noninteractive dpkg -i "$artifacts/hybridlet.deb" >/dev/null
containerd_with_pause

write_config() {  # write_config ACTIVATION_CODE
  mkdir -p /etc/hybridlet
  { node_config_head; cat <<YAML
  hybrid:
    enableCredentialsFile: true
    ssm:
      activationCode: "$1"
      activationId: 8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d
---
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  proxy:
    httpsProxy: http://svc:p%40ss@127.0.0.1:3128
    noProxy: [localhost, 127.0.0.1]
  images:
    sandbox: $PAUSE_IMAGE
YAML
  } > /etc/hybridlet/config.yaml
}
pid() { systemctl show -p MainPID --value "$1"; }

step "init before the agent is installed: refused, nothing changed"
write_config "AbCdEfGhIjKlMnOpQrStUv+123/xyz"
if out=$(hybridlet init 2>&1); then fail "init succeeded without an SSM agent"; fi
echo "$out" | tail -n 1 | head -c 300 | sed 's/^/    /'; echo
echo "$out" | grep -q 'the SSM agent is not installed' || fail "no clear message: $out"
[ ! -e /etc/kubernetes/kubelet/config.json ] || fail "files written despite the refusal"

step "install --credential-provider ssm: kubelet and the verified agent package (dpkg)"
expect_ok hybridlet install 1.31 --manifest file:///tmp/mirror/manifest.yaml --credential-provider ssm
dpkg -s amazon-ssm-agent 2>/dev/null | grep -q 'Status: install ok installed' || fail "agent package not installed"
systemctl cat amazon-ssm-agent.service >/dev/null || fail "systemd does not know the agent's unit"
grep -q '"ssm_agent_package": "amazon-ssm-agent"' /var/lib/hybridlet/install.json || fail "install record lacks the package"

step "an expired activation: exit 78 with the fix; nothing registered"
write_config "Expired0123456789012345"
set +e; out=$(hybridlet init 2>&1); rc=$?; set -e
expect_eq "expired activation: exit" 78 "$rc"
echo "$out" | grep -q 'spec.hybrid.ssm.activationId' || fail "field not named: $out"
echo "$out" | grep -q 'aws ssm create-activation' || fail "fix not given: $out"
echo "$out" | grep -q 'Expired0123' && fail "the activation code was printed: $out"
[ ! -e /var/lib/amazon/ssm/registration ] || fail "registered with an expired activation"
[ ! -e /etc/kubernetes/kubelet/config.json ] || fail "files written despite the refusal"

step "init: registers behind the proxy, starts the agent with its drop-in, joins as the managed instance"
write_config "AbCdEfGhIjKlMnOpQrStUv+123/xyz"
rm -f /var/log/ssm-register.log
expect_ok hybridlet init
grep -q -- '-register -y -region eu-west-1 -code AbCdEfGhIjKlMnOpQrStUv+123/xyz -id 8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d' /var/log/ssm-register.log \
  || fail "register arguments: $(cat /var/log/ssm-register.log)"
grep -q '^HTTPS_PROXY=http://svc:p%40ss@127.0.0.1:3128$' /var/log/ssm-register.log || fail "registration did not get the proxy"
expect_eq "agent" active "$(systemctl is-active amazon-ssm-agent)"
expect_eq "agent enabled" enabled "$(systemctl is-enabled amazon-ssm-agent)"
expect_eq "the agent's proxy (drop-in + root-only env file)" "http://svc:p%40ss@127.0.0.1:3128" "$(cat /run/ssm-agent.proxy)"
expect_eq "proxy.env mode" 600 "$(stat -c %a /etc/hybridlet/proxy.env)"
systemctl show -p Environment amazon-ssm-agent kubelet | grep -q 'p%40ss' && fail "the proxy password shows in systemctl show"
grep -rq 'p%40ss' /etc/systemd/system && fail "the proxy password is in a world-readable unit file"
[ -s /root/.aws/credentials ] || fail "no credentials file"
expect_eq "/eks-hybrid/.aws" /root/.aws "$(readlink /eks-hybrid/.aws)"
grep -q '"providerID": "eks-hybrid:///eu-west-1/e2e/mi-0e2e0000000000001"' /etc/kubernetes/kubelet/config.json \
  || fail "the node is not named after the managed instance"
expect_eq "kubelet" active "$(systemctl is-active kubelet)"
a_pid=$(pid amazon-ssm-agent)

step "init again: not registered again, nothing restarted"
out=$(hybridlet init)
echo "$out" | grep -q 'nothing written' || fail "rerun wrote something: $out"
echo "$out" | grep -q 'agent registered as managed instance mi-0e2e0000000000001' || fail "$out"
expect_eq "registrations" 1 "$(grep -c -- '^-register' /var/log/ssm-register.log)"
expect_eq "agent not restarted" "$a_pid" "$(pid amazon-ssm-agent)"

step "uninstall: deregistered with the agent's credentials, registration and package removed"
"$artifacts/fake-ssm" mi-0e2e0000000000001 > /tmp/ssm.log 2>/tmp/ssm.err &
ssm_pid=$!
wait_for 10 "SSM stand-in listening" test -s /tmp/ssm.log
ssm_url=$(head -n 1 /tmp/ssm.log)
AWS_ENDPOINT_URL_SSM=$ssm_url expect_ok hybridlet uninstall
sleep 0.3
kill "$ssm_pid"
grep -q '^DescribeInstanceInformation AKIDSSMAGENT ' /tmp/ssm.log || fail "no DescribeInstanceInformation with the agent's key: $(cat /tmp/ssm.log)"
grep -q '^DeregisterManagedInstance AKIDSSMAGENT {"InstanceId":"mi-0e2e0000000000001"}' /tmp/ssm.log \
  || fail "not deregistered: $(cat /tmp/ssm.log)"
for f in /var/lib/amazon/ssm/registration /var/lib/amazon/ssm/Vault /root/.aws/credentials /eks-hybrid/.aws \
         /etc/kubernetes/kubelet/config.json /usr/bin/amazon-ssm-agent; do
  [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f is still there"
done
dpkg -s amazon-ssm-agent >/dev/null 2>&1 && fail "the agent package is still installed"
echo "    ok: deregistered, agent package and registration gone"

systemctl disable --now containerd
rm -f /etc/systemd/system/containerd.service
rm -rf /etc/kubernetes /etc/containerd /etc/eks /etc/systemd/system/*.service.d /var/log/ssm-register.log
systemctl daemon-reload
remove_hybridlet
