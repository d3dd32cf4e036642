#!/usr/bin/env bash
# Runs the standard load scenarios against switchboard runtimes and the raw fan-out floor,
# on loopback, and writes benches/results/<result>.md, a JSON-lines log and a PNG plot.
# Usage: [SWITCHBOARD_SHARDS=N] benches/run.sh [runtimes] [seconds per scenario] [repetitions]
#   runtimes: values of `switchboard serve --runtime` (tokio, glommio), comma-separated to
#            compare them in one run; `tokio-multi-thread` is the one engine on tokio's
#            work-stealing pool that switchboard no longer offers, built from its last
#            commit into a scratch folder outside the repo (BENCH_SCRATCH, default
#            ~/.cache/switchboard-bench).
#            `peers`: switchboard (tokio) beside sockudo, a Rust server of the Pusher
#            protocol, driven by the load generator's Pusher mode. sockudo is built from
#            crates.io into the scratch folder on first use (it needs protoc, from Debian's
#            protobuf-compiler), not in CI; presence and vsn 1.0.0 are switchboard's own,
#            so those scenarios run for switchboard alone.
#   SWITCHBOARD_SHARDS: the server's shard count (default: one per core); <result> is the
#            runtimes joined by `-vs-`, with `-N-shards` when it is set.
#   repetitions: each scenario runs this often, alternating servers and floor, and the
#            table shows medians: with the load generator on the same cores, one run's
#            latency moves by a factor of two.
#   BENCH_ONLY: a pattern (grep -E) of the scenario names to run; default all.
#   BENCH_SYSCALLS=1: count the server's syscalls and io_uring submissions with `perf stat`
#            (tracepoints; needs root or perf_event_paranoid ≤ -1) and add them per
#            delivery to the table.
set -euo pipefail
cd "$(dirname "$0")/.."
runtimes="${1:-tokio}"
if [ "$runtimes" = peers ]; then
  servers=(tokio sockudo)
else
  IFS=, read -r -a servers <<< "$runtimes"
fi
result="${runtimes//,/-vs-}${SWITCHBOARD_SHARDS:+-$SWITCHBOARD_SHARDS-shards}"
secs="${2:-10}"
reps="${3:-3}"
out=benches/results
mkdir -p "$out"
log="$out/$result.jsonl"
: > "$log"

cargo build --release -q -p switchboard -p switchboard-benches
bin="${CARGO_TARGET_DIR:-target}/release"
# The last commit with the one-engine multi-thread runtime, built once, outside the repo.
multi_thread_commit=703d198^
scratch="${BENCH_SCRATCH:-$HOME/.cache/switchboard-bench}"
if [[ ",$runtimes," == *,tokio-multi-thread,* ]]; then
  old="$scratch/multi-thread"
  if [ ! -x "$old/target/release/switchboard" ]; then
    rm -rf "$old" && mkdir -p "$old"
    git archive "$multi_thread_commit" | tar -x -C "$old"
    (cd "$old" && cargo build --release -q --locked -p switchboard)
  fi
fi
# sockudo, from crates.io, built once outside the repo; its one app has no limits a
# scenario reaches.
sockudo_version=5.2.0
peer="$scratch/sockudo-$sockudo_version"
app_key=bench-key
app_secret=bench-secret
if [[ " ${servers[*]} " == *" sockudo "* ]]; then
  if [ ! -x "$peer/bin/sockudo" ]; then
    if ! command -v protoc >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get install -y -qq protobuf-compiler >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null; }
    fi
    mkdir -p "$peer"
    nice -n 19 cargo install sockudo --version "$sockudo_version" --locked --no-default-features \
      --features local --root "$peer" --target-dir "$peer/target"
    rm -rf "$peer/target"
  fi
  # The port comes from PORT at each start. Metrics, the connection rate limiter (20 per
  # minute per address) and the webhook queue (Redis by default) are off, and the stop
  # does not wait out a 10 s grace for sockets the load generator has closed already.
  # Each socket's send queue keeps sockudo's default of 1,000 messages, not switchboard's
  # 8,192: sockudo allocates it whole, and 8,192 cost 0.9 MB per socket.
  cat > "$peer/config.toml" <<EOF
host = "127.0.0.1"
shutdown_grace_period = 0

[app_manager]
driver = "memory"

[[app_manager.array.apps]]
id = "bench"
key = "$app_key"
secret = "$app_secret"
enabled = true

[app_manager.array.apps.policy.limits]
max_connections = 0
max_client_events_per_second = 0

[app_manager.array.apps.policy.features]
enable_client_messages = true

[metrics]
enabled = false

[rate_limiter]
enabled = false

[queue]
driver = "none"

[logging]
colors_enabled = false
EOF
fi
secret="bench-secret-bench-secret-bench-secret-0"
ulimit -n 20000 || true

key=$(python3 - "$secret" <<'EOF'
import base64, hashlib, hmac, json, sys
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"role": "anon", "exp": 4000000000}).encode())
sig = b(hmac.new(sys.argv[1].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
EOF
)

# The binary and runtime flags of a server in the comparison.
server_command() {
  case "$1" in
    tokio-multi-thread) echo "$scratch/multi-thread/target/release/switchboard serve --runtime tokio-multi-thread --shards 1" ;;
    *) echo "$bin/switchboard serve --runtime $1" ;;
  esac
}

start_switchboard() {
  # shellcheck disable=SC2046
  $(server_command "$1") --bind 127.0.0.1:0 --jwt-secret "$secret" \
    --max-concurrent-users 1000000 --max-joins-per-second 0 --max-events-per-second 0 \
    --max-presence-events-per-second 0 --send-queue 8192 --log-level error > "$out/.server.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's#^switchboard listening on http://##p' "$out/.server.out")
    [ -n "$addr" ] && return
    sleep 0.1
  done
  echo "switchboard did not start" >&2; exit 1
}

start_floor() {
  "$bin/floor" --bind 127.0.0.1:0 > "$out/.server.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's#^floor listening on ws://##p' "$out/.server.out")
    [ -n "$addr" ] && return
    sleep 0.1
  done
  echo "floor did not start" >&2; exit 1
}

# sockudo cannot bind port 0 and say which it got: a free port is chosen here. Its
# environment is emptied, since it reads many variables (REDIS_URL, DATABASE_URL, …). A
# config file it cannot parse is silently replaced by its defaults, so the run stops
# unless sockudo logged the bench app among those it registered before listening.
start_sockudo() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env -i PORT="$port" RUST_LOG=error,sockudo::bootstrap::server=info \
    "$peer/bin/sockudo" --config "$peer/config.toml" > "$out/.server.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      grep -q "registered app app_id=bench " "$out/.server.out" || break
      addr="127.0.0.1:$port"; return
    fi
    sleep 0.1
  done
  echo "sockudo did not start" >&2; cat "$out/.server.out" >&2; exit 1
}

stop() { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; }

# name | loadgen arguments
scenarios=(
  "1k fan-out 1→1000|--connections 1001 --rooms 1 --publishers 1 --rate 1000"
  "10k, 100 rooms × 100|--connections 10000 --rooms 100 --publishers 100 --rate 2000"
  "10k fan-out 1→10000|--connections 10000 --rooms 1 --publishers 1 --rate 200"
  "10k fan-out 1→10000, 400/s (saturating)|--connections 10000 --rooms 1 --publishers 1 --rate 400"
  "1k v1.0.0 fan-out 1→1000|--connections 1001 --rooms 1 --publishers 1 --rate 2000 --vsn v1"
  "presence churn 1k|--connections 1000 --rooms 1 --publishers 500 --rate 50 --presence"
  "19k idle joined|--connections 19000 --rooms 190 --publishers 0 --rate 0 --connect-concurrency 512 --settle-secs 15"
)

# perf's tracepoints for the syscalls that move bytes, and every syscall and submission.
events=raw_syscalls:sys_enter,io_uring:io_uring_submit_req,syscalls:sys_enter_io_uring_enter
events+=,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto
events+=,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait

for entry in "${scenarios[@]}"; do
  name="${entry%%|*}"
  args="${entry#*|}"
  if [ -n "${BENCH_ONLY:-}" ] && ! grep -qE "$BENCH_ONLY" <<< "$name"; then continue; fi
  for run in $(for _ in $(seq "$reps"); do echo "${servers[@]}" floor; done); do
    case "$name" in presence*|"1k v1"*) [ "$run" = floor ] || [ "$run" = sockudo ] && continue ;; esac
    case "$run" in
      floor) mode=floor; start_floor ;;
      sockudo) mode=pusher; start_sockudo ;;
      *) mode=switchboard; start_switchboard "$run" ;;
    esac
    counting=""
    if [ "${BENCH_SYSCALLS:-}" = 1 ]; then
      perf stat -x, -e "$events" -p "$server" -o "$out/.perf" & counting=$!
    fi
    # shellcheck disable=SC2086
    line=$("$bin/loadgen" --mode "$mode" --addr "$addr" --key "$key" --duration "$secs" \
      --app-key "$app_key" --app-secret "$app_secret" \
      --server-pid "$server" --label "$name" $args 2>/dev/null | tail -n 1)
    if [ -n "$counting" ]; then
      kill -INT "$counting"; wait "$counting" || true
      line=$(python3 benches/perf_counts.py "$out/.perf" "$line")
    fi
    stop
    line="{\"server\":\"$run\",${line#\{}"
    echo "$line" >> "$log"
    echo "$run  $line"
  done
done

# On a throwaway Postgres: postgres_changes with RLS (100 subscribers in 10 claims groups),
# then the join rate of public and private channels (1000 connections × 5 channels); not
# for peers, which have no database side to compare.
rls_line=""
join_line=""
# shellcheck source=benches/pg.sh
. benches/pg.sh
if [ "$runtimes" != peers ] && pg_start; then
  # shellcheck disable=SC2046
  $(server_command "${servers[0]}") --bind 127.0.0.1:0 --jwt-secret "$secret" \
    --database-url "$dburl" --max-concurrent-users 1000000 --max-joins-per-second 0 \
    --max-events-per-second 0 --log-level error > "$out/.server.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's#^switchboard listening on http://##p' "$out/.server.out"); [ -n "$addr" ] && break; sleep 0.1
  done
  rls_line=$("$bin/rls_load" --addr "$addr" --database-url "$dburl" --secret "$secret" \
    --subscribers 100 --groups 10 --rate 500 --duration "$secs" --tables rls | tail -n 1)
  join_line=$("$bin/join_load" --addr "$addr" --database-url "$dburl" --secret "$secret" | tail -n 1)
  stop
  pg_stop
  echo "rls (${servers[0]})  $rls_line"
  echo "joins (${servers[0]})  $join_line"
fi

python3 - "$log" "$out/$result.md" "$result" "$rls_line" "$join_line" <<'EOF'
import json, sys
import statistics
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# One row per (mode, scenario): the median of each figure over the repetitions.
rows, seen = [], {}
for r in runs:
    seen.setdefault((r.get("server", r["mode"]), r["mode"], r["label"]), []).append(r)
for (server, mode, label), group in seen.items():
    row = {"server": server, "mode": mode, "label": label, "reps": len(group)}
    for k, v in group[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values = [g[k] for g in group if g.get(k) is not None]
            row[k] = statistics.median(values) if values else None
    rows.append(row)
floor = {r["label"]: r for r in rows if r["mode"] == "floor"}
reps = max(r["reps"] for r in rows)
names = list(dict.fromkeys(r["server"] for r in rows if r["mode"] != "floor"))
kind = "Runtime" if all(r["mode"] in ("switchboard", "floor") for r in rows) else "Server"
lines = [
    f"{kind}{'s' if len(names) > 1 else ''} {', '.join(f'`{n}`' for n in names)} vs the raw fan-out floor, "
    f"same load generator, same run, loopback, "
    f"2 cores shared by server and load generator; medians of {reps} runs each.",
    "",
    "| scenario | delivered/s | × floor | p50 ms | p99 ms | p99 × floor | p999 ms | CPU ms per 1M | CPU × floor | engine % of a core | setup/s | RSS idle MiB | B per idle conn |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
fmt = lambda us: f"{us / 1000:.2f}"
num = lambda v, f="{:.0f}": f.format(v) if v is not None else "–"
def ratio(r, f, key):
    return f"{r[key] / f[key]:.2f}" if f and r.get(key) and f.get(key) else "–"
syscalls = any(r.get("syscalls_per_delivery") is not None for r in rows)
def line(r, f, name):
    rss = f"{(r['rss_idle_kib'] or 0) / 1024:.1f}"
    extra = (
        f" {num(r.get('syscalls_per_delivery'), '{:.3f}')} | {num(r.get('uring_submissions_per_delivery'), '{:.3f}')} |"
        if syscalls else ""
    )
    return (
        f"| {name} | {r['delivered_per_sec']:.0f} | {ratio(r, f, 'delivered_per_sec')} | {fmt(r['p50_us'])} "
        f"| {fmt(r['p99_us'])} | {ratio(r, f, 'p99_us')} | {fmt(r['p999_us'])} "
        f"| {num(r.get('server_cpu_ms_per_million'))} | {ratio(r, f, 'server_cpu_ms_per_million')} "
        f"| {num(r.get('engine_core_share') and r['engine_core_share'] * 100, '{:.1f}')} "
        f"| {r['setup_per_sec']:.0f} | {rss} | {num(r.get('rss_per_idle_conn_bytes'))} |" + extra
    )
if syscalls:
    lines[2] += " syscalls per delivery | io_uring submissions per delivery |"
    lines[3] += " ---: | ---: |"
for r in sorted((r for r in rows if r["mode"] != "floor"), key=lambda r: [x["label"] for x in rows].index(r["label"])):
    name = r["label"] if len(names) == 1 else f"{r['label']}: {r['server']}"
    lines.append(line(r, floor.get(r["label"]), name))
for r in rows:
    if r["mode"] == "floor":
        lines.append(line(r, r, "floor: " + r["label"]))
if len(sys.argv) > 4 and sys.argv[4]:
    c = json.loads(sys.argv[4])["ceilings"][0]
    r = c["kept_up"] or c["fell_behind"]
    lines += [
        "",
        f"postgres_changes with RLS ({names[0]}): {r['subscribers']} subscribers in {r['claims_groups']} claims groups, "
        f"{r['rate']} rows/s inserted: {r['delivered_per_sec']:.0f} changes/s delivered "
        f"({r['delivered']} of {r['expected']} expected), {r['visibility_queries']:.0f} visibility queries for "
        f"{r['rows']} rows = {r['queries_per_change']:.3f} per change ({r['queries_per_change_per_group']:.4f} per change per claims group).",
    ]
if len(sys.argv) > 5 and sys.argv[5]:
    j = json.loads(sys.argv[5])
    lines += [
        "",
        f"Join rate ({names[0]}): {j['connections']} connections × {j['channels']} channels joined at once, "
        f"{j['users']} users, {j['topics']} topics; private channels authorised by a policy on realtime.messages.",
        "",
        "| channels | joins/s | p50 ms | p99 ms | authorization batches per join |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("public", "private"):
        r = j[kind]
        batches = f"{r['batches_per_join']:.3f}" if kind == "private" else "–"
        lines.append(f"| {kind} | {r['joins_per_sec']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {batches} |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
with open(sys.argv[2] + ".dat", "w") as d:
    d.write("scenario " + " ".join(f'"{n}"' for n in names) + " floor\n")
    for label in dict.fromkeys(r["label"] for r in rows):
        if label not in floor:
            continue
        by = {r["server"]: r for r in rows if r["label"] == label and r["mode"] != "floor"}
        values = " ".join(str(by[n]["delivered_per_sec"]) if n in by else "0" for n in names)
        d.write(f"\"{label}\" {values} {floor[label]['delivered_per_sec']}\n")
print("\n".join(lines))
EOF

if ! command -v gnuplot >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq gnuplot-nox >/dev/null; }
fi
columns=$(( ${#servers[@]} + 2 ))
title="switchboard ($result)"
if [ "$runtimes" = peers ]; then title="switchboard (tokio) and sockudo"; fi
gnuplot <<EOF
set terminal pngcairo size 900,450
set output "$out/$result.png"
set title "Delivered messages/s: $title vs raw fan-out floor"
set key autotitle columnhead
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel "messages/s"
set xtics rotate by -15
set grid ytics
plot for [i=2:$columns] "$out/$result.md.dat" using i:xtic(1)
EOF
rm -f "$out/.server.out" "$out/.perf" "$out/$result.md.dat"
echo "wrote $out/$result.md and $out/$result.png"
