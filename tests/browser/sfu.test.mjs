// The web client (web/calls.js) on the SFU, in headless Chromium with fake media: a `class`
// room whose `av.mode` is `sfu` (set with PATCH /api/rooms/{id}), SFU_BROWSERS browsers (8 by
// default, above the mesh's 6: 140-160 s on a 2-core runner, within the test's own limit; at 160x120 and 10 fps, simulcast as
// the web client sends it) sign in through the dev form, join the room and its A/V from
// the A/V tab; each gets `mode:"sfu"`, holds exactly ONE RTCPeerConnection (counted by a
// wrapper installed before the page's scripts) and decodes growing video and receives audio
// from every other user through the server, told apart by the stream id of each section (the
// publisher's user id); the speaking users' tiles light up; half the class closes its tabs and
// their tiles go at the others, who still decode each other; then the host's mute button on a tile
// (`av_mute`) shows a toast and disables the local track at its owner (unmute, `av_unmute`,
// turns it back on and the others decode it again), and `av_leave` removes the tile at the others. The live room on
// the SFU is sfu-live.test.mjs (a file of its own: each file has 300 s in the suite).
// Relay-only (TURN) on the SFU is sfu-relay.test.mjs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { within } from './lib/harness.mjs';
import { sfuRig, T, POLL } from './lib/sfuweb.mjs';

const BROWSERS = Number(process.env.SFU_BROWSERS || 8);
// The browsers that stay for the mute, leave and rejoin steps (at least 3: the host, kid1,
// and a third who watches kid1).
const KEEP = Math.min(BROWSERS, 4);
let rig;

// Bandwidth estimation off: eight Chromiums on 2 shared cores answer TWCC from a starved CPU,
// the estimate collapses and the SFU pauses their video as designed (it cannot tell a busy
// receiver from a congested link). Estimation and layer choice in browsers are
// sfu-simulcast.test.mjs and sfu-audience.test.mjs.
before(async () => {
  rig = await sfuRig({ env: { STUDYHALL_SFU_BWE_START_KBPS: '0' } });
});

after(async () => {
  if (rig) await rig.stop();
});

test(`class room on the SFU: ${BROWSERS} web clients, one peer connection each, everyone decodes everyone`, { timeout: 60000 + 30000 * BROWSERS }, async () => {
  const { sfuRoom, openUser, enterRoom, joinAv, received, waitFlowing, waitStopped, dumpLogs } = rig;
  await sfuRoom('sfu-class', 'class');
  const users = Array.from({ length: BROWSERS }, (_, i) => (i === 0 ? 'teach' : 'kid' + i));
  const list = [];
  try {
    list.push(...await Promise.all(users.map((u) =>
      openUser(u, u === 'teach' ? 'tutor' : 'student', u === 'teach' ? 'sfu-class:host' : ''))));
    await Promise.all(list.map((p) => enterRoom(p, 'sfu-class')));
    for (const p of list) {
      const r = await joinAv(p);
      assert.deepEqual(r, { mode: 'sfu', publish: true }, p.user);
    }
    // A tile per other user, named, on the one connected peer connection. One check per page
    // every POLL ms: 56 locators, or checks on every animation frame, would cost eight
    // starved browsers more than the media does.
    await within(60000, 'every tile connected', Promise.all(list.map((p) => p.waitForFunction((others) => others.every((u) => {
      const caption = document.querySelector(`#av-grid figure[data-user="${u}"] figcaption`);
      return caption && caption.textContent.includes(u + ' · connected');
    }), users.filter((u) => u !== p.user), { timeout: 60000, polling: POLL }))));
    const flowing = await waitFlowing(list, (p) => users.filter((u) => u !== p.user), { ms: 90000 });
    for (const [i, p] of list.entries()) {
      assert.equal(flowing[i].pcs, 1, p.user + ' holds exactly one RTCPeerConnection (the SFU, not a mesh)');
      assert.deepEqual(Object.keys(flowing[i].byUser).sort(), users.filter((u) => u !== p.user).sort(), p.user + ' receives exactly the others');
      // Every signal came from the server, none from another session.
      assert.deepEqual(await p.evaluate(() => [...window.__signalsFrom]), ['sfu'], p.user);
    }
    const least = Math.min(...flowing.flatMap((f) => Object.values(f.byUser).map((x) => x.frames)));
    console.log(`${BROWSERS} browsers: every browser decodes every other user's video through the SFU (least frames decoded from one user: ${least})`);
    // The tiles play: each remote <video> has decoded a picture.
    for (const p of list) {
      await p.waitForFunction((n) => [...document.querySelectorAll('#av-grid figure[data-user] video')]
        .filter((v) => v.videoWidth > 0).length >= n, BROWSERS - 1, { timeout: T, polling: POLL });
    }

    // Speakers: the fake microphone beeps; some tile is highlighted at some point.
    await list[1].waitForFunction(() => document.querySelector('#av-grid figure.speaking'), null, { timeout: T, polling: POLL });

    // Half the class closes its tabs: their sessions end, they leave the SFU and their tiles
    // go at the others. The moderation steps below run with the other half: eight full web
    // clients are all a 2-core runner can carry, and with all eight on, a responsive page's
    // command can reach the server's socket more than 10 s after the click (22 s measured),
    // past the client's request limit, however fast the server answers it.
    const gone = list.splice(KEEP);
    for (const p of gone) await p.context().close();
    const left = users.splice(KEEP);
    await within(60000, 'the tiles of those who left removed', Promise.all(list.map((p) => p.waitForFunction((who) =>
      !who.some((u) => document.querySelector(`#av-grid figure[data-user="${u}"]`)), left, { timeout: 60000, polling: POLL }))));
    await waitFlowing(list, (p) => users.filter((u) => u !== p.user), { ms: 60000 });

    // av_mute: the host stops kid1's camera with the button on kid1's tile; kid1 is told and
    // its track is disabled.
    const [host, kid] = list;
    const camButton = host.locator('#av-grid figure[data-user="kid1"] button.av-mute[data-kind="video"]');
    assert.equal(await camButton.textContent(), 'Mute camera');
    assert.equal(await list[2].locator('#av-grid button.av-mute').count(), 0, 'only host/ta get mute buttons');
    await camButton.click();
    await host.locator('#av-grid figure[data-user="kid1"] button.av-mute[data-kind="video"][aria-pressed="true"]', { hasText: 'Unmute camera' }).waitFor({ timeout: T });
    // The toast hides itself after a few seconds: its text stays, so wait on that.
    const toastSays = (text) => kid.waitForFunction((t) => (document.querySelector('#toast').textContent || '').includes(t), text, { timeout: T, polling: POLL });
    await toastSays('camera was turned off by teach');
    assert.equal(await kid.evaluate(() => window.studyhall.calls.local.getVideoTracks()[0].enabled), false);
    await waitStopped(list[2], 'kid1');

    // av_unmute: kid1 is told, its camera track is on again, and the others decode it again
    // (from a keyframe the server asks for).
    await camButton.click();
    await host.locator('#av-grid figure[data-user="kid1"] button.av-mute[data-kind="video"][aria-pressed="false"]', { hasText: 'Mute camera' }).waitFor({ timeout: T });
    await toastSays('camera was turned back on by teach');
    assert.equal(await kid.evaluate(() => window.studyhall.calls.local.getVideoTracks()[0].enabled), true);
    await waitFlowing([list[2]], () => ['kid1'], { audio: false, ms: T });

    // av_leave: the tile goes at the others, the page's peer connection is closed.
    await kid.click('#av-leave');
    await kid.locator('#av-join').waitFor({ timeout: T });
    assert.equal(await kid.evaluate(() => window.__pcs[0].connectionState), 'closed');
    for (const p of list.filter((x) => x !== kid)) {
      await p.locator('#av-grid figure[data-user="kid1"]').waitFor({ state: 'detached', timeout: T });
    }
    // The server's next offer stopped kid1's two sections (port 0), and that was answered.
    // Chromium drops stopped transceivers from getTransceivers().
    await list[2].waitForFunction(() => {
      const pc = window.__pcs[0];
      const secs = pc.currentRemoteDescription.sdp.split(/\r?\nm=/).slice(1);
      const stopped = secs.filter((x) => /^\S+ 0 /.test(x)).map((x) => (x.match(/\na=mid:(\S+)/) || [])[1]);
      const mids = new Set(pc.getTransceivers().map((t) => t.mid));
      return pc.signalingState === 'stable' && stopped.length >= 2 && !stopped.some((m) => mids.has(m)) &&
        !secs.some((x) => /\na=msid:kid1 /.test(x));
    }, null, { timeout: T, polling: POLL });
    // The others still see each other.
    await waitFlowing([host], () => users.filter((u) => u !== 'teach' && u !== 'kid1'), { audio: false });

    // Back in (camera on again: a mute lasts until the session leaves the room's SFU), then
    // out and in again at once, before the others have negotiated the stop: seen every time.
    await kid.click('#av-join');
    await waitFlowing(list.filter((p) => p !== kid), () => ['kid1']);
    await kid.evaluate(async () => {
      await window.studyhall.calls.avLeave();
      await window.studyhall.calls.avJoin('sfu-class');
    });
    await waitFlowing(list.filter((p) => p !== kid), () => ['kid1']);
    await waitFlowing([kid], () => users.filter((u) => u !== 'kid1'));
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});
