'use strict';
// Express 5 app: GET /, /json, /slow?ms=N (see app.js). `npm start`.
const { build, listen } = require('./app');

listen(build());
