// Simulcast through the SFU, in headless Chromium: the web client publishes its camera as
// three layers (rids l, m, h), and the server forwards to each viewer the one its bandwidth
// carries. A teacher publishes a 640x360 camera of random noise (a generated Y4M file, so that
// every layer runs at its encoding's maxBitrate: l 150, m 500 kbit/s, whatever the machine);
// a student watches. With no cap the student decodes the teacher's fastest layer (its picture
// as wide as the widest layer Chromium sends); with `sfu_viewer_max_kbps` at 300 (236 left for
// video after the audio's 64) the server switches the student to the slowest layer (as wide as
// the narrowest), at a keyframe of that layer, and the student's decoder goes on decoding.
// Layer widths are read from the publisher's own outbound stats, not assumed.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { sleep } from './lib/harness.mjs';
import { sfuRig } from './lib/sfuweb.mjs';

const CAMERA = { width: 640, height: 360, frameRate: 15 };
let rig = null;

/// A Y4M file of `frames` frames of random noise (Chromium loops it as the fake camera).
function noiseCamera({ width, height, frameRate }, frames = 15) {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'sfu-sim-')), 'noise.y4m');
  const parts = [Buffer.from(`YUV4MPEG2 W${width} H${height} F${frameRate}:1 Ip A1:1 C420jpeg\n`)];
  for (let i = 0; i < frames; i++) parts.push(Buffer.from('FRAME\n'), crypto.randomBytes((width * height * 3) / 2));
  fs.writeFileSync(file, Buffer.concat(parts));
  return file;
}
const cameraFile = noiseCamera(CAMERA);

after(async () => {
  if (rig) await rig.stop();
  fs.rmSync(path.dirname(cameraFile), { recursive: true, force: true });
});

/// The publisher's video layers that are being sent: [{rid, width}], narrowest first.
function sentLayers(page) {
  return page.evaluate(async () => {
    const pc = window.__pcs.find((p) => p.connectionState !== 'closed');
    const out = [];
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video' && s.frameWidth && s.framesEncoded > 0) {
        out.push({ rid: s.rid, width: s.frameWidth });
      }
    });
    return out.sort((a, b) => a.width - b.width);
  });
}

/// The width of the picture the viewer decodes, and its frames decoded so far.
function decoded(page) {
  return page.evaluate(async () => {
    const pc = window.__pcs.find((p) => p.connectionState !== 'closed');
    let r = { width: 0, frames: 0 };
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') r = { width: s.frameWidth || 0, frames: s.framesDecoded || 0 };
    });
    return r;
  });
}

/// Waits (bounded) until the viewer decodes growing video `width` wide; returns the last sample.
async function waitWidth(page, width, ms = 60000) {
  const deadline = Date.now() + ms;
  let last = await decoded(page);
  for (;;) {
    await sleep(1000);
    const now = await decoded(page);
    if (now.width === width && now.frames > last.frames) return now;
    if (Date.now() > deadline) throw new Error(`viewer decodes ${JSON.stringify(now)}, wanted width ${width} and growing frames`);
    last = now;
  }
}

/// A teacher publishing at 640x360 and a watching student in a fresh `sfu` class room.
async function classOnTheSfu(env) {
  rig = await sfuRig({ env, browserArgs: ['--use-file-for-fake-video-capture=' + cameraFile] });
  const { sfuRoom, openUser, enterRoom, joinAv } = rig;
  await sfuRoom('sim', 'class');
  const teach = await openUser('teach', 'tutor', 'sim:host');
  const kid = await openUser('kid1', 'student');
  await enterRoom(teach, 'sim');
  await teach.evaluate((c) => (window.studyhall.calls.videoConstraints = c), CAMERA);
  await enterRoom(kid, 'sim');
  assert.deepEqual(await joinAv(teach), { mode: 'sfu', publish: true });
  assert.deepEqual(await joinAv(kid), { mode: 'sfu', publish: true });
  // Chromium brings its layers up as its own estimate grows: wait for at least two.
  const deadline = Date.now() + 60000;
  let layers = await sentLayers(teach);
  while (layers.length < 2) {
    if (Date.now() > deadline) throw new Error('the publisher sends fewer than two layers: ' + JSON.stringify(layers));
    await sleep(1000);
    layers = await sentLayers(teach);
  }
  return { teach, kid, layers };
}

async function stopRig() {
  await rig.stop();
  rig = null;
}

test('simulcast on the SFU: a viewer with room gets the widest layer', { timeout: 140000 }, async () => {
  const { teach, kid, layers } = await classOnTheSfu({});
  try {
    assert.ok(layers.every((l) => ['l', 'm', 'h'].includes(l.rid)), JSON.stringify(layers));
    // The widest layer Chromium sends may still grow as its estimate does: follow it.
    const widest = async () => (await sentLayers(teach)).at(-1).width;
    let want = await widest();
    const deadline = Date.now() + 60000;
    for (;;) {
      try {
        const got = await waitWidth(kid, want, 5000);
        console.log(`layers sent ${JSON.stringify(await sentLayers(teach))}; the viewer decodes ${JSON.stringify(got)}`);
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        want = await widest();
      }
    }
  } catch (e) {
    rig.dumpLogs([teach, kid]);
    throw e;
  } finally {
    await stopRig();
  }
});

test('simulcast on the SFU: a viewer capped at 300 kbit/s gets the narrowest layer and keeps decoding', { timeout: 140000 }, async () => {
  const { teach, kid, layers } = await classOnTheSfu({ STUDYHALL_SFU_VIEWER_MAX_KBPS: '300' });
  try {
    const narrowest = layers[0];
    const got = await waitWidth(kid, narrowest.width);
    const later = await waitWidth(kid, narrowest.width, 20000);
    assert.ok(later.frames > got.frames);
    console.log(`layers sent ${JSON.stringify(await sentLayers(teach))}; the capped viewer decodes ${JSON.stringify(later)}`);
  } catch (e) {
    rig.dumpLogs([teach, kid]);
    throw e;
  } finally {
    await stopRig();
  }
});
