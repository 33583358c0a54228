// Regression tests of the web client (web/, served by the binary at `/`) for bugs found by
// using it: a failed join must not switch the view; the raise-hand button follows the server's
// `hand` events; the header's `.me` style must not leak onto the leaderboard's own row; the
// Reports list of host/ta loads the open reports with the reported message and resolves them;
// plurals, the streak before the first check-in, the report form's button, the phone's active
// tab, the header's name, the dashboard's members note and a page load with no console error;
// live rooms put the Q&A board in the middle (desktop) and first (phone).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, API_KEY } from './lib/harness.mjs';

const T = 15000;
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 812 };
let server, browser;
const contexts = [];

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  if (browser) await browser.close();
  if (server) await server.stop();
});

async function openPage(viewport) {
  const context = await browser.newContext({ viewport });
  contexts.push(context);
  const page = await context.newPage();
  page.errors = [];
  page.on('console', (m) => m.type() === 'error' && page.errors.push(m.text()));
  page.on('pageerror', (e) => page.errors.push('pageerror: ' + e.message));
  return page;
}

/// The dev sign-in form; waits until connected with some room on screen (the first room of
/// a user with grants is that room, not the lobby).
async function signIn(page, user, role, grants = '') {
  await page.goto(server.base + '/');
  await page.locator('#dev-form').waitFor({ timeout: T });
  await page.fill('#dev-user', user);
  await page.fill('#dev-name', user);
  await page.selectOption('#dev-role', role);
  if (grants) await page.fill('#dev-rooms', grants);
  await page.click('#dev-submit');
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  await until(page, () => !['', 'No room'].includes(document.getElementById('room-title').textContent));
}

async function say(page, text) {
  await page.fill('#composer-text', text);
  await page.press('#composer-text', 'Enter');
  await page.locator('#msg-list .msg .text').filter({ hasText: text }).first().waitFor({ timeout: T });
}

async function openRoom(page, id) {
  // On a phone the join form is on the Rooms view.
  if (await page.locator('#mobile-nav').isVisible()) await page.click('#mobile-nav button[data-view="rooms"]');
  await page.fill('#join-room', id);
  await page.press('#join-room', 'Enter');
}

const tab = (page, name) => page.click(`.tabs button[data-tab="${name}"]`);

/// Waits until `fn(arg)` is truthy in the page (bounded).
const until = (page, fn, arg) => page.waitForFunction(fn, arg, { timeout: T });

test('a failed join leaves the view, the header and the composer on the room before', { timeout: 60000 }, async () => {
  await server.room('algebra', 'group');
  const p = await openPage(DESKTOP);
  await signIn(p, 'fjoin', 'student');
  await openRoom(p, 'algebra');
  await p.locator('#room-title', { hasText: 'algebra' }).waitFor({ timeout: T });
  await say(p, 'in algebra');
  await openRoom(p, 'no-such-room');
  await p.locator('#toast', { hasText: 'not found' }).waitFor({ timeout: T });
  assert.equal(await p.textContent('#room-title'), 'algebra', 'the header stays on algebra');
  assert.equal(await p.locator('.room.active').count(), 1);
  assert.equal(await p.locator('.room.active').getAttribute('data-room'), 'algebra');
  assert.equal(await p.locator('.room[data-room="no-such-room"]').count(), 0, 'no phantom room in the list');
  assert.equal(await p.isEnabled('#composer-text'), true);
  await say(p, 'still algebra');
  // What was typed went to algebra, where the page says it is.
  const r = await fetch(server.base + '/api/rooms/algebra/messages', { headers: { authorization: 'Bearer ' + API_KEY } });
  const texts = (await r.json()).events.map((e) => e.text);
  assert.ok(texts.includes('still algebra'), JSON.stringify(texts));
  // The failed room is not rejoined after a reload either.
  await p.reload();
  await p.locator('#room-title', { hasText: 'algebra' }).waitFor({ timeout: T });
  await p.locator('#conn[data-state="open"]').waitFor({ timeout: T });
});

test('raise hand follows the server: raise, then lower, on two clicks', { timeout: 60000 }, async () => {
  await server.room('hands', 'class');
  const host = await openPage(DESKTOP);
  const kid = await openPage(DESKTOP);
  await signIn(host, 'hhost', 'tutor', 'hands:host');
  await signIn(kid, 'hkid', 'student');
  await openRoom(host, 'hands');
  await openRoom(kid, 'hands');
  await kid.locator('#room-title', { hasText: 'hands' }).waitFor({ timeout: T });
  await host.locator('#room-title', { hasText: 'hands' }).waitFor({ timeout: T });
  await kid.locator('#hand-btn', { hasText: 'Raise hand' }).waitFor({ timeout: T });
  await kid.click('#hand-btn');
  await kid.locator('#toast', { hasText: 'Hand raised' }).waitFor({ timeout: T });
  await host.locator('#hands-list li', { hasText: 'hkid' }).waitFor({ timeout: T });
  await kid.locator('#hand-btn[aria-pressed="true"]', { hasText: 'Lower hand' }).waitFor({ timeout: T });
  await kid.click('#hand-btn');
  await kid.locator('#hand-btn[aria-pressed="false"]', { hasText: 'Raise hand' }).waitFor({ timeout: T });
  await until(host, () => document.querySelectorAll('#hands-list li').length === 0);
  // The host lowers it from the queue: the student's button follows.
  await kid.click('#hand-btn');
  await host.locator('#hands-list li', { hasText: 'hkid' }).locator('button', { hasText: 'Lower' }).click();
  await kid.locator('#hand-btn[aria-pressed="false"]', { hasText: 'Raise hand' }).waitFor({ timeout: T });
});

test('phone: the own leaderboard row is not styled as the header, the header name fits', { timeout: 60000 }, async () => {
  await server.room('lb', 'group');
  const p = await openPage(PHONE);
  await p.goto(server.base + '/');
  await p.locator('#dev-form').waitFor({ timeout: T });
  await p.fill('#dev-user', 'carla');
  await p.fill('#dev-name', 'Carlotta Montgomery');
  await p.click('#dev-submit');
  await p.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  // The first room on screen before the Rooms view is chosen (opening it shows its chat).
  await p.locator('#room-title', { hasText: 'Lobby' }).waitFor({ timeout: T });
  // The header: the full name in its title, never cut below what the bar leaves room for.
  const me = p.locator('#me');
  assert.equal(await me.getAttribute('title'), 'Carlotta Montgomery (student)');
  const head = await me.evaluate((e) => ({ w: e.getBoundingClientRect().width, full: e.scrollWidth }));
  assert.ok(head.w >= 110, 'the name has room in the header: ' + JSON.stringify(head));
  await openRoom(p, 'lb');
  await p.locator('#room-title', { hasText: 'lb' }).waitFor({ timeout: T });
  await say(p, 'one point');
  await p.click('#mobile-nav button[data-view="side"]');
  await tab(p, 'progress');
  const row = p.locator('#leaderboard li[data-user="carla"]');
  await row.waitFor({ timeout: T });
  const box = await row.evaluate((li) => {
    const name = li.querySelector('.name');
    const r = li.getBoundingClientRect();
    return { left: r.left, marginLeft: getComputedStyle(li).marginLeft, nameCut: name.scrollWidth > name.clientWidth + 1, pane: li.parentElement.getBoundingClientRect().left };
  });
  assert.equal(box.marginLeft, '0px', JSON.stringify(box));
  assert.ok(box.left - box.pane < 4, 'the row starts at the list edge: ' + JSON.stringify(box));
  assert.equal(box.nameCut, false, 'the name is shown in full: ' + JSON.stringify(box));
  // One message, one point: "1 pt".
  assert.equal(await row.locator('.pts').textContent(), '1 pt');
});

test('reports: host/ta see the open reports with the message, resolve and dismiss them', { timeout: 60000 }, async () => {
  await server.room('mod', 'group');
  const kid = await openPage(DESKTOP);
  const rude = await openPage(DESKTOP);
  await signIn(kid, 'rkid', 'student');
  await signIn(rude, 'rrude', 'student');
  for (const p of [kid, rude]) {
    await openRoom(p, 'mod');
    await p.locator('#room-title', { hasText: 'mod' }).waitFor({ timeout: T });
  }
  await say(rude, 'first rude thing');
  await say(rude, 'second rude thing');
  for (const text of ['first rude thing', 'second rude thing']) {
    const m = kid.locator('#msg-list .msg', { hasText: text });
    await m.waitFor({ timeout: T });
    await m.hover();
    await m.locator('button.report').click();
    const submit = m.locator('.inline-form button[type="submit"]');
    assert.equal(await submit.textContent(), 'Report', 'the report form says what it does');
    await m.locator('.inline-form input').fill('rude: ' + text);
    await submit.click();
    await kid.locator('#toast', { hasText: 'Reported' }).waitFor({ timeout: T });
    await m.locator('.inline-form').waitFor({ state: 'detached', timeout: T });
  }
  // The teacher opens the page after the reports were filed.
  const teacher = await openPage(DESKTOP);
  await signIn(teacher, 'rteach', 'tutor', 'mod:host');
  await openRoom(teacher, 'mod');
  await teacher.locator('#room-title', { hasText: 'mod' }).waitFor({ timeout: T });
  await tab(teacher, 'mod');
  const first = teacher.locator('#report-list li', { hasText: 'rude: first rude thing' });
  await first.waitFor({ timeout: T });
  assert.equal(await first.locator('.report-target .text').textContent(), 'first rude thing');
  assert.match(await first.locator('.report-target .author').textContent(), /rrude/i);
  assert.equal(await teacher.locator('#report-list li').count(), 2);
  await first.locator('button', { hasText: 'Dismiss' }).click();
  await first.waitFor({ state: 'detached', timeout: T });
  const second = teacher.locator('#report-list li', { hasText: 'rude: second rude thing' });
  await second.locator('button', { hasText: 'Resolve' }).click();
  await second.waitFor({ state: 'detached', timeout: T });
  const r = await fetch(server.base + '/api/rooms/mod/reports?all=true', { headers: { authorization: 'Bearer ' + API_KEY } });
  const all = (await r.json()).reports;
  assert.deepEqual(all.map((x) => [x.reason, x.resolution, x.resolved_by]), [
    ['rude: first rude thing', 'dismissed', 'rteach'],
    ['rude: second rude thing', 'resolved', 'rteach'],
  ]);
  // A report filed while the tab is open shows up with its message.
  await say(rude, 'third rude thing');
  const m = kid.locator('#msg-list .msg', { hasText: 'third rude thing' });
  await m.hover();
  await m.locator('button.report').click();
  await m.locator('.inline-form input').fill('rude again');
  await m.locator('.inline-form button[type="submit"]').click();
  const third = teacher.locator('#report-list li', { hasText: 'rude again' });
  await third.locator('.report-target .text', { hasText: 'third rude thing' }).waitFor({ timeout: T });
  assert.equal(await teacher.locator('#report-list li').count(), 1);
});

test('progress, phone nav, dashboard note and a page load with no console error', { timeout: 60000 }, async () => {
  await server.room('prog', 'group');
  const p = await openPage(PHONE);
  await p.goto(server.base + '/');
  await signIn(p, 'pteach', 'tutor', 'prog:host');
  await openRoom(p, 'prog');
  await p.locator('#room-title', { hasText: 'prog' }).waitFor({ timeout: T });
  // The phone's bottom bar marks the view on screen.
  const current = () => p.$$eval('#mobile-nav button[aria-current="page"]', (bs) => bs.map((b) => b.dataset.view));
  assert.deepEqual(await current(), ['chat']);
  await p.click('#mobile-nav button[data-view="side"]');
  assert.deepEqual(await current(), ['side']);
  const look = await p.$$eval('#mobile-nav button', (bs) => bs.map((b) => getComputedStyle(b).backgroundColor + getComputedStyle(b).color));
  assert.equal(new Set(look).size, 2, 'the active button looks different: ' + look);
  // Before the first check-in the streak says so, not "0-day streak".
  await tab(p, 'progress');
  await p.locator('#streak', { hasText: 'No streak yet' }).waitFor({ timeout: T });
  await p.click('#checkin-btn');
  await p.locator('#streak', { hasText: '1-day streak' }).waitFor({ timeout: T });
  // The dashboard explains why members can be fewer than active users.
  await p.click('#dash-open');
  await p.locator('#kpi-members').waitFor({ timeout: T });
  await p.locator('#dash-note', { hasText: 'token grants' }).waitFor({ timeout: T });
  await p.click('#dash-close');
  // A fresh load (signed out and signed in) logs no error.
  const fresh = await openPage(DESKTOP);
  await signIn(fresh, 'clean', 'student');
  await fresh.reload();
  await fresh.locator('#conn[data-state="open"]').waitFor({ timeout: T });
  await fresh.locator('#room-title', { hasText: 'Lobby' }).waitFor({ timeout: T });
  assert.deepEqual(fresh.errors, [], 'no console error on load');
  assert.deepEqual(p.errors, []);
});

test('live rooms: the question board is central on desktop and first on a phone', { timeout: 60000 }, async () => {
  await server.room('live-talk', 'live');
  const host = await openPage(DESKTOP);
  await signIn(host, 'lhost', 'tutor', 'live-talk:host');
  await openRoom(host, 'live-talk');
  await host.locator('#room-title', { hasText: 'live-talk' }).waitFor({ timeout: T });
  const board = host.locator('#question-list');
  await host.locator('#ask-text').waitFor({ state: 'visible', timeout: T });
  await host.fill('#ask-text', 'What is a limit?');
  await host.click('#ask-form button[type="submit"]');
  await board.locator('.question', { hasText: 'What is a limit?' }).waitFor({ timeout: T });
  const geo = await host.evaluate(() => {
    const r = (id) => document.getElementById(id).getBoundingClientRect();
    return { qa: r('ask-form'), chat: r('chat-pane'), w: innerWidth };
  });
  const mid = geo.qa.left + geo.qa.width / 2;
  assert.ok(mid > geo.w * 0.3 && mid < geo.w * 0.7, 'Q&A in the middle: ' + JSON.stringify(geo));
  assert.ok(geo.qa.width > geo.chat.width, 'Q&A wider than the chat: ' + JSON.stringify(geo));
  assert.ok(geo.chat.width > 200, 'the chat is still there: ' + JSON.stringify(geo));
  // Back in a group room, the usual layout.
  await openRoom(host, 'lobby');
  await host.locator('#room-title', { hasText: 'Lobby' }).waitFor({ timeout: T });
  await until(host, () => {
    const c = document.getElementById('chat-pane').getBoundingClientRect();
    return c.left + c.width / 2 > innerWidth * 0.3 && c.left + c.width / 2 < innerWidth * 0.7;
  });
  // Phone: the live room opens on the question board, and the bar offers it.
  const kid = await openPage(PHONE);
  await signIn(kid, 'lkid', 'student');
  await openRoom(kid, 'live-talk');
  await kid.locator('#question-list .question', { hasText: 'What is a limit?' }).waitFor({ state: 'visible', timeout: T });
  assert.deepEqual(await kid.$$eval('#mobile-nav button[aria-current="page"]', (bs) => bs.map((b) => b.dataset.view)), ['qa']);
  await kid.click('#mobile-nav button[data-view="chat"]');
  await kid.locator('#composer-text').waitFor({ state: 'visible', timeout: T });
});
