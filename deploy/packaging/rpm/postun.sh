# hybridlet %postun. $1 >= 1: an upgrade; restart a running agent so the new binary takes
# over (mounts are kernel state and survive). Erasing keeps /etc/hybridlet and
# /var/lib/hybridlet (RPM has no purge: remove them by hand to forget the node's state).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart hybridlet.service >/dev/null 2>&1 || :
    fi
fi
