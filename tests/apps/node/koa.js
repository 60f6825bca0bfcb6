'use strict';
// Koa 3 app with no cluster code: GET / answers as app.js's does.
// PORT (default 3000), HOST (default: none); prints "port <P>" once
// listening.
const cluster = require('cluster');
const Koa = require('koa');

const id = cluster.isWorker ? cluster.worker.id : '-';
const app = new Koa();
app.use((ctx) => {
  ctx.type = 'text/plain';
  ctx.body = `Hello from worker ${id} (pid ${process.pid})\n`;
});
const port = Number(process.env.PORT || 3000);
const server = process.env.HOST ? app.listen(port, process.env.HOST) : app.listen(port);
server.on('listening', () => console.log(`port ${server.address().port}`));
server.on('error', (e) => {
  console.error(`listen error ${e.code}`);
  process.exit(3);
});
