#!/bin/bash
# wrk against rr, reuseport and reuseport --steer rr, modes alternating:
# req/s, p50 and the primary's CPU per request, one request per connection.
#
#   bash benches/wrk_modes.sh [BIN] [ROUNDS] [SECONDS] [WORKERS]
#
# Needs wrk, and root for the steered mode. Defaults: the release build,
# 3 rounds, 5 s each (after a 1 s warm-up), 2 workers.
set -u
BIN=${1:-target/release/distributor}
ROUNDS=${2:-3}
SECS=${3:-5}
WORKERS=${4:-2}
command -v wrk >/dev/null || { echo "wrk_modes: wrk is not installed" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
port=18300
for r in $(seq "$ROUNDS"); do
    for mode in rr reuseport steer; do
        port=$((port + 1))
        case $mode in
            steer) args=(--sched reuseport --steer rr) ;;
            *) args=(--sched "$mode") ;;
        esac
        "$BIN" -w "$WORKERS" "${args[@]}" --listen 127.0.0.1:$port >/dev/null 2>"$log" &
        pid=$!
        for _ in $(seq 100); do
            grep -q "$WORKERS of $WORKERS slots ready" "$log" && break
            sleep 0.1
        done
        if ! kill -0 $pid 2>/dev/null; then
            echo "round $r $mode: not started: $(tail -n 1 "$log")"
            continue
        fi
        url=http://127.0.0.1:$port/
        wrk -t1 -c32 -d1s -H 'Connection: close' "$url" >/dev/null 2>&1
        t0=$(awk '{print $14 + $15}' /proc/$pid/stat)
        out=$(wrk -t1 -c32 -d"${SECS}"s -H 'Connection: close' --latency "$url" 2>&1)
        t1=$(awk '{print $14 + $15}' /proc/$pid/stat)
        rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
        p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
        reqs=$(echo "$out" | awk '/requests in/ {print $1}')
        errors=$(echo "$out" | grep -E "Socket errors|Non-2xx" | tr '\n' ' ')
        # /proc/PID/stat counts 10 ms ticks.
        cpu=$(awk -v t="$((t1 - t0))" -v n="$reqs" 'BEGIN {printf "%.2f", t * 10000 / n}')
        echo "round $r $mode: $rps req/s, p50 $p50, primary CPU $cpu µs/request $errors"
        kill -TERM $pid
        wait $pid 2>/dev/null
    done
done
