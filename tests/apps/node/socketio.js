// A socket.io server as users write one, for the sticky-session tests:
// answers each "ping" with a "pong" naming its process. PORT (default 0);
// prints "port <P>" once listening.
const http = require("node:http");
const { Server } = require("socket.io");

const server = http.createServer((req, res) => {
  res.end(`plain answer from ${process.pid}\n`);
});
const io = new Server(server);
io.on("connection", (socket) => {
  socket.on("ping", (n, reply) => reply({ n, pid: process.pid }));
});
server.listen(Number(process.env.PORT || 0), () => {
  console.log(`port ${server.address().port}`);
});
