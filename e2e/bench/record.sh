#!/usr/bin/env bash
# Writes a benchmark's report (markdown on stdin) into docs/BENCHMARKS.md between the markers
# `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`, replacing the previous run's block (appended under
# "Latest `make bench` results" the first time). Prefixes the machine, the date, the commit and the command.
# Usage: <report> | e2e/bench/record.sh NAME "TITLE" "COMMAND"
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1 title=$2 command=$3
body=$(cat)
cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
header="### ${title}

- **Command:** \`${command}\`
- **Date:** $(date -u '+%F %H:%M UTC'); **commit:** $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet -- . ':!docs/BENCHMARKS.md' 2>/dev/null || echo ' (with local changes)')
- **Machine:** $(nproc) × ${cpu:-unknown CPU}, $(free -g | awk '/Mem:/{print $2}') GiB RAM, Linux $(uname -r); load average at the end $(cut -d' ' -f1-3 /proc/loadavg)
"
BENCH_BLOCK="${header}
${body}" python3 - "$name" docs/BENCHMARKS.md <<'PY'
import os, sys
name, path = sys.argv[1], sys.argv[2]
start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
block = f"{start}\n{os.environ['BENCH_BLOCK'].rstrip()}\n{end}"
text = open(path).read()
if start in text and end in text:
    before, rest = text.split(start, 1)
    text = before + block + rest.split(end, 1)[1]
else:
    anchor = "## Latest `make bench` results"
    if anchor not in text:
        text = text.rstrip() + f"\n\n{anchor}\n\nWritten by `make bench` (e2e/bench/*.sh → e2e/bench/record.sh); older, annotated runs are further up.\n"
    text = text.rstrip() + f"\n\n{block}\n"
open(path, "w").write(text)
print(f"[bench] wrote the '{name}' block of {path}", file=sys.stderr)
PY
