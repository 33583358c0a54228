// Whiteboards with the real `yjs` client (npm yjs, y-protocols, lib0) against the server
// binary: two Y.Docs edit one board concurrently and converge through the server; one goes
// offline, both keep editing (the offline one on stale state), it reconnects, syncs with step 1
// and step 2, and both end identical; a fresh client then syncs the same content from the
// server. A student without a grant syncs but gets `forbidden` for an update, learns of a
// grant at once (the server's step 1 reaches its open session), draws, and is refused again
// after the grant is taken back.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer } from './lib/harness.mjs';
import * as awarenessProtocol from 'y-protocols/awareness';
import { Session, BoardPeer, until, poll, Y } from './lib/yboard.mjs';

const ROOM = 'geo-1';
const BOARD = 'main';
let server;
const sessions = [];

before(async () => {
  server = await startServer({ STUDYHALL_BOARD_SAVE_MS: '200' });
  await server.room(ROOM, 'class');
});

after(async () => {
  for (const s of sessions) await s.close().catch(() => {});
  if (server) await server.stop();
});

async function open(user, extra) {
  const s = await Session.open(server.wsUrl, await server.token(user, extra));
  sessions.push(s);
  return s;
}

/// A stroke as the web client stores it: a Y.Map in the `strokes` Y.Array.
function stroke(doc, id, by) {
  const m = new Y.Map();
  m.set('id', id);
  m.set('by', by);
  m.set('kind', 'pen');
  m.set('points', [1, 2, 3, 4]);
  doc.getArray('strokes').push([m]);
}

const ids = (peer) => peer.doc.getArray('strokes').toJSON().map((s) => s.id);
/// The document's content (its root types named, as a fresh Y.Doc has not defined them yet).
const content = (peer) => ({ strokes: peer.doc.getArray('strokes').toJSON(), title: peer.doc.getText('title').toString() });
const same = (a, b) => JSON.stringify(content(a)) === JSON.stringify(content(b));

test('two Yjs clients converge through the server, also after one edited offline', async () => {
  const host = await open('teach', { role: 'tutor', rooms: { [ROOM]: 'host' } });
  await host.request({ type: 'join', room: ROOM });
  await host.request({ type: 'board_grant', room: ROOM, board: BOARD, user: 'ann', draw: true });

  const a = new BoardPeer(ROOM, BOARD);
  const b = new BoardPeer(ROOM, BOARD);
  await a.attach(host);
  await b.attach(await open('ann'));
  assert.equal(a.serverStep1s, 1, 'the host may draw: the server sent its step 1');
  assert.equal(b.serverStep1s, 1, 'ann was granted: the server sent its step 1');

  // Concurrent edits: both change the document before either hears of the other.
  a.doc.transact(() => {
    stroke(a.doc, 'a1', 'teach');
    a.doc.getText('title').insert(0, 'Triangles');
  });
  b.doc.transact(() => {
    stroke(b.doc, 'b1', 'ann');
    b.doc.getText('title').insert(0, 'Angles ');
  });
  stroke(a.doc, 'a2', 'teach');
  stroke(b.doc, 'b2', 'ann');
  await until('concurrent edits converge', [a.doc, b.doc], () => same(a, b) && ids(a).length === 4);
  assert.deepEqual(new Set(ids(a)), new Set(['a1', 'a2', 'b1', 'b2']));
  assert.equal(a.doc.getText('title').toString().length, 'Triangles'.length + 'Angles '.length);
  assert.deepEqual(a.errors, []);
  assert.deepEqual(b.errors, []);

  // b goes offline; a keeps editing; b edits its stale copy (including a delete of a shared
  // stroke and an insert into the shared text).
  const bOld = b.session;
  b.detach();
  await bOld.close();
  stroke(a.doc, 'a3', 'teach');
  a.doc.getText('title').insert(0, '# ');
  stroke(a.doc, 'a4', 'teach');
  stroke(b.doc, 'b3-offline', 'ann');
  const bStrokes = b.doc.getArray('strokes');
  bStrokes.delete(ids(b).indexOf('a1'), 1);
  b.doc.getText('title').insert(b.doc.getText('title').length, '!');
  assert.ok(!ids(b).includes('a3') && !ids(a).includes('b3-offline'), 'the copies differ while b is offline');

  // b reconnects: its step 1 brings what a did, the server's step 1 takes what b did.
  await b.attach(await open('ann'));
  await until('offline edits converge', [a.doc, b.doc], () => same(a, b) && ids(a).includes('b3-offline') && ids(b).includes('a4'));
  assert.deepEqual(new Set(ids(a)), new Set(['a2', 'a3', 'a4', 'b1', 'b2', 'b3-offline']));
  assert.ok(a.doc.getText('title').toString().startsWith('# '));
  assert.ok(a.doc.getText('title').toString().endsWith('!'));
  assert.deepEqual(a.errors, []);
  assert.deepEqual(b.errors, []);

  // A fresh client gets the same document from the server alone.
  const c = new BoardPeer(ROOM, BOARD);
  await c.attach(await open('cid'));
  assert.deepEqual(content(c), content(a), 'a fresh client syncs to the same content');
  assert.equal(c.serverStep1s, 0, 'a student without a grant gets no server step 1');
});

test('a student without a grant syncs but cannot draw; a grant and its revocation apply at once', async () => {
  const host = await open('teach2', { role: 'tutor', rooms: { [ROOM]: 'host' } });
  const h = new BoardPeer(ROOM, 'second');
  await h.attach(host);
  stroke(h.doc, 'h1', 'teach2');
  const kid = new BoardPeer(ROOM, 'second');
  await kid.attach(await open('kid'));
  await until('the student sees the host stroke', [kid.doc], () => ids(kid).includes('h1'));
  assert.equal(kid.serverStep1s, 0);

  stroke(kid.doc, 'k1', 'kid');
  await poll('the update is refused', () => kid.errors.length === 1);
  assert.deepEqual(kid.errors, ['forbidden']);
  assert.ok(!ids(h).includes('k1'), 'nothing of the refused update reached the host');
  // Awareness (a cursor) is relayed for everyone joined, also without a grant.
  // (Awareness objects run a timer: destroyed whatever happens.)
  const aw = new awarenessProtocol.Awareness(kid.doc);
  const seen = new awarenessProtocol.Awareness(new Y.Doc());
  try {
    aw.setLocalState({ user: 'kid', cursor: [40, 50] });
    const update = awarenessProtocol.encodeAwarenessUpdate(aw, [kid.doc.clientID]);
    await kid.sendAwareness(update);
    await poll('the host gets the awareness update', () => h.awareness.length === 1);
    assert.deepEqual([...h.awareness[0]], [...update]);
    awarenessProtocol.applyAwarenessUpdate(seen, h.awareness[0], 'test');
    assert.deepEqual(seen.getStates().get(kid.doc.clientID), { user: 'kid', cursor: [40, 50] });
  } finally {
    aw.destroy();
    seen.destroy();
  }

  // The grant reaches the student's open session as the server's step 1, answered with the
  // stroke the server refused before.
  await host.request({ type: 'board_grant', room: ROOM, board: 'second', user: 'kid', draw: true });
  await poll('the server step 1 after the grant', () => kid.serverStep1s === 1);
  await until('the earlier stroke arrives once granted', [h.doc], () => ids(h).includes('k1'));
  stroke(kid.doc, 'k2', 'kid');
  await until('a granted update arrives', [h.doc], () => ids(h).includes('k2'));
  assert.deepEqual(kid.errors, ['forbidden']);

  await host.request({ type: 'board_grant', room: ROOM, board: 'second', user: 'kid', draw: false });
  stroke(kid.doc, 'k3', 'kid');
  await poll('refused again after the revocation', () => kid.errors.length === 2);
  assert.deepEqual(kid.errors, ['forbidden', 'forbidden']);
  assert.ok(!ids(h).includes('k3'));

  // Members cannot grant.
  await assert.rejects(
    kid.session.request({ type: 'board_grant', room: ROOM, board: 'second', user: 'kid', draw: true }),
    (e) => e.code === 'forbidden',
  );
});
