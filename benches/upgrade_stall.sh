#!/bin/bash
# The longest stall a client sees during a hot upgrade of the primary,
# against a steady run of the same length: wrk's max latency and errors,
# one request per connection and kept-alive, rr and reuseport.
#
#   bash benches/upgrade_stall.sh [BIN] [SECONDS] [WORKERS]
#
# Needs wrk. Each mode: a steady run, then a run with `distributor ctl
# upgrade` at a third of it. Defaults: the release build, 6 s, 2 workers.
set -u
BIN=${1:-target/release/distributor}
SECS=${2:-6}
WORKERS=${3:-2}
command -v wrk >/dev/null || { echo "upgrade_stall: wrk is not installed" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$BIN" "$dir/distributor"
port=18500
summary() {
    awk '/Latency/ {lat = $2; max = $4} /requests in/ {n = $1}
         /Socket errors/ {err = $0} /Non-2xx/ {bad = $0}
         END {printf "%s requests, latency avg %s max %s; %s %s\n", n, lat, max, err ? err : "no socket errors", bad}'
}
for mode in rr reuseport; do
    for load in close keepalive; do
        for run in steady upgrade; do
            port=$((port + 1))
            "$dir/distributor" -w "$WORKERS" --sched "$mode" --listen 127.0.0.1:$port \
                --control "$dir/ctl.sock" >/dev/null 2>"$dir/log" &
            for _ in $(seq 100); do
                grep -q "$WORKERS of $WORKERS slots ready" "$dir/log" && break
                sleep 0.1
            done
            header=()
            [ "$load" = close ] && header=(-H 'Connection: close')
            wrk -t2 -c32 -d"${SECS}"s "${header[@]}" http://127.0.0.1:$port/ >"$dir/wrk" 2>&1 &
            wrk_pid=$!
            if [ "$run" = upgrade ]; then
                sleep "$(awk -v s="$SECS" 'BEGIN {print s / 3}')"
                "$dir/distributor" ctl --control "$dir/ctl.sock" upgrade >/dev/null \
                    || echo "upgrade failed: $(tail -n 3 "$dir/log")"
            fi
            wait $wrk_pid
            echo "$mode $load $run: $(summary <"$dir/wrk")"
            # The primary now running: the one whose socket answers.
            "$dir/distributor" ctl --control "$dir"/*.sock stop >/dev/null 2>&1 \
                || pkill -TERM -f "127.0.0.1:$port" 
            sleep 0.5
            rm -f "$dir"/*.sock
        done
    done
done
