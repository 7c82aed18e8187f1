# Scenario 1: the .deb of this commit under real systemd. Install enables but does not
# start; the unit reaches active through Type=notify; /metrics and /readyz answer; a
# broken config on reload is refused and the old one keeps running; a good one is applied
# in the same process (log level, TLS and its rotation, the admin address, the CSI plugin
# and a DRA driver started, restarted and stopped on their own); stop is clean; remove
# keeps the config, purge removes the state.
. /mnt/share/guest/lib.sh

step "dpkg -i"
expect_ok dpkg -i "$artifacts/hybridlet.deb"
expect_eq "enabled after install" enabled "$(systemctl is-enabled hybridlet)"
expect_eq "not started by install" inactive "$(systemctl is-active hybridlet || true)"
expect_ok hybridlet version
expect_ok hybridlet check --config-only

step "systemctl start (Type=notify: returns once READY=1 was sent)"
expect_ok systemctl start hybridlet
expect_eq "active" active "$(systemctl is-active hybridlet)"
expect_eq "unit type" notify "$(systemctl show -p Type --value hybridlet)"
status=$(systemctl show -p StatusText --value hybridlet)
echo "    StatusText: $status"
[ -n "$status" ] || fail "no STATUS= line from the daemon"
pid=$(main_pid)

step "/metrics, /healthz, /readyz"
expect_ok curl -fsS -o /dev/null http://127.0.0.1:9464/readyz
expect_ok curl -fsS -o /dev/null http://127.0.0.1:9464/healthz
# Prometheus asks for OpenMetrics and gets it; curl (Accept: */*) gets the 0.0.4 text
# format, which older scrapers parse.
curl -fsS -H 'Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5' \
  http://127.0.0.1:9464/metrics > /tmp/metrics.om
grep -q '^# EOF' /tmp/metrics.om || fail "/metrics asked for OpenMetrics is not OpenMetrics (no # EOF)"
curl -fsS http://127.0.0.1:9464/metrics > /tmp/metrics
grep -q '^hybridlet_build_info{' /tmp/metrics || fail "no hybridlet_build_info in /metrics"
grep -q '^# TYPE hybridlet_build_info gauge' /tmp/metrics || fail "/metrics for curl is not the 0.0.4 text format"
! grep -q '^# EOF' /tmp/metrics || fail "/metrics for curl is OpenMetrics"
echo "    ok: $(grep -c '^hybridlet_' /tmp/metrics) hybridlet samples"

step "reload with a broken drop-in: refused, the running config stays"
mkdir -p /etc/hybridlet/config.d
cat > /etc/hybridlet/config.d/99-broken.yaml <<'YAML'
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  admin:
    listenAdress: 127.0.0.1:9999
YAML
expect_fail systemctl reload hybridlet
journalctl -u hybridlet --no-pager | grep -q 'spec.admin.listenAdress' \
  || fail "the journal does not name the bad field"
echo "    ok: systemctl reload failed and the journal names spec.admin.listenAdress"
expect_eq "same main PID after a refused reload" "$pid" "$(main_pid)"
expect_eq "still active" active "$(systemctl is-active hybridlet)"
# A bare SIGHUP (no pre-check) is refused by the daemon itself.
kill -HUP "$pid"
wait_for 20 "SIGHUP with a broken config counted as invalid" sh -c \
  "curl -fsS http://127.0.0.1:9464/metrics | grep -q 'hybridlet_config_reloads_total{result=\"invalid\"} 1'"
expect_eq "same main PID after a refused SIGHUP" "$pid" "$(main_pid)"
expect_ok curl -fsS -o /dev/null http://127.0.0.1:9464/readyz
rm /etc/hybridlet/config.d/99-broken.yaml
expect_ok systemctl reload hybridlet
wait_for 20 "good reload counted" sh -c \
  "curl -fsS http://127.0.0.1:9464/metrics | grep -q 'hybridlet_config_reloads_total{result=\"ok\"} 1'"

step "reload applies: log level, TLS and its rotation, admin address, CSI, a DRA driver (one process)"
pid=$(main_pid)
tls=/etc/hybridlet/tls
mkdir -p "$tls"
cp "$artifacts/tls/cert.pem" "$tls/cert.pem"; cp "$artifacts/tls/key.pem" "$tls/key.pem"
start_fake_apiserver "$(hostname)"
# reload_with CONFIG-BODY: the drop-in's spec, then systemctl reload; the same process.
reloads=1
reload_with() {
  printf 'apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n%s\n' "$1" > /etc/hybridlet/config.d/60-reload.yaml
  expect_ok systemctl reload hybridlet
  reloads=$((reloads + 1))
  wait_for 30 "reload $reloads counted ok" sh -c \
    "curl -fsS ${2:-http://127.0.0.1:9464}/metrics ${3:-} | grep -q 'hybridlet_config_reloads_total{result=\"ok\"} $reloads'"
  expect_eq "same main PID after reload $reloads" "$pid" "$(main_pid)"
}
since=$(date '+%Y-%m-%d %H:%M:%S')
reload_with '  logLevel: debug
  csi: {nfs: {enabled: true}}'
wait_for 20 "the CSI sockets" test -S "$csi_socket" -a -S "$csi_reg_socket"
journalctl -u hybridlet --since "$since" -p debug --no-pager -o cat | grep -q 'subsystem started' \
  || fail "no debug line after logLevel: debug"
echo "    ok: debug lines in the journal"
csi_inode=$(stat -c %i-%z "$csi_reg_socket")

reload_with '  logLevel: debug
  csi: {nfs: {enabled: true}, topology: {topology.hybridlet.io/site: rack-7}}'
wait_for 20 "a new CSI registration socket" sh -c "[ -S $csi_reg_socket ] && [ \"\$(stat -c %i-%z $csi_reg_socket)\" != '$csi_inode' ]"
kubelet info | grep -q 'topology.hybridlet.io/site": "rack-7"' || fail "NodeGetInfo without the new topology: $(kubelet info)"
echo "    ok: NodeGetInfo reports topology.hybridlet.io/site=rack-7"
csi_inode=$(stat -c %i-%z "$csi_reg_socket")

base='  logLevel: debug
  csi: {nfs: {enabled: true}, topology: {topology.hybridlet.io/site: rack-7}}'
reload_with "$base
  dra: {gpu: {enabled: true}}"
dra_socket=/var/lib/kubelet/plugins/gpu.hybridlet.io/dra.sock
wait_for 30 "the GPU DRA socket" test -S "$dra_socket"
wait_for 30 "its ResourceSlice" sh -c "curl -fsS $api/apis/resource.k8s.io/v1/resourceslices | grep -q '\"driver\":\"gpu.hybridlet.io\"'"
reload_with "$base"
wait_for 30 "the GPU DRA socket gone" sh -c "[ ! -e $dra_socket ]"
wait_for 30 "its ResourceSlice withdrawn" sh -c "! curl -fsS $api/apis/resource.k8s.io/v1/resourceslices | grep -q gpu.hybridlet.io"
expect_eq "the CSI plugin untouched by the DRA changes" "$csi_inode" "$(stat -c %i-%z "$csi_reg_socket")"

https_base="$base
  admin: {tls: {certFile: $tls/cert.pem, keyFile: $tls/key.pem}}"
reload_with "$https_base" https://127.0.0.1:9464 "--cacert $tls/cert.pem"
expect_fail curl -fsS -o /dev/null http://127.0.0.1:9464/healthz
echo "    ok: HTTPS with the configured certificate, no plain HTTP"
cp "$artifacts/tls/rotated-cert.pem" "$tls/cert.pem"; cp "$artifacts/tls/rotated-key.pem" "$tls/key.pem"
cp "$artifacts/tls/cert.pem" /tmp/old-ca.pem
reload_with "$https_base" https://127.0.0.1:9464 "--cacert $tls/cert.pem"
expect_fail curl -fsS -o /dev/null --cacert /tmp/old-ca.pem https://127.0.0.1:9464/healthz
echo "    ok: the renewed certificate is served after reload; the old one is gone"

reload_with "$base
  admin: {listenAddress: 127.0.0.1:9465}" http://127.0.0.1:9465
expect_fail curl -fsS -o /dev/null http://127.0.0.1:9464/healthz
echo "    ok: the admin server moved to 9465"
expect_eq "the CSI plugin untouched by the admin changes" "$csi_inode" "$(stat -c %i-%z "$csi_reg_socket")"

rm /etc/hybridlet/config.d/60-reload.yaml
expect_ok systemctl reload hybridlet
reloads=$((reloads + 1))
wait_for 30 "back on 9464 with CSI off" sh -c "[ ! -e $csi_socket ] && curl -fsS http://127.0.0.1:9464/metrics | grep -q 'hybridlet_config_reloads_total{result=\"ok\"} $reloads'"
expect_eq "same main PID after all reloads" "$pid" "$(main_pid)"
kill "$api_pid" 2>/dev/null || true
rm -rf /var/lib/kubelet "$tls"

step "a broken config stops a restart (exit 78) without a restart loop"
printf 'apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  nope: 1\n' > /etc/hybridlet/config.d/99-broken.yaml
expect_fail systemctl restart hybridlet
wait_for 20 "unit failed" sh -c '[ "$(systemctl is-active hybridlet)" = failed ]'
expect_eq "main process exit status" 78 "$(systemctl show -p ExecMainStatus --value hybridlet)"
sleep 7   # longer than RestartSec=5: a restart loop would show up here
expect_eq "still failed, no restart loop" failed "$(systemctl is-active hybridlet || true)"
expect_eq "automatic restarts" 0 "$(systemctl show -p NRestarts --value hybridlet)"
rm /etc/hybridlet/config.d/99-broken.yaml
systemctl reset-failed hybridlet
expect_ok systemctl start hybridlet

step "systemctl stop exits cleanly"
expect_ok systemctl stop hybridlet
expect_eq "inactive" inactive "$(systemctl is-active hybridlet || true)"
expect_eq "result" success "$(systemctl show -p Result --value hybridlet)"
expect_eq "main exit status" 0 "$(systemctl show -p ExecMainStatus --value hybridlet)"

step "remove keeps the config, purge removes state"
mkdir -p /var/lib/hybridlet
expect_ok dpkg -r hybridlet
[ ! -e /usr/bin/hybridlet ] || fail "binary left after remove"
[ -f /etc/hybridlet/config.yaml ] || fail "remove deleted /etc/hybridlet/config.yaml"
[ -d /var/lib/hybridlet ] || fail "remove deleted the state directory"
echo "    ok: config and state kept"
expect_ok dpkg -P hybridlet
[ ! -e /var/lib/hybridlet ] || fail "purge left /var/lib/hybridlet"
[ ! -e /etc/hybridlet/config.yaml ] || fail "purge left the config"
echo "    ok: purged"
