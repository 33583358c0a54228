// The web client (web/calls.js) in a `live` room on the SFU, in headless Chromium with fake
// media: the host publishes and two students join watching only (no camera, recvonly); a
// student put on stage opens her camera, publishes through the one peer connection and is
// decoded by the host and the other student; taken off stage, her tile goes and the server no
// longer forwards her video, while the host's goes on.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { within } from './lib/harness.mjs';
import { sfuRig, T } from './lib/sfuweb.mjs';

let rig;

before(async () => {
  rig = await sfuRig();
});

after(async () => {
  if (rig) await rig.stop();
});

test('live room on the SFU: only the host and the student on stage publish', { timeout: 150000 }, async () => {
  const { sfuRoom, openUser, enterRoom, joinAv, received, waitFlowing, waitStopped, dumpLogs } = rig;
  await sfuRoom('sfu-live', 'live');
  const host = await openUser('host', 'tutor', 'sfu-live:host');
  const ann = await openUser('ann', 'student');
  const ben = await openUser('ben', 'student');
  const list = [host, ann, ben];
  try {
    for (const p of list) await enterRoom(p, 'sfu-live');
    assert.deepEqual(await joinAv(host), { mode: 'sfu', publish: true });
    for (const p of [ann, ben]) {
      assert.deepEqual(await joinAv(p), { mode: 'sfu', publish: false }, p.user);
      // Watching only: no camera, no sending section.
      assert.equal(await p.evaluate(() => window.studyhall.calls.local), null);
    }
    await waitFlowing([ann, ben], () => ['host']);
    for (const p of [ann, ben]) assert.equal((await received(p)).pcs, 1);
    assert.deepEqual(Object.keys((await received(host)).byUser), [], 'nobody else publishes yet');
    assert.equal(await host.locator('#av-grid figure[data-user]').count(), 0);

    // On stage, ann publishes: the host and ben see her.
    const on = await host.evaluate(() => window.studyhall.client.request({ type: 'stage', room: 'sfu-live', user: 'ann', on: true }));
    assert.equal(on.type, 'ok', JSON.stringify(on));
    await within(30000, 'ann on stage is seen', Promise.all([host, ben].map((p) =>
      p.locator('#av-grid figure[data-user="ann"] figcaption', { hasText: 'ann · connected' }).waitFor({ timeout: 30000 }))));
    await waitFlowing([host, ben], () => ['ann']);
    await waitFlowing([ben], () => ['host']);

    // Off stage: her tile goes, and the server no longer forwards her media.
    const off = await host.evaluate(() => window.studyhall.client.request({ type: 'stage', room: 'sfu-live', user: 'ann', on: false }));
    assert.equal(off.type, 'ok', JSON.stringify(off));
    for (const p of [host, ben]) {
      await p.locator('#av-grid figure[data-user="ann"]').waitFor({ state: 'detached', timeout: T });
      await waitStopped(p, 'ann');
    }
    assert.equal(await ann.evaluate(() => window.studyhall.calls.av.publish), false);
    // The host is still forwarded to the students.
    await waitFlowing([ann, ben], () => ['host']);
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});
