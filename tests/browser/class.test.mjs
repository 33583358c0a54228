// A small class in a real mesh: four browsers `join` a `class` room, `av_join` its A/V, and
// each newcomer offers to every peer already there through `signal {room, to}`; every pair
// connects and every browser decodes growing video from the three others. Low resolution and
// frame rate keep twelve peer connections within two CPU cores.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRig, openClient, growth, dumpLogs, within, sleep } from './lib/harness.mjs';

let rig, server, page, browser, clients;

before(async () => {
  rig = await startRig();
  ({ server, page, browser, clients } = rig);
  await server.room('class-1', 'class');
});


after(async () => {
  if (rig) await rig.stop();
});


test('class mesh: four browsers connect pairwise through signal {room, to}', { timeout: 120000 }, async () => {
  const users = ['tutor', 'ann', 'ben', 'cat'];
  try {
    for (const u of users) {
      const c = await openClient(browser, page.url, server.wsUrl, await server.token(u), u);
      clients.push(c);
      const joined = await c.eval(() => window.sh.request({ type: 'join', room: 'class-1' }));
      assert.equal(joined.type, 'ok', JSON.stringify(joined));
      await c.eval(() => window.sh.media({ video: { width: 160, height: 120, frameRate: 10 }, audio: true }));
    }
    // Join the A/V one after another: each newcomer sees the earlier ones as peers.
    for (const [i, c] of clients.entries()) {
      const r = await c.eval(() => window.sh.avJoin('class-1'));
      assert.equal(r.type, 'ok', JSON.stringify(r));
      assert.equal(r.mode, 'mesh');
      assert.equal(r.publish, true);
      assert.deepEqual(
        r.peers.map((p) => p.session).sort(),
        clients.slice(0, i).map((x) => x.session).sort(),
        c.name + ' sees the earlier joiners',
      );
    }
    // Every browser holds a connected peer connection to each of the three others.
    await within(60000, 'all pairs connected', Promise.all(clients.flatMap((c) =>
      clients.filter((o) => o !== c).map((o) => c.eval(async (k) => {
        const t0 = Date.now();
        while (!window.sh.peerKeys().includes(k)) {
          if (Date.now() - t0 > 20000) throw new Error('no peer ' + k);
          await new Promise((r) => setTimeout(r, 50));
        }
        return window.sh.waitConnected(k, 40000);
      }, 'class-1/' + o.session)))));

    // Let the decoders settle, then sample.
    await sleep(500);
    // Two samples of every connection of every browser, 2 s apart.
    const keysOf = (c) => clients.filter((o) => o !== c).map((o) => 'class-1/' + o.session);
    const sample = () => Promise.all(clients.map((c) =>
      c.eval((keys) => Promise.all(keys.map((k) => window.sh.stats(k))), keysOf(c))));
    const first = await sample();
    await sleep(2000);
    const second = await sample();
    for (const [ci, c] of clients.entries()) {
      const others = clients.filter((o) => o !== c);
      const g = others.map((_, i) => growth(first[ci][i], second[ci][i]));
      console.log(c.name + ' receives ' + g.map((x, i) => others[i].name + ': +' + x.videoFrames + ' frames, +' + x.audioBytes + ' B').join('; '));
      for (const [i, x] of g.entries()) {
        assert.ok(x.videoFrames > 0, c.name + ' decodes growing video from ' + others[i].name);
        assert.ok(x.audioBytes > 0, c.name + ' receives growing audio from ' + others[i].name);
      }
      // Every signal came with the room and from a peer of the mesh.
      const sigs = await c.eval(() => window.sh.events().filter((e) => e.type === 'signal'));
      for (const s of sigs) {
        assert.equal(s.room, 'class-1');
        assert.ok(others.some((o) => o.session === s.from.session));
      }
    }
  } catch (e) {
    dumpLogs(clients);
    throw e;
  }
});
