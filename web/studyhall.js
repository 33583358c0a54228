// studyhall.js owns the protocol client of the web client: the WebSocket and `hello`,
// requests matched by `rid` with time-outs, automatic reconnect (exponential backoff with
// jitter) and the connection state the page shows, and per room the sequenced state: which
// seqs were seen (so a reconnect, replay or history page never shows an event twice), resume
// with `join {after_seq}` (paging `history` on `gap:true`), and the room model (messages,
// reactions, questions) built from the events; and BoardLink, which keeps a whiteboard's
// Y.Doc in sync over the same connection. No DOM here: app.js and board.js render what this
// emits.

export class RequestError extends Error {
  constructor(code, message) {
    super(code + ': ' + message);
    this.code = code;
    this.detail = message;
  }
}

const ROOM_ROLES = new Set(['host', 'ta', 'member', 'viewer']);
export const ROOM_GRANTS_SYNTAX =
  'room:role or room=role, separated by commas or spaces, role one of host, ta, member or viewer ' +
  '(member when left out), e.g. lobby:host, algebra=ta';

/// Parses room grants as the dev sign-in form takes them (and as `studyhall token --rooms`
/// does): `room:role` or `room=role` entries, the role `member` when left out. Returns
/// `{room: role}`; throws an Error naming the bad entry and the expected syntax.
export function parseRoomGrants(text) {
  const rooms = {};
  for (const part of text.split(/[,\s]+/).filter(Boolean)) {
    const m = /^([^:=]+)(?:[:=](.*))?$/.exec(part);
    const room = m ? m[1] : '';
    const role = m && m[2] !== undefined ? m[2] : 'member';
    if (!m || !/^[A-Za-z0-9_.-]{1,64}$/.test(room) || !ROOM_ROLES.has(role)) {
      throw new Error(`invalid room grant "${part}": expected ${ROOM_GRANTS_SYNTAX}`);
    }
    rooms[room] = role;
  }
  return rooms;
}

const SEQUENCED = new Set([
  'message', 'message_edited', 'message_deleted', 'reaction', 'question', 'question_updated', 'hidden',
  'poll', 'class_state',
]);

/// One joined room: what was seen, the messages and the questions.
export class Room {
  constructor(id) {
    this.id = id;
    this.info = null; // join ok's room {id, kind, title}
    this.role = null;
    this.seen = new Set(); // every seq already applied
    this.high = 0; // the highest seq applied or announced by a join (resume point)
    this.oldest = null; // the lowest seq held (history pages go below it)
    this.hasMore = true; // older history remains
    this.messages = new Map(); // id -> message, with stateSeq and reactions Map
    this.questions = new Map(); // id -> question, with stateSeq
    this.online = new Map(); // user id -> user
    this.onlineCount = 0; // everyone online (a live room's audience sees only some of them)
    this.stage = [];
    this.hands = [];
    this.joined = false;
    this.initialLoaded = false;
  }

  /// Messages oldest first.
  sortedMessages() {
    return [...this.messages.values()].sort((a, b) => a.seq - b.seq);
  }
}

export class Client {
  /// `url`: the ws:// URL; `token`: the JWT.
  constructor(url, token, opts = {}) {
    this.url = url;
    this.token = token;
    this.opts = opts;
    this.state = 'idle'; // idle | connecting | open | reconnecting | closed
    this.me = null; // welcome
    this.rooms = new Map();
    this.ws = null;
    this.nextRid = 1;
    this.pending = new Map(); // rid -> {resolve, reject, timer}
    this.listeners = new Map();
    this.attempt = 0;
    this.retryTimer = null;
    this.outbox = new Map(); // client_msg_id -> {room, text, reply_to} unacknowledged sends
    this.openWaiters = [];
    this.stopped = false;
    this.gapsFilled = 0; // resumes that had to page history (join answered gap:true)
  }

  // -- events ------------------------------------------------------------------------------

  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.listeners.get(type).delete(fn);
  }

  emit(type, data) {
    for (const fn of this.listeners.get(type) || []) {
      try {
        fn(data);
      } catch (e) {
        console.error('listener of ' + type, e);
      }
    }
  }

  setState(state, detail) {
    this.state = state;
    this.emit('state', { state, detail, attempt: this.attempt });
  }

  // -- connection --------------------------------------------------------------------------

  /// Connects; resolves with the first welcome. Later drops reconnect by themselves.
  start() {
    this.stopped = false;
    const first = new Promise((resolve, reject) => {
      const off = this.on('welcome', (w) => {
        off();
        offFail();
        resolve(w);
      });
      const offFail = this.on('fatal', (e) => {
        off();
        offFail();
        reject(e);
      });
    });
    this.connect();
    return first;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, 'bye');
    this.setState('closed');
  }

  /// Goes offline on purpose (closes the socket, no reconnect) until `resume()`: for a
  /// "work offline" switch, and for tests of the resume path.
  pause() {
    this.paused = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, 'paused');
  }

  resume() {
    if (!this.paused) return;
    this.paused = false;
    this.attempt = 0;
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    if (this.paused) return;
    this.setState(this.attempt === 0 && !this.me ? 'connecting' : 'reconnecting');
    let ws;
    try {
      ws = new WebSocket(this.url, 'studyhall.v1');
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    let welcomed = false;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: 'hello', token: this.token, call_waiting: false }));
    };
    ws.onmessage = (e) => {
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return;
      }
      if (!welcomed) {
        if (msg.type === 'welcome') {
          welcomed = true;
          this.onWelcome(msg);
        } else if (msg.type === 'error' && msg.code === 'unauthorized') {
          this.stopped = true;
          this.emit('fatal', new RequestError(msg.code, msg.message));
        }
        return;
      }
      this.onFrame(msg);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const [rid, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new RequestError('disconnected', 'the connection closed'));
        this.pending.delete(rid);
      }
      for (const r of this.rooms.values()) r.joined = false;
      this.emit('closed', { code: e.code, reason: e.reason });
      if (e.code === 4001) {
        this.stopped = true;
        this.setState('closed', 'unauthorized');
        this.emit('fatal', new RequestError('unauthorized', e.reason || 'sign-in refused'));
        return;
      }
      if (this.stopped) return;
      if (this.paused) {
        this.setState('reconnecting', { paused: true });
        return;
      }
      this.scheduleReconnect(e.code === 4029 ? 5000 : 0);
    };
  }

  /// Exponential backoff (0.5 s doubling up to 15 s) with full jitter over its upper half.
  scheduleReconnect(minMs = 0) {
    const base = Math.min(15000, 500 * 2 ** Math.min(this.attempt, 5));
    const delay = Math.max(minMs, base / 2 + Math.random() * (base / 2));
    this.attempt++;
    this.setState('reconnecting', { inMs: Math.round(delay) });
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  async onWelcome(w) {
    const again = !!this.me;
    this.me = w;
    this.attempt = 0;
    this.setState('open');
    for (const f of this.openWaiters.splice(0)) f();
    this.emit('welcome', w);
    // Resume every room this client had joined, from the last seq it applied.
    for (const room of this.rooms.values()) {
      if (room.wanted) this.join(room.id).catch((e) => this.emit('room_error', { room: room.id, error: e }));
    }
    // Sends that got no ok before the drop: resend with the same client_msg_id (idempotent).
    if (again) this.emit('resumed', w);
  }

  waitOpen(ms) {
    if (this.state === 'open') return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new RequestError('timeout', 'not connected')), ms);
      this.openWaiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /// Sends `cmd` with a fresh rid; resolves with the ok frame, rejects with a RequestError
  /// (`code` from the error frame, or `timeout` / `disconnected`). Waits for the connection
  /// when it is down, within the same time-out.
  async request(cmd, ms = 10000) {
    const t0 = Date.now();
    await this.waitOpen(ms);
    const rid = this.nextRid++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new RequestError('timeout', 'no reply to ' + cmd.type));
      }, Math.max(1, ms - (Date.now() - t0)));
      this.pending.set(rid, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...cmd, rid }));
    });
  }

  /// Fire and forget (no rid): typing and the like. Dropped while disconnected.
  cast(cmd) {
    if (this.state === 'open' && this.ws) this.ws.send(JSON.stringify(cmd));
  }

  onFrame(msg) {
    if (msg.rid !== undefined && this.pending.has(msg.rid)) {
      const p = this.pending.get(msg.rid);
      this.pending.delete(msg.rid);
      clearTimeout(p.timer);
      if (msg.type === 'error') p.reject(new RequestError(msg.code, msg.message));
      else p.resolve(msg);
      return;
    }
    if (SEQUENCED.has(msg.type) && msg.room) {
      const room = this.rooms.get(msg.room);
      if (room) this.apply(room, msg, 'live');
      return;
    }
    const room = msg.room && this.rooms.get(msg.room);
    if (room) {
      if (msg.type === 'presence') {
        if (msg.state === 'online') room.online.set(msg.user.id, msg.user);
        else room.online.delete(msg.user.id);
        room.onlineCount = room.online.size;
      } else if (msg.type === 'online_count') {
        // A live room's audience (or a room past the presence limit) follows the count.
        room.onlineCount = msg.count;
      } else if (msg.type === 'stage') {
        room.stage = room.stage.filter((u) => u.id !== msg.user.id);
        if (msg.on) room.stage.push(msg.user);
      } else if (msg.type === 'hand') {
        room.hands = room.hands.filter((h) => h.user.id !== msg.user.id);
        if (msg.raised) room.hands.push({ user: msg.user, ts: Date.now() });
      } else if (msg.type === 'kicked') {
        room.wanted = false;
        room.joined = false;
      }
    }
    this.emit(msg.type, msg);
    this.emit('frame', msg);
  }

  // -- rooms and the sequenced state --------------------------------------------------------

  room(id) {
    if (!this.rooms.has(id)) this.rooms.set(id, new Room(id));
    return this.rooms.get(id);
  }

  /// Joins (or re-joins after a reconnect, resuming after the last seq applied).
  async join(id) {
    const room = this.room(id);
    room.wanted = true;
    const resume = room.high > 0 || room.initialLoaded;
    const cmd = { type: 'join', room: id };
    if (resume) cmd.after_seq = room.high;
    let ok;
    try {
      ok = await this.request(cmd);
    } catch (e) {
      // A refused first join (no such room, banned, ...) leaves no trace: not rejoined on
      // reconnect, not listed. A refused rejoin keeps what the room already holds.
      if (!room.joined && !room.initialLoaded) {
        room.wanted = false;
        if (this.rooms.get(id) === room) this.rooms.delete(id);
      }
      throw e;
    }
    room.info = ok.room;
    room.role = ok.role;
    room.joined = true;
    room.online = new Map(ok.online.map((u) => [u.id, u]));
    room.onlineCount = ok.online_count ?? room.online.size;
    room.stage = ok.stage || [];
    room.hands = ok.hands || [];
    const before = room.high;
    if (!resume) room.high = Math.max(room.high, ok.last_seq);
    this.emit('joined', { room, ok, resume });
    if (resume && ok.gap) {
      // More was missed than the server replays: page back from the end to what we had.
      await this.fillGap(room, before, ok.last_seq);
    }
    if (!room.initialLoaded) {
      room.initialLoaded = true;
      await this.loadOlder(id, ok.last_seq + 1);
    }
    return ok;
  }

  async fillGap(room, had, last) {
    this.gapsFilled++;
    room.high = Math.max(room.high, last);
    let before = last + 1;
    const pages = [];
    while (before > had + 1) {
      const ok = await this.request({ type: 'history', room: room.id, before_seq: before, limit: 100 });
      if (!ok.events.length) break;
      pages.unshift(ok.events);
      before = ok.events[0].seq;
      if (!ok.has_more) break;
    }
    const h = room.high;
    for (const evs of pages) for (const ev of evs) this.apply(room, ev, 'replay', h);
    this.emit('room_changed', { room });
  }

  /// One page of older history. Resolves with the number of new events.
  async loadOlder(id, beforeSeq) {
    const room = this.room(id);
    const before = beforeSeq || room.oldest || room.high + 1;
    if (before <= 1) {
      room.hasMore = false;
      return 0;
    }
    const asOf = room.high; // stored copies are current as of at least this seq
    const ok = await this.request({ type: 'history', room: id, before_seq: before, limit: 50 });
    room.hasMore = ok.has_more;
    let n = 0;
    for (const ev of ok.events) if (this.apply(room, ev, 'history', asOf)) n++;
    if (ok.events.length) room.oldest = Math.min(room.oldest || Infinity, ok.events[0].seq);
    else room.hasMore = false;
    this.emit('history', { room, count: n });
    return n;
  }

  /// Applies one sequenced event once. `asOf`: for stored copies (history), the seq their
  /// state is at least as new as, so older change events on a history page do not roll it
  /// back. Returns false for a seq already seen.
  apply(room, ev, source, asOf = 0) {
    if (room.seen.has(ev.seq)) return false;
    room.seen.add(ev.seq);
    if (source !== 'history') room.high = Math.max(room.high, ev.seq);
    room.oldest = Math.min(room.oldest || Infinity, ev.seq);
    const stateSeq = source === 'history' ? Math.max(ev.seq, asOf) : ev.seq;
    let changed = null;
    switch (ev.type) {
      case 'message': {
        if (room.messages.has(ev.id)) break;
        const m = { ...ev, stateSeq, reactions: new Map() };
        for (const r of ev.reactions || []) m.reactions.set(r.emoji, { count: r.count, mine: false });
        room.messages.set(ev.id, m);
        if (ev.client_msg_id && this.me && ev.from.id === this.me.user.id) this.outbox.delete(ev.client_msg_id);
        changed = m;
        break;
      }
      case 'message_edited':
      case 'message_deleted':
      case 'reaction': {
        const m = room.messages.get(ev.id);
        if (!m || ev.seq <= m.stateSeq) break;
        m.stateSeq = ev.seq;
        if (ev.type === 'message_edited') {
          if (!m.deleted) {
            m.text = ev.text;
            m.edited_ts = ev.ts;
          }
        } else if (ev.type === 'message_deleted') {
          m.deleted = true;
          m.text = '';
          m.reactions.clear();
        } else {
          const r = m.reactions.get(ev.emoji) || { count: 0, mine: false };
          r.count = ev.count;
          if (this.me && ev.user.id === this.me.user.id) r.mine = ev.added;
          if (r.count > 0) m.reactions.set(ev.emoji, r);
          else m.reactions.delete(ev.emoji);
        }
        changed = m;
        break;
      }
      case 'question':
      case 'question_updated': {
        const q = room.questions.get(ev.id);
        if (q && ev.seq <= q.stateSeq) break;
        const { type, room: _r, seq, change, ...fields } = ev;
        room.questions.set(ev.id, { ...(q || {}), ...fields, stateSeq });
        changed = room.questions.get(ev.id);
        break;
      }
      default:
        break; // hidden: a seq with nothing to show
    }
    this.emit('event', { room, ev, source, changed });
    return true;
  }

  /// The room's questions, fresh from the server.
  async loadQuestions(id, sort = 'top') {
    const room = this.room(id);
    const asOf = room.high;
    const ok = await this.request({ type: 'questions', room: id, sort });
    for (const q of ok.questions) {
      const old = room.questions.get(q.id);
      if (!old || old.stateSeq <= asOf) room.questions.set(q.id, { ...q, stateSeq: asOf });
    }
    return ok.questions.map((q) => q.id);
  }

  // -- writes --------------------------------------------------------------------------------

  /// Sends a message; kept in the outbox until its ok, and resent with the same
  /// client_msg_id after a reconnect, so nothing is lost and nothing doubles.
  async send(roomId, text, replyTo = null) {
    const id = 'w' + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
    const item = { room: roomId, text, reply_to: replyTo, client_msg_id: id, ts: Date.now() };
    this.outbox.set(id, item);
    this.emit('outbox', { room: roomId });
    return this.flushOne(item);
  }

  async flushOne(item) {
    for (let i = 0; i < 8; i++) {
      try {
        const cmd = { type: 'send', room: item.room, text: item.text, client_msg_id: item.client_msg_id };
        if (item.reply_to) cmd.reply_to = item.reply_to;
        const ok = await this.request(cmd, 15000);
        this.outbox.delete(item.client_msg_id);
        this.emit('outbox', { room: item.room });
        return ok;
      } catch (e) {
        if (e.code !== 'disconnected' && e.code !== 'timeout' && e.code !== 'not_member' && e.code !== 'unavailable') {
          this.outbox.delete(item.client_msg_id);
          this.emit('outbox', { room: item.room, error: e });
          throw e;
        }
        await new Promise((r) => setTimeout(r, 300 + 200 * i));
      }
    }
    throw new RequestError('timeout', 'message not sent');
  }

  pendingFor(roomId) {
    return [...this.outbox.values()].filter((m) => m.room === roomId);
  }
}

// -- whiteboards ---------------------------------------------------------------------------------

/// base64 of bytes (board frames carry y-protocols messages as base64).
export function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function fromBase64(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

const BOARD_SYNC = 0;
const BOARD_AWARENESS = 1;

/// Keeps a Y.Doc in sync with one board of a joined room through `client`, in y-websocket's
/// framing (protocol.md §22): a sync step 1 whenever the room is (re)joined, incoming step 2s
/// and updates applied, the server's step 1 answered with a step 2 (the server sends it only to
/// sessions that may draw, also at once when a host/ta grants drawing, so it is how this side
/// learns it may draw), and local updates sent as they happen. `Y` is web/vendor/yjs.mjs,
/// passed in so that this module loads without it. Events through `on`: `access` ({draw}),
/// `refused` (an update the server refused: the local copy holds changes the board has not),
/// `synced`, `awareness` (a remote awareness update, as bytes).
export class BoardLink {
  constructor(client, room, board, Y, doc, mayDraw = false) {
    this.client = client;
    this.room = room;
    this.board = board;
    this.Y = Y;
    this.doc = doc;
    this.mayDraw = mayDraw;
    this.synced = false;
    this.listeners = new Map();
    this.offs = [];
    this.onUpdate = (update, origin) => {
      if (origin === this) return;
      const e = Y.encoding.createEncoder();
      Y.encoding.writeVarUint(e, BOARD_SYNC);
      Y.syncProtocol.writeUpdate(e, update);
      // Sent only when connected: what is missed meanwhile goes in the step 2 that answers the
      // server's step 1 after the next join.
      if (this.client.state === 'open') this.send(Y.encoding.toUint8Array(e));
    };
  }

  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }

  emit(type, data) {
    for (const fn of this.listeners.get(type) || []) fn(data);
  }

  start() {
    this.doc.on('update', this.onUpdate);
    this.offs.push(this.client.on('board', (m) => {
      if (m.room === this.room && m.board === this.board) this.receive(fromBase64(m.data));
    }));
    this.offs.push(this.client.on('joined', ({ room }) => room.id === this.room && this.sync()));
    const room = this.client.rooms.get(this.room);
    if (room && room.joined) this.sync();
  }

  stop() {
    this.doc.off('update', this.onUpdate);
    for (const off of this.offs.splice(0)) off();
  }

  /// Our sync step 1: the server answers with what we lack (and, if we may draw, its own step 1).
  sync() {
    const { encoding, syncProtocol } = this.Y;
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, BOARD_SYNC);
    syncProtocol.writeSyncStep1(e, this.doc);
    return this.send(encoding.toUint8Array(e)).then((ok) => {
      if (ok && !this.synced) {
        this.synced = true;
        this.emit('synced', {});
      }
    });
  }

  /// One awareness update (y-protocols awareness encoding) to the room's other sessions.
  sendAwareness(update) {
    const { encoding } = this.Y;
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, BOARD_AWARENESS);
    encoding.writeVarUint8Array(e, update);
    this.client.cast({ type: 'board', room: this.room, board: this.board, data: toBase64(encoding.toUint8Array(e)) });
  }

  /// Resolves true on the server's ok, false when refused or not delivered.
  send(bytes) {
    return this.client
      .request({ type: 'board', room: this.room, board: this.board, data: toBase64(bytes) })
      .then(() => true)
      .catch((err) => {
        if (err.code === 'forbidden') {
          this.setAccess(false);
          this.emit('refused', err);
        } else if (err.code === 'too_large' || err.code === 'bad_request') {
          this.emit('refused', err);
        }
        // Anything else (disconnected, timeout, not joined yet, rate limits): the change stays
        // in the doc, and the step 2 answering the server's step 1 at the next join carries it.
        return false;
      });
  }

  setAccess(draw) {
    if (this.mayDraw === draw) return;
    this.mayDraw = draw;
    this.emit('access', { draw });
  }

  receive(bytes) {
    const { encoding, decoding, syncProtocol } = this.Y;
    let d;
    let type;
    try {
      d = decoding.createDecoder(bytes);
      type = decoding.readVarUint(d);
    } catch {
      return;
    }
    if (type === BOARD_AWARENESS) {
      this.emit('awareness', decoding.readVarUint8Array(d));
      return;
    }
    if (type !== BOARD_SYNC) return;
    const e = encoding.createEncoder();
    encoding.writeVarUint(e, BOARD_SYNC);
    const kind = syncProtocol.readSyncMessage(d, e, this.doc, this);
    if (kind === syncProtocol.messageYjsSyncStep1) {
      // Only sessions that may draw get the server's step 1.
      this.setAccess(true);
      this.send(encoding.toUint8Array(e));
    }
  }
}
