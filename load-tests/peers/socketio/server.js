//! Socket.IO 4.x peer for the studyhall load generator: a room-broadcast server with exactly
//! the features the fan-out and idle scenarios compare (join a room with an ack, publish to a
//! room, everyone in it receives). WebSocket transport only, no compression, loopback only.
// Prints "socketio listening on PORT" on stdout once ready (PORT env, 0 = any free port).
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  pingInterval: 25000,
  pingTimeout: 60000,
  maxHttpBufferSize: 1e6,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    socket.join(String(room));
    if (typeof ack === "function") ack("ok");
  });
  socket.on("pub", (room, text) => {
    io.to(String(room)).emit("msg", text);
  });
});

httpServer.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  console.log(`socketio listening on ${httpServer.address().port}`);
});
process.on("SIGTERM", () => process.exit(0));
