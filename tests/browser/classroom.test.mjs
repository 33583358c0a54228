// The classroom tools in the web client (web/classroom.js), end to end in headless Chromium:
// a teacher runs a whole live class. The class is scheduled, students ask a question before it
// starts, the teacher starts it, runs a quiz the students answer (results with the right option
// marked, and the quiz leaderboard), a word cloud, draws on the board (a student sees the
// stroke), opens breakout groups on a short timer (students are taken to their group, one is
// moved to another group, they chat there, call for help, the teacher listens in, and everyone
// is back in the main room when the timer runs out), ends the class (the room turns read-only
// for students, and the A/V that teacher and a student are in closes) and reads the summary.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, API_KEY } from './lib/harness.mjs';

const T = 20000;
const DESKTOP = { width: 1280, height: 800 };
let server, browser;
const contexts = [];

before(async () => {
  // A fast clock so that the breakout timer's return is seconds, not a minute.
  server = await startServer({ STUDYHALL_CLASS_CLOCK_MS: '200' });
  browser = await launchBrowser();
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  if (browser) await browser.close();
  if (server) await server.stop();
});

async function openPage() {
  const context = await browser.newContext({ viewport: DESKTOP });
  contexts.push(context);
  const page = await context.newPage();
  page.errors = [];
  page.on('console', (m) => m.type() === 'error' && page.errors.push(m.text()));
  page.on('pageerror', (e) => page.errors.push('pageerror: ' + e.message));
  page.on('dialog', (d) => d.accept());
  return page;
}

async function signIn(page, user, role, grants) {
  await page.goto(server.base + '/');
  await page.locator('#dev-form').waitFor({ timeout: T });
  await page.fill('#dev-user', user);
  await page.fill('#dev-name', user[0].toUpperCase() + user.slice(1));
  await page.selectOption('#dev-role', role);
  await page.fill('#dev-rooms', grants);
  await page.click('#dev-submit');
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: T });
}

const until = (page, fn, arg) => page.waitForFunction(fn, arg, { timeout: T });
const tab = (page, name) => page.click(`.tabs button[data-tab="${name}"]`);
const title = (page, text) => page.locator('#room-title', { hasText: text }).waitFor({ timeout: T });

async function say(page, text) {
  await page.fill('#composer-text', text);
  await page.press('#composer-text', 'Enter');
  await page.locator('#msg-list .msg .text').filter({ hasText: text }).first().waitFor({ timeout: T });
}

async function createScheduledRoom(id) {
  const r = await fetch(server.base + '/api/rooms', {
    method: 'POST',
    headers: { authorization: 'Bearer ' + API_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ id, kind: 'class', title: 'Algebra', visibility: 'open', starts_at: Date.now() + 3600000, qa: { enabled: true }, stage: { talk_cap_s: 600, auto_down: false } }),
  });
  assert.equal(r.status, 201, await r.text());
}

test('a teacher runs a whole live class in the web client', { timeout: 240000 }, async () => {
  await createScheduledRoom('algebra');
  const teacher = await openPage();
  const ann = await openPage();
  const ben = await openPage();
  await signIn(teacher, 'teach', 'tutor', 'algebra:host');
  await signIn(ann, 'ann', 'student', 'algebra:member');
  await signIn(ben, 'ben', 'student', 'algebra:member');
  for (const p of [teacher, ann, ben]) await title(p, 'Algebra');

  // Scheduled: the badge says so, and questions are collected before the start.
  for (const p of [teacher, ann]) await p.locator('#class-badge[data-state="scheduled"]').waitFor({ timeout: T });
  await tab(ann, 'qa');
  await ann.fill('#ask-text', 'Will the quiz count?');
  await ann.click('#ask-form button[type=submit]');
  await ann.locator('#question-list li', { hasText: 'Will the quiz count?' }).waitFor({ timeout: T });

  // The host starts the class; everyone sees it live.
  await tab(teacher, 'class');
  await teacher.click('#class-start');
  for (const p of [teacher, ann, ben]) await p.locator('#class-badge[data-state="live"]').waitFor({ timeout: T });

  // Ann on stage: the teacher sees her time on stage against the room's 10-minute cap.
  await tab(teacher, 'people');
  await teacher.locator('#people-list li[data-user="ann"] button', { hasText: 'Stage' }).click();
  await until(teacher, () => /^\d+:\d\d \/ 10:00$/.test((document.querySelector('#stage-list li[data-user="ann"] .stage-time') || {}).textContent || ''));

  // A quiz: results stay hidden from students until it closes.
  await tab(teacher, 'polls');
  await teacher.selectOption('#poll-kind', 'quiz');
  await teacher.fill('#poll-question', '2 + 2?');
  await teacher.fill('#poll-options', '3\n4\n5');
  await teacher.locator('#poll-correct input[value="1"]').check();
  await teacher.click('#poll-submit');
  const quiz = (p) => p.locator('#poll-list .poll[data-kind="quiz"]');
  await quiz(teacher).locator('.poll-state', { hasText: 'open' }).waitFor({ timeout: T });
  for (const [p, pick] of [[ann, '1'], [ben, '0']]) {
    // The poll tab comes up by itself when a poll opens.
    await quiz(p).locator(`input[value="${pick}"]`).check({ timeout: T });
    await quiz(p).locator('button[type=submit]').click();
    await quiz(p).locator('.answered').waitFor({ timeout: T });
    assert.equal(await quiz(p).locator('.bar-row').count(), 0, 'students see no results before the close');
  }
  // The host sees the answers come in, and who answered.
  await until(teacher, () => {
    const r = document.querySelector('#poll-list .poll[data-kind="quiz"] .results .muted');
    return r && /^2 answers/.test(r.textContent);
  });
  await quiz(teacher).locator('.poll-who').click();
  await quiz(teacher).locator('.poll-answers li', { hasText: 'Ann' }).waitFor({ timeout: T });
  await quiz(teacher).locator('.poll-close').click();
  for (const p of [teacher, ann, ben]) {
    await quiz(p).locator('.poll-state', { hasText: 'closed' }).waitFor({ timeout: T });
    const right = quiz(p).locator('.bar-row.correct');
    await right.waitFor({ timeout: T });
    assert.equal(await right.getAttribute('data-option'), '1');
    assert.equal(await right.getAttribute('data-count'), '1');
  }
  // The quiz leaderboard ranks Ann (right) above Ben (wrong).
  for (const p of [ann, teacher]) {
    await p.locator('#quiz-leaderboard li').first().waitFor({ timeout: T });
    assert.equal(await p.locator('#quiz-leaderboard li').first().getAttribute('data-user'), 'ann');
  }

  // A word cloud, shown live.
  await teacher.selectOption('#poll-kind', 'word_cloud');
  await teacher.fill('#poll-question', 'One word for today?');
  await teacher.click('#poll-submit');
  const cloud = (p) => p.locator('#poll-list .poll[data-kind="word_cloud"]');
  for (const [p, w] of [[ann, 'fractions'], [ben, 'Fractions!']]) {
    await cloud(p).locator('.cloud-input').fill(w, { timeout: T });
    await cloud(p).locator('button[type=submit]').click();
    await cloud(p).locator('.answered').waitFor({ timeout: T });
  }
  await cloud(teacher).locator('.word[data-count="2"]', { hasText: 'fractions' }).waitFor({ timeout: T });

  // The board: the teacher draws a stroke with the pen; Ann opens the board and has it in her
  // copy of the document (board.test.mjs checks the ink on the canvas).
  await teacher.click('#board-open');
  await until(teacher, () => window.__board && window.__board.synced);
  const box = await teacher.locator('#board-canvas').boundingBox();
  await teacher.mouse.move(box.x + 0.2 * box.width, box.y + 0.3 * box.height);
  await teacher.mouse.down();
  for (let i = 1; i <= 8; i++) await teacher.mouse.move(box.x + (0.2 + 0.05 * i) * box.width, box.y + (0.3 + 0.04 * i) * box.height);
  await teacher.mouse.up();
  await ann.click('#board-open');
  await until(ann, () => window.__board && window.__board.strokes().some((s) => s.by === 'teach' && s.kind === 'pen'));
  for (const p of [teacher, ann]) await p.click('#board-close');

  // Breakouts on a short timer: two groups, balanced (Ann and Ben apart).
  await tab(teacher, 'class');
  await teacher.fill('#bo-count', '2');
  await teacher.selectOption('#bo-assign', 'balanced');
  await teacher.fill('#bo-minutes', '0.5');
  await teacher.click('#bo-start');
  await teacher.locator('#bo-open .groups li').nth(1).waitFor({ timeout: T });
  // Students are taken to their group, with the time left and a help button.
  await title(ann, 'Group 1');
  await title(ben, 'Group 2');
  // The teacher moves Ben to Ann's group while the groups are open; Ben follows.
  await teacher.selectOption('#bo-open .groups li[data-group="algebra.g2"] select[data-user="ben"]', 'algebra.g1');
  await teacher.locator('#bo-open .groups li[data-group="algebra.g1"] .member-chip[data-user="ben"]').waitFor({ timeout: T });
  await until(ben, () => document.getElementById('room-title').textContent === 'Group 1');
  await ann.locator('#breakout-bar #bo-left').waitFor({ timeout: T });
  await say(ann, 'hello group one');
  await ann.click('#bo-help');
  await teacher.locator('#help-list li', { hasText: 'Ann' }).waitFor({ timeout: T });
  // The teacher listens in on group 1 and sees its chat.
  await teacher.locator('#bo-open .groups li[data-group="algebra.g1"] .listen').click();
  await title(teacher, 'Group 1');
  await teacher.locator('#msg-list .msg .text', { hasText: 'hello group one' }).waitFor({ timeout: T });
  // The timer runs out: everyone is back in the main room.
  for (const p of [ann, ben, teacher]) {
    await p.locator('#room-title', { hasText: 'Algebra' }).waitFor({ timeout: 60000 });
    await until(p, () => document.getElementById('breakout-bar').hidden);
  }
  await say(ben, 'back in class');

  // Teacher and Ann are on A/V when the class ends.
  for (const p of [teacher, ann]) {
    await tab(p, 'av');
    await p.click('#av-join');
    await p.locator('#av-leave').waitFor({ state: 'visible', timeout: T });
  }
  await teacher.locator('#av-grid figure[data-user="ann"]').waitFor({ timeout: T });

  // The host ends the class: students can no longer write, A/V closes for everyone in it; the
  // summary lists who came.
  await tab(teacher, 'class');
  await teacher.click('#class-end');
  for (const p of [teacher, ann, ben]) await p.locator('#class-badge[data-state="ended"]').waitFor({ timeout: T });
  for (const p of [teacher, ann]) {
    await tab(p, 'av');
    await p.locator('#av-join').waitFor({ state: 'visible', timeout: T });
    await until(p, () => window.studyhall.calls.av === null && !document.querySelector('#av-grid figure'));
  }
  await until(ann, () => document.getElementById('composer-text').disabled);
  await tab(teacher, 'class');
  await teacher.click('#class-summary-btn');
  for (const who of ['ann', 'ben']) {
    await teacher.locator(`#summary-attendance li[data-user="${who}"]`).waitFor({ timeout: T });
  }

  for (const p of [teacher, ann, ben]) assert.deepEqual(p.errors, [], 'no console errors');
});

test('a late joiner sees the open poll and the class state at once', { timeout: 120000 }, async () => {
  await createScheduledRoom('late');
  const teacher = await openPage();
  await signIn(teacher, 'teach2', 'tutor', 'late:host');
  await title(teacher, 'Algebra');
  await tab(teacher, 'class');
  await teacher.click('#class-start');
  await teacher.locator('#class-badge[data-state="live"]').waitFor({ timeout: T });
  await tab(teacher, 'polls');
  await teacher.fill('#poll-question', 'Ready?');
  await teacher.fill('#poll-options', 'yes\nno');
  await teacher.click('#poll-submit');
  await teacher.locator('#poll-list .poll[data-state="open"]').waitFor({ timeout: T });

  // A student arriving now sees "live" and the open poll without anything replayed to them.
  const late = await openPage();
  await signIn(late, 'cat', 'student', 'late:member');
  await title(late, 'Algebra');
  await late.locator('#class-badge[data-state="live"]').waitFor({ timeout: T });
  await tab(late, 'polls');
  await late.locator('#poll-list .poll[data-state="open"] input[value="0"]').check({ timeout: T });
  await late.locator('#poll-list .poll[data-state="open"] button[type=submit]').click();
  await late.locator('#poll-list .poll .answered').waitFor({ timeout: T });
  await until(teacher, () => /^1 answer/.test((document.querySelector('#poll-list .poll .results .muted') || {}).textContent || ''));
  assert.deepEqual(late.errors, [], 'no console errors');
});
