// The web client's engagement screens and the teacher dashboard, driven in headless Chromium
// against the real server: bob (student) chats and asks in the lobby, checks in from the
// Progress tab (streak shown, a second check-in says "already"), earns the first-question
// badge (toast and badge list), marks alice's answer helpful, and appears on the leaderboard;
// alice (host) answers, sees the helpful mark, then opens the room-health dashboard, whose
// charts are drawn from the `stats` command with non-empty bars, a line and the active-ratio
// band marker. A student sees no dashboard and
// the server refuses them `stats`. Screenshots go to the artifacts folder.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startServer, launchBrowser, artifactDir, devSignIn } from './lib/harness.mjs';

const T = 15000;
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

async function openPage(viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.lines = [];
  page.on('console', (m) => page.lines.push(m.text()));
  page.on('pageerror', (e) => page.lines.push('pageerror: ' + e.message));
  pages.push(page);
  return page;
}

const signIn = (page, user, role, grants = '') => devSignIn(page, server.base, user, role, grants, T);

async function say(page, text) {
  await page.fill('#composer-text', text);
  await page.press('#composer-text', 'Enter');
  await page.locator('#msg-list .msg .text').filter({ hasText: text }).first().waitFor({ timeout: T });
}

const tab = (page, name) => page.click(`.tabs button[data-tab="${name}"]`);
const shot = (page, name) => page.screenshot({ path: path.join(artifactDir(), name) });

test('progress tab, badges, leaderboard and the teacher dashboard', { timeout: 90000 }, async () => {
  const alice = await openPage({ width: 1280, height: 900 });
  const bob = await openPage({ width: 375, height: 812 });
  try {
    await signIn(alice, 'alice', 'tutor', 'lobby:host');
    await signIn(bob, 'bob', 'student');

    // Contributions: bob chats and asks; alice answers from the Q&A board.
    await say(bob, 'hello class');
    await say(bob, 'second message');
    await say(alice, 'welcome bob');
    await bob.click('#mobile-nav button[data-view="side"]');
    await tab(bob, 'qa');
    await bob.fill('#ask-text', 'What is a monoid?');
    await bob.click('#ask-form button[type="submit"]');
    // The first question earns a badge: its event shows as a toast.
    await bob.locator('#toast', { hasText: 'New badge' }).waitFor({ timeout: T });

    await tab(alice, 'qa');
    const q = alice.locator('#question-list .question', { hasText: 'What is a monoid?' });
    await q.waitFor({ timeout: T });
    await q.locator('button.answer-btn').click();
    await q.locator('.inline-form input').fill('A set with an associative operation and an identity.');
    await q.locator('.inline-form input').press('Enter');
    const bq = bob.locator('#question-list .question.status-answered', { hasText: 'What is a monoid?' });
    await bq.waitFor({ timeout: T });
    // The asker marks the answer helpful; the host sees the mark (a sequenced update).
    await bq.locator('.answer button.helpful-btn').click();
    await q.locator('.answer.helpful .helpful-mark').waitFor({ timeout: T });

    // Check-in from the Progress tab: a streak of 1, then "already" the second time.
    await tab(bob, 'progress');
    await bob.click('#checkin-btn');
    await bob.locator('#streak', { hasText: '1-day streak' }).waitFor({ timeout: T });
    await bob.click('#checkin-btn');
    await bob.locator('#toast', { hasText: 'Already checked in today' }).waitFor({ timeout: T });
    // Profile: points above zero and the first-question badge in the list.
    await bob.locator('#my-badges li.badge-item').first().waitFor({ timeout: T });
    const points = Number(await bob.textContent('#my-points .kpi-value'));
    assert.ok(points > 0, 'bob has points: ' + points);
    // The leaderboard lists bob, ranked.
    await bob.locator('#leaderboard li[data-user="bob"]').waitFor({ timeout: T });
    assert.equal(await bob.locator('#dash-open').isHidden(), true, 'a student sees no dashboard button');
    await shot(bob, 'web-phone-progress.png');

    // The server refuses `stats` to a student, whatever the page shows.
    const refused = await bob.evaluate(() =>
      window.studyhall.client.request({ type: 'stats', room: 'lobby' }).then(() => 'ok', (e) => e.code));
    assert.equal(refused, 'forbidden');

    // The teacher's dashboard: KPIs, a non-empty time series and the band with its marker.
    await tab(alice, 'progress');
    await alice.locator('#dash-open').waitFor({ state: 'visible', timeout: T });
    await alice.click('#dash-open');
    await alice.locator('#dash-series svg').waitFor({ timeout: T });
    const bars = await alice.$$eval('#dash-series svg rect.bar', (rs) => rs.map((r) => Number(r.dataset.value)));
    assert.ok(bars.length >= 2, 'one bar per series and bucket: ' + bars.length);
    assert.ok(bars.some((v) => v > 0), 'some bar is non-empty: ' + bars);
    const messageBars = await alice.$$eval('#dash-series svg rect.bar.s-messages', (rs) => rs.map((r) => Number(r.dataset.value)));
    assert.ok(messageBars.reduce((a, b) => a + b, 0) >= 3, 'the three messages are counted: ' + messageBars);
    assert.ok(await alice.locator('#dash-series svg polyline.line').count() === 1, 'the active-members line');
    await alice.locator('#dash-band svg rect.marker').waitFor({ state: 'attached', timeout: T });
    // bob's open-room join stored his membership; alice's host role is a token grant, never stored.
    assert.ok(Number(await alice.textContent('#kpi-members .kpi-value')) >= 1, 'members counted');
    await alice.locator('#dash-top li', { hasText: 'Bob' }).waitFor({ timeout: T });
    // A weekly bucket redraws the same data.
    await alice.selectOption('#dash-bucket', 'week');
    await alice.waitForFunction((daily) => {
      const rs = [...document.querySelectorAll('#dash-series svg rect.bar')];
      return rs.length > 0 && rs.length < daily && rs.some((r) => Number(r.dataset.value) > 0);
    }, bars.length, { timeout: T });
    await shot(alice, 'web-desktop-dashboard.png');
    const errors = [...alice.lines, ...bob.lines].filter((l) => l.startsWith('pageerror'));
    assert.deepEqual(errors, []);
  } catch (e) {
    console.log('--- alice console\n' + alice.lines.join('\n') + '\n--- bob console\n' + bob.lines.join('\n'));
    console.log('--- server stderr\n' + server.stderr().slice(-4000));
    throw e;
  }
});
