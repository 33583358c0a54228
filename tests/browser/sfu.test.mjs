// The web client (web/calls.js) on the SFU, in headless Chromium with fake media: a `class`
// room whose `av.mode` is `sfu` (set with PATCH /api/rooms/{id}), SFU_BROWSERS browsers (8 by
// default, at 160x120 and 10 fps) sign in through the dev form, join the room and its A/V from
// the A/V tab; each gets `mode:"sfu"`, holds exactly ONE RTCPeerConnection (counted by a
// wrapper installed before the page's scripts) and decodes growing video and receives audio
// from every other user through the server, told apart by the stream id of each section (the
// publisher's user id); tiles carry the users' names, the speaking users' tiles light up,
// `av_mute` shows a toast and disables the local track, and `av_leave` removes the tile at the
// others. Then a `live` room on the SFU: only the host publishes; a student put on stage is
// seen by the others, and taken off stage stops being forwarded. Relay-only (TURN) on the SFU
// is not covered here.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, within, sleep, API_KEY } from './lib/harness.mjs';

const T = 20000;
const BROWSERS = Number(process.env.SFU_BROWSERS || 8);
const SMALL = { width: 160, height: 120, frameRate: 10 };
let server, browser;
const pages = [];

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  for (const p of pages) await p.context().close().catch(() => {});
  if (browser) await browser.close();
  if (server) await server.stop();
});

async function sfuRoom(id, kind) {
  await server.room(id, kind);
  const r = await fetch(server.base + '/api/rooms/' + id, {
    method: 'PATCH',
    headers: { authorization: 'Bearer ' + API_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ av: { mode: 'sfu' } }),
  });
  const body = await r.json();
  assert.equal(r.status, 200, JSON.stringify(body));
  assert.equal(body.av.mode, 'sfu');
}

/// A signed-in web client in its own context; every RTCPeerConnection it makes is counted.
async function openUser(user, role, grants = '') {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 }, permissions: ['camera', 'microphone'] });
  await context.addInitScript(() => {
    const Base = window.RTCPeerConnection;
    window.__pcs = [];
    window.RTCPeerConnection = class extends Base {
      constructor(...args) {
        super(...args);
        window.__pcs.push(this);
      }
    };
  });
  const page = await context.newPage();
  page.user = user;
  page.lines = [];
  page.on('console', (m) => page.lines.push(m.text()));
  page.on('pageerror', (e) => page.lines.push('pageerror: ' + e.message));
  pages.push(page);
  // The dev form; the first room on screen is the granted one or the first listed, so wait
  // for any room rather than the lobby.
  await page.goto(server.base + '/');
  await page.locator('#dev-form').waitFor({ timeout: T });
  await page.fill('#dev-user', user);
  await page.fill('#dev-name', user);
  await page.selectOption('#dev-role', role);
  if (grants) await page.fill('#dev-rooms', grants);
  await page.click('#dev-submit');
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  await page.waitForFunction(() => !['', 'No room'].includes(document.getElementById('room-title').textContent), null, { timeout: T });
  await page.evaluate(() => {
    window.__signalsFrom = new Set();
    window.studyhall.client.on('signal', (m) => window.__signalsFrom.add(m.from.session));
  });
  return page;
}

async function enterRoom(page, room) {
  await page.fill('#join-room', room);
  await page.click('#join-form button[type="submit"]');
  await page.locator('#room-title', { hasText: room }).waitFor({ timeout: T });
  await page.click('.tabs button[data-tab="av"]');
  await page.evaluate((c) => (window.studyhall.calls.videoConstraints = c), SMALL);
}

/// Clicks "Join A/V" and waits for the SFU grid; returns {mode, publish}.
async function joinAv(page) {
  await page.click('#av-join');
  await page.locator('#av-grid[data-mode="sfu"]').waitFor({ state: 'attached', timeout: T });
  return page.evaluate(() => ({ mode: window.studyhall.calls.av.mode, publish: window.studyhall.calls.av.publish }));
}

/// What the page's one live peer connection received, per publisher: {pcs, byUser: {user:
/// {frames, audio}}}. Publishers are read from the remote description's `a=msid` per `a=mid`,
/// not from the client's own bookkeeping.
function received(page) {
  return page.evaluate(async () => {
    const pcs = window.__pcs;
    const pc = pcs.find((p) => p.connectionState !== 'closed');
    const byUser = {};
    if (!pc || !pc.currentRemoteDescription) return { pcs: pcs.length, byUser };
    const userOf = {};
    for (const sec of pc.currentRemoteDescription.sdp.split(/\r?\nm=/).slice(1)) {
      const mid = (sec.match(/\na=mid:(\S+)/) || [])[1];
      const msid = (sec.match(/\na=msid:(\S+)/) || [])[1];
      if (mid !== undefined && msid) userOf[mid] = msid;
    }
    (await pc.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp' || !userOf[s.mid]) return;
      const u = (byUser[userOf[s.mid]] ||= { frames: 0, audio: 0 });
      if (s.kind === 'video') u.frames += s.framesDecoded || 0;
      else u.audio += s.bytesReceived || 0;
    });
    return { pcs: pcs.length, byUser };
  });
}

/// Waits until every page in `who` decodes growing video (and, with `audio`, receives growing
/// audio) from each of its `from(page)` users, comparing samples `gapMs` apart.
async function waitFlowing(who, from, { ms = 60000, gapMs = 2000, audio = true } = {}) {
  const deadline = Date.now() + ms;
  let last = await Promise.all(who.map(received));
  let missing;
  for (;;) {
    await sleep(gapMs);
    const now = await Promise.all(who.map(received));
    missing = [];
    for (const [i, p] of who.entries()) {
      for (const u of from(p)) {
        const a = last[i].byUser[u] || { frames: 0, audio: 0 };
        const b = now[i].byUser[u] || { frames: 0, audio: 0 };
        if (b.frames <= a.frames || (audio && b.audio <= a.audio)) missing.push(p.user + '<-' + u + ' (+' + (b.frames - a.frames) + ' frames, +' + (b.audio - a.audio) + ' B)');
      }
    }
    if (!missing.length) return now;
    if (Date.now() > deadline) throw new Error('media not flowing: ' + missing.join(', '));
    last = now;
  }
}

/// Waits until `page` receives no new video frames from `user` across `gapMs`.
async function waitStopped(page, user, { ms = 20000, gapMs = 1000 } = {}) {
  const deadline = Date.now() + ms;
  let last = await received(page);
  for (;;) {
    await sleep(gapMs);
    const now = await received(page);
    const a = (last.byUser[user] || { frames: 0 }).frames;
    const b = (now.byUser[user] || { frames: 0 }).frames;
    if (b === a) return;
    if (Date.now() > deadline) throw new Error(page.user + ' still decodes ' + user + ': +' + (b - a) + ' frames');
    last = now;
  }
}

function dumpLogs(list) {
  for (const p of list) console.log('--- page log of ' + p.user + ' ---\n' + p.lines.slice(-40).join('\n'));
}

test(`class room on the SFU: ${BROWSERS} web clients, one peer connection each, everyone decodes everyone`, { timeout: 240000 }, async () => {
  await sfuRoom('sfu-class', 'class');
  const users = Array.from({ length: BROWSERS }, (_, i) => (i === 0 ? 'teach' : 'kid' + i));
  const list = [];
  try {
    for (const u of users) {
      const p = await openUser(u, u === 'teach' ? 'tutor' : 'student', u === 'teach' ? 'sfu-class:host' : '');
      list.push(p);
      await enterRoom(p, 'sfu-class');
    }
    for (const p of list) {
      const r = await joinAv(p);
      assert.deepEqual(r, { mode: 'sfu', publish: true }, p.user);
    }
    // A tile per other user, named, on the one connected peer connection.
    await within(60000, 'every tile connected', Promise.all(list.flatMap((p) => users.filter((u) => u !== p.user).map((u) =>
      p.locator(`#av-grid figure[data-user="${u}"] figcaption`, { hasText: u + ' · connected' }).waitFor({ timeout: 60000 })))));
    const flowing = await waitFlowing(list, (p) => users.filter((u) => u !== p.user), { ms: 90000 });
    for (const [i, p] of list.entries()) {
      assert.equal(flowing[i].pcs, 1, p.user + ' holds exactly one RTCPeerConnection (the SFU, not a mesh)');
      assert.deepEqual(Object.keys(flowing[i].byUser).sort(), users.filter((u) => u !== p.user).sort(), p.user + ' receives exactly the others');
      // Every signal came from the server, none from another session.
      assert.deepEqual(await p.evaluate(() => [...window.__signalsFrom]), ['sfu'], p.user);
    }
    console.log(`${BROWSERS} browsers: every browser decodes every other user's video through the SFU`);
    // The tiles play: each remote <video> has decoded a picture.
    for (const p of list) {
      await p.waitForFunction((n) => [...document.querySelectorAll('#av-grid figure[data-user] video')]
        .filter((v) => v.videoWidth > 0).length >= n, BROWSERS - 1, { timeout: T });
    }

    // Speakers: the fake microphone beeps; some tile is highlighted at some point.
    await list[1].waitForFunction(() => document.querySelector('#av-grid figure.speaking'), null, { timeout: T });

    // av_mute: the host stops kid1's camera; kid1 is told and its track is disabled.
    const [host, kid] = list;
    const muted = await host.evaluate(() => window.studyhall.client.request({ type: 'av_mute', room: 'sfu-class', user: 'kid1', kind: 'video' }));
    assert.equal(muted.type, 'ok', JSON.stringify(muted));
    await kid.locator('#toast', { hasText: 'camera was turned off by teach' }).waitFor({ timeout: T });
    assert.equal(await kid.evaluate(() => window.studyhall.calls.local.getVideoTracks()[0].enabled), false);
    await waitStopped(list[2], 'kid1');

    // av_leave: the tile goes at the others, the page's peer connection is closed.
    await kid.click('#av-leave');
    await kid.locator('#av-join').waitFor({ timeout: T });
    assert.equal(await kid.evaluate(() => window.__pcs[0].connectionState), 'closed');
    for (const p of list.filter((x) => x !== kid)) {
      await p.locator('#av-grid figure[data-user="kid1"]').waitFor({ state: 'detached', timeout: T });
    }
    // The others still see each other.
    await waitFlowing([host], () => users.filter((u) => u !== 'teach' && u !== 'kid1'), { audio: false });
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});

test('live room on the SFU: only the host and the student on stage publish', { timeout: 150000 }, async () => {
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
