"""Adds `perf stat -x,` tracepoint counts to a load generator's JSON line, per delivery:
every syscall, every io_uring submission, and the syscalls that move bytes by name.
Usage: perf_counts.py PERF_OUTPUT JSON_LINE"""
import json
import sys

result = json.loads(sys.argv[2])
counts = {}
for row in open(sys.argv[1]):
    fields = row.strip().split(",")
    if len(fields) > 2 and fields[0].isdigit():
        counts[fields[2].split(":")[-1]] = int(fields[0])
delivered = result.get("delivered") or 0


def per(n):
    return n / delivered if delivered else None


result["syscalls_per_delivery"] = per(counts.get("sys_enter", 0))
result["uring_submissions_per_delivery"] = per(counts.get("io_uring_submit_req", 0))
result["syscalls"] = {
    name.removeprefix("sys_enter_"): n for name, n in counts.items() if name.startswith("sys_enter_")
}
print(json.dumps(result))
