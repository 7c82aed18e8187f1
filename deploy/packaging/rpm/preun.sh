# hybridlet %preun. $1 = 0: the package is being erased (not upgraded): stop and disable.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop hybridlet.service >/dev/null 2>&1 || :
    fi
    systemctl disable hybridlet.service >/dev/null 2>&1 || :
fi
