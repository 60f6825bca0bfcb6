#!/usr/bin/env python3
"""Recycling under load: what it costs an app to replace its workers.

The same Express app (tests/apps/node, `npm ci --prefix tests/apps/node`)
under `distributor -w 2`, driven by wrk, in turns:

  plain         node server.js                      no recycling
  self          node recycle.js, RECYCLE_AFTER=N    the app leaves by itself
                                                    every N requests
                                                    (cluster.worker.disconnect())
  max-requests  --max-requests N, node server.js    the primary recycles each
                                                    worker after N connections,
                                                    its successor first

Keep-alive loads run `plain` and `self` (the primary counts connections, not
requests, so --max-requests does not recycle under a few kept-alive
connections); `Connection: close` loads run all three, where a connection is
a request. Rounds alternate the contenders; the median round is shown, with
each contender's ratio to `plain` in the same load.

    python3 benches/recycle.py [--bin target/release/distributor]
        [--rounds 3] [--duration 5] [--connections 32] [--every 2000]
        [--contenders plain,self,max-requests]

Needs wrk (apt-get install wrk), node and the npm packages.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps", "node")


def start(binary, extra, app, env):
    """The primary with 2 Express workers on a free loopback port; returns
    (process, address, log path)."""
    log = f"/tmp/distributor-recycle-{os.getpid()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [binary, "-w", "2", "-l", "127.0.0.1:0", *extra, "--", "node",
             os.path.join(APPS, app)],
            stdout=subprocess.DEVNULL, stderr=out,
            env={**os.environ, "PORT": "0", **env}, start_new_session=True)
    deadline = time.time() + 30
    addr = None
    while time.time() < deadline:
        text = open(log).read()
        if addr is None:
            m = re.search(r"INFO listening on (\S+)", text)
            addr = m and m.group(1)
        if addr and "2 of 2 slots ready" in text:
            return proc, addr, log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc)
    sys.exit(f"the primary did not get ready:\n{open(log).read()}")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wrk(addr, seconds, connections, close):
    """requests/s and errors (socket errors plus non-2xx) of one wrk run."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [f"http://{addr}/"], capture_output=True,
                         text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return rps, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "distributor"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--contenders", default="plain,self,max-requests",
                    help="which to run, comma-separated (plain always runs)")
    args = ap.parse_args()
    wanted = set(args.contenders.split(",")) | {"plain"}
    every = str(args.every)
    contenders = {
        "plain": ([], "server.js", {}),
        "self": ([], "recycle.js", {"RECYCLE_AFTER": every}),
        "max-requests": (["--max-requests", every], "server.js", {}),
    }
    loads = {
        "keep-alive": [n for n in ["plain", "self"] if n in wanted],
        "close": [n for n in ["plain", "self", "max-requests"] if n in wanted],
    }
    print(f"{args.bin}; 2 Express workers; wrk -t1 -c{args.connections} -d{args.duration}s; "
          f"recycling every {every}; {args.rounds} rounds, median shown")
    for load, names in loads.items():
        results = {n: [] for n in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            for name in order:
                extra, app, env = contenders[name]
                proc, addr, log = start(args.bin, extra, app, env)
                try:
                    rps, errors = wrk(addr, args.duration, args.connections, load == "close")
                    text = open(log).read()
                    started = len(re.findall(r"worker \d+ started", text))
                finally:
                    stop(proc)
                results[name].append((rps, errors, started - 2))
        base = statistics.median(x[0] for x in results["plain"])
        print(f"\n{load}:\n| contender | req/s (median) | rounds | x plain | errors | workers replaced |")
        print("|---|---|---|---|---|---|")
        for name in names:
            rows = sorted(results[name])
            mid = rows[len(rows) // 2]
            spread = " / ".join(f"{x[0]:.0f}" for x in results[name])
            print(f"| {name} | {mid[0]:.0f} | {spread} | {mid[0] / base:.2f} | {mid[1]} | {mid[2]} |")


if __name__ == "__main__":
    main()
