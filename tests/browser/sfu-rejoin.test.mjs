// The web client gets its SFU media back by itself when the server drops its peer connection:
// a student's one RTCPeerConnection to the SFU is closed under it (as when its network goes
// away), the server tells it `av_closed {reason:"connection_lost"}`, and the client joins the
// room's A/V again with a new peer connection; media flows both ways again.

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

test('SFU: a dropped peer connection is told connection_lost and the web client re-joins', { timeout: 120000 }, async () => {
  const { sfuRoom, openUser, enterRoom, joinAv, waitFlowing, dumpLogs } = rig;
  await sfuRoom('sfu-rejoin', 'class');
  const users = ['teach', 'kid'];
  const list = [];
  try {
    list.push(await openUser('teach', 'tutor', 'sfu-rejoin:host'), await openUser('kid', 'student'));
    for (const p of list) await enterRoom(p, 'sfu-rejoin');
    for (const p of list) assert.deepEqual(await joinAv(p), { mode: 'sfu', publish: true }, p.user);
    const others = (p) => users.filter((u) => u !== p.user);
    await within(60000, 'media before', waitFlowing(list, others, { ms: 60000 }));

    const kid = list[1];
    await kid.evaluate(() => {
      window.__closed = [];
      window.studyhall.client.on('av_closed', (m) => window.__closed.push(m));
      window.__pcs.find((p) => p.connectionState !== 'closed').close();
    });
    await kid.waitForFunction(() => window.__closed.length > 0, null, { timeout: T });
    assert.deepEqual(await kid.evaluate(() => window.__closed[0]), { type: 'av_closed', room: 'sfu-rejoin', reason: 'connection_lost' });
    // A second peer connection, connected, in the SFU grid again.
    await kid.waitForFunction(() => window.__pcs.length === 2 && window.__pcs[1].connectionState === 'connected'
      && window.studyhall.calls.av && window.studyhall.calls.av.mode === 'sfu', null, { timeout: 30000 });
    await within(60000, 'media after the re-join', waitFlowing(list, others, { ms: 60000 }));
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});
