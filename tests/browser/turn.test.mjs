// A real TURN server (coturn, REST-API shared secret) with real browsers: a 1v1 call forced
// through TURN (iceTransportPolicy 'relay') connects with the credentials the server hands
// out in `ice_servers` and its selected candidate pair is relay; credentials computed here
// with the same scheme are refused by coturn once expired (no relay candidate, never
// connected) and accepted with a future expiry.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startRig, openClient, mediaGrowth, dumpLogs, within, sleep,
  startCoturn, turnCredential,
} from './lib/harness.mjs';

const SECRET = 'browser-test-turn-secret';
let turn, rig, server, page, browser, clients;

before(async () => {
  turn = await startCoturn(SECRET);
  rig = await startRig({
    STUDYHALL_TURN_URLS: turn.url,
    STUDYHALL_TURN_SECRET: SECRET,
    STUDYHALL_TURN_TTL_S: '600',
  });
  ({ server, page, browser, clients } = rig);
});


after(async () => {
  if (rig) await rig.stop();
  if (turn) await turn.stop();
});


/// Two fresh browsers, tutor calls student; `iceServers` overrides the server's list on both
/// sides (else they use `ice_servers` from the replies). Returns the pair and the call id.
async function relayCall(tutorId, studentId, iceServers) {
  const tutor = await openClient(browser, page.url, server.wsUrl, await server.token(tutorId, { role: 'tutor' }), tutorId);
  const student = await openClient(browser, page.url, server.wsUrl, await server.token(studentId), studentId);
  clients.push(tutor, student);
  const constraints = { video: { width: 160, height: 120, frameRate: 10 }, audio: true };
  await tutor.eval((c) => window.sh.media(c), constraints);
  await student.eval((c) => window.sh.media(c), constraints);
  const opts = { iceTransportPolicy: 'relay', ...(iceServers ? { iceServers } : {}) };
  const accepting = student.eval((o) => window.sh.acceptCall(o), opts);
  const placed = await tutor.eval(([to, o]) => window.sh.call(to, { audio: true, video: true }, o), [studentId, opts]);
  assert.equal(placed.type, 'ok', JSON.stringify(placed));
  const accepted = await accepting;
  assert.equal(accepted.type, 'ok', JSON.stringify(accepted));
  return { tutor, student, id: placed.call_id, placed, accepted };
}

test('TURN: relay-only call connects with the server-issued credentials', { timeout: 90000 }, async () => {
  let pair = [];
  try {
    const { tutor, student, id, placed, accepted } = await relayCall('tutor1', 'student1');
    pair = [tutor, student];
    const now = Math.floor(Date.now() / 1000);
    for (const [who, reply] of [['tutor1', placed], ['student1', accepted]]) {
      const turnEntry = reply.ice_servers.find((s) => s.urls.includes(turn.url));
      assert.ok(turnEntry, 'ice_servers carries the TURN url: ' + JSON.stringify(reply.ice_servers));
      const [expiry, user] = turnEntry.username.split(':');
      assert.equal(user, who);
      assert.ok(Math.abs(Number(expiry) - (now + 600)) <= 5, 'expiry is now + TTL: ' + turnEntry.username);
      assert.equal(turnEntry.credential, turnCredential(SECRET, who, Number(expiry)).credential);
    }
    await within(30000, 'relay call connected', Promise.all([
      tutor.eval((k) => window.sh.waitConnected(k), id),
      student.eval((k) => window.sh.waitConnected(k), id),
    ]));
    for (const c of pair) {
      const info = await c.eval((k) => window.sh.peerInfo(k), id);
      assert.ok(info.localCandidates.length > 0 && info.localCandidates.every((t) => t === 'relay'),
        c.name + ' gathered only relay candidates: ' + info.localCandidates);
    }
    const [gt, gs] = await Promise.all([mediaGrowth(tutor, id), mediaGrowth(student, id)]);
    console.log('relay: tutor receives', JSON.stringify(gt), '; student receives', JSON.stringify(gs));
    for (const [c, g] of [[tutor, gt], [student, gs]]) {
      assert.equal(g.pair && g.pair.local, 'relay', c.name + ' selected pair is local relay: ' + JSON.stringify(g.pair));
      assert.ok(g.videoFrames > 0, c.name + ' decodes video through TURN');
      assert.ok(g.audioBytes > 0, c.name + ' receives audio through TURN');
    }
  } catch (e) {
    dumpLogs(pair);
    console.log('--- coturn ---\n' + turn.log().split('\n').slice(-40).join('\n'));
    throw e;
  }
});

test('TURN: an expired credential is refused, a future one works', { timeout: 90000 }, async () => {
  const now = Math.floor(Date.now() / 1000);
  let pair = [];
  try {
    // Expired an hour ago: coturn answers 401, no relay candidate, the call never connects.
    const old = turnCredential(SECRET, 'tutor2', now - 3600);
    const expired = [{ urls: [turn.url], ...old }];
    const a = await relayCall('tutor2', 'student2', expired);
    pair = [a.tutor, a.student];
    // Gathering ends without a relay candidate; then give the pair 3 s more to (not) connect.
    for (const c of pair) {
      await c.eval(async (k) => {
        const t0 = Date.now();
        while (window.sh.peerInfo(k).iceGatheringState !== 'complete' && Date.now() - t0 < 15000) {
          await new Promise((r) => setTimeout(r, 100));
        }
      }, a.id);
    }
    await sleep(3000);
    for (const c of pair) {
      const info = await c.eval((k) => window.sh.peerInfo(k), a.id);
      console.log(c.name + ' with expired credential: ' + JSON.stringify(info));
      assert.notEqual(info.connectionState, 'connected');
      assert.ok(!info.states.includes('connected'), c.name + ' never connected');
      assert.ok(!info.localCandidates.includes('relay'), c.name + ' gathered no relay candidate');
      assert.equal(info.iceGatheringState, 'complete');
      assert.ok(info.candidateErrors.some((e) => e.errorCode === 401), c.name + ' saw icecandidateerror 401 from coturn');
    }

    // The same scheme with a future expiry: connects relay-to-relay.
    const fresh = turnCredential(SECRET, 'tutor3', now + 600);
    const b = await relayCall('tutor3', 'student3', [{ urls: [turn.url], ...fresh }]);
    pair = [b.tutor, b.student];
    await within(30000, 'future-credential call connected', Promise.all([
      b.tutor.eval((k) => window.sh.waitConnected(k), b.id),
      b.student.eval((k) => window.sh.waitConnected(k), b.id),
    ]));
    const st = await b.tutor.eval((k) => window.sh.stats(k), b.id);
    assert.equal(st.pair && st.pair.local, 'relay', JSON.stringify(st.pair));
  } catch (e) {
    dumpLogs(pair);
    console.log('--- coturn ---\n' + turn.log().split('\n').slice(-40).join('\n'));
    throw e;
  }
});
