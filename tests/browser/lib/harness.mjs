// Test harness of the browser tests: starts the studyhall server binary (STUDYHALL_BIN) on
// 127.0.0.1:0 with a throw-away SQLite database, creates rooms through the HTTP API, mints
// tokens through `POST /dev/token`, serves tests/browser/page/ over http://127.0.0.1:PORT,
// launches Debian's headless Chromium through playwright-core (fake camera and microphone),
// starts coturn in the foreground in a test-owned directory, and computes TURN REST
// credentials; restarts the server (SIGKILL, then the same address and database) for the
// reconnect tests. Every wait is bounded; every process started here is stopped by its handle.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import dgram from 'node:dgram';
import { mkdtempSync, rmSync, readFileSync, mkdirSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const PAGE_DIR = path.join(here, '..', 'page');
export const JWT_SECRET = 'browser-test-secret-0123456789abcdef';
export const API_KEY = 'browser-test-api-key';

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/// Resolves `p`, or rejects after `ms` with `what`.
export function within(ms, what, p) {
  let timer;
  return Promise.race([
    p,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error('timed out after ' + ms + ' ms: ' + what)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

function killChild(child) {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  return within(5000, 'child exit', new Promise((r) => child.once('exit', r))).catch(() => {
    child.kill('SIGKILL');
  });
}

/// The server binary, started on a free port. `env` adds or overrides STUDYHALL_* settings.
export async function startServer(env = {}) {
  const bin = process.env.STUDYHALL_BIN;
  if (!bin) throw new Error('STUDYHALL_BIN must name the studyhall binary (cargo build --bin studyhall)');
  const dir = mkdtempSync(path.join(tmpdir(), 'studyhall-browser-'));
  let child;
  let stderr = '';
  // Starts the binary on `listen` with the same database every time; resolves its address.
  const launch = async (listen) => {
    child = spawn(bin, ['serve', '--dev'], {
      env: {
        ...process.env,
        STUDYHALL_ADDR: listen,
        STUDYHALL_DATABASE_URL: 'sqlite://' + path.join(dir, 'x.db'),
        STUDYHALL_JWT_SECRET: JWT_SECRET,
        STUDYHALL_API_KEY: API_KEY,
        STUDYHALL_LOG: process.env.STUDYHALL_LOG || 'warn',
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const c = child;
    c.stderr.on('data', (d) => {
      stderr += d;
    });
    return within(
      20000,
      'studyhall listening line',
      new Promise((resolve, reject) => {
        let out = '';
        c.stdout.on('data', (d) => {
          out += d;
          const m = out.match(/studyhall listening on http:\/\/(\S+)/);
          if (m) resolve(m[1]);
        });
        c.once('exit', (code) => reject(new Error('studyhall exited ' + code + ': ' + stderr)));
      }),
    );
  };
  const addr = await launch('127.0.0.1:0');
  const base = 'http://' + addr;
  return {
    base,
    wsUrl: 'ws://' + addr + '/ws',
    stderr: () => stderr,
    async room(id, kind) {
      const r = await fetch(base + '/api/rooms', {
        method: 'POST',
        headers: { authorization: 'Bearer ' + API_KEY, 'content-type': 'application/json' },
        body: JSON.stringify({ id, kind, title: id, visibility: 'open' }),
      });
      if (r.status !== 201) throw new Error('create room ' + id + ': ' + r.status + ' ' + (await r.text()));
    },
    async token(user, extra = {}) {
      const r = await fetch(base + '/dev/token', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ user, name: user, ...extra }),
      });
      if (r.status !== 200) throw new Error('dev token: ' + r.status + ' ' + (await r.text()));
      return (await r.json()).token;
    },
    /// Kills the server with SIGKILL (a crash: no `bye`), waits `downMs`, and starts it
    /// again on the same address with the same database.
    async restart(downMs = 1500) {
      const c = child;
      c.kill('SIGKILL');
      await within(5000, 'server exit', new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r() : c.once('exit', r))));
      await sleep(downMs);
      const again = await launch(addr);
      if (again !== addr) throw new Error('restarted on ' + again + ', not ' + addr);
    },
    async stop() {
      await killChild(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/// Signs `user` in through the web client's dev form at `base` (a `serve --dev` server) and
/// waits until the page is connected and shows the lobby.
export async function devSignIn(page, base, user, role, grants = '', ms = 15000) {
  await page.goto(base + '/');
  await page.locator('#dev-form').waitFor({ timeout: ms });
  await page.fill('#dev-user', user);
  await page.fill('#dev-name', user[0].toUpperCase() + user.slice(1));
  await page.selectOption('#dev-role', role);
  if (grants) await page.fill('#dev-rooms', grants);
  await page.click('#dev-submit');
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: ms });
  await page.locator('#room-title', { hasText: 'Lobby' }).waitFor({ timeout: ms });
}

/// What every WebRTC test file sets up: a server (with `env`), the test page and a browser.
/// Push opened clients to `clients`; `stop()` closes them and everything else, in order, and
/// also cleans up after a start that failed half-way.
export async function startRig(env = {}) {
  const rig = { server: null, page: null, browser: null, clients: [] };
  rig.stop = async () => {
    for (const c of rig.clients) await c.close().catch(() => {});
    if (rig.browser) await rig.browser.close();
    if (rig.page) await rig.page.close();
    if (rig.server) await rig.server.stop();
  };
  try {
    rig.server = await startServer(env);
    rig.page = await servePage();
    rig.browser = await launchBrowser();
  } catch (e) {
    await rig.stop();
    throw e;
  }
  return rig;
}

/// tests/browser/page/ over HTTP on 127.0.0.1 (a secure context for getUserMedia).
export async function servePage() {
  const types = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8' };
  const server = http.createServer((req, res) => {
    const name = new URL(req.url, 'http://x').pathname.replace(/^\/+/, '') || 'index.html';
    if (!/^[A-Za-z0-9_.-]+$/.test(name) || name.startsWith('.')) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = readFileSync(path.join(PAGE_DIR, name));
      res.writeHead(200, { 'content-type': types[path.extname(name)] || 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: 'http://127.0.0.1:' + server.address().port + '/index.html',
    close: () => new Promise((r) => server.close(r)),
  };
}

/// Chromium, started through lib/chromium-niced (which says why and how).
const NICED_CHROMIUM = fileURLToPath(new URL('./chromium-niced', import.meta.url));

/// Headless Chromium with fake camera and microphone. `extraArgs`, e.g. a smaller fake
/// capture, are appended.
export function launchBrowser(extraArgs = []) {
  return within(
    30000,
    'chromium launch',
    chromium.launch({
      executablePath: NICED_CHROMIUM,
      args: ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--disable-gpu', ...extraArgs],
    }),
  );
}

/// A fresh browser context on the test page, signed in to the server as `token`.
export async function openClient(browser, pageUrl, wsUrl, token, name) {
  const context = await browser.newContext({ permissions: ['camera', 'microphone'] });
  const page = await context.newPage();
  const lines = [];
  page.on('console', (m) => lines.push(m.text()));
  page.on('pageerror', (e) => lines.push('pageerror: ' + e.message));
  await page.goto(pageUrl);
  const welcome = await page.evaluate(([u, t]) => window.sh.connect(u, t), [wsUrl, token]);
  return {
    name,
    page,
    context,
    welcome,
    session: welcome.session,
    lines,
    eval: (fn, arg) => page.evaluate(fn, arg),
    close: () => context.close(),
  };
}

/// Where screenshots go (scripts/test points this at "$target/browser-artifacts").
export function artifactDir() {
  const dir = process.env.STUDYHALL_BROWSER_ARTIFACTS || path.join(here, '..', 'artifacts');
  mkdirSync(dir, { recursive: true });
  return dir;
}

// -- coturn ------------------------------------------------------------------------------------

function freeUdpPort() {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket('udp4');
    s.once('error', reject);
    s.bind(0, '127.0.0.1', () => {
      const port = s.address().port;
      s.close(() => resolve(port));
    });
  });
}

/// Whether TCP 127.0.0.1:port can be bound right now.
function tcpFree(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/// A port of 127.0.0.1 free for both UDP and TCP (coturn listens on both): the ephemeral
/// range is shared with every other test's outgoing TCP connections.
async function freeTurnPort() {
  for (let i = 0; i < 50; i++) {
    const port = await freeUdpPort();
    if (await tcpFree(port)) return port;
  }
  throw new Error('no port free for both UDP and TCP');
}

/// One STUN Binding request to 127.0.0.1:port; true if a Binding success response came back.
function stunPing(port) {
  return new Promise((resolve) => {
    const s = dgram.createSocket('udp4');
    const req = Buffer.alloc(20);
    req.writeUInt16BE(0x0001, 0); // Binding request
    req.writeUInt16BE(0, 2);
    req.writeUInt32BE(0x2112a442, 4); // magic cookie
    for (let i = 8; i < 20; i++) req[i] = (Math.random() * 256) | 0;
    const done = (ok) => {
      clearTimeout(timer);
      s.close();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 300);
    s.on('message', (m) => done(m.length >= 20 && m.readUInt16BE(0) === 0x0101));
    s.on('error', () => done(false));
    s.send(req, port, '127.0.0.1');
  });
}

/// coturn in the foreground with the TURN REST secret `secret`, on a free port of 127.0.0.1.
/// A port can still be taken between the check and coturn's bind (another test's outgoing
/// connection): coturn then says "Address already in use", and it is started again on
/// another port, three tries at most.
export async function startCoturn(secret) {
  let last;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      return await startCoturnOn(secret, await freeTurnPort());
    } catch (e) {
      last = e;
      if (!e.portTaken) throw e;
    }
  }
  throw last;
}

async function startCoturnOn(secret, port) {
  const dir = mkdtempSync(path.join(tmpdir(), 'studyhall-turn-'));
  const child = spawn(
    process.env.TURNSERVER || 'turnserver',
    [
      '-n',
      '--log-file=stdout',
      '--pidfile=' + path.join(dir, 'turn.pid'),
      '--userdb=' + path.join(dir, 'turndb'),
      '--use-auth-secret',
      '--static-auth-secret=' + secret,
      '--realm=test',
      '--allow-loopback-peers',
      '--no-tls',
      '--no-dtls',
      '--listening-ip=127.0.0.1',
      '--listening-port=' + port,
      '--no-cli',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout.on('data', (d) => {
    out += d;
  });
  child.stderr.on('data', (d) => {
    out += d;
  });
  const deadline = Date.now() + 15000;
  for (;;) {
    if (child.exitCode !== null) throw new Error('turnserver exited ' + child.exitCode + ':\n' + out);
    if (await stunPing(port)) break;
    const taken = out.includes('Address already in use');
    if (taken || Date.now() > deadline) {
      await killChild(child);
      rmSync(dir, { recursive: true, force: true });
      const e = new Error('turnserver did not answer STUN on ' + port + ':\n' + out);
      e.portTaken = taken;
      throw e;
    }
    await sleep(100);
  }
  return {
    port,
    url: 'turn:127.0.0.1:' + port,
    log: () => out,
    async stop() {
      await killChild(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/// The TURN REST API credential (coturn `use-auth-secret`), computed independently of the
/// server: username `EXPIRY:USER`, credential base64(HMAC-SHA1(secret, username)).
export function turnCredential(secret, user, expiryS) {
  const username = expiryS + ':' + user;
  const credential = createHmac('sha1', secret).update(username).digest('base64');
  return { username, credential };
}

// -- assertions on media ------------------------------------------------------------------------

/// How much inbound media grew between two stats samples of one peer connection: video
/// framesDecoded and audio bytesReceived, summed over inbound streams of that kind.
export function growth(a, b) {
  const sum = (s, kind, field) => s.inbound.filter((x) => x.kind === kind).reduce((n, x) => n + x[field], 0);
  return {
    videoFrames: sum(b, 'video', 'framesDecoded') - sum(a, 'video', 'framesDecoded'),
    audioBytes: sum(b, 'audio', 'bytesReceived') - sum(a, 'audio', 'bytesReceived'),
    videoStreams: b.inbound.filter((x) => x.kind === 'video').length,
    pair: b.pair,
  };
}

/// Two getStats() samples `gapMs` apart on `client`'s peer `key` (see `growth`).
export async function mediaGrowth(client, key, gapMs = 2000) {
  const a = await client.eval((k) => window.sh.stats(k), key);
  await sleep(gapMs);
  const b = await client.eval((k) => window.sh.stats(k), key);
  return growth(a, b);
}

/// On failure, what each page logged (candidates, icecandidateerror, refused signals).
export function dumpLogs(clients) {
  for (const c of clients) {
    if (!c) continue;
    console.log('--- page log of ' + c.name + ' ---\n' + c.lines.slice(-60).join('\n'));
  }
}
