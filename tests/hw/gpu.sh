#!/bin/bash
# Hardware tier: hybridlet's NVML paths on a host with NVIDIA GPUs and the driver loaded.
#
#   tests/hw/gpu.sh BIN_DIR [OUT_DIR]
#
# BIN_DIR holds release builds of `hybridlet`, `e2e-kubelet` and the `fake-apiserver`
# example (tests/hw/build-bins builds them). Runs as root; writes only under a temporary
# directory, /var/run/cdi (one spec, removed again) and OUT_DIR (logs, scrapes, results).
# Needs nvidia-smi and python3; a CUDA load step runs when python3 has torch, and is
# reported as skipped (not passed) otherwise.
#
# What it checks, each against nvidia-smi as the reference:
#   1. `hybridlet devices -o json` (NVML): count, index, UUID, PCI bus ID, name, memory,
#      driver version, compute capability, minor number (= /dev/nvidiaN).
#   2. `hybridlet run` with the GPU DRA driver: the ResourceSlice on a fake API server lists
#      every GPU with its UUID; /metrics has every GPU telemetry family for every GPU and
#      XID watching; power and temperature agree with nvidia-smi.
#   3. Under a CUDA load: utilization, memory used and power rise in /metrics.
#   4. DRA prepare/unprepare through the kubelet's socket: the CDI spec names the GPU's
#      device node (a character device that exists) and its UUID; unprepare removes it.
#   5. SIGTERM: clean exit, sockets removed.
#   6. MIG, read only (the GPU's settings, MIG mode included, are never changed): each
#      GPU's MIG capability and current mode agree with `nvidia-smi --query-gpu=mig.mode.current`
#      (as `nvidia-smi -q` reports it); for GPUs in MIG mode, the profiles agree with
#      `nvidia-smi mig -lgip` (ID, name, instances, SMs) and the instances with
#      `nvidia-smi mig -lgi` (profile, instance ID, placement), and the slice offers those
#      MIG devices (static MIG). Reported as skipped when no GPU is in MIG mode.
set -uo pipefail

bin=${1:?usage: tests/hw/gpu.sh BIN_DIR [OUT_DIR]}
bin=$(cd "$bin" && pwd)
out=${2:-$(mktemp -d /tmp/hybridlet-hw.XXXXXX)}
mkdir -p "$out"
work=$(mktemp -d /tmp/hybridlet-hw-work.XXXXXX)
results="$out/results.tsv"
: > "$results"
failures=0
daemon=""
api_pid=""

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*"; }
pass() { log "PASS $1"; printf 'PASS\t%s\n' "$1" >> "$results"; }
fail() {
  local why
  why=$(printf '%s' "$2" | tr '\n\t' '  ')
  log "FAIL $1: $why"; printf 'FAIL\t%s\t%s\n' "$1" "$why" >> "$results"; failures=$((failures + 1))
}
skip() { log "SKIP $1: $2"; printf 'SKIP\t%s\t%s\n' "$1" "$2" >> "$results"; }
cleanup() {
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null
  [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nvidia-smi python3; do
  command -v "$tool" >/dev/null || { echo "hardware tier needs $tool" >&2; exit 2; }
done
for b in hybridlet e2e-kubelet fake-apiserver; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b (tests/hw/build-bins)" >&2; exit 2; }
done
hl="$bin/hybridlet"
"$hl" version | tee "$out/version.txt"
nvidia-smi -L | tee "$out/nvidia-smi-L.txt"

# --- 1. devices vs nvidia-smi -------------------------------------------------------------
nvidia-smi --query-gpu=index,uuid,pci.bus_id,name,memory.total,driver_version,compute_cap \
  --format=csv,noheader,nounits > "$out/smi.csv"
if "$hl" --config-dir "$work/none" devices -o json > "$out/devices.json" 2> "$out/devices.err"; then
  if python3 - "$out/smi.csv" "$out/devices.json" > "$out/devices-compare.txt" 2>&1 <<'PY'
import csv, json, os, stat, sys
smi = [[c.strip() for c in row] for row in csv.reader(open(sys.argv[1]))]
dev = json.load(open(sys.argv[2]))
gpus = dev["gpus"]
want = os.environ.get("HW_GPU_SOURCE", "nvml")  # the script's own dry run uses a fixture
assert dev["gpuSource"] == want, f'GPU source {dev["gpuSource"]}, want {want}'

assert len(gpus) == len(smi), f"hybridlet sees {len(gpus)} GPUs, nvidia-smi {len(smi)}"
for row, g in zip(smi, gpus):
    index, uuid, bus, name, mem_mib, driver, cc = row
    checks = {
        "index": (g["index"], int(index)),
        "uuid": (g["uuid"], uuid),
        "pciBusId": (g["pciBusId"].upper(), bus.upper()),
        "name": (g["name"], name),
        "memory MiB": (g["memoryTotalBytes"] // 2**20, int(mem_mib)),
        "driverVersion": (g["driverVersion"], driver),
        "computeCapability": (f'{g["cudaComputeCapability"]["major"]}.{g["cudaComputeCapability"]["minor"]}', cc),
    }
    for what, (ours, theirs) in checks.items():
        assert ours == theirs, f"GPU {index} {what}: hybridlet {ours!r}, nvidia-smi {theirs!r}"
    node = f'/dev/nvidia{g["minorNumber"]}'
    assert stat.S_ISCHR(os.stat(node).st_mode), f"{node} is not a character device"
    assert os.major(os.stat(node).st_rdev) == 195 and os.minor(os.stat(node).st_rdev) == g["minorNumber"], \
        f"{node} is {os.major(os.stat(node).st_rdev)}:{os.minor(os.stat(node).st_rdev)}, want 195:{g['minorNumber']}"
    print(f"GPU {index}: {uuid} {bus} {name} {mem_mib} MiB, driver {driver}, cc {cc}, {node}; "
          f"topology root={g.get('pcieRoot')} switch={g.get('pcieSwitch')} numa={g.get('numaNode')}")
print(f"{len(gpus)} GPUs agree with nvidia-smi")
PY
  then pass "devices: NVML inventory agrees with nvidia-smi"; else fail "devices: NVML inventory" "$(tail -n 3 "$out/devices-compare.txt")"; fi
else
  fail "devices -o json" "$(tail -n 3 "$out/devices.err")"
fi
cat "$out/devices-compare.txt" 2>/dev/null

# --- 2. the daemon with the GPU DRA driver ------------------------------------------------
node=$(hostname)
"$bin/fake-apiserver" > "$work/api.url" 2> "$out/fake-apiserver.err" &
api_pid=$!
for _ in $(seq 50); do [ -s "$work/api.url" ] && break; sleep 0.1; done
api=$(head -n 1 "$work/api.url")
curl -fsS -X POST -H 'Content-Type: application/json' \
  -d "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$node\"}}" "$api/api/v1/nodes" > /dev/null
mkdir -p "$work/kubelet" "$work/state" "$work/conf.d"
cat > "$work/kubelet/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "$api"}}]
contexts: [{name: k, context: {cluster: c, user: u}}]
current-context: k
users: [{name: u, user: {token: node-token}}]
KC
cat > "$work/config.yaml" <<YAML
apiVersion: hybridlet.io/v1alpha1
kind: AgentConfig
spec:
  kubeletRootDir: $work/kubelet
  stateDir: $work/state
  admin:
    listenAddress: 127.0.0.1:19464
  dra:
    gpu:
      enabled: true
YAML
"$hl" --config "$work/config.yaml" --config-dir "$work/conf.d" --log-format json run \
  --device-sample-interval 1s > /dev/null 2> "$out/daemon.log" &
daemon=$!
ready=""
for _ in $(seq 100); do
  if curl -fsS http://127.0.0.1:19464/readyz > /dev/null 2>&1; then ready=1; break; fi
  kill -0 "$daemon" 2>/dev/null || break
  sleep 0.2
done
if [ -n "$ready" ]; then pass "run: ready with the GPU DRA driver"; else fail "run: ready" "$(tail -n 5 "$out/daemon.log")"; fi

slice=""
for _ in $(seq 50); do
  slice=$(curl -fsS "$api/apis/resource.k8s.io/v1/resourceslices")
  echo "$slice" | grep -q '"gpu.hybridlet.io"' && break
  sleep 0.2
done
echo "$slice" > "$out/resourceslices.json"
if python3 - "$out/resourceslices.json" "$out/devices.json" <<'PY'
import json, sys
slices = json.load(open(sys.argv[1]))["items"]
gpus = json.load(open(sys.argv[2]))["gpus"]
assert len(slices) == 1, f"{len(slices)} slices"
devs = {d["name"]: d for d in slices[0]["spec"]["devices"]}
for g in gpus:
    if g.get("migEnabled"):
        # A GPU in MIG mode is offered as the MIG devices it has (step 6 checks them).
        mig = [d for d in devs.values() if d["attributes"].get("parentUUID", {}).get("string") == g["uuid"]]
        assert len(mig) == len((g.get("mig") or {}).get("instances", [])), (g["uuid"], mig)
        continue
    d = devs[f'gpu-{g["index"]}']
    assert d["attributes"]["uuid"]["string"] == g["uuid"], d
    assert int(d["capacity"]["memory"]["value"]) == g["memoryTotalBytes"], d
print(json.dumps(slices[0]["spec"]["devices"][0]["attributes"]))
PY
then pass "run: ResourceSlice lists every GPU with UUID and memory"; else fail "run: ResourceSlice" "see resourceslices.json"; fi

scrape() { curl -fsS http://127.0.0.1:19464/metrics; }
sleep 2
scrape > "$out/metrics-idle.txt"
# Resident memory with NVML loaded, and how long one NVML discovery + sample took.
grep -E '^(VmRSS|VmHWM)' "/proc/$daemon/status" | tee "$out/rss.txt"
grep -E '^hybridlet_device_discovery_duration_seconds ' "$out/metrics-idle.txt" | tee -a "$out/rss.txt"
python3 - "$out/metrics-idle.txt" "$out/devices.json" > "$out/metrics-check.txt" 2>&1 <<'PY'
import json, re, subprocess, sys
text = open(sys.argv[1]).read()
gpus = json.load(open(sys.argv[2]))["gpus"]
def value(family, uuid):
    m = re.search(rf'^hybridlet_{family}\{{[^}}]*UUID="{re.escape(uuid)}"[^}}]*\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else None
families = ["gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_temperature_celsius",
            "gpu_power_watts", "gpu_power_limit_watts", "gpu_sm_clock_hertz",
            "gpu_ecc_errors", "gpu_ecc_uncorrected_errors", "gpu_pcie_replays",
            "gpu_throttle_reasons", "gpu_xid_watched", "gpu_xid_errors_total", "gpu_memory_total_bytes"]
def smi_field(field):
    """uuid -> value of one nvidia-smi field (None where it says N/A or cannot answer)."""
    r = subprocess.run(["nvidia-smi", f"--query-gpu=uuid,{field}", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    out = {}
    for line in r.stdout.strip().splitlines():
        uuid, _, v = line.partition(",")
        v = v.strip()
        out[uuid.strip()] = None if (r.returncode or "N/A" in v or "Not Supported" in v) else v
    return out
# Our family -> the nvidia-smi field that reads the same NVML value (None: no such field).
reference = {
    "gpu_utilization_ratio": "utilization.gpu", "gpu_memory_used_bytes": "memory.used",
    "gpu_temperature_celsius": "temperature.gpu", "gpu_power_watts": "power.draw",
    "gpu_power_limit_watts": "enforced.power.limit", "gpu_sm_clock_hertz": "clocks.sm",
    "gpu_ecc_errors": "ecc.errors.corrected.volatile.total",
    "gpu_ecc_uncorrected_errors": "ecc.errors.uncorrected.volatile.total",
    "gpu_throttle_reasons": "clocks_event_reasons.active",
}
smi = {f: smi_field(field) for f, field in reference.items()}
missing = []
for g in gpus:
    for f in families:
        v = value(f, g["uuid"])
        ref = smi.get(f, {}).get(g["uuid"], "") if f in reference else ""
        print(f'GPU {g["index"]} hybridlet_{f} = {v}' + (f"  (nvidia-smi {reference[f]}: {ref})" if f in reference else ""))
        # A family may be absent only where nvidia-smi cannot read the value either.
        if v is None and ref is not None:
            missing.append(f"{f} (GPU {g['index']})")
    def close(f, tolerance):
        ours, ref = value(f, g["uuid"]), smi[f].get(g["uuid"])
        if ours is not None and ref is not None:
            assert abs(ours - float(ref)) <= tolerance(float(ref)), f"GPU {g['index']} {f}: {ours} vs nvidia-smi {ref}"
    close("gpu_power_watts", lambda r: max(30.0, 0.25 * r))
    close("gpu_temperature_celsius", lambda r: 5)
    close("gpu_power_limit_watts", lambda r: 1)
print("missing:", ", ".join(missing) or "none")
assert not missing, "families missing: " + ", ".join(missing)
PY
if [ $? -eq 0 ]; then pass "metrics: every GPU family nvidia-smi can read is present; power, temperature, limit agree"; else fail "metrics: GPU families" "$(tail -n 2 "$out/metrics-check.txt")"; fi
cat "$out/metrics-check.txt"

# The kubelet's health stream: every GPU healthy (no XID since start), pool = node.
sock="$work/kubelet/plugins/gpu.hybridlet.io/dra.sock"
if "$bin/e2e-kubelet" --socket "$sock" dra-health > "$out/health.txt" 2>&1 \
  && [ "$(grep -c ' HEALTHY' "$out/health.txt")" -eq "$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["gpus"]))' "$out/devices.json")" ] \
  && ! grep -q 'UNHEALTHY' "$out/health.txt"; then
  pass "DRA health stream: every GPU HEALTHY"
else
  fail "DRA health stream" "$(cat "$out/health.txt")"
fi
cat "$out/health.txt"

# --- 3. under a CUDA load -----------------------------------------------------------------
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  python3 - > "$out/load.txt" 2>&1 <<'PY' &
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
hold = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")  # 8 GiB in use
end = time.time() + 12
n = 0
while time.time() < end:
    for _ in range(50):
        c = a @ b
    torch.cuda.synchronize()
    n += 50
print(f"{n} matmuls")
PY
  load=$!
  sleep 8
  scrape > "$out/metrics-load.txt"
  wait "$load"
  if python3 - "$out/metrics-idle.txt" "$out/metrics-load.txt" > "$out/load-check.txt" 2>&1 <<'PY'
import re, sys
def read(path):
    out = {}
    for m in re.finditer(r'^hybridlet_(gpu_\w+)\{gpu="0",[^}]*\} (\S+)', open(path).read(), re.M):
        out[m.group(1)] = float(m.group(2))
    return out
idle, load = read(sys.argv[1]), read(sys.argv[2])
for k in ["gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_power_watts", "gpu_sm_clock_hertz", "gpu_temperature_celsius"]:
    print(f"{k}: idle {idle.get(k)} -> load {load.get(k)}")
assert load["gpu_utilization_ratio"] >= 0.5, "utilization did not rise under load"
assert load["gpu_memory_used_bytes"] - idle["gpu_memory_used_bytes"] >= 8 * 2**30, "memory used did not rise by 8 GiB"
assert load["gpu_power_watts"] > idle["gpu_power_watts"] + 50, "power did not rise"
PY
  then pass "metrics under CUDA load: utilization, memory used and power rise"; else fail "metrics under load" "$(tail -n 2 "$out/load-check.txt")"; fi
  cat "$out/load-check.txt"
else
  skip "metrics under CUDA load" "python3 has no torch with CUDA"
fi

# --- 4. DRA prepare / unprepare -----------------------------------------------------------
# The first GPU not in MIG mode (a MIG GPU is offered as its MIG devices).
read -r idx0 uuid0 < <(python3 -c 'import json,sys; g=[g for g in json.load(open(sys.argv[1]))["gpus"] if not g.get("migEnabled")]; print(g[0]["index"], g[0]["uuid"]) if g else print("none none")' "$out/devices.json")
claim=$(curl -fsS -X POST -H 'Content-Type: application/json' -d "{\"apiVersion\":\"resource.k8s.io/v1\",\"kind\":\"ResourceClaim\",\"metadata\":{\"name\":\"train\",\"namespace\":\"ml\"},\"spec\":{},\"status\":{\"allocation\":{\"devices\":{\"results\":[{\"request\":\"gpu\",\"driver\":\"gpu.hybridlet.io\",\"pool\":\"$node\",\"device\":\"gpu-$idx0\"}]}},\"reservedFor\":[{\"resource\":\"pods\",\"name\":\"train-0\",\"uid\":\"p0\"}]}}" \
  "$api/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims")
uid=$(echo "$claim" | python3 -c 'import json,sys; print(json.load(sys.stdin)["metadata"]["uid"])')
spec="/var/run/cdi/gpu_hybridlet_io-$uid.json"
if "$bin/e2e-kubelet" --socket "$sock" dra-prepare --namespace ml --name train --uid "$uid" > "$out/prepare.txt" 2>&1 \
  && python3 - "$spec" "$uuid0" > "$out/cdi-check.txt" 2>&1 <<'PY'
import json, os, stat, sys
spec = json.load(open(sys.argv[1]))
edits = spec["devices"][0]["containerEdits"]
print(json.dumps(spec, indent=1))
assert f"NVIDIA_VISIBLE_DEVICES={sys.argv[2]}" in edits["env"], edits["env"]
for n in edits["deviceNodes"]:
    assert stat.S_ISCHR(os.stat(n["path"]).st_mode), f'{n["path"]} is not a character device'
paths = [n["path"] for n in edits["deviceNodes"]]
assert "/dev/nvidiactl" in paths and any(p.startswith("/dev/nvidia") and p[11:].isdigit() for p in paths), paths
PY
then pass "DRA prepare: CDI spec with the GPU's device nodes (all exist) and UUID"; else fail "DRA prepare" "$(tail -n 3 "$out/prepare.txt" "$out/cdi-check.txt" 2>/dev/null)"; fi
if scrape | grep -E "^hybridlet_gpu_power_watts\\{gpu=\"$idx0\"," | grep -q 'namespace="ml",pod="train-0",claim="train"'; then
  pass "metrics: the prepared GPU's telemetry names its namespace, pod and claim"
else
  fail "metrics: holder labels" "$(scrape | grep -E '^hybridlet_gpu_power_watts')"
fi
if "$bin/e2e-kubelet" --socket "$sock" dra-unprepare --namespace ml --name train --uid "$uid" >> "$out/prepare.txt" 2>&1 && [ ! -e "$spec" ]; then
  pass "DRA unprepare: CDI spec removed"
else
  fail "DRA unprepare" "$(tail -n 3 "$out/prepare.txt")"
fi

# --- 6. MIG, read only -------------------------------------------------------------------
nvidia-smi --query-gpu=index,uuid,mig.mode.current --format=csv,noheader > "$out/mig-mode.txt" 2>&1
if python3 - "$out/devices.json" "$out/mig-mode.txt" > "$out/mig-mode-check.txt" 2>&1 <<'PY'
import json, sys
gpus = {g["uuid"]: g for g in json.load(open(sys.argv[1]))["gpus"]}
for line in open(sys.argv[2]):
    index, uuid, mode = [f.strip() for f in line.split(",")]
    want = {"Enabled": True, "Disabled": False}.get(mode)  # "[N/A]": no MIG
    ours = gpus[uuid].get("migEnabled")
    assert ours == want, f"GPU {index}: nvidia-smi says MIG {mode}, hybridlet {ours}"
    print(f"GPU {index}: MIG {mode}")
PY
then pass "MIG: capability and mode agree with nvidia-smi"; else fail "MIG: mode" "$(tail -n 2 "$out/mig-mode-check.txt")"; fi
cat "$out/mig-mode-check.txt"
mig_gpus=$(grep -c ', Enabled$' "$out/mig-mode.txt")
if [ "$mig_gpus" -eq 0 ]; then
  skip "MIG: profiles and instances vs nvidia-smi mig -lgip/-lgi" "no GPU is in MIG mode (the tier never changes it)"
else
  for i in $(grep ', Enabled$' "$out/mig-mode.txt" | cut -d, -f1); do
    nvidia-smi mig -i "$i" -lgip > "$out/mig-lgip-$i.txt" 2>&1
    nvidia-smi mig -i "$i" -lgi > "$out/mig-lgi-$i.txt" 2>&1
  done
  if python3 - "$out" "$out/devices.json" "$out/resourceslices.json" > "$out/mig-check.txt" 2>&1 <<'PY'
import json, re, sys
out, devices, slices = sys.argv[1:]
devs = [d for s in json.load(open(slices))["items"] for d in s["spec"].get("devices", [])]
for g in json.load(open(devices))["gpus"]:
    if not g.get("migEnabled"):
        continue
    i, mig = g["index"], g.get("mig")
    assert mig, f"GPU {i}: MIG mode on, but hybridlet read no profiles"
    ours = {p["id"]: p for p in mig["profiles"]}
    # |   0  MIG 1g.18gb       19     7/7        16.25      No     16     1     0   |
    row = re.compile(r"^\|\s+\d+\s+MIG\s+(\S+)\s+(\d+)\s+(\d+)/(\d+)\s+[\d.]+\s+\S+\s+(\d+)\s+\d+\s+\d+\s+\|")
    seen = 0
    for line in open(f"{out}/mig-lgip-{i}.txt"):
        m = row.match(line)
        if not m:
            continue
        name, pid, total, sms = m.group(1), int(m.group(2)), int(m.group(4)), int(m.group(5))
        p = ours.get(pid)
        assert p, f"GPU {i}: nvidia-smi lists profile {pid} ({name}), hybridlet does not"
        assert (p["name"], p["instanceCount"], p["multiprocessors"]) == (name, total, sms), (p, line)
        seen += 1
    assert seen == len(ours), f"GPU {i}: nvidia-smi lists {seen} profiles, hybridlet {len(ours)}"
    # |   0  MIG 1g.18gb          19        1          0:1     |
    gi = re.compile(r"^\|\s+\d+\s+MIG\s+\S+\s+(\d+)\s+(\d+)\s+(\d+):(\d+)\s+\|")
    theirs = {tuple(map(int, m.groups())) for m in map(gi.match, open(f"{out}/mig-lgi-{i}.txt")) if m}
    mine = {(x["profileId"], x["gpuInstanceId"], x["placement"]["start"], x["placement"]["size"]) for x in mig["instances"]}
    assert mine == theirs, f"GPU {i}: instances hybridlet {sorted(mine)}, nvidia-smi {sorted(theirs)}"
    offered = [d for d in devs if d["attributes"].get("parentUUID", {}).get("string") == g["uuid"]]
    assert len(offered) == len(mig["instances"]), f"GPU {i}: {len(offered)} MIG devices offered"
    print(f"GPU {i}: {seen} profiles and {len(mine)} GPU instances agree with nvidia-smi")
PY
  then pass "MIG: profiles and instances agree with nvidia-smi mig -lgip/-lgi; the slice offers them"; else fail "MIG: profiles/instances" "$(tail -n 2 "$out/mig-check.txt")"; fi
  cat "$out/mig-check.txt"
fi

# --- 5. clean shutdown --------------------------------------------------------------------
kill -TERM "$daemon"
wait "$daemon"
rc=$?
daemon=""
if [ "$rc" -eq 0 ] && [ ! -e "$sock" ]; then pass "SIGTERM: exit 0, sockets removed"; else fail "SIGTERM" "exit $rc"; fi
grep -E 'XID|xid' "$out/daemon.log" | head -n 5

echo
column -t -s $'\t' "$results" 2>/dev/null || cat "$results"
[ "$failures" -eq 0 ]
