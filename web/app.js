// app.js owns the web client's UI: sign-in (the dev form or `#token=`), the rooms list with
// unread counts, the chat (infinite scroll back through history, replies, reactions, edit and
// delete, typing, presence), the Q&A board, hands and stage, the call card and the class grid,
// and the host/ta moderation controls. The Progress tab and the teacher dashboard are in
// engagement.js; polls, quizzes, the class lifecycle and breakout groups in classroom.js.
// Every piece of user content goes into the page as text (textContent / value), never as
// HTML. Protocol state lives in studyhall.js, WebRTC in calls.js.

import { Client, parseRoomGrants } from './studyhall.js';
import { Calls } from './calls.js';
import { setupEngagement } from './engagement.js';
import { setupClassroom } from './classroom.js';
import { setupBoard } from './board.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'studyhall.token';
const REACTIONS = ['👍', '❤️', '😂', '🎉', '❓'];

/// Builds an element: `el('div', {class: 'x', onclick}, child, 'text', ...)`. Strings become
/// text nodes, never HTML.
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return e;
}

let toastTimer;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 4000);
}

function fail(e) {
  toast((e && (e.detail || e.message)) || String(e));
}

function time(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

const isMod = (role) => role === 'host' || role === 'ta';

// -- sign-in ---------------------------------------------------------------------------------

async function devMode() {
  // `GET /client.json` always answers (so the page logs no error probing for the dev form).
  try {
    const r = await fetch('/client.json');
    return r.ok && (await r.json()).dev_sign_in === true;
  } catch {
    return false;
  }
}

// `#room=<id>` opens that room first; read before the fragment is cleared.
const fragmentRoom = (/(?:^|[#&])room=([A-Za-z0-9_.-]+)/.exec(location.hash) || [])[1] || null;

function tokenFromFragment() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (!m) return null;
  const token = decodeURIComponent(m[1]);
  // Keep the token out of the address bar and the history.
  history.replaceState(null, '', location.pathname + location.search);
  return token;
}

async function showSignIn(error) {
  $('app').hidden = true;
  $('mobile-nav').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = error || '';
  const dev = await devMode();
  $('dev-form').hidden = !dev;
  $('token-hint').hidden = dev;
}

$('dev-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const user = $('dev-user').value.trim();
  const body = { user, name: $('dev-name').value.trim() || user, role: $('dev-role').value };
  try {
    const grants = $('dev-rooms').value.trim();
    if (grants) body.rooms = parseRoomGrants(grants);
    const r = await fetch('/dev/token', {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
    });
    const j = await r.json();
    if (!r.ok) throw new Error(j.message || 'sign-in failed');
    sessionStorage.setItem(TOKEN_KEY, j.token);
    await start(j.token);
  } catch (err) {
    $('signin-error').textContent = err.message;
  }
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// -- the signed-in app -----------------------------------------------------------------------

let client = null;
let calls = null;
let engagement = null;
let classroom = null;
let board = null; // board.js: the whiteboard panel
let active = null; // the room id on screen
let roomsList = []; // the `rooms` reply
let replyTo = null;
let loadingOlder = false;
const typingUntil = new Map(); // user id -> {name, until}
const myVotes = new Set();
let reports = []; // the `reports` reply for the room on screen (host/ta)

function wsUrl() {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
}

async function start(token) {
  client = new Client(wsUrl(), token);
  window.studyhall = { get client() { return client; }, get calls() { return calls; } };
  client.on('state', renderConn);
  calls = new Calls(client, {
    onCall: renderCall, onAv: renderAv, onSpeakers: renderSpeakers,
    onAvMuted: (m) => toast('Your ' + (m.kind === 'audio' ? 'microphone' : 'camera') + ' was turned off by ' + m.by),
    onAvUnmuted: (m) => toast('Your ' + (m.kind === 'audio' ? 'microphone' : 'camera') + ' was turned back on by ' + m.by),
    onAvClosed: (m) => toast(m.reason === 'class_ended' ? 'The class has ended: audio/video closed' : 'Audio/video closed'),
  });
  engagement = setupEngagement({
    client, el, $, toast, fail,
    active: () => active,
    role: () => (client.rooms.get(active) || {}).role,
  });
  classroom = setupClassroom({
    client, el, $, toast, fail,
    active: () => active,
    role: () => (client.rooms.get(active) || {}).role,
    openRoom, renderRoomHead, showTab,
  });
  // The shared whiteboard (board.js): its panel, and the room header's Board button.
  board = setupBoard({
    client, el, $, toast, fail,
    active: () => active,
    role: () => (client.rooms.get(active) || {}).role,
  });
  wireClient();
  try {
    await client.start();
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    client = null;
    return showSignIn('Sign-in refused: ' + (e.detail || e.message));
  }
  $('signin').hidden = true;
  $('app').hidden = false;
  $('mobile-nav').hidden = false;
  $('signout').hidden = false;
  const who = client.me.user.name + ' (' + client.me.user.role + ')';
  $('me').textContent = who;
  $('me').title = who;
  await refreshRooms();
  const first = fragmentRoom || sessionStorage.getItem('studyhall.room') ||
    (roomsList[0] && roomsList[0].id) || 'lobby';
  if (!(await openRoom(first))) {
    // The room asked for is gone or refused: fall back to one we can open.
    const other = roomsList.map((r) => r.id).find((r) => r !== first) || (first !== 'lobby' ? 'lobby' : null);
    if (other) await openRoom(other);
  }
}

function renderConn({ state, detail }) {
  const c = $('conn');
  c.dataset.state = state;
  const text = {
    idle: 'offline', connecting: 'connecting…', open: 'connected',
    reconnecting: 'reconnecting…', closed: 'disconnected',
  }[state] || state;
  c.textContent = text;
  c.title = detail && detail.inMs ? 'next try in ' + detail.inMs + ' ms' : '';
  $('composer').classList.toggle('offline', state !== 'open');
}

function wireClient() {
  client.on('welcome', () => {
    if (client.rooms.size) refreshRooms();
  });
  client.on('event', ({ room, ev, source, changed }) => {
    if (room.id !== active) return;
    if (ev.type === 'message' && changed) {
      typingUntil.delete(ev.from.id);
      renderTyping();
    }
    if (changed && changed.from) renderMessage(room, changed, source === 'live');
    if (changed && changed.votes !== undefined) renderQuestions();
    if (source === 'live') markRead();
  });
  client.on('room_changed', ({ room }) => room.id === active && renderAllMessages());
  client.on('outbox', ({ room, error }) => {
    if (error) fail(error);
    if (room === active) renderOutbox();
  });
  client.on('joined', ({ room, ok }) => {
    classroom.joined(room, ok);
    room.stageSince = null;
    if (room.id !== active) return;
    renderRoomHead();
    renderPeople();
  });
  for (const t of ['presence', 'online_count', 'stage', 'hand']) {
    client.on(t, (m) => {
      const r = client.rooms.get(m.room);
      if (t === 'stage' && r && r.stageSince) {
        if (m.on) r.stageSince.set(m.user.id, Date.now());
        else r.stageSince.delete(m.user.id);
      }
      if (m.room !== active) return;
      renderPeople();
      if (t === 'hand') renderHandBtn();
    });
  }
  client.on('typing', (m) => {
    if (m.room !== active) return;
    typingUntil.set(m.user.id, { name: m.user.name, until: Date.now() + 4000 });
    renderTyping();
  });
  // A report filed or resolved (by any host/ta): the queue is read again, with its targets.
  client.on('report', (m) => m.room === active && loadReports());
  client.on('muted', (m) => {
    if (m.user === client.me.user.id) toast(m.until ? 'You are muted in ' + m.room + ' until ' + time(m.until) : 'You are no longer muted in ' + m.room);
    else toast(m.user + (m.until ? ' muted until ' + time(m.until) : ' unmuted'));
  });
  client.on('kicked', (m) => toast('You were removed from ' + m.room + ' (' + m.reason + ')'));
  client.on('slow_mode', (m) => {
    if (m.room === active) {
      $('slow-mode').value = String(m.seconds);
      toast(m.seconds ? 'Slow mode: one message every ' + m.seconds + ' s' : 'Slow mode off');
    }
  });
  client.on('error', (m) => m.code !== 'not_member' && fail(m));
  setInterval(renderTyping, 1000);
  setInterval(() => client.state === 'open' && refreshRooms(), 15000);
}

// -- rooms -----------------------------------------------------------------------------------

async function refreshRooms() {
  try {
    const ok = await client.request({ type: 'rooms' });
    roomsList = ok.rooms;
  } catch {
    return;
  }
  renderRooms();
}

function renderRooms() {
  const ul = $('room-list');
  ul.replaceChildren();
  const ids = new Set(roomsList.map((r) => r.id));
  const list = [...roomsList];
  if (active && !ids.has(active)) list.push({ id: active, title: active, unread: 0 });
  for (const r of list) {
    const unread = r.id === active ? 0 : r.unread;
    ul.append(el('li', {},
      el('button', {
        type: 'button', class: 'room' + (r.id === active ? ' active' : ''), dataset: { room: r.id },
        onclick: () => openRoom(r.id),
      }, el('span', { class: 'room-name', text: r.title || r.id }),
      unread ? el('span', { class: 'unread', text: String(unread), 'aria-label': unread + ' unread' }) : null)));
  }
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const id = $('join-room').value.trim();
  if (id) openRoom(id).then((ok) => ok && ($('join-room').value = ''));
});

/// Shows room `id`, joining it first if needed. The view changes only once the join's `ok`
/// came: a refused join leaves the page on the room before. Resolves whether it opened.
async function openRoom(id) {
  const known = client.rooms.get(id);
  if (!known || !known.joined) {
    try {
      await client.join(id);
    } catch (e) {
      fail(e);
      return false;
    }
  }
  active = id;
  sessionStorage.setItem('studyhall.room', id);
  replyTo = null;
  renderReply();
  typingUntil.clear();
  reports = [];
  renderReports();
  $('msg-list').replaceChildren();
  $('question-list').replaceChildren();
  const room = client.rooms.get(id);
  const live = !!(room && room.info && room.info.kind === 'live');
  setLiveLayout(live);
  setView(live ? 'qa' : 'chat');
  renderRoomHead();
  classroom.roomChanged();
  renderAllMessages();
  renderPeople();
  renderRooms();
  scrollToBottom();
  markRead();
  loadQuestions();
  refreshRooms();
  if (isMod(room && room.role)) loadReports();
  return true;
}

function renderRoomHead() {
  const room = client.rooms.get(active);
  if (!room) return;
  $('room-title').textContent = (room.info && room.info.title) || room.id;
  $('qa-title').textContent = 'Questions · ' + ((room.info && room.info.title) || room.id);
  $('room-role').textContent = room.role || '';
  $('mod-tab').hidden = !isMod(room.role);
  $('hands-box').hidden = !isMod(room.role);
  engagement.roomChanged();
  board.roomChanged();
  if (!$('tab-progress').hidden) engagement.showProgress();
  const av = room.info && (room.info.kind === 'class' || room.info.kind === 'live');
  $('av-join').disabled = !av;
  $('av-hint').textContent = av ? 'Small-class video grid (mesh, up to 6).' : 'Class A/V is for class and live rooms.';
  $('composer-text').disabled = room.role === 'viewer' || classroom.readOnly(room.id);
  $('composer-text').placeholder = classroom.readOnly(room.id) ? 'The class has ended' : 'Message';
  $('class-badge-slot').replaceChildren(...[classroom.stateBadge(room.id)].filter(Boolean));
  renderHandBtn();
}

let readTimer = null;
function markRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const room = client.rooms.get(active);
    if (room && room.high > 0 && document.visibilityState !== 'hidden') {
      client.request({ type: 'read', room: room.id, seq: room.high }).catch(() => {});
    }
  }, 500);
}

// -- messages --------------------------------------------------------------------------------

function nearBottom() {
  const m = $('messages');
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom() {
  const m = $('messages');
  m.scrollTop = m.scrollHeight;
}

function renderAllMessages() {
  const room = client.rooms.get(active);
  $('msg-list').replaceChildren();
  if (!room) return;
  for (const m of room.sortedMessages()) renderMessage(room, m, false);
  renderOutbox();
  renderHistoryState();
}

function renderHistoryState() {
  const room = client.rooms.get(active);
  $('history-state').textContent = !room ? '' : room.hasMore ? 'Scroll up for older messages' : 'Beginning of the room';
}

function findMessageEl(id) {
  return $('msg-list').querySelector('[data-id="' + CSS.escape(id) + '"]');
}

function renderMessage(room, m, live) {
  const stick = nearBottom();
  const old = findMessageEl(m.id);
  const node = messageNode(room, m);
  if (old) old.replaceWith(node);
  else {
    // Insert in seq order.
    const list = $('msg-list');
    let after = null;
    for (const c of list.children) {
      if (Number(c.dataset.seq) < m.seq) after = c;
      else break;
    }
    if (after) after.after(node);
    else list.prepend(node);
  }
  if (live && stick) scrollToBottom();
}

function messageNode(room, m) {
  const me = client.me.user.id;
  const mine = m.from.id === me;
  const node = el('article', {
    class: 'msg' + (mine ? ' mine' : '') + (m.deleted ? ' deleted' : ''), dataset: { id: m.id, seq: String(m.seq) },
  });
  const meta = el('div', { class: 'meta' },
    el('span', { class: 'author', text: m.from.name }),
    m.from.role && m.from.role !== 'member' ? el('span', { class: 'badge', text: m.from.role }) : null,
    el('time', { text: time(m.ts) }),
    m.edited_ts && !m.deleted ? el('span', { class: 'muted', text: '(edited)' }) : null);
  node.append(meta);
  if (m.reply_to) {
    const parent = room.messages.get(m.reply_to);
    node.append(el('div', { class: 'reply-ref' },
      '↪ ', parent ? (parent.from.name + ': ' + (parent.deleted ? 'deleted message' : parent.text.slice(0, 80))) : 'an earlier message'));
  }
  node.append(el('div', { class: 'text', text: m.deleted ? 'message deleted' : m.text }));
  if (m.deleted) return node;
  const chips = el('div', { class: 'reactions' });
  for (const [emoji, r] of m.reactions) {
    chips.append(el('button', {
      type: 'button', class: 'chip' + (r.mine ? ' mine' : ''), onclick: () => toggleReaction(room, m, emoji),
    }, emoji + ' ' + r.count));
  }
  node.append(chips);
  const actions = el('div', { class: 'actions' });
  actions.append(el('button', { type: 'button', onclick: () => setReply(m) }, 'Reply'));
  const picker = el('span', { class: 'picker' });
  for (const emoji of REACTIONS) {
    picker.append(el('button', { type: 'button', class: 'react', 'aria-label': 'react ' + emoji, onclick: () => toggleReaction(room, m, emoji) }, emoji));
  }
  actions.append(picker);
  if (mine) {
    actions.append(el('button', { type: 'button', class: 'edit', onclick: () => startEdit(node, room, m) }, 'Edit'));
  }
  if (mine || isMod(room.role)) {
    actions.append(el('button', {
      type: 'button', class: 'delete', onclick: () => client.request({ type: 'delete', room: room.id, id: m.id }).catch(fail),
    }, 'Delete'));
  }
  if (!mine && m.from.role !== 'system') {
    actions.append(el('button', { type: 'button', class: 'report', onclick: () => startReport(node, room, m) }, 'Report'));
    if (isMod(room.role) && !isMod(m.from.role)) actions.append(modMenu(room, m.from));
  }
  node.append(actions);
  return node;
}

function modMenu(room, user) {
  const sel = el('select', { class: 'mod-menu', 'aria-label': 'moderate ' + user.name },
    el('option', { value: '' }, 'Moderate…'),
    el('option', { value: 'mute' }, 'Mute 5 min'),
    el('option', { value: 'unmute' }, 'Unmute'),
    el('option', { value: 'kick' }, 'Kick'),
    el('option', { value: 'ban' }, 'Ban'));
  sel.addEventListener('change', async () => {
    const action = sel.value;
    sel.value = '';
    if (!action) return;
    const cmd = { type: action, room: room.id, user: user.id };
    if (action === 'mute') cmd.seconds = 300;
    try {
      await client.request(cmd);
      toast(action + ': ' + user.name);
    } catch (e) {
      fail(e);
    }
  });
  return sel;
}

async function toggleReaction(room, m, emoji) {
  const r = m.reactions.get(emoji);
  const type = r && r.mine ? 'unreact' : 'react';
  try {
    const ok = await client.request({ type, room: room.id, id: m.id, emoji });
    if (ok.seq === null && type === 'react') {
      // Already ours (a stored copy does not say whose reactions they are): take it back.
      await client.request({ type: 'unreact', room: room.id, id: m.id, emoji });
    }
  } catch (e) {
    fail(e);
  }
}

function inlineForm(node, value, placeholder, onSubmit, label = 'Save') {
  const input = el('input', { class: 'inline-input', maxlength: 4000, placeholder });
  input.value = value;
  const form = el('form', { class: 'inline-form' }, input,
    el('button', { type: 'submit' }, label),
    el('button', { type: 'button', onclick: () => form.remove() }, 'Cancel'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await onSubmit(input.value);
      form.remove();
    } catch (err) {
      fail(err);
    }
  });
  node.append(form);
  input.focus();
}

function startEdit(node, room, m) {
  inlineForm(node, m.text, 'new text', (text) => client.request({ type: 'edit', room: room.id, id: m.id, text }));
}

function startReport(node, room, m) {
  inlineForm(node, '', 'why report this?', async (reason) => {
    await client.request({ type: 'report', room: room.id, id: m.id, reason });
    toast('Reported. Thank you.');
  }, 'Report');
}

function setReply(m) {
  replyTo = m;
  renderReply();
  $('composer-text').focus();
}

function renderReply() {
  $('reply-bar').hidden = !replyTo;
  $('reply-text').textContent = replyTo ? 'Replying to ' + replyTo.from.name + ': ' + replyTo.text.slice(0, 80) : '';
}
$('reply-cancel').addEventListener('click', () => {
  replyTo = null;
  renderReply();
});

function renderOutbox() {
  const box = $('outbox-list');
  box.replaceChildren();
  if (!client || !active) return;
  for (const p of client.pendingFor(active)) {
    box.append(el('article', { class: 'msg mine pending' },
      el('div', { class: 'meta' }, el('span', { class: 'author', text: client.me.user.name }), el('span', { class: 'muted', text: 'sending…' })),
      el('div', { class: 'text', text: p.text })));
  }
}

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('composer-text');
  const text = input.value;
  if (!text.trim() || !active) return;
  input.value = '';
  const reply = replyTo ? replyTo.id : null;
  replyTo = null;
  renderReply();
  client.send(active, text, reply).catch(fail);
  renderOutbox();
  scrollToBottom();
});

$('composer-text').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

let lastTyping = 0;
$('composer-text').addEventListener('input', () => {
  if (!active || Date.now() - lastTyping < 2500) return;
  lastTyping = Date.now();
  client.cast({ type: 'typing', room: active });
});

function renderTyping() {
  const now = Date.now();
  const names = [];
  for (const [id, t] of typingUntil) {
    if (t.until < now) typingUntil.delete(id);
    else names.push(t.name);
  }
  $('typing').textContent = !names.length ? '' : names.join(', ') + (names.length === 1 ? ' is typing…' : ' are typing…');
}

$('messages').addEventListener('scroll', async () => {
  const m = $('messages');
  if (m.scrollTop > 60 || loadingOlder || !active) return;
  const room = client.rooms.get(active);
  if (!room || !room.hasMore) return;
  loadingOlder = true;
  const before = m.scrollHeight;
  try {
    await client.loadOlder(active);
    m.scrollTop += m.scrollHeight - before;
  } catch (e) {
    fail(e);
  } finally {
    loadingOlder = false;
    renderHistoryState();
  }
});

// -- people, hands, stage --------------------------------------------------------------------

function renderPeople() {
  const room = client.rooms.get(active);
  if (!room) return;
  const me = client.me.user.id;
  const mod = isMod(room.role);
  $('online-count').textContent = Math.max(room.onlineCount || 0, room.online.size) + ' online';
  const ul = $('people-list');
  ul.replaceChildren();
  for (const u of [...room.online.values()].sort((a, b) => a.name.localeCompare(b.name))) {
    const li = el('li', { dataset: { user: u.id } },
      el('span', { class: 'dot', 'aria-hidden': 'true' }),
      el('span', { class: 'name', text: u.name }),
      u.role !== 'member' ? el('span', { class: 'badge', text: u.role }) : null);
    if (u.id !== me) {
      li.append(el('button', { type: 'button', class: 'call-btn', onclick: () => placeCall(u) }, 'Call'));
      if (mod) li.append(el('button', { type: 'button', onclick: () => stageCmd(u, true) }, 'Stage'));
      if (mod && !isMod(u.role)) li.append(modMenu(room, u));
    }
    ul.append(li);
  }
  const stage = $('stage-list');
  stage.replaceChildren();
  if (mod && !room.stageSince) loadStageTimes(room);
  for (const u of room.stage) {
    stage.append(el('li', { dataset: { user: u.id } }, el('span', { class: 'name', text: u.name }),
      mod ? el('span', { class: 'stage-time muted' }) : null,
      mod ? el('button', { type: 'button', onclick: () => stageCmd(u, false) }, 'Off stage') : null));
  }
  renderStageTimes();
  const hands = $('hands-list');
  hands.replaceChildren();
  for (const h of room.hands) {
    hands.append(el('li', {}, el('span', { class: 'name', text: '✋ ' + h.user.name }),
      el('button', { type: 'button', onclick: () => stageCmd(h.user, true) }, 'To stage'),
      el('button', { type: 'button', onclick: () => client.request({ type: 'lower_hand', room: active, user: h.user.id }).catch(fail) }, 'Lower')));
  }
}

/// host/ta see each speaker's time on stage (the current spell, from `hands`' `since`, then
/// from the stage events) against the room's talk-time cap, if it has one.
function loadStageTimes(room) {
  room.stageSince = new Map();
  client.request({ type: 'hands', room: room.id }).then((ok) => {
    room.talkCap = ok.talk_cap_s || null;
    for (const s of ok.stage || []) room.stageSince.set(s.user.id, s.since);
    renderStageTimes();
  }).catch(() => { room.stageSince = null; });
}

function renderStageTimes() {
  if (!client) return; // before sign-in
  const room = client.rooms.get(active);
  if (!room || !room.stageSince) return;
  const cap = room.talkCap;
  const clock = (s) => Math.floor(s / 60) + ':' + String(s % 60).padStart(2, '0');
  for (const li of $('stage-list').querySelectorAll('li[data-user]')) {
    const since = room.stageSince.get(li.dataset.user);
    const span = li.querySelector('.stage-time');
    if (!span || since === undefined) continue;
    const s = Math.max(0, Math.floor((Date.now() - since) / 1000));
    span.textContent = clock(s) + (cap ? ' / ' + clock(cap) : '');
    span.classList.toggle('over', !!cap && s >= cap);
  }
}
setInterval(renderStageTimes, 1000);

function stageCmd(u, on) {
  client.request({ type: 'stage', room: active, user: u.id, on }).then((ok) => {
    const room = client.rooms.get(active);
    if (room) room.stage = ok.stage;
    renderPeople();
  }).catch(fail);
}

/// Whether my hand is up in the room on screen, as the server last said: the room's hands
/// follow the `hand` events (which reach the user too) and the join's list.
function myHandUp() {
  const room = client && client.rooms.get(active);
  return !!room && room.hands.some((h) => h.user.id === client.me.user.id);
}

/// Records what a raise/lower `ok` says (the server's state, not a local toggle), for when no
/// `hand` event comes (a hand already up, or already down).
function setMyHand(roomId, raised) {
  const room = client.rooms.get(roomId);
  if (!room) return;
  const me = client.me.user;
  const had = room.hands.some((h) => h.user.id === me.id);
  if (raised && !had) room.hands.push({ user: { id: me.id, name: me.name }, ts: Date.now() });
  if (!raised && had) room.hands = room.hands.filter((h) => h.user.id !== me.id);
}

function renderHandBtn() {
  const up = myHandUp();
  $('hand-btn').textContent = up ? '✋ Lower hand' : '✋ Raise hand';
  $('hand-btn').setAttribute('aria-pressed', String(up));
}

$('hand-btn').addEventListener('click', async () => {
  const room = active;
  if (!room) return;
  try {
    if (myHandUp()) {
      await client.request({ type: 'lower_hand', room });
      setMyHand(room, false);
    } else {
      const ok = await client.request({ type: 'raise_hand', room });
      setMyHand(room, true);
      toast('Hand raised: #' + ok.position + ' in the queue');
    }
  } catch (e) {
    fail(e);
  }
  if (room === active) {
    renderHandBtn();
    renderPeople();
  }
});

// -- Q&A -------------------------------------------------------------------------------------

async function loadQuestions() {
  if (!active) return;
  try {
    await client.loadQuestions(active, $('qa-sort').value);
  } catch {
    // Q&A may be off in this room; the board stays empty.
  }
  renderQuestions();
}

$('qa-sort').addEventListener('change', renderQuestions);

$('ask-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('ask-text').value;
  if (!text.trim()) return;
  try {
    const ok = await client.request({ type: 'ask', room: active, text, anonymous: $('ask-anon').checked });
    $('ask-text').value = '';
    if (ok.status === 'pending') toast('Your question waits for a host to approve it.');
  } catch (err) {
    fail(err);
  }
});

function renderQuestions() {
  const room = client.rooms.get(active);
  const ul = $('question-list');
  if (!room) return;
  ul.replaceChildren();
  const mod = isMod(room.role);
  const sort = $('qa-sort').value;
  const qs = [...room.questions.values()].filter((q) => mod || q.status !== 'pending');
  qs.sort(sort === 'recent' ? (a, b) => b.ts - a.ts : (a, b) => b.votes - a.votes || a.ts - b.ts);
  for (const q of qs) {
    const li = el('li', { class: 'question status-' + q.status, dataset: { id: q.id } });
    const voted = myVotes.has(q.id);
    li.append(el('div', { class: 'q-head' },
      el('button', {
        type: 'button', class: 'vote' + (voted ? ' mine' : ''), 'aria-pressed': String(voted),
        'aria-label': 'upvote', disabled: q.status === 'dismissed' || undefined, onclick: () => vote(q),
      }, '▲ ' + q.votes),
      el('span', { class: 'q-text', text: q.text })));
    li.append(el('div', { class: 'q-meta muted' },
      el('span', { class: 'status badge', text: q.status }),
      ' ', q.author ? q.author.name : 'Anonymous', q.anonymous && q.author ? ' (anonymous)' : '',
      ' · ', time(q.ts), q.overdue ? ' · overdue' : ''));
    // Host/ta and the asker may mark an answer helpful (the `helpful` command).
    const mayMark = room.role !== 'viewer' && (mod || (q.author && q.author.id === client.me.user.id));
    for (const a of q.answers || []) {
      const row = el('div', { class: 'answer' + (a.helpful ? ' helpful' : ''), dataset: { answer: a.id } },
        el('b', { text: (a.author ? a.author.name : '') + ': ' }), el('span', { text: a.text }),
        a.helpful ? el('span', { class: 'helpful-mark badge', text: '✓ helpful' }) : null);
      if (mayMark) {
        row.append(el('button', {
          type: 'button', class: 'helpful-btn', 'aria-pressed': String(!!a.helpful),
          onclick: () => client.request({ type: 'helpful', room: room.id, question: q.id, answer: a.id, on: !a.helpful }).catch(fail),
        }, a.helpful ? 'Not helpful' : 'Helpful'));
      }
      li.append(row);
    }
    const controls = el('div', { class: 'row q-controls' });
    if (room.role !== 'viewer') {
      controls.append(el('button', { type: 'button', class: 'answer-btn', onclick: () => inlineForm(li, '', 'your answer', (text) => client.request({ type: 'answer', room: room.id, question: q.id, text }), 'Answer') }, 'Answer'));
    }
    if (mod) {
      const set = (status) => client.request({ type: 'question_status', room: room.id, question: q.id, status }).catch(fail);
      if (q.status === 'pending') controls.append(el('button', { type: 'button', class: 'approve', onclick: () => set('open') }, 'Approve'));
      if (q.status !== 'pinned') controls.append(el('button', { type: 'button', class: 'pin', onclick: () => set('pinned') }, 'Pin'));
      if (q.status !== 'answered') controls.append(el('button', { type: 'button', class: 'mark-answered', onclick: () => set('answered') }, 'Mark answered'));
      if (q.status !== 'dismissed') controls.append(el('button', { type: 'button', class: 'dismiss', onclick: () => set('dismissed') }, 'Dismiss'));
    }
    li.append(controls);
    ul.append(li);
  }
}

async function vote(q) {
  const up = !myVotes.has(q.id);
  try {
    const ok = await client.request({ type: 'vote', room: active, question: q.id, up });
    if (ok.seq === null && up) {
      // Already voted (from another device or before a reload): this click takes it back.
      await client.request({ type: 'vote', room: active, question: q.id, up: false });
      myVotes.delete(q.id);
    } else if (up) myVotes.add(q.id);
    else myVotes.delete(q.id);
    renderQuestions();
  } catch (e) {
    fail(e);
  }
}

// -- moderation ------------------------------------------------------------------------------

/// The room's open reports (host/ta), with the message or question each points at.
async function loadReports() {
  const room = client.rooms.get(active);
  if (!room || !isMod(room.role)) return;
  const id = room.id;
  try {
    const ok = await client.request({ type: 'reports', room: id });
    if (id !== active) return;
    reports = ok.reports;
  } catch (e) {
    if (id === active) $('report-state').textContent = 'Reports unavailable: ' + (e.detail || e.message);
    return;
  }
  renderReports();
}

async function resolveReport(r, resolution, deleteFirst) {
  try {
    if (deleteFirst) await client.request({ type: 'delete', room: r.room, id: r.target_id });
    await client.request({ type: 'report_resolve', room: r.room, report: r.id, resolution });
    reports = reports.filter((x) => x.id !== r.id);
    renderReports();
  } catch (e) {
    fail(e);
    loadReports();
  }
}

function renderReports() {
  const ul = $('report-list');
  ul.replaceChildren();
  $('report-state').textContent = reports.length ? '' : 'No open reports.';
  $('mod-tab').textContent = 'Moderation' + (reports.length ? ' (' + reports.length + ')' : '');
  for (const r of reports) {
    const target = r.target
      ? el('blockquote', { class: 'report-target' },
        el('span', { class: 'author', text: r.target.author.name }), ': ',
        el('span', { class: 'text', text: r.target.text }))
      : el('blockquote', { class: 'report-target muted', text: 'The ' + r.target_kind + ' is gone (deleted).' });
    ul.append(el('li', { dataset: { report: r.id } },
      el('div', { class: 'report-head muted', text: r.reporter + ' reported a ' + r.target_kind + ' · ' + time(r.ts) }),
      target,
      el('div', { class: 'report-reason' }, el('b', { text: 'Reason: ' }), el('span', { text: r.reason })),
      el('div', { class: 'row' },
        r.target && r.target_kind === 'message'
          ? el('button', { type: 'button', class: 'danger', onclick: () => resolveReport(r, 'removed', true) }, 'Delete message')
          : null,
        el('button', { type: 'button', class: 'ok', onclick: () => resolveReport(r, 'resolved') }, 'Resolve'),
        el('button', { type: 'button', onclick: () => resolveReport(r, 'dismissed') }, 'Dismiss'))));
  }
}

$('slow-mode').addEventListener('change', () => {
  client.request({ type: 'slow_mode', room: active, seconds: Number($('slow-mode').value) }).catch(fail);
});

// -- calls -----------------------------------------------------------------------------------

let callTimer = null;

async function placeCall(u) {
  try {
    await calls.place(u.id, u.name);
  } catch (e) {
    fail(e);
  }
}

function playVideo(v, stream) {
  if (v.srcObject !== stream) v.srcObject = stream;
  v.play().catch(() => {
    v.muted = true;
    v.play().catch(() => {});
  });
}

// What a call's end reason means to the person it happened to.
const CALL_END_TEXT = {
  ended: 'Call ended',
  rejected: 'Call declined',
  missed: 'No answer',
  busy: 'Busy: they are in another call',
  cancelled: 'Call cancelled',
  failed: 'Call failed',
};

function renderCall(call, endReason) {
  const ringing = call && call.state === 'ringing' && !call.outgoing;
  $('incoming').hidden = !ringing;
  if (ringing) $('incoming-text').textContent = call.peerName + ' is calling…';
  $('call-card').hidden = !call || ringing;
  clearInterval(callTimer);
  if (!call) {
    if (endReason) toast(CALL_END_TEXT[endReason] || 'Call ended (' + endReason + ')');
    $('remote-video').srcObject = null;
    $('local-video').srcObject = null;
    return;
  }
  const label = {
    calling: 'Calling ' + call.peerName + '…', accepted: call.peerName, reconnecting: call.peerName + ' is reconnecting…',
    resumed: call.peerName,
  }[call.state] || call.state;
  $('call-status').textContent = label + (call.pcState && call.pcState !== 'connected' && call.state === 'accepted' ? ' (' + call.pcState + ')' : '');
  $('call-card').dataset.state = call.pcState || call.state;
  if (calls.local) playVideo($('local-video'), calls.local);
  if (call.remote) playVideo($('remote-video'), call.remote);
  const tick = () => {
    const s = call.startedAt ? Math.floor((Date.now() - call.startedAt) / 1000) : 0;
    $('call-timer').textContent = Math.floor(s / 60) + ':' + String(s % 60).padStart(2, '0');
  };
  tick();
  if (call.startedAt) callTimer = setInterval(tick, 1000);
}

$('incoming-accept').addEventListener('click', () => calls.accept().catch(fail));
$('incoming-reject').addEventListener('click', () => calls.reject().catch(fail));
$('call-hangup').addEventListener('click', () => calls.hangup().catch(fail));
$('call-mic').addEventListener('click', (e) => {
  const off = e.target.getAttribute('aria-pressed') !== 'true';
  calls.setMic(!off);
  e.target.setAttribute('aria-pressed', String(off));
  e.target.textContent = off ? 'Unmute mic' : 'Mute mic';
});
$('call-cam').addEventListener('click', (e) => {
  const off = e.target.getAttribute('aria-pressed') !== 'true';
  calls.setCamera(!off);
  e.target.setAttribute('aria-pressed', String(off));
  e.target.textContent = off ? 'Camera on' : 'Camera off';
});

function renderAv(av) {
  $('av-join').hidden = !!av;
  $('av-leave').hidden = !av;
  const grid = $('av-grid');
  grid.replaceChildren();
  if (!av) return;
  grid.dataset.mode = av.mode || 'mesh';
  if (calls.local) {
    const v = el('video', { autoplay: true, playsinline: true, muted: true });
    v.muted = true;
    grid.append(el('figure', {}, v, el('figcaption', { text: 'You' })));
    playVideo(v, calls.local);
  }
  const shown = new Set();
  for (const [session, p] of av.peers) {
    const v = el('video', { autoplay: true, playsinline: true, dataset: { session } });
    // One set of mute buttons per user (a user's sessions are muted together).
    const buttons = shown.has(p.user) ? [] : muteButtons(av, p.user);
    shown.add(p.user);
    const f = el('figure', { dataset: { user: p.user } }, v, el('figcaption', { text: p.user + ' · ' + p.state }), ...buttons);
    grid.append(f);
    if (p.stream) playVideo(v, p.stream);
  }
  renderSpeakers(av);
}

/// SFU, host/ta: buttons that stop and restart forwarding a user's microphone or camera
/// (`av_mute` / `av_unmute`). The server tells only the user, so what this page muted is
/// remembered on `av.mutedByMe`.
function muteButtons(av, user) {
  const room = client.rooms.get(av.room);
  if (av.mode !== 'sfu' || !room || !isMod(room.role) || user === client.me.user.id) return [];
  av.mutedByMe = av.mutedByMe || new Map();
  const state = av.mutedByMe.get(user) || { audio: false, video: false };
  return ['audio', 'video'].map((kind) => {
    const noun = kind === 'audio' ? 'mic' : 'camera';
    return el('button', {
      type: 'button', class: 'av-mute', dataset: { kind }, 'aria-pressed': String(state[kind]),
      onclick: () => {
        const muted = !state[kind];
        client.request({ type: muted ? 'av_mute' : 'av_unmute', room: av.room, user, kind }).then(() => {
          av.mutedByMe.set(user, { ...state, [kind]: muted });
          if (calls.av === av) renderAv(av);
        }).catch(fail);
      },
    }, (state[kind] ? 'Unmute ' : 'Mute ') + noun);
  });
}

/// SFU `active_speakers`: the speaking users' tiles are highlighted.
function renderSpeakers(av) {
  const speaking = (av && av.speakers) || new Set();
  for (const f of $('av-grid').querySelectorAll('figure[data-user]')) f.classList.toggle('speaking', speaking.has(f.dataset.user));
}

$('av-join').addEventListener('click', () => calls.avJoin(active).catch(fail));
$('av-leave').addEventListener('click', () => calls.avLeave().catch(fail));

// -- layout: side tabs and the phone's bottom nav --------------------------------------------

function showTab(name) {
  for (const o of document.querySelectorAll('.tabs button')) o.classList.toggle('active', o.dataset.tab === name);
  // The side pane's tabs; a live room's Q&A board lives outside them, always shown.
  for (const t of $('side-pane').querySelectorAll('.tab')) t.hidden = t.id !== 'tab-' + name;
  if (name === 'qa') loadQuestions();
  if (name === 'mod') loadReports();
  if (name === 'progress' && engagement) engagement.showProgress();
  if (classroom) classroom.showTab(name);
}
for (const b of document.querySelectorAll('.tabs button')) {
  b.addEventListener('click', () => showTab(b.dataset.tab));
}

/// The phone's one visible pane (`rooms`, `qa`, `chat` or `side`), marked in the bottom bar.
function setView(view) {
  document.body.dataset.view = view;
  for (const b of document.querySelectorAll('#mobile-nav button')) {
    b.classList.toggle('active', b.dataset.view === view);
    if (b.dataset.view === view) b.setAttribute('aria-current', 'page');
    else b.removeAttribute('aria-current');
  }
}
for (const b of document.querySelectorAll('#mobile-nav button')) {
  b.addEventListener('click', () => setView(b.dataset.view));
}

/// Live rooms: the Q&A board moves to the middle (the phone's first view), the chat to the
/// side. Other rooms: Q&A is a tab of the side pane again.
function setLiveLayout(live) {
  const qa = $('tab-qa');
  $('app').classList.toggle('live', live);
  $('qa-pane').hidden = !live;
  $('qa-tab').hidden = live;
  $('nav-qa').hidden = !live;
  $('nav-side').textContent = live ? 'People' : 'People · Q&A';
  if (live && qa.parentElement !== $('qa-pane')) {
    $('qa-pane').append(qa);
    qa.hidden = false;
    if ($('qa-tab').classList.contains('active')) showTab('people');
  } else if (!live && qa.parentElement !== $('side-pane')) {
    $('side-pane').insertBefore(qa, $('tab-av'));
    qa.hidden = !$('qa-tab').classList.contains('active');
  }
}

// -- boot ------------------------------------------------------------------------------------

setView(document.body.dataset.view || 'chat');
const token = tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
if (token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  start(token);
} else {
  showSignIn();
}
