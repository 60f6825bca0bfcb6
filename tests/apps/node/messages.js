'use strict';
// server.js's routes, plus GET /send: process.send({hello: 'primary', pid})
// to the primary over the IPC channel (when there is one), answers "sent\n".
const { build, listen } = require('./app');

listen(build((app) => {
  app.get('/send', (req, res) => {
    if (typeof process.send === 'function') {
      process.send({ hello: 'primary', pid: process.pid });
    }
    res.type('text/plain').send('sent\n');
  });
}));
