#!/bin/bash
# In-guest payload: run each scenario named in /mnt/share/scenarios with its own deadline,
# record `name<TAB>result<TAB>seconds` in out/results.tsv and each log in out/<name>.log.
set -u
share=/mnt/share
out=$share/out
: > "$out/results.tsv"
failed=0
echo "RIG: kernel $(uname -r), $(nproc) CPUs, systemd $(systemctl --version | head -n 1 | cut -d' ' -f2)"
for name in $(cat "$share/scenarios"); do
  script=$share/guest/scenarios/$name.sh
  start=$(date +%s.%N)
  if [ ! -f "$script" ]; then
    rc=127; echo "no scenario $name" > "$out/$name.log"
  else
    rc=0
    timeout --kill-after=10 "${SCENARIO_TIMEOUT:-600}" bash -eu -o pipefail "$script" > "$out/$name.log" 2>&1 || rc=$?
  fi
  seconds=$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  case $rc in
    0) result=pass ;;
    124|137) result=timeout; failed=1 ;;
    *) result=fail; failed=1 ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$result" "$seconds" >> "$out/results.tsv"
  echo "RIG: scenario $name $result in ${seconds}s"
  if [ "$result" != pass ]; then
    echo "RIG: --- last lines of $name.log ---"
    tail -n 40 "$out/$name.log"
    journalctl -u hybridlet --no-pager -n 40 > "$out/$name.journal" 2>&1 || true
  fi
  # A failed scenario may leave the package, a config or mounts behind; the next one
  # starts from a clean node.
  (. "$share/guest/lib.sh"; remove_hybridlet) >/dev/null 2>&1 || true
  sync
done
exit "$failed"
