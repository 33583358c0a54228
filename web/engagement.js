// engagement.js owns the web client's engagement and room-health screens: the Progress tab
// (daily check-in with its streak, the user's points, level and badges in the room, the
// room's leaderboard by week, month or all time), the `badge` event's toast, and the
// teacher dashboard (host/ta: the `stats` command drawn as KPI cards, a time-series chart,
// the weekly-active ratio against its healthy band, top contributors and churn risk).
// It talks to the server only through the protocol client (studyhall.js) and draws charts
// with charts.js; every piece of user content goes into the page as text.

import { seriesChart, bandChart } from './charts.js';

const DAY = 86400000;

/// "1 pt", "2 pts".
export function pts(n) {
  return n + (Math.abs(n) === 1 ? ' pt' : ' pts');
}

/// `ctx`: {client, el, $, toast, fail, active: () => room id, role: () => room role}.
export function setupEngagement(ctx) {
  const { el, $, toast, fail } = ctx;
  const isMod = () => ['host', 'ta'].includes(ctx.role());

  // -- Progress tab ----------------------------------------------------------------------------

  function renderStreak(streak) {
    let text;
    if (streak && streak.current > 0) text = `🔥 ${streak.current}-day streak · best ${streak.longest}`;
    else if (streak && streak.longest > 0) text = `No streak right now (best ${streak.longest} days) — check in`;
    else text = 'No streak yet — check in';
    $('streak').textContent = text;
  }

  async function loadProfile() {
    const room = ctx.active();
    if (!room) return;
    let ok;
    try {
      ok = await ctx.client.request({ type: 'profile', room });
    } catch (e) {
      $('my-progress').replaceChildren(el('p', { class: 'muted', text: 'No progress here yet.' }));
      return;
    }
    const mine = (ok.rooms || []).find((r) => r.room === room);
    const box = $('my-progress');
    box.replaceChildren();
    if (!mine) {
      box.append(el('p', { class: 'muted', text: 'No points yet: say something!' }));
      renderStreak(null);
      return;
    }
    renderStreak(mine.streak);
    box.append(el('div', { class: 'kpis small' },
      kpi('Points', mine.points, 'my-points'),
      kpi('Level', mine.level, 'my-level'),
      mine.next_level_points !== null && mine.next_level_points !== undefined
        ? kpi('Next level at', mine.next_level_points) : null));
    const ul = el('ul', { class: 'badges', id: 'my-badges' });
    for (const b of mine.badges || []) {
      ul.append(el('li', { class: 'badge-item', title: b.description, dataset: { badge: b.id } }, '🏅 ', b.name));
    }
    if (!(mine.badges || []).length) ul.append(el('li', { class: 'muted', text: 'No badges yet.' }));
    box.append(ul);
  }

  async function loadLeaderboard() {
    const room = ctx.active();
    if (!room) return;
    const period = $('lb-period').value;
    const ol = $('leaderboard');
    try {
      const ok = await ctx.client.request({ type: 'leaderboard', room, period, limit: 10 });
      ol.replaceChildren();
      for (const e of ok.entries) {
        const me = e.user.id === ctx.client.me.user.id;
        ol.append(el('li', { class: me ? 'me' : '', dataset: { user: e.user.id, rank: e.rank } },
          el('span', { class: 'rank', text: '#' + e.rank }),
          el('span', { class: 'name', text: e.user.name }),
          el('span', { class: 'badge', text: 'L' + e.level }),
          el('span', { class: 'pts', text: pts(e.points) })));
      }
      if (!ok.entries.length) ol.append(el('li', { class: 'muted', text: 'Nobody has points in this period yet.' }));
    } catch (e) {
      ol.replaceChildren(el('li', { class: 'muted', text: 'Leaderboard unavailable: ' + (e.detail || e.message) }));
    }
  }

  $('checkin-btn').addEventListener('click', async () => {
    const room = ctx.active();
    if (!room) return;
    try {
      const ok = await ctx.client.request({ type: 'checkin', room });
      renderStreak(ok.streak);
      toast(ok.already
        ? 'Already checked in today (' + ok.day + ')'
        : 'Checked in for ' + ok.day + (ok.points ? ' · +' + pts(ok.points) : ''));
      loadProfile();
      loadLeaderboard();
    } catch (e) {
      fail(e);
    }
  });
  $('lb-period').addEventListener('change', loadLeaderboard);

  ctx.client.on('badge', (m) => {
    toast('🏅 New badge: ' + m.badge.name + (m.badge.description ? ' — ' + m.badge.description : ''));
    if (m.room === ctx.active()) loadProfile();
  });

  // -- teacher dashboard -----------------------------------------------------------------------

  function kpi(label, value, id) {
    return el('div', { class: 'kpi', id }, el('div', { class: 'kpi-value', text: String(value) }),
      el('div', { class: 'kpi-label', text: label }));
  }

  function dur(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms < 60000) return Math.round(ms / 1000) + ' s';
    if (ms < 3600000) return Math.round(ms / 60000) + ' min';
    return (ms / 3600000).toFixed(1) + ' h';
  }

  function dayLabel(ts, tz) {
    try {
      return new Date(ts).toLocaleDateString([], { month: 'short', day: 'numeric', timeZone: tz || 'UTC' });
    } catch {
      return new Date(ts).toISOString().slice(5, 10);
    }
  }

  async function loadStats() {
    const room = ctx.active();
    if (!room) return;
    const days = Number($('dash-range').value);
    const bucket = $('dash-bucket').value;
    const to = Date.now();
    const state = $('dash-state');
    state.textContent = 'Loading…';
    let s;
    try {
      s = await ctx.client.request({ type: 'stats', room, from: to - days * DAY, to, bucket });
    } catch (e) {
      state.textContent = 'Statistics unavailable: ' + (e.detail || e.message);
      return;
    }
    state.textContent = '';
    renderStats(s);
  }

  function renderStats(s) {
    const pct = (v) => (v * 100).toFixed(1) + ' %';
    const q = s.questions || {};
    $('dash-kpis').replaceChildren(
      kpi('Members', s.members, 'kpi-members'),
      kpi('New members', s.new_members, 'kpi-new'),
      kpi('Weekly active', s.weekly_active_members, 'kpi-wau'),
      kpi('Weekly active ratio', pct(s.weekly_active_ratio), 'kpi-ratio'),
      kpi('Questions answered', q.asked ? pct(q.answered_share) : '—', 'kpi-answered'),
      kpi('Median first answer', dur(q.first_answer_ms && q.first_answer_ms.median), 'kpi-median'),
      kpi('p90 first answer', dur(q.first_answer_ms && q.first_answer_ms.p90), 'kpi-p90'),
      kpi('Overdue questions', q.overdue || 0, 'kpi-overdue'),
      kpi('Churn risk', s.churn_risk ? s.churn_risk.count : 0, 'kpi-churn'));
    const labels = s.series.map((b) => dayLabel(b.start, s.tz));
    $('dash-series').replaceChildren(seriesChart({
      labels,
      bars: [
        { name: 'messages', values: s.series.map((b) => b.messages), cls: 's-messages' },
        { name: 'questions', values: s.series.map((b) => b.questions), cls: 's-questions' },
      ],
      line: { name: 'active members', values: s.series.map((b) => b.active_members), cls: 's-active' },
      label: 'messages, questions and active members per ' + s.bucket,
    }));
    const band = s.healthy_band || { low: 0.15, high: 0.3 };
    $('dash-band').replaceChildren(bandChart({
      ratio: s.weekly_active_ratio, low: band.low, high: band.high, label: 'weekly active ratio',
    }));
    $('dash-health').textContent = {
      low: 'Below the healthy band: few members were active this week.',
      healthy: 'In the healthy band.',
      high: 'Above the band: a very active room.',
    }[s.health] || '';
    $('dash-health').dataset.health = s.health;
    const top = $('dash-top');
    top.replaceChildren();
    for (const c of s.top_contributors || []) {
      top.append(el('li', {}, el('span', { class: 'name', text: c.user.name }),
        el('span', { class: 'muted', text: `${pts(c.points)} · ${c.messages} msg · ${c.questions} q · ${c.answers} a` })));
    }
    if (!top.children.length) top.append(el('li', { class: 'muted', text: 'No contributions in this range.' }));
    const churn = $('dash-churn');
    churn.replaceChildren();
    for (const u of (s.churn_risk && s.churn_risk.users) || []) {
      churn.append(el('li', {}, el('span', { class: 'name', text: u.name || u.id }),
        el('span', { class: 'muted', text: u.last_active_ts ? 'last active ' + dayLabel(u.last_active_ts, s.tz) : 'never active' })));
    }
    if (!churn.children.length) churn.append(el('li', { class: 'muted', text: 'Nobody inactive for ' + ((s.churn_risk && s.churn_risk.inactive_days) || 14) + ' days.' }));
  }

  function openDashboard() {
    $('dashboard').hidden = false;
    $('dash-title').textContent = 'Room health · ' + ctx.active();
    loadStats();
  }
  $('dash-open').addEventListener('click', openDashboard);
  $('dash-close').addEventListener('click', () => ($('dashboard').hidden = true));
  $('dash-range').addEventListener('change', loadStats);
  $('dash-bucket').addEventListener('change', loadStats);

  return {
    /// The room on screen changed (or its role did): refresh what the tabs show.
    roomChanged() {
      $('dash-open').hidden = !isMod();
      if (!isMod()) $('dashboard').hidden = true;
      else if (!$('dashboard').hidden) openDashboard();
      $('streak').textContent = '';
      $('my-progress').replaceChildren();
      $('leaderboard').replaceChildren();
    },
    /// The Progress tab was opened.
    showProgress() {
      loadProfile();
      loadLeaderboard();
    },
  };
}
