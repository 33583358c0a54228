// The README's screenshots of the web client, from a scripted demo: starts the server binary
// (STUDYHALL_BIN) with `serve --dev` on a throw-away database, fills a live class with a
// teacher and five students (chat, questions with upvotes, an answer, a pinned question, a
// raised hand), then opens the web client in headless Chromium as the teacher on a desktop
// (1280x800) and as a student on a phone (375x812) and saves the two screenshots.
// Run with scripts/screenshots (it builds the binary and installs playwright-core first).
// Usage: node screenshots.mjs [OUT_DIR]  (default: the repository's docs/)

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, launchBrowser, API_KEY, within } from './lib/harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.resolve(process.argv[2] || path.join(here, '..', '..', 'docs'));
const T = 20000;
const ROOM = 'calculus-live';

const TEACHER = { user: 'mchen', name: 'Dr. Maya Chen', role: 'tutor', rooms: { [ROOM]: 'host' } };
const STUDENTS = [
  { user: 'sam', name: 'Sam Okafor' },
  { user: 'priya', name: 'Priya Natarajan' },
  { user: 'leo', name: 'Leo Martins' },
  { user: 'aiko', name: 'Aiko Tanaka' },
  { user: 'jonas', name: 'Jonas Weber' },
];

async function token(server, who) {
  const r = await fetch(server.base + '/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ role: 'student', ...who }),
  });
  if (!r.ok) throw new Error('dev token: ' + r.status + ' ' + (await r.text()));
  return (await r.json()).token;
}

/// A scripted participant: a bare WebSocket client running in a browser page (no UI), which
/// signs in with `tok` and answers `req(cmd)` with the command's `ok` (rejects on `error`).
async function actor(browser, server, tok) {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(server.base + '/client.json');
  await page.evaluate(([url, t]) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const pending = new Map();
    let rid = 0;
    window.req = (cmd) => new Promise((res, rej) => {
      rid += 1;
      pending.set(rid, { res, rej });
      ws.send(JSON.stringify({ ...cmd, rid }));
    });
    ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', token: t }));
    ws.onerror = () => reject(new Error('websocket error'));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === 'welcome') resolve();
      const p = m.rid !== undefined && pending.get(m.rid);
      if (!p) return;
      pending.delete(m.rid);
      if (m.type === 'error') p.rej(new Error(m.code + ': ' + m.message));
      else p.res(m);
    };
  }), [server.wsUrl, tok]);
  return {
    req: (cmd) => within(T, cmd.type, page.evaluate((c) => window.req(c), cmd)),
    close: () => context.close(),
  };
}

async function main() {
  const server = await startServer();
  const browser = await launchBrowser();
  const closers = [];
  try {
    const r = await fetch(server.base + '/api/rooms', {
      method: 'POST',
      headers: { authorization: 'Bearer ' + API_KEY, 'content-type': 'application/json' },
      body: JSON.stringify({
        id: ROOM, kind: 'live', title: 'Calculus I · Live: limits and continuity', visibility: 'open',
        qa: { enabled: true, moderated: false, peer_answers: false },
      }),
    });
    if (r.status !== 201) throw new Error('create room: ' + r.status + ' ' + (await r.text()));

    const teacherTok = await token(server, TEACHER);
    const teacher = await actor(browser, server, teacherTok);
    closers.push(teacher);
    await teacher.req({ type: 'join', room: ROOM });
    const s = {};
    for (const who of STUDENTS) {
      s[who.user] = await actor(browser, server, await token(server, who));
      closers.push(s[who.user]);
      await s[who.user].req({ type: 'join', room: ROOM });
    }
    let n = 0;
    const say = (a, text) => a.req({ type: 'send', room: ROOM, text, client_msg_id: 'demo-' + n++ });
    const ask = async (a, text, anonymous = false) => (await a.req({ type: 'ask', room: ROOM, text, anonymous })).id;
    const vote = (a, question) => a.req({ type: 'vote', room: ROOM, question, up: true });

    await say(teacher, 'Welcome, everyone! Today: limits and continuity. Put your questions on the board and upvote the ones you want answered first.');
    await say(s.sam, 'Hi Dr. Chen! 👋');
    await say(s.priya, 'Good morning. Will the slides be posted after class?');
    await say(teacher, 'Yes, they will be in the course page tonight.');
    const q1 = await ask(s.priya, 'Why does the limit of sin(x)/x as x → 0 equal 1 and not 0/0?');
    const q2 = await ask(s.leo, 'Can a function be continuous at a point where it is not differentiable?');
    const q3 = await ask(s.aiko, 'How do one-sided limits relate to the two-sided limit?');
    const q4 = await ask(s.jonas, 'Is there a quick way to spot removable discontinuities?', true);
    await ask(s.sam, 'Will the squeeze theorem be on Friday\'s quiz?');
    for (const a of [s.sam, s.leo, s.aiko, s.jonas]) await vote(a, q1);
    for (const a of [s.sam, s.priya, s.aiko]) await vote(a, q2);
    for (const a of [s.priya, s.leo]) await vote(a, q4);
    await vote(s.jonas, q3);
    await teacher.req({ type: 'answer', room: ROOM, question: q2, text: 'Yes: |x| at x = 0 is continuous but has a corner, so no derivative there.' });
    await teacher.req({ type: 'question_status', room: ROOM, question: q1, status: 'pinned' });
    await say(s.leo, 'The |x| example makes it click, thanks!');
    await say(s.aiko, 'Could we do one more example with a piecewise function?');
    await say(teacher, 'Sure, right after the sin(x)/x question. Raise your hand if you want to try it on the board.');
    await s.sam.req({ type: 'raise_hand', room: ROOM });
    await say(s.jonas, 'The squeeze theorem proof was really clear 🙌');

    // The teacher's desktop.
    const desk = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    closers.push(desk);
    const dp = await desk.newPage();
    await dp.goto(server.base + '/#token=' + encodeURIComponent(teacherTok) + '&room=' + ROOM);
    await ready(dp);
    await dp.locator('#hands-list li', { hasText: 'Sam Okafor' }).waitFor({ timeout: T });
    await dp.screenshot({ path: path.join(out, 'web-client.png') });

    // A student's phone, on the question board.
    const phone = await browser.newContext({ viewport: { width: 375, height: 812 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    closers.push(phone);
    const pp = await phone.newPage();
    await pp.goto(server.base + '/#token=' + encodeURIComponent(await token(server, { user: 'nora', name: 'Nora Lindqvist' })) + '&room=' + ROOM);
    await ready(pp);
    await pp.screenshot({ path: path.join(out, 'web-client-phone.png') });
    console.log('screenshots written: ' + path.join(out, 'web-client.png') + ', ' + path.join(out, 'web-client-phone.png'));
  } finally {
    for (const c of closers.reverse()) await c.close().catch(() => {});
    await browser.close();
    await server.stop();
  }
}

/// The live room on screen with its board and chat loaded, and no toast over them.
async function ready(page) {
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  await page.locator('#room-title', { hasText: 'Calculus I' }).waitFor({ state: 'attached', timeout: T });
  await page.locator('#question-list .question', { hasText: 'sin(x)/x' }).waitFor({ timeout: T });
  await page.locator('#question-list .question .answer', { hasText: '|x|' }).waitFor({ timeout: T });
  await page.locator('#msg-list .msg', { hasText: 'squeeze theorem proof' }).waitFor({ state: 'attached', timeout: T });
  await page.waitForFunction(() => document.getElementById('toast').hidden, null, { timeout: T });
  await page.evaluate(() => document.fonts.ready);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
