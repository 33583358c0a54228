// A lecture on the SFU, in headless Chromium: a `live` room where the host publishes and puts
// two students on stage (web clients through the dev form), and an audience of AUDIENCE (20)
// watching sessions, each with its own WebSocket session and RTCPeerConnection to the server
// (all in one page, lib/audience.mjs). Every viewer decodes growing video from all three
// publishers; taken off stage, a student's video stops at every viewer (the time until the
// last viewer's frames stop growing is printed), while the host's and the other student's go
// on.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { sleep, within } from './lib/harness.mjs';
import { sfuRig, T } from './lib/sfuweb.mjs';
import { openAudience, sampleAudience } from './lib/audience.mjs';

const AUDIENCE = Number(process.env.SFU_AUDIENCE || 20);
const ROOM = 'lecture';
let rig;

before(async () => {
  rig = await sfuRig({ env: { STUDYHALL_SFU_ROOM_MAX: String(AUDIENCE + 10) } });
});

after(async () => {
  if (rig) await rig.stop();
});

/// Waits (bounded) until every viewer decodes growing video from each of `from` between two
/// samples `gapMs` apart; returns the later sample.
async function waitAudience(page, from, ms = 90000, gapMs = 2000) {
  const deadline = Date.now() + ms;
  let last = await sampleAudience(page);
  for (;;) {
    await sleep(gapMs);
    const now = await sampleAudience(page);
    assert.deepEqual(now.errors, []);
    const missing = [];
    now.frames.forEach((f, i) => {
      for (const u of from) if (!((f[u] || 0) > (last.frames[i][u] || 0))) missing.push(`viewer${i}<-${u}`);
    });
    if (!missing.length) return now;
    if (Date.now() > deadline) throw new Error(`${missing.length} streams not flowing: ${missing.slice(0, 12).join(', ')}`);
    last = now;
  }
}

/// Waits (bounded) until no viewer's frames from `user` grow between two samples; returns the
/// milliseconds from `since` to the first sample after which none grew.
async function waitAudienceStopped(page, user, since, ms = 20000) {
  const deadline = Date.now() + ms;
  let last = await sampleAudience(page);
  let lastAt = Date.now();
  for (;;) {
    await sleep(250);
    const now = await sampleAudience(page);
    const growing = now.frames.filter((f, i) => (f[user] || 0) > (last.frames[i][user] || 0)).length;
    if (!growing) return lastAt - since;
    if (Date.now() > deadline) throw new Error(`${growing} viewers still decode ${user}`);
    last = now;
    lastAt = Date.now();
  }
}

test(`lecture on the SFU: 2 students on stage with the host, ${AUDIENCE} viewers decode all three; off stage stops at every viewer`, { timeout: 150000 }, async () => {
  const { server, sfuRoom, openUser, enterRoom, joinAv, waitFlowing, dumpLogs } = rig;
  await sfuRoom(ROOM, 'live');
  const host = await openUser('host', 'tutor', ROOM + ':host');
  const ann = await openUser('ann', 'student');
  const ben = await openUser('ben', 'student');
  const list = [host, ann, ben];
  try {
    for (const p of list) await enterRoom(p, ROOM);
    assert.deepEqual(await joinAv(host), { mode: 'sfu', publish: true });
    for (const p of [ann, ben]) assert.deepEqual(await joinAv(p), { mode: 'sfu', publish: false }, p.user);
    for (const u of ['ann', 'ben']) {
      const on = await host.evaluate((who) => window.studyhall.client.request({ type: 'stage', room: 'lecture', user: who, on: true }), u);
      assert.equal(on.type, 'ok', JSON.stringify(on));
    }
    await waitFlowing([host], () => ['ann', 'ben'], { audio: false });

    const tokens = [];
    for (let i = 0; i < AUDIENCE; i++) tokens.push(await server.token('viewer' + i, { role: 'student' }));
    const context = list[0].context().browser().newContext();
    const page = await (await context).newPage();
    await page.goto(server.base + '/');
    await within(60000, 'the audience joins', openAudience(page, server.wsUrl, ROOM, tokens));
    const flowing = await waitAudience(page, ['host', 'ann', 'ben']);
    const least = Math.min(...flowing.frames.flatMap((f) => ['host', 'ann', 'ben'].map((u) => f[u])));
    console.log(`${AUDIENCE} viewers decode host, ann and ben through the SFU (least frames from one publisher at one viewer: ${least})`);

    // Off stage: ann's video stops at every viewer; the host's and ben's go on.
    const at = Date.now();
    const off = await host.evaluate(() => window.studyhall.client.request({ type: 'stage', room: 'lecture', user: 'ann', on: false }));
    assert.equal(off.type, 'ok', JSON.stringify(off));
    const stoppedMs = await waitAudienceStopped(page, 'ann', at);
    console.log(`ann off stage: her video stopped at all ${AUDIENCE} viewers within ${stoppedMs} ms of the command (sampled every 250 ms + the time a sample of ${AUDIENCE} peer connections takes)`);
    await waitAudience(page, ['host', 'ben'], T);
  } catch (e) {
    dumpLogs(list);
    throw e;
  }
});
