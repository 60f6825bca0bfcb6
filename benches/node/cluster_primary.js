// Node's own cluster primary running the unmodified app.js in N workers:
// the reference that `cargo bench --bench node_cluster` compares
// distributor with.
//
//   PORT=8000 NODE_CLUSTER_SCHED_POLICY=rr|none node cluster_primary.js [N]
//
// N defaults to the number of CPUs. NODE_CLUSTER_SCHED_POLICY: `rr` (the
// default: the primary accepts and hands connections round-robin) or
// `none` (the workers accept on the shared socket themselves). Logs
// `cluster primary: N workers listening on ADDR:PORT (sched ...)` on stderr
// once every worker listens. SIGTERM/SIGINT stop the workers, then the
// primary; a worker that exits otherwise is logged and not replaced.
'use strict';
const cluster = require('cluster');
const os = require('os');
const path = require('path');

const policies = { rr: cluster.SCHED_RR, none: cluster.SCHED_NONE };
const policyName = process.env.NODE_CLUSTER_SCHED_POLICY || 'rr';
if (!(policyName in policies)) {
  console.error(`cluster primary: NODE_CLUSTER_SCHED_POLICY must be rr or none, not ${policyName}`);
  process.exit(2);
}
const n = process.argv[2] === undefined ? os.availableParallelism() : Number(process.argv[2]);
if (!Number.isInteger(n) || n < 1) {
  console.error(`cluster primary: the worker count must be a positive integer, not ${process.argv[2]}`);
  process.exit(2);
}

// Before the first fork, or it has no effect.
cluster.schedulingPolicy = policies[policyName];
cluster.setupPrimary({ exec: path.join(__dirname, 'app.js') });

let listening = 0;
let stopping = false;
cluster.on('listening', (worker, address) => {
  listening += 1;
  if (listening === n) {
    console.error(
      `cluster primary: ${n} workers listening on ${address.address}:${address.port} ` +
        `(sched ${policyName}, pid ${process.pid})`
    );
  }
});
cluster.on('exit', (worker, code, signal) => {
  if (!stopping) {
    console.error(`cluster primary: worker ${worker.id} (pid ${worker.process.pid}) exited: ${signal || code}`);
  }
  if (stopping && Object.keys(cluster.workers).length === 0) {
    process.exit(0);
  }
});

function stop() {
  if (stopping) {
    // A second signal: kill now.
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(1);
  }
  stopping = true;
  const alive = Object.values(cluster.workers);
  if (alive.length === 0) process.exit(0);
  for (const w of alive) w.process.kill('SIGTERM');
  // Bounded: whatever is left after 3 s is killed.
  setTimeout(() => {
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(1);
  }, 3000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

for (let i = 0; i < n; i++) cluster.fork();
