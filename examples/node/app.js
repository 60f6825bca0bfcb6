// A plain Node HTTP app with no cluster code at all. Run it with Node's
// own primary replaced by distributor's:
//
//   distributor --workers 4 -- node examples/node/app.js
//   curl http://127.0.0.1:3000/      # Hello from worker 2 (pid 12345)
//
// `cluster.worker` is set because distributor starts each worker as a Node
// cluster worker; the app works the same when run alone (`node app.js`).
const http = require('http');
const cluster = require('cluster');

const id = cluster.worker ? cluster.worker.id : 0;
const port = Number(process.env.PORT || 3000);

http
  .createServer((req, res) => {
    res.end(`Hello from worker ${id} (pid ${process.pid})\n`);
  })
  .listen(port, () => console.log(`listening on port ${port}`));
