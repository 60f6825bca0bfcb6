'use strict';
// server.js's routes, plus: after RECYCLE_AFTER requests (default 2000) the
// worker leaves once: cluster.worker.disconnect() as a cluster worker (the
// primary then starts a replacement), else process.exit(0).
const cluster = require('cluster');
const { build, listen } = require('./app');

const limit = Number(process.env.RECYCLE_AFTER || 2000);
let count = 0;
let triggered = false;

listen(build((app) => {
  app.use((req, res, next) => {
    count += 1;
    if (!triggered && count >= limit) {
      triggered = true;
      // Leave after this answer is written.
      res.on('finish', () => {
        if (cluster.isWorker) cluster.worker.disconnect();
        else process.exit(0);
      });
    }
    next();
  });
}));
