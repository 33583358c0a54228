// 1v1 call between two real browsers through the server: the tutor `call`s, the student
// `call_accept`s, offer, answer and trickled candidates go only through `signal`; both peer
// connections reach `connected` and video frames and audio bytes keep arriving on both sides.
// Also the call's rights: a third user cannot signal into it (`forbidden`). Saves a
// screenshot of the tutor's page as a CI artifact.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import {
  startRig, openClient, mediaGrowth, dumpLogs, artifactDir, within,
} from './lib/harness.mjs';

let rig, server, page, browser, clients;

before(async () => {
  rig = await startRig();
  ({ server, page, browser, clients } = rig);
});


after(async () => {
  if (rig) await rig.stop();
});


test('1v1 call: browsers connect through signal and media flows both ways', { timeout: 90000 }, async () => {
  const tutor = await openClient(browser, page.url, server.wsUrl, await server.token('tutor', { role: 'tutor' }), 'tutor');
  const student = await openClient(browser, page.url, server.wsUrl, await server.token('student'), 'student');
  const eve = await openClient(browser, page.url, server.wsUrl, await server.token('eve'), 'eve');
  clients.push(tutor, student, eve);
  try {
    const constraints = { video: { width: 320, height: 240, frameRate: 15 }, audio: true };
    await tutor.eval((c) => window.sh.media(c), constraints);
    await student.eval((c) => window.sh.media(c), constraints);

    const accepting = student.eval(() => window.sh.acceptCall());
    const placed = await tutor.eval(() => window.sh.call('student', { audio: true, video: true }));
    assert.equal(placed.type, 'ok', JSON.stringify(placed));
    const accepted = await accepting;
    assert.equal(accepted.type, 'ok', JSON.stringify(accepted));
    const id = placed.call_id;
    assert.equal(accepted.call_id, id);
    assert.equal(accepted.incoming.from.user, 'tutor');
    assert.equal(accepted.incoming.from.session, tutor.session);
    assert.deepEqual(accepted.incoming.media, { audio: true, video: true });

    const waits = await within(30000, 'both connected', Promise.all([
      tutor.eval((k) => window.sh.waitConnected(k), id),
      student.eval((k) => window.sh.waitConnected(k), id),
    ]));
    console.log('connected after ' + waits.join(' / ') + ' ms');

    // Everything both sides exchanged went through `signal` with this call id.
    for (const [c, other] of [[tutor, student], [student, tutor]]) {
      const sigs = await c.eval(() => window.sh.events().filter((e) => e.type === 'signal'));
      assert.ok(sigs.some((s) => s.data.sdp), c.name + ' got an sdp through signal');
      assert.ok(sigs.some((s) => s.data.candidate), c.name + ' got candidates through signal');
      for (const s of sigs) {
        assert.equal(s.call_id, id);
        assert.equal(s.from.session, other.session);
      }
    }

    const [gt, gs] = await Promise.all([mediaGrowth(tutor, id), mediaGrowth(student, id)]);
    console.log('tutor receives', JSON.stringify(gt), '; student receives', JSON.stringify(gs));
    for (const [who, g] of [['tutor', gt], ['student', gs]]) {
      assert.ok(g.videoFrames > 0, who + ': inbound video framesDecoded grows');
      assert.ok(g.audioBytes > 0, who + ': inbound audio bytesReceived grows');
    }

    await tutor.page.screenshot({ path: path.join(artifactDir(), 'call-1v1-tutor.png') });

    // Rights: a third user may not signal into the call, neither an sdp nor a candidate.
    const offer = await tutor.eval(() => window.sh.makeOffer());
    const r1 = await eve.eval(([cid, sdp]) => window.sh.request({ type: 'signal', call_id: cid, data: { sdp } }), [id, offer]);
    assert.equal(r1.type, 'error', JSON.stringify(r1));
    assert.equal(r1.code, 'forbidden');
    const r2 = await eve.eval((cid) => window.sh.request({ type: 'signal', call_id: cid, data: { candidate: null } }), id);
    assert.equal(r2.code, 'forbidden', JSON.stringify(r2));
    // ...and nothing of eve's reached the parties.
    for (const c of [tutor, student]) {
      const fromEve = await c.eval(() => window.sh.events().filter((e) => e.type === 'signal' && e.from.user === 'eve').length);
      assert.equal(fromEve, 0);
    }
    // The call is still up.
    assert.equal(await tutor.eval((k) => window.sh.peerInfo(k).connectionState, id), 'connected');
  } catch (e) {
    dumpLogs(clients);
    throw e;
  }
});
