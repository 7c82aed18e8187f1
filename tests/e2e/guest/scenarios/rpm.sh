# The .rpm's scriptlets under real systemd (Debian's rpm tool runs them with /bin/sh, as
# RPM-based distributions do): install enables without starting; an upgrade restarts the
# running agent and keeps an edited config; erase stops and disables, keeps the state, and
# saves the edited config as config.yaml.rpmsave (RPM's rule for %config files).
. /mnt/share/guest/lib.sh

rpm --initdb 2>/dev/null || true
step "rpm -i"
expect_ok rpm -i --nodeps "$artifacts/hybridlet-1.rpm"
expect_eq "enabled after install" enabled "$(systemctl is-enabled hybridlet)"
expect_eq "not started by install" inactive "$(systemctl is-active hybridlet || true)"
expect_eq "state directory mode" 700 "$(stat -c %a /var/lib/hybridlet)"
expect_ok systemctl start hybridlet
expect_eq "active" active "$(systemctl is-active hybridlet)"
pid=$(main_pid)

step "rpm -U (release 2) restarts the running agent and keeps an edited config"
echo "# edited by the operator" >> /etc/hybridlet/config.yaml
expect_ok rpm -U --nodeps "$artifacts/hybridlet-2.rpm"
expect_eq "installed release" 2 "$(rpm -q --qf '%{RELEASE}' hybridlet)"
wait_for 30 "active again" systemctl is-active -q hybridlet
[ "$(main_pid)" != "$pid" ] || fail "the agent was not restarted by the upgrade"
grep -q 'edited by the operator' /etc/hybridlet/config.yaml || fail "the upgrade replaced the edited config"
expect_eq "still enabled" enabled "$(systemctl is-enabled hybridlet)"

step "rpm -e stops, disables, keeps state"
expect_ok rpm -e --nodeps hybridlet
expect_eq "stopped" inactive "$(systemctl is-active hybridlet || true)"
[ ! -e /usr/bin/hybridlet ] || fail "binary left after erase"
[ ! -e /etc/systemd/system/multi-user.target.wants/hybridlet.service ] || fail "still enabled after erase"
[ -d /var/lib/hybridlet ] || fail "erase deleted the state directory"
[ -f /etc/hybridlet/config.yaml.rpmsave ] || fail "the edited config was not kept as config.yaml.rpmsave"
echo "    ok: state kept, edited config saved as config.yaml.rpmsave"
rm -rf /var/lib/hybridlet /etc/hybridlet
