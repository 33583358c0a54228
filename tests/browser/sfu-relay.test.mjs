// The SFU reached only through TURN: a real coturn (REST-API shared secret), and two web
// clients whose every peer connection is relay-only (iceTransportPolicy 'relay', forced in the
// page). They join a `class` room's SFU with the TURN entry the server hands out in
// `ice_servers`, decode each other's video and receive each other's audio through the server,
// and the selected candidate pair on each side is a local relay candidate.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { within, startCoturn } from './lib/harness.mjs';
import { sfuRig } from './lib/sfuweb.mjs';

const SECRET = 'browser-test-sfu-turn-secret';
let turn, rig;

before(async () => {
  turn = await startCoturn(SECRET);
  rig = await sfuRig({
    env: { STUDYHALL_TURN_URLS: turn.url, STUDYHALL_TURN_SECRET: SECRET, STUDYHALL_TURN_TTL_S: '600' },
    relay: true,
  });
});

after(async () => {
  if (rig) await rig.stop();
  if (turn) await turn.stop();
});

test('SFU through TURN only: two relay-only web clients decode each other', { timeout: 120000 }, async () => {
  const { sfuRoom, openUser, enterRoom, joinAv, waitFlowing, selectedPair, dumpLogs } = rig;
  await sfuRoom('sfu-relay', 'class');
  const users = ['teach', 'kid'];
  const list = [];
  try {
    list.push(await openUser('teach', 'tutor', 'sfu-relay:host'), await openUser('kid', 'student'));
    for (const p of list) await enterRoom(p, 'sfu-relay');
    for (const p of list) {
      assert.deepEqual(await joinAv(p), { mode: 'sfu', publish: true }, p.user);
      const servers = await p.evaluate(() => window.studyhall.calls.av.ice);
      assert.ok((servers || []).some((s) => [].concat(s.urls).includes(turn.url)),
        p.user + ' got the TURN server in ice_servers: ' + JSON.stringify(servers));
    }
    await within(60000, 'media through TURN', waitFlowing(list, (p) => users.filter((u) => u !== p.user), { ms: 60000 }));
    for (const p of list) {
      const pair = await selectedPair(p);
      assert.equal(pair && pair.local, 'relay', p.user + ' selected pair: ' + JSON.stringify(pair));
    }
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});
