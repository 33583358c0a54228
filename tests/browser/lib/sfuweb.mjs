// Helpers of the SFU browser tests (sfu.test.mjs, sfu-live.test.mjs): a server and a headless
// Chromium, rooms set to `av.mode` `sfu` through PATCH /api/rooms/{id}, web clients signed in
// through the dev form with every RTCPeerConnection they make counted, and what each page's one
// peer connection receives per publisher (read from the remote description's `a=msid`, not
// from the client's bookkeeping). Every wait is bounded.

import assert from 'node:assert/strict';
import { startServer, launchBrowser, sleep, API_KEY } from './harness.mjs';

export const T = 20000;
/// How often an in-page wait checks its condition (Playwright's default is every animation
/// frame, which keeps every page of a busy runner rendering at full rate).
export const POLL = 250;
export const SMALL = { width: 160, height: 120, frameRate: 10 };
/// The fake microphone without the browser's audio processing: echo cancellation, noise
/// suppression and gain control of eight microphones cost a 2-core runner half a core in
/// Chromium's audio service, and the fake beep needs none of them.
export const RAW_AUDIO = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };

/// Starts the server and the browser; `stop()` closes the pages, the browser and the server.
/// `env`: extra server settings; `relay`: every peer connection the pages make is relay-only
/// (iceTransportPolicy 'relay', forced by the same wrapper that counts them); `browserArgs`:
/// extra Chromium flags (e.g. a fake camera file).
export async function sfuRig({ env = {}, relay = false, browserArgs = [] } = {}) {
  const pages = [];
  let server = null;
  let browser = null;
  const stop = async () => {
    for (const p of pages) await p.context().close().catch(() => {});
    if (browser) await browser.close();
    if (server) await server.stop();
  };
  try {
    server = await startServer(env);
    browser = await launchBrowser(browserArgs);
  } catch (e) {
    await stop();
    throw e;
  }

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
    await context.addInitScript((relayOnly) => {
      const Base = window.RTCPeerConnection;
      window.__pcs = [];
      window.RTCPeerConnection = class extends Base {
        constructor(config, ...rest) {
          super(relayOnly ? { ...(config || {}), iceTransportPolicy: 'relay' } : config, ...rest);
          window.__pcs.push(this);
        }
      };
    }, relay);
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
    await page.evaluate(([v, a]) => {
      window.studyhall.calls.videoConstraints = v;
      window.studyhall.calls.audioConstraints = a;
    }, [SMALL, RAW_AUDIO]);
  }

  /// Clicks "Join A/V" and waits for the SFU grid; returns {mode, publish}.
  /// The local and remote candidate types of the page's live peer connection's selected pair.
  function selectedPair(page) {
    return page.evaluate(async () => {
      const pc = window.__pcs.find((p) => p.connectionState !== 'closed');
      if (!pc) return null;
      const stats = await pc.getStats();
      let pair = null;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      if (!pair) stats.forEach((s) => { if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
      if (!pair) return null;
      return { local: stats.get(pair.localCandidateId).candidateType, remote: stats.get(pair.remoteCandidateId).candidateType };
    });
  }

  async function joinAv(page) {
    // A page joining a class whose media already fills the runner's CPU can take a while to
    // render the click target as stable.
    await page.click('#av-join', { timeout: 60000 });
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
    // SERVER_LOG_LINES: how much of the server's log to show (the last 60 lines by default).
    console.log('--- server log ---\n' + server.stderr().split('\n').slice(-(Number(process.env.SERVER_LOG_LINES) || 60)).join('\n'));
  }

  return { server, stop, sfuRoom, openUser, enterRoom, joinAv, received, waitFlowing, waitStopped, selectedPair, dumpLogs };
}
