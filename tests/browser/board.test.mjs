// The web client's whiteboard in headless Chromium against the server binary: a host and
// three students open the board of a class room; the host lets two of them draw from the
// board's grant toggles (their open pages learn it at once); student A draws a pen stroke and
// student B sees it in its Y.Doc (`window.__board`) and as ink on its canvas; B draws a
// rectangle and A sees it; A's undo removes A's own stroke for everyone and leaves B's; the
// student without a grant sees the read-only note, has its tools disabled, and a drag on its
// canvas adds nothing; the host's ellipse and text reach the students and its eraser takes the
// ellipse away for everyone; a stroke B draws while offline reaches A once B is back. A
// screenshot of the board goes to the artifacts folder.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startServer, launchBrowser, artifactDir, dumpLogs } from './lib/harness.mjs';

const ROOM = 'art-1';
const T = 15000;
let server, browser;
const pages = [];

before(async () => {
  server = await startServer();
  await server.room(ROOM, 'class');
  browser = await launchBrowser();
});

after(async () => {
  for (const p of pages) await p.context().close().catch(() => {});
  if (browser) await browser.close();
  if (server) await server.stop();
});

/// The dev sign-in form (as harness.mjs's devSignIn, but the first room shown may be ROOM
/// rather than the lobby when the token grants it).
async function signIn(page, user, role, grants) {
  await page.goto(server.base + '/');
  await page.locator('#dev-form').waitFor({ timeout: T });
  await page.fill('#dev-user', user);
  await page.fill('#dev-name', user[0].toUpperCase() + user.slice(1));
  await page.selectOption('#dev-role', role);
  if (grants) await page.fill('#dev-rooms', grants);
  await page.click('#dev-submit');
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  await page.locator('#board-open').waitFor({ timeout: T });
}

/// A signed-in page showing ROOM with its board open and synced.
async function boardPage(user, role, grants = '') {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.lines = [];
  page.name = user;
  page.on('console', (m) => page.lines.push(m.text()));
  page.on('pageerror', (e) => page.lines.push('pageerror: ' + e.message));
  pages.push(page);
  try {
    await signIn(page, user, role, grants);
  } catch (e) {
    dumpLogs([{ name: user, lines: page.lines }]);
    throw e;
  }
  await page.fill('#join-room', ROOM);
  await page.press('#join-room', 'Enter');
  await page.locator('#room-title', { hasText: ROOM }).waitFor({ timeout: T });
  await page.click('#board-open');
  await page.locator('#board-panel').waitFor({ state: 'visible', timeout: T });
  await page.waitForFunction(() => window.__board && window.__board.synced, null, { timeout: T });
  return page;
}

/// Drags on the board's canvas from (x1, y1) to (x2, y2), given as fractions of its size.
async function drag(page, x1, y1, x2, y2) {
  const box = await page.locator('#board-canvas').boundingBox();
  const at = (fx, fy) => [box.x + fx * box.width, box.y + fy * box.height];
  await page.mouse.move(...at(x1, y1));
  await page.mouse.down();
  for (let i = 1; i <= 8; i++) await page.mouse.move(...at(x1 + ((x2 - x1) * i) / 8, y1 + ((y2 - y1) * i) / 8));
  await page.mouse.up();
}

const strokes = (page) => page.evaluate(() => window.__board.strokes());
const waitBoard = (page, fn, arg) => page.waitForFunction(fn, arg, { timeout: T });

test('granted students draw and see each other, undo is per user, an ungranted student cannot draw', async () => {
  let host, ann, bob, cid;
  try {
    host = await boardPage('teach', 'tutor', ROOM + ':host');
    ann = await boardPage('ann', 'student');
    bob = await boardPage('bob', 'student');
    cid = await boardPage('cid', 'student');

    // Before any grant, students see the board read-only.
    for (const p of [ann, bob, cid]) {
      assert.equal(await p.evaluate(() => window.__board.mayDraw), false);
      await p.locator('#board-note', { hasText: 'View only' }).waitFor({ timeout: T });
      assert.equal(await p.locator('.board-tools .tool[data-tool="pen"]').isDisabled(), true);
    }
    assert.equal(await host.evaluate(() => window.__board.mayDraw), true);

    // The host lets ann and bob draw; their open boards learn it without a reload.
    for (const u of ['ann', 'bob']) {
      const toggle = host.locator(`#board-grants button[data-user="${u}"]`);
      await toggle.waitFor({ timeout: T });
      await toggle.click();
      await host.locator(`#board-grants button[data-user="${u}"][aria-pressed="true"]`).waitFor({ timeout: T });
    }
    for (const p of [ann, bob]) {
      await waitBoard(p, () => window.__board.mayDraw);
      await p.locator('#board-note').waitFor({ state: 'hidden', timeout: T });
    }

    // A draws a pen stroke: B has it in its document and ink on its canvas.
    assert.equal(await bob.evaluate(() => window.__board.inked()), 0, 'an empty board is all background');
    await drag(ann, 0.1, 0.1, 0.4, 0.3);
    await waitBoard(bob, () => window.__board.strokes().some((s) => s.by === 'ann' && s.kind === 'pen'));
    await waitBoard(bob, () => window.__board.inked() > 50);
    const annStroke = (await strokes(bob)).find((s) => s.by === 'ann');
    assert.ok(annStroke.pts.length >= 4, 'a pen stroke holds its points');

    // B draws a rectangle: A sees it, and more ink than its own stroke alone.
    const annInk = await ann.evaluate(() => window.__board.inked());
    await bob.click('.board-tools .tool[data-tool="rect"]');
    await bob.click('.board-tools .swatch[data-color="#c8363a"]');
    await drag(bob, 0.55, 0.5, 0.85, 0.85);
    await waitBoard(ann, () => window.__board.strokes().some((s) => s.by === 'bob' && s.kind === 'rect' && s.color === '#c8363a'));
    await waitBoard(ann, (before) => window.__board.inked() > before, annInk);
    // Everyone (the host and the ungranted student too) holds the same two strokes.
    for (const p of [host, cid]) await waitBoard(p, () => window.__board.strokes().length === 2);
    assert.deepEqual(await strokes(host), await strokes(ann));

    // A's undo takes back A's stroke, for everyone; B's rectangle stays. B has nothing of its
    // own to undo but its rectangle.
    assert.equal(await ann.locator('#board-undo').isDisabled(), false);
    await ann.click('#board-undo');
    for (const p of [ann, bob, host, cid]) {
      await waitBoard(p, () => {
        const s = window.__board.strokes();
        return s.length === 1 && s[0].by === 'bob' && s[0].kind === 'rect';
      });
    }
    assert.equal(await ann.evaluate(() => window.__board.canUndo()), false);

    // The student without a grant: read-only note, tools disabled, and a drag adds nothing.
    await cid.locator('#board-note', { hasText: 'View only' }).waitFor({ timeout: T });
    assert.equal(await cid.locator('#board-undo').isDisabled(), true);
    await drag(cid, 0.1, 0.6, 0.3, 0.9);
    // Had the drag drawn, cid's own document would hold the stroke at once; the host's stroke
    // drawn afterwards shows that cid's board still follows the others.
    await drag(host, 0.6, 0.1, 0.9, 0.3);
    await waitBoard(cid, () => window.__board.strokes().some((s) => s.by === 'teach'));
    for (const p of [host, cid]) {
      const all = await strokes(p);
      assert.equal(all.length, 2, p.name + ' holds the rectangle and the host stroke only');
      assert.ok(!all.some((s) => s.by === 'cid'));
    }

    // The host's other tools: an ellipse and a text item reach the students, and the eraser
    // takes the ellipse away for everyone (board units: the ellipse spans 160..480 × 100..300,
    // so the eraser's drag across x = 160 at y = 200 meets its left edge and nothing else).
    await host.click('.board-tools .tool[data-tool="ellipse"]');
    await drag(host, 0.1, 0.1, 0.3, 0.3);
    await host.fill('#board-text', 'x + 1 = 2');
    await host.click('.board-tools .tool[data-tool="text"]');
    const box = await host.locator('#board-canvas').boundingBox();
    await host.mouse.click(box.x + 0.1 * box.width, box.y + 0.6 * box.height);
    await waitBoard(ann, () => {
      const s = window.__board.strokes();
      return s.some((x) => x.kind === 'ellipse') && s.some((x) => x.kind === 'text' && x.text === 'x + 1 = 2');
    });
    await host.click('.board-tools .tool[data-tool="eraser"]');
    await drag(host, 0.08, 0.2, 0.12, 0.2);
    for (const p of [ann, bob, cid]) {
      await waitBoard(p, () => {
        const s = window.__board.strokes();
        return !s.some((x) => x.kind === 'ellipse') && s.length === 3;
      });
    }
    assert.deepEqual((await strokes(bob)).map((s) => s.kind).sort(), ['pen', 'rect', 'text']);

    // Offline: bob's connection goes down, bob draws on, and the stroke reaches ann once bob
    // is back (the rejoin's sync: bob's step 1, the server's step 1, bob's step 2).
    await bob.evaluate(() => window.studyhall.client.pause());
    await bob.locator('#conn:not([data-state="open"])').waitFor({ timeout: T });
    await bob.click('.board-tools .tool[data-tool="pen"]');
    await drag(bob, 0.3, 0.8, 0.45, 0.95);
    assert.equal((await strokes(bob)).filter((s) => s.by === 'bob').length, 2, 'drawn offline, held locally');
    await bob.evaluate(() => window.studyhall.client.resume());
    await waitBoard(ann, () => window.__board.strokes().filter((s) => s.by === 'bob').length === 2);
    assert.deepEqual(await strokes(ann), await strokes(bob));
    await ann.screenshot({ path: path.join(artifactDir(), 'board.png') });
  } catch (e) {
    dumpLogs([host, ann, bob, cid].filter(Boolean).map((p) => ({ name: p.name, lines: p.lines })));
    throw e;
  }
});
