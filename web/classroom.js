// classroom.js owns the web client's live-class tools: the Polls tab (host/ta create, open and
// close polls, quizzes and word clouds; members answer, change their answer while it is open and
// see results when the poll allows; quizzes mark the right options and rank the room in a quiz
// leaderboard), and the Class tab (the class state with the host's start, end and reopen, the
// end-of-class summary; breakout groups: host/ta open, time, broadcast to, listen in on and
// close them, students are taken to their group and back, can call for help, and see the time
// left). It talks to the server only through the protocol client (studyhall.js) and the page
// only through the helpers app.js hands it; every piece of user content goes into the page as
// text.

const KIND_LABEL = { poll: 'Poll', quiz: 'Quiz', word_cloud: 'Word cloud' };

/// "4:05" for 245 s; "0:00" once past.
export function clock(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return Math.floor(s / 60) + ':' + String(s % 60).padStart(2, '0');
}

/// `ctx`: {client, el, $, toast, fail, active: () => room id, role: () => room role,
/// openRoom: (id) => Promise<bool>, renderRoomHead: () => void}.
export function setupClassroom(ctx) {
  const { el, $, toast, fail } = ctx;
  const client = ctx.client;
  const isMod = (role) => role === 'host' || role === 'ta';
  const polls = new Map(); // room -> Map(poll id -> poll, as this user may see it)
  const myAnswers = new Map(); // poll id -> {choices, text}
  // What a student has typed or ticked but not sent yet, so that a re-render (results come in
  // every second) does not wipe it: poll id -> {choices, text}.
  const drafts = new Map();
  const classes = new Map(); // room -> {state, starts_at, ends_at, started_at, ended_at}
  const breakouts = new Map(); // parent room -> {groups, closes_at, mine}
  const parentOf = new Map(); // group room -> parent room
  const helpRequests = []; // {room, group_room, user, ts}
  let leaderboard = null; // quiz leaderboard of the room on screen

  const roomPolls = (room) => {
    if (!polls.has(room)) polls.set(room, new Map());
    return polls.get(room);
  };

  // -- class state -------------------------------------------------------------------------

  function classOf(room) {
    return classes.get(room) || null;
  }

  function setClass(room, fields) {
    classes.set(room, { ...(classes.get(room) || {}), ...fields });
    if (room === ctx.active()) {
      renderClass();
      ctx.renderRoomHead();
    }
  }

  /// What the room head shows: "Scheduled", "Live", "Ended" (nothing when unknown).
  function stateBadge(room) {
    const c = classOf(room);
    if (!c || !c.state) return null;
    return el('span', {
      id: 'class-badge', class: 'badge class-' + c.state, dataset: { state: c.state },
      text: { scheduled: 'Scheduled', live: 'Live', ended: 'Ended' }[c.state] || c.state,
    });
  }

  async function classCmd(type) {
    const room = ctx.active();
    try {
      const ok = await client.request({ type, room });
      if (ok.state) setClass(room, { state: ok.state });
    } catch (e) {
      fail(e);
    }
  }

  async function showSummary() {
    const room = ctx.active();
    let ok;
    try {
      ok = await client.request({ type: 'class_summary', room });
    } catch (e) {
      return fail(e);
    }
    const s = ok.summary;
    const box = $('class-summary');
    const mins = (ms) => Math.round(ms / 60000) + ' min';
    box.replaceChildren(
      el('h3', { text: 'Class summary' }),
      el('p', { class: 'muted', text: `${s.attendance.length} attended · ${s.questions.asked} questions, ${s.questions.answered} answered · ${s.polls.length} polls` }),
      el('h4', { text: 'Attendance' }),
      el('ul', { class: 'people', id: 'summary-attendance' }, s.attendance.map((a) =>
        el('li', { dataset: { user: a.user } }, el('span', { text: a.name || a.user }), ' ',
          el('span', { class: 'muted', text: mins(a.present_ms) + (a.sessions > 1 ? ` · ${a.sessions} sessions` : '') })))),
      s.stage.length ? el('h4', { text: 'Time on stage' }) : null,
      s.stage.length ? el('ul', { class: 'people' }, s.stage.map((a) =>
        el('li', {}, el('span', { text: a.name || a.user }), ' ', el('span', { class: 'muted', text: mins(a.on_stage_ms) })))) : null,
      s.polls.length ? el('h4', { text: 'Polls' }) : null,
      s.polls.length ? el('ul', { class: 'people' }, s.polls.map((p) =>
        el('li', {}, el('span', { text: p.question }), ' ',
          el('span', { class: 'muted', text: p.results ? `${p.results.answers} answers` : p.state })))) : null,
    );
    box.hidden = false;
  }

  // -- breakouts ---------------------------------------------------------------------------

  function groupInfo(groupRoom) {
    const parent = parentOf.get(groupRoom);
    const b = parent && breakouts.get(parent);
    const g = b && b.groups && b.groups.find((x) => x.room === groupRoom);
    return { parent, breakout: b, group: g };
  }

  function noteBreakout(parent, b) {
    breakouts.set(parent, b);
    for (const g of b.groups || []) parentOf.set(g.room, parent);
    if (b.mine) parentOf.set(b.mine, parent);
  }

  async function openBreakout(e) {
    e.preventDefault();
    const room = ctx.active();
    const count = Number($('bo-count').value);
    const minutes = Number($('bo-minutes').value);
    const cmd = { type: 'breakout_open', room, count, assign: $('bo-assign').value };
    if (minutes > 0) cmd.duration_s = Math.round(minutes * 60);
    try {
      const ok = await client.request(cmd);
      noteBreakout(room, { groups: ok.groups, closes_at: ok.closes_at || null });
      toast(ok.groups.length + ' groups open');
    } catch (err) {
      fail(err);
    }
    renderClass();
  }

  async function closeBreakout() {
    try {
      await client.request({ type: 'breakout_close', room: ctx.active() });
    } catch (e) {
      fail(e);
    }
  }

  async function broadcast(e) {
    e.preventDefault();
    const text = $('bo-broadcast-text').value.trim();
    if (!text) return;
    try {
      await client.request({ type: 'breakout_broadcast', room: ctx.active(), text });
      $('bo-broadcast-text').value = '';
      toast('Sent to every group');
    } catch (err) {
      fail(err);
    }
  }

  async function askHelp() {
    try {
      await client.request({ type: 'help', room: ctx.active() });
      toast('Your teacher has been asked to come by');
    } catch (e) {
      fail(e);
    }
  }

  /// Back from a group room to its parent: leaves the group (so it no longer counts as
  /// present there) and shows the parent.
  async function backToParent(groupRoom) {
    const parent = parentOf.get(groupRoom);
    if (!parent) return;
    if (ctx.active() === groupRoom) await ctx.openRoom(parent);
    const r = client.rooms.get(groupRoom);
    if (r && r.joined) {
      r.wanted = false;
      r.joined = false;
      client.request({ type: 'leave', room: groupRoom }).catch(() => {});
    }
    renderBar();
  }

  /// The bar above the chat while the room on screen is a breakout group.
  function renderBar() {
    const bar = $('breakout-bar');
    const room = ctx.active();
    const { parent, breakout, group } = groupInfo(room);
    if (!parent) {
      bar.hidden = true;
      return;
    }
    const left = breakout && breakout.closes_at ? breakout.closes_at - Date.now() : null;
    const mod = isMod(ctx.role());
    bar.replaceChildren(
      el('span', { class: 'bo-title', text: 'Breakout: ' + ((group && group.title) || room) }),
      left !== null ? el('span', { id: 'bo-left', class: 'timer' + (left < 60000 ? ' warn' : ''), text: clock(left) + ' left' }) : null,
      mod ? null : el('button', { type: 'button', id: 'bo-help', onclick: askHelp }, '🙋 Ask for help'),
      el('button', { type: 'button', id: 'bo-back', onclick: () => backToParent(room) }, mod ? 'Back to class' : 'Back to main room'),
    );
    bar.hidden = false;
  }

  client.on('breakout_assigned', async (m) => {
    parentOf.set(m.group_room, m.room);
    const b = breakouts.get(m.room) || { groups: [], closes_at: null };
    b.mine = m.group_room;
    breakouts.set(m.room, b);
    toast('You are in a breakout group now');
    // Go to the group straight away (from the parent or from a group one was moved out of).
    const onScreen = ctx.active();
    if (onScreen === m.room || parentOf.get(onScreen) === m.room) {
      const old = onScreen !== m.room ? onScreen : null;
      if (await ctx.openRoom(m.group_room) && old && old !== m.group_room) {
        const r = client.rooms.get(old);
        if (r) {
          r.wanted = false;
          r.joined = false;
        }
      }
    }
    renderBar();
  });

  client.on('breakout_warning', (m) => {
    const b = breakouts.get(m.room);
    if (b) b.closes_at = m.closes_at;
    toast('Breakout groups close in ' + clock(m.closes_at - Date.now()));
    renderBar();
  });

  client.on('breakout_closed', async (m) => {
    // Heard in the parent and in each group: return once.
    const parent = parentOf.get(m.room) || m.room;
    const b = breakouts.get(parent);
    if (!b || b.closed) return;
    b.closed = true;
    breakouts.delete(parent);
    toast('Breakout groups closed: back to the main room');
    const onScreen = ctx.active();
    for (const [g, p] of [...parentOf]) {
      if (p !== parent) continue;
      if (g === onScreen) await backToParent(g);
      else {
        const r = client.rooms.get(g);
        if (r && r.joined) {
          r.wanted = false;
          r.joined = false;
          client.request({ type: 'leave', room: g }).catch(() => {});
        }
      }
      parentOf.delete(g);
    }
    renderBar();
    renderClass();
  });

  client.on('help_requested', (m) => {
    helpRequests.push({ ...m, ts: Date.now() });
    toast((m.user.name || m.user.id) + ' asks for help in ' + m.group_room);
    renderClass();
  });

  // `poll` and `class_state` are sequenced: they come through the room model once each, live
  // or replayed on a resume. History pages hold stored copies the `polls` reply supersedes.
  client.on('event', ({ room, ev, source }) => {
    if (source === 'history') return;
    if (ev.type === 'class_state') setClass(room.id, { state: ev.state });
    else if (ev.type === 'poll') onPoll(room.id, ev);
  });

  // -- polls -------------------------------------------------------------------------------

  async function loadPolls() {
    const room = ctx.active();
    if (!room) return;
    try {
      const ok = await client.request({ type: 'polls', room });
      const map = roomPolls(room);
      map.clear();
      for (const p of ok.polls) map.set(p.id, p);
    } catch {
      return;
    }
    if (room === ctx.active()) renderPolls();
    loadLeaderboard();
  }

  async function loadLeaderboard() {
    const room = ctx.active();
    const hasQuiz = [...roomPolls(room).values()].some((p) => p.kind === 'quiz' && p.state === 'closed');
    if (!hasQuiz) {
      leaderboard = null;
      renderLeaderboard();
      return;
    }
    try {
      const ok = await client.request({ type: 'quiz_leaderboard', room });
      leaderboard = ok.entries;
    } catch {
      leaderboard = null;
    }
    if (room === ctx.active()) renderLeaderboard();
  }

  function renderLeaderboard() {
    const box = $('quiz-board');
    if (!leaderboard || !leaderboard.length) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    $('quiz-leaderboard').replaceChildren(...leaderboard.map((e) =>
      el('li', { dataset: { user: e.user.id } },
        el('span', { class: 'lb-name', text: e.user.name || e.user.id }), ' ',
        el('span', { class: 'muted', text: `${e.correct}/${e.answered} correct` +
          (e.total_response_ms !== undefined && e.correct ? ` · ${(e.total_response_ms / 1000).toFixed(1)} s` : '') }))));
  }

  function onPoll(roomId, m) {
    const map = roomPolls(roomId);
    const had = map.get(m.poll.id);
    // Results updates for students of an after-close poll come as `hidden`; a `poll` always
    // carries the poll as this user may see it.
    map.set(m.poll.id, m.poll);
    if (roomId !== ctx.active()) {
      if (m.change === 'opened') toast('A poll is open in ' + roomId);
      return;
    }
    if (m.change === 'opened' && !isMod(ctx.role())) {
      toast('New ' + (KIND_LABEL[m.poll.kind] || 'poll').toLowerCase() + ': ' + m.poll.question);
      ctx.showTab('polls');
    }
    renderPolls();
    if (m.change === 'closed' && m.poll.kind === 'quiz') loadLeaderboard();
    if (!had && m.change !== 'created') loadPolls();
  }

  async function pollCmd(type, poll) {
    try {
      const ok = await client.request({ type, room: ctx.active(), poll: poll.id });
      if (ok.poll) roomPolls(ctx.active()).set(ok.poll.id, ok.poll);
      renderPolls();
    } catch (e) {
      fail(e);
    }
  }

  async function answer(poll, choices, text) {
    const cmd = { type: 'poll_answer', room: ctx.active(), poll: poll.id };
    if (poll.kind === 'word_cloud') cmd.text = text;
    else cmd.choices = choices;
    try {
      const ok = await client.request(cmd);
      myAnswers.set(poll.id, { choices: ok.choices || [], text: ok.text });
      drafts.delete(poll.id);
      renderPolls();
    } catch (e) {
      fail(e);
    }
  }

  async function showAnswers(poll, node) {
    let ok;
    try {
      ok = await client.request({ type: 'poll_answers', room: ctx.active(), poll: poll.id });
    } catch (e) {
      return fail(e);
    }
    const list = el('ul', { class: 'poll-answers' }, ok.answers.map((a) => {
      const what = poll.kind === 'word_cloud' ? a.text : (a.choices || []).map((i) => poll.options[i]).join(', ');
      const extra = [];
      if (a.correct !== undefined) extra.push(a.correct ? '✓' : '✗');
      if (a.response_ms !== undefined) extra.push((a.response_ms / 1000).toFixed(1) + ' s');
      extra.push(new Date(a.ts).toLocaleTimeString());
      return el('li', {}, el('b', { text: a.user.name || a.user.id }), ' ', el('span', { text: what }), ' ',
        el('span', { class: 'muted', text: extra.join(' · ') }));
    }));
    const old = node.querySelector('.poll-answers');
    if (old) old.replaceWith(list);
    else node.append(list);
  }

  function resultsNode(p) {
    const r = p.results;
    if (!r) return el('p', { class: 'muted', text: p.state === 'closed' ? 'No results.' : 'Results show when the poll closes.' });
    if (p.kind === 'word_cloud') {
      const top = Math.max(1, ...(r.words || []).map((w) => w.count));
      return el('div', { class: 'cloud' },
        el('p', { class: 'muted', text: r.answers + (r.answers === 1 ? ' answer' : ' answers') }),
        el('div', { class: 'words' }, (r.words || []).map((w) =>
          el('span', { class: 'word', dataset: { count: w.count }, style: `font-size:${(0.9 + 1.4 * (w.count / top)).toFixed(2)}em`, text: w.word }))));
    }
    const total = Math.max(1, r.answers);
    const correct = new Set(p.correct || []);
    const extra = [];
    if (r.correct_answers !== undefined) extra.push(`${r.correct_answers} correct`);
    if (r.accuracy !== undefined) extra.push(`${Math.round(r.accuracy * 100)}% accuracy`);
    if (r.avg_response_ms !== undefined) extra.push(`${(r.avg_response_ms / 1000).toFixed(1)} s average`);
    return el('div', { class: 'results' },
      el('p', { class: 'muted', text: r.answers + (r.answers === 1 ? ' answer' : ' answers') + (extra.length ? ' · ' + extra.join(' · ') : '') }),
      p.options.map((o, i) => {
        const n = (r.counts || [])[i] || 0;
        const pct = Math.round((100 * n) / total);
        return el('div', { class: 'bar-row' + (correct.has(i) ? ' correct' : ''), dataset: { option: i, count: n } },
          el('span', { class: 'bar-label', text: (correct.has(i) ? '✓ ' : '') + o }),
          el('span', { class: 'bar' }, el('span', { class: 'fill', style: `width:${pct}%` })),
          el('span', { class: 'bar-n', text: `${n} (${pct}%)` }));
      }));
  }

  function answerNode(p) {
    const mine = myAnswers.get(p.id);
    const draft = drafts.get(p.id);
    if (p.kind === 'word_cloud') {
      const value = draft ? draft.text : (mine && mine.text) || '';
      const input = el('input', { class: 'cloud-input', maxlength: 100, placeholder: 'A word or two', 'aria-label': 'your answer', value,
        oninput: () => drafts.set(p.id, { text: input.value }) });
      return el('form', { class: 'row poll-answer', onsubmit: (e) => { e.preventDefault(); const t = input.value.trim(); if (t) answer(p, null, t); } },
        input, el('button', { type: 'submit' }, mine ? 'Change' : 'Send'),
        mine ? el('span', { class: 'muted answered', text: 'Answered' }) : null);
    }
    const name = 'poll-' + p.id;
    const picked = draft ? draft.choices : (mine ? mine.choices : []);
    const inputs = p.options.map((o, i) => el('label', { class: 'option' },
      el('input', { type: p.multiple ? 'checkbox' : 'radio', name, value: String(i), checked: picked.includes(i) }), ' ', o));
    const form = el('form', { class: 'poll-answer', onchange: () => {
      drafts.set(p.id, { choices: [...form.querySelectorAll('input:checked')].map((x) => Number(x.value)) });
    }, onsubmit: (e) => {
      e.preventDefault();
      const choices = [...form.querySelectorAll('input:checked')].map((x) => Number(x.value));
      if (!choices.length) return toast('Pick an option first');
      answer(p, choices);
    } }, inputs, el('div', { class: 'row' }, el('button', { type: 'submit' }, mine ? 'Change answer' : 'Answer'),
      mine ? el('span', { class: 'muted answered', text: 'Answered: ' + mine.choices.map((i) => p.options[i]).join(', ') }) : null));
    return form;
  }

  function pollNode(p) {
    const mod = isMod(ctx.role());
    const left = p.state === 'open' && p.closes_at ? p.closes_at - Date.now() : null;
    const node = el('li', { class: 'poll state-' + p.state, dataset: { poll: p.id, state: p.state, kind: p.kind } },
      el('div', { class: 'poll-head' },
        el('span', { class: 'badge', text: KIND_LABEL[p.kind] || p.kind }), ' ',
        el('span', { class: 'badge poll-state', text: p.state }),
        left !== null ? el('span', { class: 'timer poll-left', dataset: { closes: p.closes_at }, text: clock(left) }) : null),
      el('p', { class: 'poll-q', text: p.question }));
    if (p.state === 'open' && ctx.role() !== 'viewer') node.append(answerNode(p));
    if (p.state !== 'draft') node.append(resultsNode(p));
    if (mod) {
      node.append(el('div', { class: 'row' },
        p.state === 'draft' ? el('button', { type: 'button', class: 'poll-open', onclick: () => pollCmd('poll_open', p) }, 'Open') : null,
        p.state === 'open' ? el('button', { type: 'button', class: 'poll-close', onclick: () => pollCmd('poll_close', p) }, 'Close') : null,
        p.state !== 'draft' ? el('button', { type: 'button', class: 'poll-who', onclick: () => showAnswers(p, node) }, 'Who answered') : null));
    }
    return node;
  }

  function renderPolls() {
    const room = ctx.active();
    const mod = isMod(ctx.role());
    $('poll-create').hidden = !mod;
    const list = [...roomPolls(room).values()].sort((a, b) => b.created_at - a.created_at);
    // Keep the focus (and the caret) of a word-cloud answer being typed across the re-render.
    const focused = document.activeElement;
    const typing = focused && focused.classList && focused.classList.contains('cloud-input')
      ? { poll: focused.closest('.poll').dataset.poll, at: focused.selectionStart } : null;
    $('poll-list').replaceChildren(...list.map(pollNode));
    if (typing) {
      const again = $('poll-list').querySelector(`.poll[data-poll="${typing.poll}"] .cloud-input`);
      if (again) {
        again.focus();
        again.setSelectionRange(typing.at, typing.at);
      }
    }
    $('poll-empty').hidden = list.length > 0;
  }

  function renderPollForm() {
    const kind = $('poll-kind').value;
    $('poll-options-box').hidden = kind === 'word_cloud';
    $('poll-multiple-box').hidden = kind === 'word_cloud';
    $('poll-correct-box').hidden = kind !== 'quiz';
    // Quizzes: a checkbox per option to mark the right ones.
    const opts = $('poll-options').value.split('\n').map((s) => s.trim()).filter(Boolean);
    const keep = new Set([...$('poll-correct').querySelectorAll('input:checked')].map((x) => Number(x.value)));
    $('poll-correct').replaceChildren(...opts.map((o, i) => el('label', { class: 'option' },
      el('input', { type: 'checkbox', value: String(i), checked: keep.has(i) }), ' ', o)));
  }

  async function createPoll(e) {
    e.preventDefault();
    const kind = $('poll-kind').value;
    const cmd = { type: 'poll_create', room: ctx.active(), kind, question: $('poll-question').value.trim() };
    if (kind !== 'word_cloud') {
      cmd.options = $('poll-options').value.split('\n').map((s) => s.trim()).filter(Boolean);
      cmd.multiple = $('poll-multiple').checked;
    }
    if (kind === 'quiz') cmd.correct = [...$('poll-correct').querySelectorAll('input:checked')].map((x) => Number(x.value));
    const secs = Number($('poll-duration').value);
    if (secs > 0) cmd.duration_s = secs;
    if ($('poll-show').value) cmd.show_results = $('poll-show').value;
    try {
      const ok = await client.request(cmd);
      roomPolls(ctx.active()).set(ok.poll.id, ok.poll);
      if ($('poll-open-now').checked) {
        const opened = await client.request({ type: 'poll_open', room: ctx.active(), poll: ok.poll.id });
        if (opened.poll) roomPolls(ctx.active()).set(opened.poll.id, opened.poll);
      }
      $('poll-question').value = '';
      $('poll-options').value = '';
      renderPollForm();
      renderPolls();
    } catch (err) {
      fail(err);
    }
  }

  $('poll-create').addEventListener('submit', createPoll);
  $('poll-kind').addEventListener('change', renderPollForm);
  $('poll-options').addEventListener('input', renderPollForm);

  // -- the Class tab -----------------------------------------------------------------------

  /// A student in an open group, with a menu that moves them to another group
  /// (`breakout_move`).
  function moveChip(parent, b, group, user) {
    const select = el('select', { class: 'move', 'aria-label': 'move ' + user, dataset: { user },
      onchange: async () => {
        const to = select.value;
        if (!to) return;
        try {
          await client.request({ type: 'breakout_move', room: parent, user, group_room: to });
          for (const g of b.groups) g.members = g.members.filter((m) => m !== user);
          const target = b.groups.find((g) => g.room === to);
          if (target) target.members.push(user);
        } catch (e) {
          fail(e);
        }
        renderClass();
      } },
    el('option', { value: '', text: 'move…' }),
    b.groups.filter((g) => g.room !== group.room).map((g) => el('option', { value: g.room, text: g.title })));
    return el('span', { class: 'member-chip', dataset: { user } }, el('span', { text: user }), select);
  }

  function renderClass() {
    const room = ctx.active();
    if (!room) return;
    const role = ctx.role();
    const c = classOf(room);
    const state = c && c.state;
    $('class-state').textContent = state
      ? 'This class is ' + state + (state === 'scheduled' && c.starts_at ? ' (starts ' + new Date(c.starts_at).toLocaleString() + ')' : '')
      : 'No class schedule for this room.';
    const host = role === 'host';
    $('class-start').hidden = !host || state === 'live' || state === 'ended';
    $('class-end').hidden = !host || state === 'ended';
    $('class-reopen').hidden = !host || state !== 'ended';
    $('class-summary-btn').hidden = !isMod(role);
    const inGroup = parentOf.has(room);
    $('bo-host').hidden = !isMod(role) || inGroup;
    const b = breakouts.get(room);
    $('bo-form').hidden = !!(b && !b.closed);
    const open = $('bo-open');
    if (b && !b.closed && isMod(role)) {
      const left = b.closes_at ? b.closes_at - Date.now() : null;
      open.replaceChildren(
        el('p', {}, `${b.groups.length} groups open`, left !== null ? el('span', { id: 'bo-host-left', class: 'timer', text: ' · ' + clock(left) + ' left' }) : null),
        el('ul', { class: 'groups' }, b.groups.map((g) => el('li', { dataset: { group: g.room } },
          el('b', { text: g.title }), ' ',
          g.members.length ? g.members.map((u) => moveChip(room, b, g, u)) : el('span', { class: 'muted', text: 'no one yet' }), ' ',
          el('button', { type: 'button', class: 'listen', onclick: () => ctx.openRoom(g.room) }, 'Listen in')))),
      );
      open.hidden = false;
    } else {
      open.hidden = true;
    }
    $('bo-close').hidden = !(b && !b.closed);
    $('bo-broadcast').hidden = !(b && !b.closed);
    const helps = helpRequests.filter((h) => h.room === room);
    $('help-list').replaceChildren(...helps.map((h) => el('li', {},
      el('span', { text: (h.user.name || h.user.id) + ' · ' + ((groupInfo(h.group_room).group || {}).title || h.group_room) }), ' ',
      el('button', { type: 'button', onclick: () => ctx.openRoom(h.group_room) }, 'Go'))));
    $('help-box').hidden = !helps.length || !isMod(role);
  }

  $('class-start').addEventListener('click', () => classCmd('class_start'));
  $('class-end').addEventListener('click', () => {
    if (confirm('End the class for everyone?')) classCmd('class_end');
  });
  $('class-reopen').addEventListener('click', () => classCmd('class_reopen'));
  $('class-summary-btn').addEventListener('click', showSummary);
  $('bo-form').addEventListener('submit', openBreakout);
  $('bo-close').addEventListener('click', closeBreakout);
  $('bo-broadcast').addEventListener('submit', broadcast);

  // Timers: poll countdowns, the breakout's time left.
  setInterval(() => {
    for (const t of document.querySelectorAll('.poll-left')) t.textContent = clock(Number(t.dataset.closes) - Date.now());
    const room = ctx.active();
    const { breakout } = groupInfo(room);
    const left = $('bo-left');
    if (left && breakout && breakout.closes_at) {
      const ms = breakout.closes_at - Date.now();
      left.textContent = clock(ms) + ' left';
      left.classList.toggle('warn', ms < 60000);
    }
    const b = breakouts.get(room);
    const hl = $('bo-host-left');
    if (hl && b && b.closes_at) hl.textContent = ' · ' + clock(b.closes_at - Date.now()) + ' left';
  }, 1000);

  // -- from app.js -------------------------------------------------------------------------

  return {
    stateBadge,
    /// A join's ok: the late joiner's snapshot, where the server sends one.
    joined(room, ok) {
      if (ok.class) setClass(room.id, ok.class);
      if (ok.polls) for (const p of ok.polls) roomPolls(room.id).set(p.id, p);
      if (ok.breakout) {
        const b = ok.breakout;
        noteBreakout(room.id, { groups: b.groups || [], closes_at: b.closes_at || null, mine: b.group_room || null });
      }
    },
    /// The room on screen changed.
    roomChanged() {
      leaderboard = null;
      $('class-summary').hidden = true;
      renderPolls();
      renderPollForm();
      renderLeaderboard();
      renderClass();
      renderBar();
      loadPolls();
      // A student who opens the parent while assigned to an open group is shown the way in.
      const b = breakouts.get(ctx.active());
      if (b && b.mine && !isMod(ctx.role())) toast('Your breakout group is open: ' + ((b.groups.find((g) => g.room === b.mine) || {}).title || b.mine));
    },
    showTab(name) {
      if (name === 'polls') loadPolls();
      if (name === 'class') renderClass();
    },
    /// Whether members may write in the room on screen (not after the class ended).
    readOnly(room) {
      const c = classOf(room);
      return !!(c && c.state === 'ended' && !isMod(ctx.role()));
    },
    isGroup: (room) => parentOf.has(room),
  };
}
