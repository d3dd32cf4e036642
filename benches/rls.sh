#!/usr/bin/env bash
# postgres_changes with Row Level Security at saturation. For each configuration
# (subscribers, claims groups), rls_load raises the insert rate by half per step until
# deliveries fall behind or p99 passes 1 s: first on a table with RLS, then the same load
# on a table without it (each subscriber filtering on its owner, so the same rows reach the
# same subscribers with no visibility query). Writes benches/results/rls.md and a JSON-lines
# log with every step. Not part of CI.
# Usage: benches/rls.sh [seconds per step] [visibility connections]
#   RLS_ONLY: a pattern (grep -E) of the configurations ("100/10", …) to run; default all.
#            The log keeps the other configurations' lines, so the table shows them all.
#   RLS_POLICY: `uid` (default), a policy `owner = auth.uid()`; `select-uid`, the same
#            written `owner = (select auth.uid())` as Supabase's performance advisor asks;
#            or `true`, `using (true)`, each subscriber filtering on its owner.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
visibility="${2:-2}"
out=benches/results
mkdir -p "$out"
log="$out/rls.jsonl"
if [ -n "${RLS_ONLY:-}" ] && [ -f "$log" ]; then
  python3 - "$log" "$RLS_ONLY" <<'PY'
import json, re, sys
path, only = sys.argv[1], sys.argv[2]
kept = [l for l in open(path) if l.strip()
        and not re.search(only, f"{json.loads(l)['subscribers']}/{json.loads(l)['claims_groups']}")]
open(path, "w").writelines(kept)
PY
else
  : > "$log"
fi
cargo build --release -q -p switchboard -p switchboard-benches
bin="${CARGO_TARGET_DIR:-target}/release"
secret="bench-secret-bench-secret-bench-secret-0"
ulimit -n 20000 || true
# shellcheck source=benches/pg.sh
. benches/pg.sh

# subscribers, claims groups, first rate (rows/s)
configs=("100 10 1000" "1000 100 500" "1000 1000 20")
for config in "${configs[@]}"; do
  read -r subscribers groups rate <<< "$config"
  if [ -n "${RLS_ONLY:-}" ] && ! grep -qE "$RLS_ONLY" <<< "$subscribers/$groups"; then continue; fi
  pg_start || { echo "rls.sh needs PostgreSQL's server binaries (pg_config --bindir)" >&2; exit 1; }
  "$bin/switchboard" serve --bind 127.0.0.1:0 --jwt-secret "$secret" --database-url "$dburl" \
    --visibility-connections "$visibility" --max-concurrent-users 1000000 \
    --max-joins-per-second 0 --max-events-per-second 0 --log-level error > "$out/.server.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's#^switchboard listening on http://##p' "$out/.server.out"); [ -n "$addr" ] && break; sleep 0.1
  done
  "$bin/rls_load" --addr "$addr" --database-url "$dburl" --secret "$secret" \
    --subscribers "$subscribers" --groups "$groups" --rate "$rate" --duration "$secs" --ramp \
    --policy "${RLS_POLICY:-uid}" \
    | tee -a "$log"
  kill "$server"; wait "$server" || true
  pg_stop
done

python3 - "$log" "$out/rls.md" "$secs" "$visibility" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [l for l in lines if "rate" in l]
summaries = [l for l in lines if "ceilings" in l]
policies = " or ".join(sorted({l.get("policy", "auth.uid()") for l in steps}))
out = [
    "# postgres_changes with RLS at saturation",
    "",
    f"`benches/rls.sh {sys.argv[3]} {sys.argv[4]}`: {sys.argv[3]} s per step, {sys.argv[4]} visibility connections; "
    "the insert rate grows by half per step until fewer than 99% of the deliveries arrive within the step "
    "(plus 1 s) or p99 passes 1 s. Latency is from the insert to the delivery. `rls`: a policy "
    f"`owner = {policies}`; `open`: no RLS, each subscriber filtering `owner=eq.<sub>`.",
    "",
    "| subscribers / claims groups | table | ceiling rows/s | deliveries/s | p50 ms | p99 ms | visibility queries per change per group | first rate that fell behind | its deliveries/s | its p99 ms |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for s in summaries:
    for c in s["ceilings"]:
        k, f = c["kept_up"], c["fell_behind"]
        table = "rls" if c["table"] == "bench_rls" else "open"
        row = [f"{s['subscribers']} / {s['claims_groups']}", table]
        row += [str(k["rate"]), f"{k['delivered_per_sec']:.0f}", str(k["p50_ms"]), str(k["p99_ms"]),
                f"{k['queries_per_change_per_group']:.4f}"] if k else ["–"] * 5
        row += [str(f["rate"]), f"{f['delivered_per_sec']:.0f}", str(f["p99_ms"])] if f else ["not reached"] * 3
        out.append("| " + " | ".join(row) + " |")
out += ["", "Every step:", "", "| subscribers / groups | table | rows/s | deliveries/s | of expected | p50 ms | p99 ms | queries per change per group |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in steps:
    table = "rls" if r["table"] == "bench_rls" else "open"
    out.append(f"| {r['subscribers']} / {r['claims_groups']} | {table} | {r['rate']} | {r['delivered_per_sec']:.0f} | "
               f"{r['delivered'] / max(r['expected'], 1):.1%} | {r['p50_ms']} | {r['p99_ms']} | {r['queries_per_change_per_group']:.4f} |")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
