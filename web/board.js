// board.js owns the web client's shared whiteboard: a panel over the room view with a canvas
// bound to the room's board `main` (a Yjs document, protocol.md §22), the tools (pen,
// rectangle, ellipse, text, eraser), colours, and undo/redo of one's own strokes only
// (Y.UndoManager on local changes). Strokes are Y.Maps in the Y.Array `strokes`:
// {id, by, kind: pen|rect|ellipse|text, color, width, pts: [x, y, ...], text}, in board
// coordinates (BOARD_W × BOARD_H, scaled to the canvas). Sync goes through the protocol client
// (BoardLink in studyhall.js); Yjs itself (web/vendor/yjs.mjs) loads when the board is first
// opened. Host/ta draw and let others draw (`board_grant`); everyone else sees the board
// read-only with a note until granted. Text from others is drawn on the canvas, never put
// into the page as HTML. `window.__board` exposes the state for tests.

import { BoardLink } from './studyhall.js';

const BOARD = 'main';
const BOARD_W = 1600;
const BOARD_H = 1000;
const COLORS = ['#1d2330', '#c8363a', '#2f6fde', '#1f8a4c', '#c77700', '#8e44ad'];
const TOOLS = [
  ['pen', '✏️ Pen'], ['rect', '▭ Rectangle'], ['ellipse', '◯ Ellipse'], ['text', 'T Text'], ['eraser', '⌫ Eraser'],
];
const MAX_TEXT = 200; // characters of one text item
const MAX_POINTS = 2000; // points of one pen stroke (keeps one stroke well within a board message)
const ERASE_RADIUS = 12; // board units around the pointer that an eraser stroke takes

/// `ctx`: {client, el, $, toast, fail, active: () => room id, role: () => room role}.
export function setupBoard(ctx) {
  const { el, $, toast } = ctx;
  const isMod = () => ['host', 'ta'].includes(ctx.role());
  let Y = null; // web/vendor/yjs.mjs, loaded on first open
  let state = null; // {room, doc, strokes, link, undo, local}
  let tool = 'pen';
  let color = COLORS[0];
  let drawing = null; // the stroke being drawn: {kind, pts}
  let erasing = false;
  const granted = new Set(); // users this host/ta let draw (from this page: the server does not list grants)
  let grantsRoom = null; // the room `granted` is about
  let frame = 0;

  // -- the panel -----------------------------------------------------------------------------

  const canvas = el('canvas', { id: 'board-canvas', width: BOARD_W, height: BOARD_H, 'aria-label': 'whiteboard' });
  const toolButtons = TOOLS.map(([t, label]) =>
    el('button', { type: 'button', class: 'tool', dataset: { tool: t }, 'aria-pressed': 'false', onclick: () => setTool(t) }, label));
  const swatches = COLORS.map((c) =>
    el('button', { type: 'button', class: 'swatch', style: 'background:' + c, dataset: { color: c }, 'aria-label': 'colour ' + c, onclick: () => setColor(c) }));
  const textInput = el('input', { id: 'board-text', maxlength: MAX_TEXT, placeholder: 'text to place', 'aria-label': 'text to place' });
  const undoBtn = el('button', { type: 'button', id: 'board-undo', onclick: () => state && state.undo.undo() }, '↶ Undo');
  const redoBtn = el('button', { type: 'button', id: 'board-redo', onclick: () => state && state.undo.redo() }, '↷ Redo');
  const note = el('p', { id: 'board-note', class: 'muted', role: 'status' });
  const grants = el('div', { id: 'board-grants', class: 'board-grants', hidden: true });
  const tools = el('div', { class: 'row board-tools' }, toolButtons, swatches, textInput, undoBtn, redoBtn);
  const panel = el('section', { id: 'board-panel', class: 'board-panel', 'aria-label': 'whiteboard', hidden: true },
    el('div', { class: 'board-head' },
      el('h2', { id: 'board-title', text: 'Board' }),
      el('button', { type: 'button', id: 'board-close', 'aria-label': 'close board', onclick: close }, '✕')),
    tools, note, grants, el('div', { class: 'board-wrap' }, canvas));
  $('app').append(panel);

  function setTool(t) {
    tool = t;
    for (const b of toolButtons) b.setAttribute('aria-pressed', String(b.dataset.tool === t));
    canvas.dataset.tool = t;
  }
  function setColor(c) {
    color = c;
    for (const b of swatches) b.classList.toggle('active', b.dataset.color === c);
  }
  setTool('pen');
  setColor(COLORS[0]);

  // -- opening a room's board ---------------------------------------------------------------

  async function open() {
    const room = ctx.active();
    if (!room) return;
    panel.hidden = false;
    $('board-title').textContent = 'Board · ' + room;
    if (state && state.room === room) return render();
    try {
      Y = Y || (await import('./vendor/yjs.mjs'));
    } catch (e) {
      ctx.fail(e);
      return;
    }
    attach(room);
  }

  function close() {
    panel.hidden = true;
  }

  /// A fresh document for `room`'s board, synced from the server.
  function attach(room) {
    detach();
    const doc = new Y.Doc();
    const strokes = doc.getArray('strokes');
    const local = { local: true }; // the origin of this page's own changes
    const undo = new Y.UndoManager(strokes, { trackedOrigins: new Set([local]), captureTimeout: 0 });
    const link = new BoardLink(ctx.client, room, BOARD, Y, doc, isMod());
    state = { room, doc, strokes, link, undo, local };
    strokes.observeDeep(schedule);
    undo.on('stack-item-added', renderTools);
    undo.on('stack-item-popped', renderTools);
    link.on('access', renderAccess);
    link.on('synced', render);
    link.on('refused', (err) => {
      // The server does not hold what was just drawn: drop the local copy and sync afresh.
      if (err.code === 'forbidden') toast('You may not draw on this board (any more).');
      else toast('Not saved on the board: ' + (err.detail || err.message));
      if (state && state.link === link) attach(room);
    });
    link.start();
    renderAccess();
    render();
  }

  function detach() {
    if (!state) return;
    state.link.stop();
    state.undo.destroy();
    state.doc.destroy();
    state = null;
    drawing = null;
  }

  function mayDraw() {
    return !!(state && state.link.mayDraw);
  }

  // -- drawing -------------------------------------------------------------------------------

  function at(e) {
    const r = canvas.getBoundingClientRect();
    return [
      Math.round(((e.clientX - r.left) * BOARD_W) / r.width),
      Math.round(((e.clientY - r.top) * BOARD_H) / r.height),
    ];
  }

  function commit(fields) {
    const { doc, strokes, local } = state;
    doc.transact(() => {
      const m = new Y.Map();
      m.set('id', ctx.client.me.user.id + '-' + Date.now().toString(36) + Math.random().toString(36).slice(2, 6));
      m.set('by', ctx.client.me.user.id);
      for (const [k, v] of Object.entries(fields)) m.set(k, v);
      strokes.push([m]);
    }, local);
  }

  function eraseAt([x, y]) {
    const { doc, strokes, local } = state;
    const hit = [];
    strokes.forEach((m, i) => {
      if (hits(m.toJSON(), x, y)) hit.push(i);
    });
    if (!hit.length) return;
    doc.transact(() => {
      for (const i of hit.reverse()) strokes.delete(i, 1);
    }, local);
  }

  canvas.addEventListener('pointerdown', (e) => {
    if (!mayDraw() || e.button !== 0) return;
    const p = at(e);
    if (tool === 'text') {
      const text = textInput.value.trim().slice(0, MAX_TEXT);
      if (!text) {
        toast('Type the text to place first.');
        textInput.focus();
        return;
      }
      commit({ kind: 'text', color, width: 28, pts: p, text });
      return;
    }
    canvas.setPointerCapture(e.pointerId);
    if (tool === 'eraser') {
      erasing = true;
      eraseAt(p);
      return;
    }
    drawing = { kind: tool, color, width: tool === 'pen' ? 4 : 3, pts: tool === 'pen' ? p : [...p, ...p] };
    schedule();
  });
  canvas.addEventListener('pointermove', (e) => {
    if (erasing) return eraseAt(at(e));
    if (!drawing) return;
    const p = at(e);
    if (drawing.kind === 'pen') {
      if (drawing.pts.length < MAX_POINTS * 2) drawing.pts.push(...p);
    } else {
      drawing.pts[2] = p[0];
      drawing.pts[3] = p[1];
    }
    schedule();
  });
  const end = (e) => {
    erasing = false;
    if (!drawing) return;
    const d = drawing;
    drawing = null;
    if (e.type === 'pointerup') {
      const p = at(e);
      if (d.kind === 'pen') {
        if (d.pts.length < MAX_POINTS * 2) d.pts.push(...p);
      } else {
        d.pts[2] = p[0];
        d.pts[3] = p[1];
      }
      if (mayDraw()) commit(d);
    }
    schedule();
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  panel.addEventListener('keydown', (e) => {
    if (!state || e.target === textInput || !(e.ctrlKey || e.metaKey) || e.key.toLowerCase() !== 'z') return;
    e.preventDefault();
    if (e.shiftKey) state.undo.redo();
    else state.undo.undo();
  });

  // -- rendering -----------------------------------------------------------------------------

  function schedule() {
    if (!frame) frame = requestAnimationFrame(() => {
      frame = 0;
      render();
    });
  }

  function render() {
    const g = canvas.getContext('2d');
    g.fillStyle = '#ffffff';
    g.fillRect(0, 0, BOARD_W, BOARD_H);
    if (state) for (const m of state.strokes) paint(g, m.toJSON());
    if (drawing) paint(g, drawing);
    renderTools();
  }

  function renderTools() {
    const draw = mayDraw();
    for (const b of [...toolButtons, ...swatches, textInput]) b.disabled = !draw;
    undoBtn.disabled = !draw || !state || !state.undo.canUndo();
    redoBtn.disabled = !draw || !state || !state.undo.canRedo();
  }

  function renderAccess() {
    const draw = mayDraw();
    panel.dataset.draw = String(draw);
    note.textContent = draw ? '' : 'View only: the host or a TA can let you draw on this board.';
    note.hidden = draw;
    renderTools();
    renderGrants();
  }

  /// Host/ta: everyone online in the room who is not host/ta, with a toggle to let them draw.
  function renderGrants() {
    grants.hidden = !isMod();
    if (!isMod()) return grants.replaceChildren();
    const room = ctx.client.rooms.get(ctx.active());
    const users = room ? [...room.online.values()].filter((u) => u.id !== ctx.client.me.user.id && !['host', 'ta'].includes(u.role)) : [];
    grants.replaceChildren(el('span', { class: 'muted', text: users.length ? 'Let draw:' : 'No students online to let draw.' }));
    for (const u of users.sort((a, b) => a.name.localeCompare(b.name))) {
      const on = granted.has(u.id);
      grants.append(el('button', {
        type: 'button', class: on ? 'ok' : '', dataset: { user: u.id }, 'aria-pressed': String(on),
        onclick: () => grant(u.id, !on),
      }, (on ? '✓ ' : '') + u.name));
    }
  }

  async function grant(user, draw) {
    try {
      await ctx.client.request({ type: 'board_grant', room: ctx.active(), board: BOARD, user, draw });
    } catch (e) {
      return ctx.fail(e);
    }
    if (draw) granted.add(user);
    else granted.delete(user);
    renderGrants();
  }

  for (const t of ['presence', 'joined']) {
    ctx.client.on(t, (m) => {
      const id = m.room && (m.room.id || m.room);
      if (!panel.hidden && id === ctx.active()) renderGrants();
    });
  }

  window.__board = {
    get room() { return state && state.room; },
    get mayDraw() { return mayDraw(); },
    get synced() { return !!(state && state.link.synced); },
    strokes: () => (state ? state.strokes.toJSON() : []),
    canUndo: () => !!(state && state.undo.canUndo()),
    /// Pixels of the canvas that are not the white background.
    inked() {
      const d = canvas.getContext('2d').getImageData(0, 0, BOARD_W, BOARD_H).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] !== 255 || d[i + 1] !== 255 || d[i + 2] !== 255) n++;
      return n;
    },
  };

  $('board-open').addEventListener('click', open);

  return {
    open,
    close,
    /// The room on screen changed (or its role did): a board open for another room follows.
    roomChanged() {
      $('board-open').hidden = !ctx.active();
      if (grantsRoom !== ctx.active()) granted.clear();
      grantsRoom = ctx.active();
      if (state && state.room !== ctx.active()) {
        detach();
        if (!panel.hidden) open();
      } else if (state) {
        if (isMod()) state.link.setAccess(true); // host/ta always draw
        renderAccess();
      }
    },
  };
}

/// Draws one stroke.
function paint(g, s) {
  const p = Array.isArray(s.pts) ? s.pts : [];
  g.strokeStyle = g.fillStyle = typeof s.color === 'string' ? s.color : '#1d2330';
  g.lineWidth = Math.min(40, Math.max(1, Number(s.width) || 3));
  g.lineCap = g.lineJoin = 'round';
  if (s.kind === 'pen' && p.length >= 2) {
    g.beginPath();
    g.moveTo(p[0], p[1]);
    if (p.length === 2) g.lineTo(p[0] + 0.1, p[1]);
    for (let i = 2; i + 1 < p.length; i += 2) g.lineTo(p[i], p[i + 1]);
    g.stroke();
  } else if ((s.kind === 'rect' || s.kind === 'ellipse') && p.length >= 4) {
    const [x1, y1, x2, y2] = p;
    g.beginPath();
    if (s.kind === 'rect') g.rect(Math.min(x1, x2), Math.min(y1, y2), Math.abs(x2 - x1), Math.abs(y2 - y1));
    else g.ellipse((x1 + x2) / 2, (y1 + y2) / 2, Math.abs(x2 - x1) / 2, Math.abs(y2 - y1) / 2, 0, 0, 2 * Math.PI);
    g.stroke();
  } else if (s.kind === 'text' && p.length >= 2 && typeof s.text === 'string') {
    g.font = Math.min(96, Math.max(10, Number(s.width) || 28)) + 'px system-ui, sans-serif';
    g.textBaseline = 'top';
    g.fillText(s.text.slice(0, MAX_TEXT), p[0], p[1]);
  }
}

/// Whether the point (x, y) is on stroke `s`, within ERASE_RADIUS.
function hits(s, x, y) {
  const p = Array.isArray(s.pts) ? s.pts : [];
  const r = ERASE_RADIUS + (Number(s.width) || 3) / 2;
  if (s.kind === 'pen') {
    for (let i = 0; i + 1 < p.length; i += 2) {
      const j = i + 2 + 1 < p.length ? i + 2 : i;
      if (segDist(x, y, p[i], p[i + 1], p[j], p[j + 1]) <= r) return true;
    }
    return false;
  }
  if ((s.kind === 'rect' || s.kind === 'ellipse') && p.length >= 4) {
    const [x1, y1, x2, y2] = [Math.min(p[0], p[2]), Math.min(p[1], p[3]), Math.max(p[0], p[2]), Math.max(p[1], p[3])];
    if (s.kind === 'rect') {
      const inside = x >= x1 - r && x <= x2 + r && y >= y1 - r && y <= y2 + r;
      const deep = x > x1 + r && x < x2 - r && y > y1 + r && y < y2 - r;
      return inside && !deep;
    }
    const cx = (x1 + x2) / 2;
    const cy = (y1 + y2) / 2;
    const rx = Math.max(1, (x2 - x1) / 2);
    const ry = Math.max(1, (y2 - y1) / 2);
    const d = Math.hypot((x - cx) / rx, (y - cy) / ry);
    return Math.abs(d - 1) * Math.min(rx, ry) <= r;
  }
  if (s.kind === 'text' && p.length >= 2 && typeof s.text === 'string') {
    const w = s.text.length * (Number(s.width) || 28) * 0.6;
    const h = Number(s.width) || 28;
    return x >= p[0] - r && x <= p[0] + w + r && y >= p[1] - r && y <= p[1] + h + r;
  }
  return false;
}

function segDist(px, py, ax, ay, bx, by) {
  const dx = bx - ax;
  const dy = by - ay;
  const len = dx * dx + dy * dy;
  const t = len ? Math.max(0, Math.min(1, ((px - ax) * dx + (py - ay) * dy) / len)) : 0;
  return Math.hypot(px - (ax + t * dx), py - (ay + t * dy));
}
