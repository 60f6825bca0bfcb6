// socket.io clients forced to HTTP long-polling, each from its own
// loopback address (127.0.0.10, .11, ...), each sending PINGS pings and
// waiting for the pongs. Prints one JSON line: {"ok": clients that got
// every pong, "errors": [first error messages]}; exits 0 either way.
//
//   node socketio_clients.js URL CLIENTS PINGS
const http = require("node:http");
const { io } = require("socket.io-client");

const [url, clients, pings] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const errors = [];
let ok = 0;

function client(n) {
  return new Promise((resolve) => {
    const socket = io(url, {
      transports: ["polling"],
      reconnection: false,
      timeout: 10000,
      // Polling takes its source address from the agent.
      agent: new http.Agent({
        keepAlive: true,
        localAddress: `127.0.${10 + Math.floor(n / 200)}.${10 + (n % 200)}`,
      }),
      forceNew: true,
    });
    const fail = (what) => {
      if (errors.length < 10) errors.push(`client ${n}: ${what}`);
      socket.close();
      resolve();
    };
    socket.on("connect_error", (e) => fail(`connect_error: ${e.message} ${e.description ? JSON.stringify(e.description.message || e.description) : ""}`));
    socket.on("disconnect", (why) => {
      if (why !== "io client disconnect") fail(`disconnect: ${why}`);
    });
    socket.on("connect", async () => {
      try {
        for (let i = 0; i < pings; i++) {
          const pong = await socket.timeout(10000).emitWithAck("ping", i);
          if (pong.n !== i) throw new Error(`pong ${pong.n} for ping ${i}`);
        }
        ok += 1;
        socket.close();
        resolve();
      } catch (e) {
        fail(`ping: ${e.message}`);
      }
    });
  });
}

Promise.all([...Array(clients).keys()].map(client)).then(() => {
  console.log(JSON.stringify({ ok, errors }));
  process.exit(0);
});
