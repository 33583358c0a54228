// Publishing rights in a `live` room with real browsers: a student who is not on stage gets
// `forbidden` when relaying an offer that would send audio/video to the host, while the
// student's recvonly answer to the host's offer is relayed, the pair connects and the student
// receives the host's media. Once the host puts the student on stage, a sending offer passes;
// once the student is off stage again because they left the room, it is refused again.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRig, openClient, mediaGrowth, dumpLogs, within } from './lib/harness.mjs';

let rig, server, page, browser, clients;

before(async () => {
  rig = await startRig();
  ({ server, page, browser, clients } = rig);
  await server.room('live-1', 'live');
});


after(async () => {
  if (rig) await rig.stop();
});


test('live room: only publishers may send media; a recvonly answer is relayed', { timeout: 90000 }, async () => {
  const host = await openClient(browser, page.url, server.wsUrl,
    await server.token('host', { role: 'tutor', rooms: { 'live-1': 'host' } }), 'host');
  const kid = await openClient(browser, page.url, server.wsUrl, await server.token('kid'), 'kid');
  clients.push(host, kid);
  try {
    const constraints = { video: { width: 320, height: 240, frameRate: 15 }, audio: true };
    for (const c of [host, kid]) {
      const j = await c.eval(() => window.sh.request({ type: 'join', room: 'live-1' }));
      assert.equal(j.type, 'ok', JSON.stringify(j));
      await c.eval((x) => window.sh.media(x), constraints);
    }
    const hj = await host.eval(() => window.sh.avJoin('live-1'));
    assert.equal(hj.type, 'ok', JSON.stringify(hj));
    assert.equal(hj.publish, true, 'the host publishes');
    const kj = await kid.eval(() => window.sh.avJoin('live-1', { recvOnly: true, noOffers: true }));
    assert.equal(kj.type, 'ok', JSON.stringify(kj));
    assert.equal(kj.publish, false, 'a student off stage does not publish');
    assert.deepEqual(kj.peers.map((p) => p.session), [host.session]);

    // The student's offer would send camera and microphone: refused, and not relayed.
    const sending = await kid.eval(() => window.sh.makeOffer());
    assert.match(sending.sdp, /a=sendrecv/);
    const refused = await kid.eval(([to, sdp]) =>
      window.sh.request({ type: 'signal', room: 'live-1', to, data: { sdp } }), [host.session, sending]);
    assert.equal(refused.type, 'error', JSON.stringify(refused));
    assert.equal(refused.code, 'forbidden');

    // The host offers (sending); the student answers recvonly: relayed, connected, media flows.
    const key = await host.eval((s) => window.sh.avOffer('live-1', s), kid.session);
    const kidKey = 'live-1/' + host.session;
    await within(30000, 'host and student connected', Promise.all([
      host.eval((k) => window.sh.waitConnected(k), key),
      kid.eval((k) => window.sh.waitConnected(k), kidKey),
    ]));
    const kidInfo = await kid.eval((k) => window.sh.peerInfo(k), kidKey);
    assert.deepEqual(kidInfo.signalErrors, [], 'every signal of the student was relayed');
    const answer = await host.eval(() => window.sh.events().find((e) => e.type === 'signal' && e.data.sdp));
    assert.equal(answer.data.sdp.type, 'answer');
    assert.match(answer.data.sdp.sdp, /a=recvonly/);
    assert.doesNotMatch(answer.data.sdp.sdp, /a=(sendrecv|sendonly)/);
    const hostInfo = await host.eval((k) => window.sh.peerInfo(k), key);
    assert.equal(hostInfo.remoteDescription, 'answer');
    // Only the student's sending offer was refused: the host got no offer from the student.
    const offers = await host.eval(() => window.sh.events().filter((e) => e.type === 'signal' && e.data.sdp && e.data.sdp.type === 'offer').length);
    assert.equal(offers, 0);

    const g = await mediaGrowth(kid, kidKey);
    console.log('student receives from host', JSON.stringify(g));
    assert.ok(g.videoFrames > 0, 'the student decodes the host video');
    assert.ok(g.audioBytes > 0, 'the student receives the host audio');

    // On stage, the same kind of offer is relayed.
    const staged = await host.eval((s) => window.sh.request({ type: 'stage', room: 'live-1', user: 'kid', on: true }), kid.session);
    assert.equal(staged.type, 'ok', JSON.stringify(staged));
    const again = await kid.eval(() => window.sh.makeOffer());
    const passed = await kid.eval(([to, sdp]) =>
      window.sh.request({ type: 'signal', room: 'live-1', to, data: { sdp } }), [host.session, again]);
    assert.equal(passed.type, 'ok', 'on stage the student may publish: ' + JSON.stringify(passed));
  } catch (e) {
    dumpLogs(clients);
    throw e;
  }
});

test('live room: leaving the room ends the right to publish that the stage gave', { timeout: 60000 }, async () => {
  await server.room('live-2', 'live');
  const host = await openClient(browser, page.url, server.wsUrl,
    await server.token('host2', { role: 'tutor', rooms: { 'live-2': 'host' } }), 'host2');
  const kid = await openClient(browser, page.url, server.wsUrl, await server.token('kid2'), 'kid2');
  clients.push(host, kid);
  try {
    for (const c of [host, kid]) {
      const j = await c.eval(() => window.sh.request({ type: 'join', room: 'live-2' }));
      assert.equal(j.type, 'ok', JSON.stringify(j));
    }
    await kid.eval(() => window.sh.media({ video: { width: 160, height: 120, frameRate: 10 }, audio: true }));
    assert.equal((await host.eval(() => window.sh.request({ type: 'av_join', room: 'live-2' }))).type, 'ok');
    const kj = await kid.eval(() => window.sh.request({ type: 'av_join', room: 'live-2' }));
    assert.equal(kj.publish, false);
    const offer = () => kid.eval(async (to) => {
      const sdp = await window.sh.makeOffer();
      return window.sh.request({ type: 'signal', room: 'live-2', to, data: { sdp } });
    }, host.session);

    const staged = await host.eval(() => window.sh.request({ type: 'stage', room: 'live-2', user: 'kid2', on: true }));
    assert.equal(staged.type, 'ok', JSON.stringify(staged));
    assert.equal((await offer()).type, 'ok', 'on stage the student may publish');

    // Leaving the room takes the student off stage (everyone is told)...
    assert.equal((await kid.eval(() => window.sh.request({ type: 'leave', room: 'live-2' }))).type, 'ok');
    await host.eval(() => window.sh.waitEvent({ type: 'stage', room: 'live-2', on: false }));
    // ...and back in the room the student is not on stage,
    const back = await kid.eval(() => window.sh.request({ type: 'join', room: 'live-2' }));
    assert.equal(back.type, 'ok', JSON.stringify(back));
    assert.ok(!back.stage.some((u) => u.id === 'kid2'), 'not on stage after leaving: ' + JSON.stringify(back.stage));
    // so an offer that sends media must be refused again.
    const after = await offer();
    assert.equal(after.type, 'error', 'off stage after leaving, the student still publishes: ' + JSON.stringify(after));
    assert.equal(after.code, 'forbidden');
  } catch (e) {
    dumpLogs([host, kid]);
    throw e;
  }
});
