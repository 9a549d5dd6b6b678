#!/usr/bin/env node
// An arbiterd worker in Node, core modules only (no npm packages).
//
// It serves HTTP on the listener arbiterd passes as fd 3:
//   GET /            -> {"app": "node", "pid": ..., "worker_id": ..., "generation": ...}
//   GET /sleep?ms=N  -> the same, after N milliseconds
//
// Heartbeat: a timer on the event loop fchmods ARBITER_HEARTBEAT_FD, so a loop
// that wedges stops beating and arbiterd replaces the worker after --timeout.
// (Node's core has no unix datagram sockets, so NOTIFY_SOCKET is out of reach
// without a package: run arbiterd with the default --ready exec.)
//
// TERM: stop accepting, finish the requests in flight (those that were on
// their way in too), exit 0. QUIT and INT: exit at once. Without
// LISTEN_FDS for this process it exits 78 (EX_CONFIG), which arbiterd does not
// restart.
"use strict";

const fs = require("fs");
const http = require("http");

const EX_CONFIG = 78;
const SD_LISTEN_FDS_START = 3;
// Node calls listen(2) again on the inherited socket, which the master and every
// sibling share, so whatever backlog it passes holds for all of them. 2048 is
// arbiterd's default --backlog; Node's own default (511) would lower it.
const BACKLOG = 2048;
// How long, after TERM, a connection this worker accepted but that has not
// sent a whole request head yet may take to do so before it is closed.
const NEW_CONNECTION_GRACE_MS = 1000;
// A request still running this long after TERM is abandoned (arbiterd's
// --graceful-timeout, 30 s by default, would KILL us about then anyway).
const DRAIN_LIMIT_MS = 30000;

const env = process.env;
if (env.LISTEN_PID !== String(process.pid) || !(Number(env.LISTEN_FDS) >= 1)) {
  console.error("worker.js: no LISTEN_FDS for this process; run it under arbiterd");
  process.exit(EX_CONFIG);
}

const identity = JSON.stringify({
  app: "node",
  pid: process.pid,
  worker_id: Number(env.ARBITER_WORKER_ID || 0),
  slot: Number(env.ARBITER_SLOT || 0),
  generation: Number(env.ARBITER_GENERATION || 0),
});

let stopping = false;

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://worker");
  const ms = url.pathname === "/sleep" ? Number(url.searchParams.get("ms") || 1000) : 0;
  setTimeout(() => {
    res.setHeader("Content-Type", "application/json");
    res.setHeader("Content-Length", Buffer.byteLength(identity));
    // Draining: no keep-alive, so the connection ends with this response.
    if (stopping) res.setHeader("Connection", "close");
    res.end(identity);
  }, ms);
});

// Node opens fd 3 as a TCP (or, for unix:PATH, a pipe) server handle, without
// binding anything. libuv makes the socket non-blocking, and a connection that
// a sibling won first is an EAGAIN libuv shrugs off.
// The backlog goes as the second argument: with `fd`, Node (20) ignores a
// `backlog` key in the options and uses 511.
function listenFailed(err) {
  // fd 3 is not a listening socket: the setup is wrong, restarting won't help.
  console.error(`worker.js: fd ${SD_LISTEN_FDS_START}: ${err.message}`);
  process.exit(EX_CONFIG);
}
server.once("error", listenFailed);
server.once("listening", () => server.off("error", listenFailed));
server.listen({ fd: SD_LISTEN_FDS_START }, BACKLOG);

// The heartbeat: change the file's ctime, alternating the mode as gunicorn
// does, well inside ARBITER_TIMEOUT (a quarter of it, at most every second).
const heartbeatFd = Number(env.ARBITER_HEARTBEAT_FD);
const timeout = Number(env.ARBITER_TIMEOUT || 0);
let flip = false;
function beat() {
  flip = !flip;
  try {
    fs.fchmodSync(heartbeatFd, flip ? 0o400 : 0o600);
  } catch (_) {
    // EBADF: the fd is not there (a broken setup); serving matters more.
  }
}
// It keeps beating while draining: the loop is still alive then.
if (env.ARBITER_HEARTBEAT_FD) {
  beat();
  setInterval(beat, timeout > 0 ? Math.min(1000, (timeout * 1000) / 4) : 1000);
}

// Connections that have not sent a complete request head yet: Node's own
// graceful close leaves them open (a request may be on its way) until its
// headersTimeout (60 s), which would hold the worker's exit as long.
const waiting = new Set();
server.on("connection", (socket) => {
  waiting.add(socket);
  socket.once("close", () => waiting.delete(socket));
});
server.on("request", (req) => waiting.delete(req.socket));

function stop() {
  if (stopping) return;
  stopping = true;
  // http.Server's close: stop accepting (the siblings keep serving the shared
  // socket), close the keep-alive connections that sit between requests, and
  // call back once every connection has ended. The requests in flight run to
  // their response, then their connection closes (Connection: close above).
  server.close(() => process.exit(0));
  server.closeIdleConnections(); // Node 18 (Debian 12's) does not in close()
  // A connection accepted in the instant before TERM has its request in the
  // kernel, read on the loop's next turn: give it that, and a slow client a
  // little more, then close whatever has still sent nothing.
  setTimeout(() => waiting.forEach((socket) => socket.destroy()), NEW_CONNECTION_GRACE_MS);
  setTimeout(() => process.exit(0), DRAIN_LIMIT_MS).unref();
}

process.on("SIGTERM", stop);
process.on("SIGINT", () => process.exit(0));
process.on("SIGQUIT", () => process.exit(0));
