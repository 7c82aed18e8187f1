# hybridlet %post. $1: how many versions are installed after this one (1: first install).
install -d -m 0700 /var/lib/hybridlet
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    # Enabled, not started: the operator writes /etc/hybridlet/config.yaml first.
    systemctl enable hybridlet.service >/dev/null 2>&1 || :
fi
