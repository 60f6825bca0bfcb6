'use strict';
// Fastify 5 app with no cluster code: GET / answers as app.js's does.
// PORT (default 3000), HOST (default 0.0.0.0, Fastify's own is localhost);
// prints "port <P>" once listening.
const cluster = require('cluster');
const fastify = require('fastify')();

const id = cluster.isWorker ? cluster.worker.id : '-';
fastify.get('/', async (request, reply) => {
  reply.type('text/plain');
  return `Hello from worker ${id} (pid ${process.pid})\n`;
});
fastify.listen({ port: Number(process.env.PORT || 3000), host: process.env.HOST || '0.0.0.0' })
  .then(() => console.log(`port ${fastify.server.address().port}`))
  .catch((e) => {
    console.error(`listen error ${e.code}`);
    process.exit(3);
  });
