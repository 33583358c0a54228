// A Node client of studyhall's whiteboards for the Yjs tests: a WebSocket session (hello,
// requests matched by rid) and a board peer that keeps a real `yjs` Y.Doc in sync with the
// server through the y-protocols messages of the `y-protocols` and `lib0` npm packages, in
// y-websocket's framing (varuint message type, 0 = sync, 1 = awareness), base64 in `board`
// frames. Every wait is bounded.

import WebSocket from 'ws';
import * as Y from 'yjs';
import * as syncProtocol from 'y-protocols/sync';
import * as encoding from 'lib0/encoding';
import * as decoding from 'lib0/decoding';
import { within } from './harness.mjs';

const MSG_SYNC = 0;
const MSG_AWARENESS = 1;
const T = 10000;

export const b64 = (bytes) => Buffer.from(bytes).toString('base64');
export const unb64 = (s) => new Uint8Array(Buffer.from(s, 'base64'));

/// One signed-in WebSocket session.
export class Session {
  static async open(wsUrl, token) {
    const s = new Session();
    s.ws = new WebSocket(wsUrl, 'studyhall.v1');
    s.nextRid = 1;
    s.pending = new Map();
    s.handlers = new Set();
    s.closed = new Promise((r) => s.ws.once('close', r));
    const welcome = new Promise((resolve, reject) => {
      s.ws.once('error', reject);
      s.ws.on('message', (raw) => {
        const msg = JSON.parse(String(raw));
        if (!s.welcome) {
          if (msg.type === 'welcome') {
            s.welcome = msg;
            resolve(msg);
          } else reject(new Error('before welcome: ' + String(raw)));
          return;
        }
        if (msg.rid !== undefined && s.pending.has(msg.rid)) {
          const p = s.pending.get(msg.rid);
          s.pending.delete(msg.rid);
          if (msg.type === 'error') p.reject(Object.assign(new Error(msg.code + ': ' + msg.message), { code: msg.code }));
          else p.resolve(msg);
          return;
        }
        for (const h of s.handlers) h(msg);
      });
    });
    await within(T, 'ws open', new Promise((r, j) => {
      s.ws.once('open', r);
      s.ws.once('error', j);
    }));
    s.ws.send(JSON.stringify({ type: 'hello', token, call_waiting: false }));
    await within(T, 'welcome', welcome);
    return s;
  }

  /// Sends `cmd` with a rid; resolves with its ok, rejects with an Error carrying `code`.
  request(cmd) {
    const rid = this.nextRid++;
    const p = new Promise((resolve, reject) => this.pending.set(rid, { resolve, reject }));
    this.ws.send(JSON.stringify({ ...cmd, rid }));
    return within(T, cmd.type + ' reply', p);
  }

  async close() {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000, 'bye');
    await within(T, 'ws close', this.closed);
  }
}

/// A Y.Doc kept in sync with board `board` of `room` while attached to a session. Local
/// changes made while detached stay in the doc and reach the server at the next `attach`
/// (sync step 1 / step 2). `errors` collects the error codes of refused updates.
export class BoardPeer {
  constructor(room, board) {
    this.room = room;
    this.board = board;
    this.doc = new Y.Doc();
    this.session = null;
    this.errors = [];
    this.serverStep1s = 0; // sync step 1s the server sent (it sends them to those who may draw)
    this.awareness = []; // awareness updates relayed from others (bytes)
    this.doc.on('update', (update, origin) => {
      if (origin === this || !this.session) return;
      const e = encoding.createEncoder();
      encoding.writeVarUint(e, MSG_SYNC);
      syncProtocol.writeUpdate(e, update);
      this.send(encoding.toUint8Array(e));
    });
  }

  send(bytes) {
    const s = this.session;
    return s
      .request({ type: 'board', room: this.room, board: this.board, data: b64(bytes) })
      .catch((err) => {
        if (s === this.session) this.errors.push(err.code || err.message);
      });
  }

  /// Joins the room on `session` and syncs: our step 1, the server's step 2 (and, if we may
  /// draw, its step 1, answered with our step 2). Resolves once the server acknowledged our
  /// step 1, so its step 2 is applied by then.
  async attach(session) {
    this.session = session;
    session.handlers.add((msg) => {
      if (msg.type === 'board' && msg.room === this.room && msg.board === this.board && session === this.session) {
        this.receive(unb64(msg.data));
      }
    });
    await session.request({ type: 'join', room: this.room });
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MSG_SYNC);
    syncProtocol.writeSyncStep1(e, this.doc);
    await this.send(encoding.toUint8Array(e));
  }

  /// Sends one awareness update (y-protocols/awareness encoding); resolves with the reply.
  sendAwareness(update) {
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MSG_AWARENESS);
    encoding.writeVarUint8Array(e, update);
    return this.session.request({ type: 'board', room: this.room, board: this.board, data: b64(encoding.toUint8Array(e)) });
  }

  /// Stops sending (the session stays open unless closed by the caller).
  detach() {
    this.session = null;
  }

  receive(bytes) {
    const d = decoding.createDecoder(bytes);
    const type = decoding.readVarUint(d);
    if (type === MSG_AWARENESS) {
      this.awareness.push(decoding.readVarUint8Array(d));
      return;
    }
    if (type !== MSG_SYNC) return;
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, MSG_SYNC);
    const kind = syncProtocol.readSyncMessage(d, e, this.doc, this);
    if (kind === syncProtocol.messageYjsSyncStep1) {
      this.serverStep1s++;
      this.send(encoding.toUint8Array(e));
    }
  }
}

/// Resolves when `pred()` holds, checked now and after every update of `docs`.
export function until(what, docs, pred, ms = T) {
  if (pred()) return Promise.resolve();
  const offs = [];
  return within(
    ms,
    what,
    new Promise((resolve) => {
      for (const doc of docs) {
        const f = () => pred() && resolve();
        doc.on('update', f);
        offs.push(() => doc.off('update', f));
      }
    }),
  ).finally(() => offs.forEach((f) => f()));
}

/// Resolves when `pred()` holds, checked every 20 ms (for state outside a doc).
export function poll(what, pred, ms = T) {
  let timer;
  return within(
    ms,
    what,
    new Promise((resolve) => {
      const tick = () => (pred() ? resolve() : (timer = setTimeout(tick, 20)));
      tick();
    }),
  ).finally(() => clearTimeout(timer));
}

export { Y };
