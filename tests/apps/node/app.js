'use strict';
// Shared by server.js, recycle.js and messages.js: a plain Express 5 app
// with no cluster code of its own. Under `distributor -- node <file>` it runs
// as a Node cluster worker; `cluster.worker.id` (Node takes it from
// NODE_UNIQUE_ID, then deletes that variable) only goes into the bodies.
//
//   GET /            -> "Hello from worker <id> (pid <pid>)\n" (text/plain; id "-" standalone)
//   GET /json        -> {"worker": <id or null>, "pid": <pid>}
//   GET /slow?ms=N   -> the same as / after N ms
//
// listen(app): PORT (default 3000), HOST (default: none, Node's `::`);
// prints "port <P>" once listening.
const express = require('express');
const cluster = require('cluster');

const workerId = cluster.isWorker ? cluster.worker.id : null;

function build(setup) {
  const app = express();
  app.disable('x-powered-by');
  app.disable('etag');
  if (setup) setup(app);
  const hello = (req, res) => {
    res.type('text/plain').send(`Hello from worker ${workerId ?? '-'} (pid ${process.pid})\n`);
  };
  app.get('/', hello);
  app.get('/json', (req, res) => res.json({ worker: workerId, pid: process.pid }));
  app.get('/slow', (req, res) => {
    const ms = Number(req.query.ms) || 0;
    setTimeout(() => hello(req, res), ms);
  });
  return app;
}

function listen(app) {
  const port = Number(process.env.PORT || 3000);
  const host = process.env.HOST || undefined;
  const server = host === undefined ? app.listen(port) : app.listen(port, host);
  server.on('listening', () => console.log(`port ${server.address().port}`));
  server.on('error', (e) => {
    console.error(`listen error ${e.code}`);
    process.exit(3);
  });
  return server;
}

module.exports = { build, listen, workerId };
