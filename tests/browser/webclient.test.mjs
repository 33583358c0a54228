// The web client (web/, embedded in the binary at `/`) driven as two users in two browser
// contexts, alice on a desktop (1280x800) and bob on a phone (375x812): dev sign-in, chat both
// ways, typing and presence; the XSS string shown as text with no dialog; a reload shows the
// history with no duplicate; a server crash (SIGKILL) and restart on the same database shows
// "reconnecting", then resumes with no duplicate and no loss (a message typed while down and
// announcements posted before the pages come back); Q&A (ask, upvote, host marks answered);
// a 1v1 call with fake media reaching `connected` with video frames decoded. Screenshots of
// the main screens go to the artifacts folder.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startServer, launchBrowser, artifactDir, within, sleep, devSignIn, API_KEY } from './lib/harness.mjs';

const XSS = '<img src=x onerror=alert(1)>';
const T = 15000;
let server, browser;
const pages = [];
const dialogs = [];

before(async () => {
  // A small replay limit, so that a resume after a longer outage takes the gap path.
  server = await startServer({ STUDYHALL_REPLAY_LIMIT: '5' });
  browser = await launchBrowser();
});

after(async () => {
  for (const p of pages) await p.context().close().catch(() => {});
  if (browser) await browser.close();
  if (server) await server.stop();
});

async function openPage(name, viewport) {
  const context = await browser.newContext({ viewport, permissions: ['camera', 'microphone'] });
  const page = await context.newPage();
  page.lines = [];
  page.on('console', (m) => page.lines.push(m.text()));
  page.on('pageerror', (e) => page.lines.push('pageerror: ' + e.message));
  page.on('dialog', (d) => {
    dialogs.push(name + ': ' + d.message());
    d.dismiss().catch(() => {});
  });
  pages.push(page);
  return page;
}

const signIn = (page, user, role, grants = '') => devSignIn(page, server.base, user, role, grants, T);

const connected = (page) => page.locator('#conn[data-state="open"]').waitFor({ timeout: T });

async function say(page, text) {
  await page.fill('#composer-text', text);
  await page.press('#composer-text', 'Enter');
}

function seeText(page, text) {
  return page.locator('#msg-list .msg .text').filter({ hasText: text }).first().waitFor({ timeout: T });
}

/// Every message on screen: [{seq, id, text}], and whether seqs and ids are unique.
async function onScreen(page) {
  const rows = await page.$$eval('#msg-list .msg', (els) =>
    els.map((e) => ({ seq: Number(e.dataset.seq), id: e.dataset.id, text: e.querySelector('.text').textContent })));
  const seqs = new Set(rows.map((r) => r.seq));
  const ids = new Set(rows.map((r) => r.id));
  return { rows, unique: seqs.size === rows.length && ids.size === rows.length };
}

function countText(rows, text) {
  return rows.filter((r) => r.text === text).length;
}

async function announce(text) {
  const r = await fetch(server.base + '/api/rooms/lobby/messages', {
    method: 'POST',
    headers: { authorization: 'Bearer ' + API_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ text }),
  });
  assert.equal(r.status, 201);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(artifactDir(), name) });
}

let alice, bob;

test('chat: sign-in, both ways, typing, presence, XSS as text, reload, server restart', { timeout: 90000 }, async () => {
  alice = await openPage('alice', { width: 1280, height: 800 });
  bob = await openPage('bob', { width: 375, height: 812 });
  await alice.goto(server.base + '/');
  await alice.locator('#dev-form').waitFor({ timeout: T });
  await shot(alice, 'web-desktop-signin.png');
  await signIn(alice, 'alice', 'tutor', 'lobby:host');
  await signIn(bob, 'bob', 'student');
  assert.equal(await alice.textContent('#room-role'), 'host');

  // Presence: each sees the other online.
  await alice.locator('#people-list li[data-user="bob"]').waitFor({ state: 'attached', timeout: T });
  await bob.locator('#people-list li[data-user="alice"]').waitFor({ state: 'attached', timeout: T });

  // Chat both ways, with typing first.
  await bob.fill('#composer-text', 'hel');
  await alice.locator('#typing', { hasText: 'Bob is typing' }).waitFor({ timeout: T });
  await say(bob, 'hello alice');
  await seeText(alice, 'hello alice');
  await say(alice, 'hi bob');
  await seeText(bob, 'hi bob');
  await say(alice, XSS);
  await seeText(bob, XSS);
  for (const p of [alice, bob]) {
    await seeText(p, XSS);
    const { rows } = await onScreen(p);
    assert.equal(countText(rows, XSS), 1, 'the XSS string is shown once, as text');
    assert.equal(await p.locator('#msg-list img').count(), 0, 'no <img> was created');
  }
  // A reply and a reaction.
  const first = bob.locator('#msg-list .msg', { hasText: 'hi bob' });
  await first.locator('.actions button', { hasText: 'Reply' }).click();
  await say(bob, 'a reply');
  await alice.locator('#msg-list .msg', { hasText: 'a reply' }).locator('.reply-ref', { hasText: 'hi bob' }).waitFor({ timeout: T });
  await alice.locator('#msg-list .msg', { hasText: 'hello alice' }).hover();
  await alice.locator('#msg-list .msg', { hasText: 'hello alice' }).locator('button.react').first().click();
  await bob.locator('#msg-list .msg', { hasText: 'hello alice' }).locator('.chip', { hasText: '👍 1' }).waitFor({ timeout: T });
  await shot(alice, 'web-desktop-chat.png');
  await shot(bob, 'web-phone-chat.png');

  // Reload: the history comes back, each message once.
  await bob.reload();
  await connected(bob);
  await seeText(bob, 'a reply');
  {
    const { rows, unique } = await onScreen(bob);
    assert.ok(unique, 'no duplicate after reload: ' + JSON.stringify(rows));
    for (const t of ['hello alice', 'hi bob', XSS, 'a reply']) assert.equal(countText(rows, t), 1, t);
    await bob.locator('#msg-list .msg', { hasText: 'hello alice' }).locator('.chip', { hasText: '👍 1' }).waitFor({ timeout: T });
  }

  // Crash and restart the server (same address, same database).
  const restarting = server.restart(2500);
  await Promise.all([alice, bob].map((p) => p.locator('#conn[data-state="reconnecting"]', { hasText: 'reconnecting' }).waitFor({ timeout: T })));
  await say(alice, 'typed while down');
  await alice.locator('#outbox-list .msg', { hasText: 'typed while down' }).waitFor({ timeout: T });
  await shot(alice, 'web-desktop-reconnecting.png');
  await restarting;
  // Announcements committed right after the restart: they come by replay (join after_seq)
  // or live, depending on when each page's backoff fires; either way exactly once.
  for (let i = 1; i <= 3; i++) await announce('announcement ' + i);
  await Promise.all([connected(alice), connected(bob)]);
  await say(bob, 'after restart');
  for (const p of [alice, bob]) {
    for (const t of ['typed while down', 'announcement 1', 'announcement 2', 'announcement 3', 'after restart']) {
      await seeText(p, t);
    }
  }
  await sleep(300);
  for (const p of [alice, bob]) {
    const { rows, unique } = await onScreen(p);
    assert.ok(unique, 'no duplicate after the restart: ' + JSON.stringify(rows));
    for (const t of ['hello alice', 'hi bob', XSS, 'a reply', 'typed while down', 'announcement 1', 'announcement 2',
      'announcement 3', 'after restart']) {
      assert.equal(countText(rows, t), 1, t + ' shown exactly once');
    }
    // Seqs on screen are increasing and gap-free from the first message on.
    const seqs = rows.map((r) => r.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    assert.equal(await p.locator('#outbox-list .msg').count(), 0, 'nothing left unsent');
  }
  assert.deepEqual(dialogs, [], 'no dialog fired');
});

test('Q&A: bob asks, alice upvotes, the host marks it answered', { timeout: 60000 }, async () => {
  await alice.click('.tabs button[data-tab="qa"]');
  await bob.click('#mobile-nav button[data-view="side"]');
  await bob.click('.tabs button[data-tab="qa"]');
  await bob.fill('#ask-text', 'What is a group?');
  await bob.click('#ask-form button[type="submit"]');
  const q = alice.locator('#question-list .question', { hasText: 'What is a group?' });
  await q.waitFor({ timeout: T });
  await q.locator('button.vote').click();
  await bob.locator('#question-list .question', { hasText: 'What is a group?' }).locator('button.vote', { hasText: '▲ 1' }).waitFor({ timeout: T });
  await q.locator('button.mark-answered').click();
  await bob.locator('#question-list .question.status-answered', { hasText: 'What is a group?' }).waitFor({ timeout: T });
  await shot(alice, 'web-desktop-qa.png');
  await shot(bob, 'web-phone-qa.png');
  await bob.click('#mobile-nav button[data-view="chat"]');
});

test('1v1 call: alice calls bob, fake media connects and video frames are decoded', { timeout: 60000 }, async () => {
  await alice.click('.tabs button[data-tab="people"]');
  await alice.locator('#people-list li[data-user="bob"] button.call-btn').click();
  await bob.locator('#incoming').waitFor({ timeout: T });
  await bob.locator('#incoming-text', { hasText: 'Alice is calling' }).waitFor({ timeout: T });
  await shot(bob, 'web-phone-incoming.png');
  await bob.click('#incoming-accept');
  await within(30000, 'both connected', Promise.all([alice, bob].map((p) =>
    p.locator('#call-card[data-state="connected"]').waitFor({ timeout: 30000 }))));
  const frames = (p) => p.evaluate(async () => {
    const pc = window.studyhall.calls.call.peer.pc;
    let n = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') n += s.framesDecoded || 0;
    });
    return n;
  });
  const a0 = await frames(alice);
  const b0 = await frames(bob);
  await sleep(1500);
  const a1 = await frames(alice);
  const b1 = await frames(bob);
  assert.ok(a1 > a0, 'alice decodes video frames: ' + a0 + ' -> ' + a1);
  assert.ok(b1 > b0, 'bob decodes video frames: ' + b0 + ' -> ' + b1);
  await alice.click('#call-mic');
  assert.equal(await alice.evaluate(() => window.studyhall.calls.local.getAudioTracks()[0].enabled), false);
  await alice.locator('#call-timer', { hasText: /0:0[1-9]/ }).waitFor({ timeout: T });
  await shot(alice, 'web-desktop-call.png');
  await shot(bob, 'web-phone-call.png');
  await bob.click('#call-hangup');
  await Promise.all([alice, bob].map((p) => p.locator('#call-card').waitFor({ state: 'hidden', timeout: T })));
  assert.deepEqual(dialogs, [], 'no dialog fired');
});

test('resume over a gap, infinite scroll, edit, delete, report and moderation', { timeout: 60000 }, async () => {
  // More missed than the replay limit (5): both pages go offline (the client's pause), 12
  // announcements are posted, and on resume the join answers gap:true and the page fills the
  // range with history.
  for (const p of [alice, bob]) await p.evaluate(() => window.studyhall.client.pause());
  await Promise.all([alice, bob].map((p) => p.locator('#conn[data-state="reconnecting"]').waitFor({ timeout: T })));
  for (let i = 1; i <= 12; i++) await announce('gap ' + i);
  for (const p of [alice, bob]) await p.evaluate(() => window.studyhall.client.resume());
  await Promise.all([connected(alice), connected(bob)]);
  for (const p of [alice, bob]) {
    await seeText(p, 'gap 12');
    await seeText(p, 'gap 1');
    assert.ok((await p.evaluate(() => window.studyhall.client.gapsFilled)) >= 1, 'the resume took the gap path');
    const { rows, unique } = await onScreen(p);
    assert.ok(unique, 'no duplicate after a gap: ' + JSON.stringify(rows.map((r) => r.seq)));
    for (let i = 1; i <= 12; i++) assert.equal(countText(rows, 'gap ' + i), 1, 'gap ' + i);
  }

  // Infinite scroll: 60 more messages, a reload shows the newest 50, scrolling up the rest.
  for (let i = 1; i <= 60; i++) await announce('bulk ' + i);
  await bob.reload();
  await connected(bob);
  await seeText(bob, 'bulk 60');
  assert.equal(await bob.locator('#msg-list .msg', { hasText: 'hello alice' }).count(), 0, 'old messages not loaded yet');
  for (let i = 0; i < 10 && (await bob.locator('#msg-list .msg', { hasText: 'hello alice' }).count()) === 0; i++) {
    await bob.evaluate(() => {
      const m = document.getElementById('messages');
      m.scrollTop = 0;
      m.dispatchEvent(new Event('scroll'));
    });
    await sleep(300);
  }
  await seeText(bob, 'hello alice');
  {
    const { rows, unique } = await onScreen(bob);
    assert.ok(unique, 'no duplicate after paging back');
    for (let i = 1; i <= 60; i++) assert.equal(countText(rows, 'bulk ' + i), 1, 'bulk ' + i);
  }

  // Edit and delete of one's own message.
  await say(bob, 'tpyo here');
  const own = bob.locator('#msg-list .msg', { hasText: 'tpyo here' });
  await own.waitFor({ timeout: T });
  await own.locator('button.edit').click();
  await own.locator('.inline-form input').fill('typo fixed');
  await own.locator('.inline-form button[type="submit"]').click();
  await alice.locator('#msg-list .msg', { hasText: 'typo fixed' }).locator('.meta', { hasText: '(edited)' }).waitFor({ timeout: T });
  await bob.locator('#msg-list .msg', { hasText: 'typo fixed' }).locator('button.delete').click();
  await alice.locator('#msg-list .msg.deleted', { hasText: 'message deleted' }).waitFor({ timeout: T });

  // Report: bob reports alice's message; the host sees it in the moderation tab.
  const target = bob.locator('#msg-list .msg', { hasText: 'hi bob' });
  await target.locator('button.report').click();
  await target.locator('.inline-form input').fill('rude <b>greeting</b>');
  await target.locator('.inline-form button[type="submit"]').click();
  await alice.click('.tabs button[data-tab="mod"]');
  await alice.locator('#report-list li', { hasText: 'rude <b>greeting</b>' }).waitFor({ timeout: T });
  await shot(alice, 'web-desktop-moderation.png');

  // Mute: bob's next message is refused with `muted`, shown to him, and not retried.
  await alice.click('.tabs button[data-tab="people"]');
  await alice.selectOption('#people-list li[data-user="bob"] select.mod-menu', 'mute');
  await bob.locator('#toast', { hasText: 'You are muted' }).waitFor({ timeout: T });
  await say(bob, 'let me talk');
  await bob.locator('#toast', { hasText: 'muted' }).waitFor({ timeout: T });
  await sleep(300);
  assert.equal(await alice.locator('#msg-list .msg', { hasText: 'let me talk' }).count(), 0);
  assert.equal(await bob.locator('#outbox-list .msg').count(), 0);

  // Kick: bob is removed from the room and leaves alice's online list.
  await alice.selectOption('#people-list li[data-user="bob"] select.mod-menu', 'kick');
  await bob.locator('#toast', { hasText: 'removed from lobby' }).waitFor({ timeout: T });
  await alice.locator('#people-list li[data-user="bob"]').waitFor({ state: 'detached', timeout: T });
  assert.deepEqual(dialogs, [], 'no dialog fired');
});

test('platform sign-in: a token in the URL fragment, then taken out of the address bar', { timeout: 30000 }, async () => {
  const carol = await openPage('carol', { width: 1280, height: 800 });
  const token = await server.token('carol');
  await carol.goto(server.base + '/#token=' + encodeURIComponent(token) + '&room=lobby');
  await connected(carol);
  await carol.locator('#room-title', { hasText: 'Lobby' }).waitFor({ timeout: T });
  assert.ok(!carol.url().includes('token='), 'token removed from the URL: ' + carol.url());
  assert.equal(await carol.locator('#dev-form').isVisible(), false);
  await seeText(carol, 'bulk 60');
  // Not the dev form: the page served by the binary has the right headers.
  for (const [p, type] of [['/', 'text/html'], ['/web/app.js', 'text/javascript'], ['/web/style.css', 'text/css']]) {
    const r = await fetch(server.base + p);
    assert.equal(r.status, 200, p);
    assert.ok(r.headers.get('content-type').startsWith(type), p + ': ' + r.headers.get('content-type'));
    assert.equal(r.headers.get('cache-control'), 'no-cache', p);
  }
  assert.equal((await fetch(server.base + '/web/nope.js')).status, 404);
});

test('class grid: two users join a class room\'s A/V and see each other (mesh)', { timeout: 60000 }, async () => {
  await server.room('class-1', 'class');
  for (const p of [alice, bob]) {
    if (p === bob) await bob.click('#mobile-nav button[data-view="rooms"]');
    await p.fill('#join-room', 'class-1');
    await p.click('#join-form button[type="submit"]');
    await p.locator('#room-title', { hasText: 'class-1' }).waitFor({ timeout: T });
    if (p === bob) await bob.click('#mobile-nav button[data-view="side"]');
    await p.click('.tabs button[data-tab="av"]');
  }
  await alice.click('#av-join');
  await alice.locator('#av-leave').waitFor({ timeout: T });
  await bob.click('#av-join');
  await Promise.all([[alice, 'bob'], [bob, 'alice']].map(([p, other]) =>
    p.locator('#av-grid figcaption', { hasText: other + ' · connected' }).waitFor({ timeout: 30000 })));
  await shot(alice, 'web-desktop-class.png');
  await shot(bob, 'web-phone-class.png');
  await bob.click('#av-leave');
  await alice.locator('#av-grid figcaption', { hasText: 'bob' }).waitFor({ state: 'detached', timeout: T });
  await alice.click('#av-leave');
});
