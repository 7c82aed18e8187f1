#!/usr/bin/env bash
# Install what the VM rig needs on the host, idempotently: grpc-go (Debian's, for the
# kubelet stand-in), debootstrap, and QEMU 10 from
# bookworm-backports (its igb device offers SR-IOV VFs that come up as network interfaces;
# bookworm's QEMU 7.2 would also remove the machine's qemu-utils 10). The backports source
# reuses the URI of the machine's existing Debian apt source; no mirror is named here.
set -euo pipefail

sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }

# grpc-go, for the kubelet stand-in's dialer (tests/peers/kubelet-dial).
if ! command -v go >/dev/null 2>&1 || [ ! -d /usr/share/gocode/src/google.golang.org/grpc ]; then
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends golang-go golang-google-grpc-dev
fi

need=0
command -v debootstrap >/dev/null 2>&1 || need=1
[ "$(qemu_major)" != "" ] && [ "$(qemu_major)" -ge 8 ] || need=1
command -v mkfs.ext4 >/dev/null 2>&1 || need=1
if [ "$need" -eq 0 ]; then
  echo "host-deps: debootstrap and QEMU $(qemu_major) present"
  exit 0
fi

backports=/etc/apt/sources.list.d/hybridlet-e2e-backports.sources
if [ ! -f "$backports" ]; then
  uri=""
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || { echo "host-deps: no Debian apt source found to derive bookworm-backports from" >&2; exit 1; }
  $sudo_ tee "$backports" >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$sudo_ apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends debootstrap e2fsprogs
DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends \
  -t bookworm-backports qemu-system-x86 qemu-utils
echo "host-deps: QEMU $(qemu_major) installed"
