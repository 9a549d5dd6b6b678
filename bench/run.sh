#!/usr/bin/env bash
# bench/run.sh [--quick] [more bench/run.py options]
#
# Sets up what the benchmark needs (wrk from apt when root, gunicorn in bench/.venv),
# builds the release binaries and the two small C programs, then runs bench/run.py,
# which writes bench/RESULTS.md (bench/.work/RESULTS-quick.md with --quick).
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
cd "$BENCH"

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    else
        echo "bench: wrk is not installed (apt-get install -y wrk); the load rows will say so" >&2
    fi
fi

if [ ! -x .venv/bin/gunicorn ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check gunicorn
fi

(cd "$ROOT" && cargo build --release --bins)

mkdir -p .work
cc -O2 -Wall -o .work/floor floor.c
cc -O2 -Wall -o .work/cworker cworker.c

exec .venv/bin/python run.py "$@"
