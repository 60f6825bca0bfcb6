// The app every contender of `cargo bench --bench node_cluster` runs,
// unmodified: a plain Node HTTP server on PORT, keep-alive by default.
// The body names the process (`worker <pid>`, which the load generator reads
// as a worker id to count each process's share of the requests).
'use strict';
const http = require('http');

http
  .createServer((req, res) => res.end('Hello from worker ' + process.pid + '\n'))
  .listen(+process.env.PORT, '127.0.0.1');
