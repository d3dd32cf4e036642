#!/usr/bin/env bash
# One node against two nodes of a cluster (through a local nats-server) with the clients
# split: publishers on the first node, every other subscriber on the second. Writes
# benches/results/cluster.md and a JSON-lines log. Not part of CI.
# Usage: benches/cluster.sh [seconds per scenario] [repetitions]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
reps="${2:-3}"
out=benches/results
mkdir -p "$out"
log="$out/cluster.jsonl"
: > "$log"
command -v nats-server > /dev/null || { echo "nats-server is missing (apt-get install nats-server)" >&2; exit 1; }
cargo build --release -q -p switchboard -p switchboard-benches
bin="${CARGO_TARGET_DIR:-target}/release"
secret="bench-secret-bench-secret-bench-secret-0"
ulimit -n 20000 || true
key=$(python3 - "$secret" <<'PY'
import base64, hashlib, hmac, json, sys
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"role": "anon", "exp": 4000000000}).encode())
print(f"{head}.{body}.{b(hmac.new(sys.argv[1].encode(), f'{head}.{body}'.encode(), hashlib.sha256).digest())}")
PY
)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# CPU seconds (user + system) of a process.
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

# start <name> [flags…]: a switchboard with one shard; sets $pid and $addr.
start() {
  local name=$1; shift
  "$bin/switchboard" serve --bind 127.0.0.1:0 --jwt-secret "$secret" --shards 1 \
    --max-concurrent-users 1000000 --max-joins-per-second 0 --max-events-per-second 0 \
    --send-queue 8192 --log-level error "$@" > "$out/.$name.out" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's#^switchboard listening on http://##p' "$out/.$name.out")
    [ -n "$addr" ] && return
    sleep 0.1
  done
  echo "switchboard did not start" >&2; exit 1
}

scenarios=(
  "1k fan-out 1→1000|--connections 1001 --rooms 1 --publishers 1 --rate 1000"
  "10k, 100 rooms × 100|--connections 10000 --rooms 100 --publishers 100 --rate 2000"
)
for entry in "${scenarios[@]}"; do
  name="${entry%%|*}"
  args="${entry#*|}"
  for run in $(for _ in $(seq "$reps"); do echo one two; done); do
    if [ "$run" = one ]; then
      start one; pids=("$pid"); remote=()
    else
      nats_port=$(free_port)
      nats-server -a 127.0.0.1 -p "$nats_port" > /dev/null 2>&1 & nats=$!
      sleep 0.3
      cluster=(--cluster-nats "nats://127.0.0.1:$nats_port")
      start a "${cluster[@]}"; first=("$pid" "$addr")
      start b "${cluster[@]}"; second=("$pid" "$addr")
      pid=${first[0]}; addr=${first[1]}; pids=("${first[0]}" "${second[0]}")
      remote=(--remote-addr "${second[1]}" --remote-pid "${second[0]}")
      # Until each node sees the other.
      for _ in $(seq 100); do
        curl -s "http://$addr/metrics" | grep -q '^switchboard_cluster_nodes 1' && break
        sleep 0.1
      done
      nats_cpu=$(cpu "$nats")
    fi
    # shellcheck disable=SC2086
    line=$("$bin/loadgen" --addr "$addr" --key "$key" --duration "$secs" --server-pid "$pid" \
      --label "$name" "${remote[@]}" $args 2>/dev/null | tail -n 1)
    extra=""
    if [ "$run" = two ]; then
      extra=",\"nats_cpu_secs\":$(python3 -c "print($(cpu "$nats") - $nats_cpu)")"
      kill "$nats"; wait "$nats" 2>/dev/null || true
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done
    line="{\"nodes\":\"$run\"$extra,${line#\{}"
    echo "$line" >> "$log"
    echo "$run  $line"
  done
done

python3 - "$log" "$out/cluster.md" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
groups = {}
for r in runs:
    groups.setdefault((r["label"], r["nodes"]), []).append(r)
med = lambda g, k: statistics.median([r[k] for r in g if r.get(k) is not None]) if any(r.get(k) is not None for r in g) else None
ms = lambda us: f"{us / 1000:.2f}" if us is not None else "–"
lines = [
    f"One switchboard node against two nodes of a cluster through a local nats-server, one shard each, "
    f"publishers on the first node, subscribers split evenly; loopback, 2 cores shared by servers, "
    f"nats-server and load generator; medians of {max(len(g) for g in groups.values())} runs.",
    "",
    "| scenario | nodes | delivered/s | p50 ms | p99 ms | same-node p99 ms | cross-node p50 ms | cross-node p99 ms | NATS messages per broadcast | switchboard CPU ms per 1M | nats-server CPU ms per 1M |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for (label, nodes), g in groups.items():
    delivered = med(g, "delivered")
    nats_cpu = med(g, "nats_cpu_secs")
    nats_per_m = f"{nats_cpu * 1e9 / delivered:.0f}" if nats_cpu is not None and delivered else "–"
    per_bc = med(g, "nats_messages_per_broadcast")
    lines.append(
        f"| {label} | {1 if nodes == 'one' else 2} | {med(g, 'delivered_per_sec'):.0f} | {ms(med(g, 'p50_us'))} | {ms(med(g, 'p99_us'))} "
        f"| {ms(med(g, 'local_p99_us'))} | {ms(med(g, 'remote_p50_us'))} | {ms(med(g, 'remote_p99_us'))} "
        f"| {f'{per_bc:.2f}' if per_bc is not None else '–'} | {med(g, 'server_cpu_ms_per_million') or 0:.0f} | {nats_per_m} |"
    )
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
