//! Poll, quiz and word-cloud commands: `poll_create`, `poll_open`, `poll_close` and
//! `poll_answers` (host/ta), `poll_answer` (anyone who may write in the room), `polls` and
//! `quiz_leaderboard` (anyone who may read it), plus the quiz leaderboard the HTTP API shares; the
//! validation of what a client sends against the configured limits; and the two clocks of a
//! poll: coalesced results updates (`ResultsQueue`, at most one per poll per
//! `poll_results_interval_ms`) and the close at `closes_at` (found in the store, so it
//! survives a restart). Rights are checked here; the store checks what only it knows (the poll
//! exists, its state, that choices fit its options). Nothing here touches a socket or SQL.

use super::chat::write_ok;
use super::{check_room_id, readable_role};
use crate::App;
use crate::command::{Ctx, Outcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::{
    ClientMsg, NewPoll, PollAnswersOk, PollKind, PollState, PollsOk, QuizLeaderboardOk, RoomId,
    ShowResults,
};
use crate::store::{PollSpec, View, WriteOp, now_ms};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Open polls with answers not yet published in a results update: (room, poll). A set, so a
/// burst of answers to one poll is one entry, drained once per `poll_results_interval_ms`.
#[derive(Default)]
pub struct ResultsQueue(Mutex<HashSet<(RoomId, String)>>);

impl ResultsQueue {
    fn mark(&self, room: RoomId, poll: String) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((room, poll));
    }

    fn take(&self) -> Vec<(RoomId, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

fn poll_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::bad_request("poll id must be 1..=64 characters"));
    }
    Ok(())
}

/// Checks a new poll against the limits and its kind's rules, and fills in defaults
/// (`show_results`: `after_close` for quizzes, `live` otherwise).
fn spec(cfg: &Config, new: NewPoll) -> Result<PollSpec> {
    super::check_len(&new.question, cfg.max_question_chars, "question")?;
    let options = new.options.unwrap_or_default();
    let cloud = new.kind == PollKind::WordCloud;
    if cloud && (!options.is_empty() || new.multiple || new.correct.is_some()) {
        return Err(Error::bad_request(
            "a word cloud has no options, multiple or correct",
        ));
    }
    if !cloud && !(2..=cfg.poll_max_options).contains(&options.len()) {
        return Err(Error::bad_request(format!(
            "a {} needs 2..={} options",
            new.kind.as_str(),
            cfg.poll_max_options
        )));
    }
    for o in &options {
        super::check_len(o, cfg.poll_max_option_chars, "an option")?;
    }
    match (new.kind, &new.correct) {
        (PollKind::Quiz, None) => return Err(Error::bad_request("a quiz needs `correct`")),
        (PollKind::Quiz, Some(c)) => {
            // A set: kept sorted, as answers' choices are.
            let mut seen = c.clone();
            seen.sort_unstable();
            seen.dedup();
            if c.is_empty()
                || seen.len() != c.len()
                || c.iter().any(|&i| i as usize >= options.len())
            {
                return Err(Error::bad_request(
                    "`correct` must list distinct option indexes",
                ));
            }
            if !new.multiple && c.len() > 1 {
                return Err(Error::bad_request(
                    "a single-choice quiz has one correct option",
                ));
            }
        }
        (_, Some(_)) => return Err(Error::bad_request("only a quiz has `correct`")),
        (_, None) => {}
    }
    if new
        .duration_s
        .is_some_and(|d| d == 0 || d > cfg.poll_max_duration_s)
    {
        return Err(Error::bad_request(format!(
            "duration_s must be 1..={}",
            cfg.poll_max_duration_s
        )));
    }
    let show_results = new.show_results.unwrap_or(if new.kind == PollKind::Quiz {
        ShowResults::AfterClose
    } else {
        ShowResults::Live
    });
    let correct = new.correct.map(|mut c| {
        c.sort_unstable();
        c
    });
    Ok(PollSpec {
        kind: new.kind,
        question: new.question,
        options,
        multiple: new.multiple,
        correct,
        duration_s: new.duration_s,
        show_results,
    })
}

fn moderator(ctx: &Ctx, room: &RoomId) -> Result<()> {
    check_room_id(room)?;
    if !ctx.joined_role(room)?.can_moderate() {
        return Err(Error::Forbidden("only host/ta run polls".into()));
    }
    Ok(())
}

pub(super) async fn create(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    new: NewPoll,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    let spec = spec(&ctx.app.config, new)?;
    let op = WriteOp::PollCreate {
        room,
        by: ctx.me.user.clone(),
        spec,
    };
    super::submit(ctx, rid, op).await
}

/// `poll_open` (`target` Open) and `poll_close` (`target` Closed).
pub(super) async fn set_state(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    poll: String,
    target: PollState,
) -> Result<Outcome> {
    moderator(ctx, &room)?;
    poll_id(&poll)?;
    let op = WriteOp::PollState {
        room,
        poll,
        target,
        words: ctx.app.config.poll_word_cloud_top,
    };
    super::submit(ctx, rid, op).await
}

pub(super) async fn answer(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    poll: String,
    choices: Option<Vec<u32>>,
    text: Option<String>,
) -> Result<Outcome> {
    check_room_id(&room)?;
    poll_id(&poll)?;
    super::writer(ctx.joined_role(&room)?)?;
    if let Some(t) = &text {
        super::check_len(t, ctx.app.config.poll_max_text_chars, "the answer")?;
    }
    let choices = choices.unwrap_or_default();
    if choices.len() > ctx.app.config.poll_max_options {
        return Err(Error::bad_request("more choices than a poll has options"));
    }
    let op = WriteOp::PollAnswer {
        room: room.clone(),
        poll: poll.clone(),
        user: ctx.me.user.clone(),
        name: ctx.me.name.clone(),
        choices,
        text,
    };
    let rx = ctx.app.store.submit(op).await?;
    let app = ctx.app.clone();
    // Marked for the next results update once committed, whether or not a reply is wanted.
    Ok(Outcome::Deferred(Box::pin(async move {
        let result = match rx.await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Unavailable("server is shutting down".into())),
        };
        match result {
            Ok(o) => {
                app.poll_results.mark(room, poll);
                rid.map(|rid| crate::protocol::encode_ok_as(rid, &write_ok(o)))
            }
            Err(e) => Some(crate::command::error_frame(rid, &e)),
        }
    })))
}

pub(super) async fn list(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    let polls = ctx
        .app
        .store
        .polls(&room, View::of(role), ctx.app.config.poll_word_cloud_top)
        .await?;
    Ok(Outcome::ok(PollsOk { polls }))
}

/// `poll_answers` (host/ta): who answered and when, a page at a time. The cursor is the last
/// answer's `ts` and user id (`<ts>:<user>`), so pages hold still while answers change.
async fn answers_page(
    ctx: &mut Ctx,
    room: RoomId,
    poll: String,
    cursor: Option<String>,
    limit: Option<u32>,
) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    if !role.can_moderate() {
        return Err(Error::Forbidden("only host/ta see who answered".into()));
    }
    poll_id(&poll)?;
    let max = ctx.app.config.poll_answers_page;
    let limit = match limit {
        None => max,
        Some(l) if (1..=max).contains(&(l as usize)) => l as usize,
        Some(_) => return Err(Error::bad_request(format!("limit must be 1..={max}"))),
    };
    let after = cursor.as_deref().map(parse_cursor).transpose()?;
    let (answers, more) = ctx
        .app
        .store
        .poll_answer_page(&room, &poll, after, limit)
        .await?;
    let next_cursor = more
        .then(|| answers.last().map(|a| format!("{}:{}", a.ts, a.user.id)))
        .flatten();
    Ok(Outcome::ok(PollAnswersOk {
        poll,
        answers,
        next_cursor,
    }))
}

fn parse_cursor(c: &str) -> Result<(i64, &str)> {
    let bad = || Error::bad_request("cursor is not one this server gave");
    let (ts, user) = c.split_once(':').ok_or_else(bad)?;
    let ts = ts.parse().map_err(|_| bad())?;
    if user.is_empty() || user.chars().count() > 64 {
        return Err(bad());
    }
    Ok((ts, user))
}

/// The quiz leaderboard answer (WebSocket `quiz_leaderboard` and
/// `GET /api/rooms/{id}/quiz-leaderboard`); `limit` 1..=100, default 10, like `leaderboard`.
pub(crate) async fn quiz_leaderboard_of(
    app: &App,
    room: &RoomId,
    limit: Option<u32>,
) -> Result<QuizLeaderboardOk> {
    let max = super::engagement::MAX_LEADERBOARD;
    let limit = limit.unwrap_or(10);
    if !(1..=max).contains(&limit) {
        return Err(Error::bad_request(format!("limit must be 1..={max}")));
    }
    let (quizzes, entries) = app.store.quiz_leaderboard(room, limit).await?;
    Ok(QuizLeaderboardOk {
        room: room.clone(),
        quizzes,
        entries,
    })
}

async fn quiz_leaderboard(ctx: &mut Ctx, room: RoomId, limit: Option<u32>) -> Result<Outcome> {
    readable_role(ctx, &room).await?;
    Ok(Outcome::ok(
        quiz_leaderboard_of(&ctx.app, &room, limit).await?,
    ))
}

/// Routes `poll_answers` and `quiz_leaderboard` (the other poll commands go through
/// [`super::class`]).
pub(super) async fn dispatch(ctx: &mut Ctx, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::PollAnswers {
            room,
            poll,
            cursor,
            limit,
        } => answers_page(ctx, room, poll, cursor, limit).await,
        ClientMsg::QuizLeaderboard { room, limit } => quiz_leaderboard(ctx, room, limit).await,
        other => Err(crate::command::misrouted(&other)),
    }
}

/// The polls' clocks: every `poll_results_interval_ms`, one results update per poll answered
/// since the last; every `class_clock_ms`, closes the polls past `closes_at`. Both go through
/// the writer, which re-checks the poll's state, so a poll closed meanwhile (or by another
/// node) is left alone.
pub async fn run_clock(app: Arc<App>) {
    let mut results =
        tokio::time::interval(Duration::from_millis(app.config.poll_results_interval_ms));
    let mut closes = tokio::time::interval(Duration::from_millis(app.config.class_clock_ms));
    results.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    closes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let words = app.config.poll_word_cloud_top;
    loop {
        tokio::select! {
            _ = results.tick() => {
                for (room, poll) in app.poll_results.take() {
                    app.store.submit_detached(WriteOp::PollResults { room, poll, words });
                }
            }
            _ = closes.tick() => match app.store.due_polls(now_ms()).await {
                Ok(due) => {
                    for (room, poll) in due {
                        let target = PollState::Closed;
                        let op = WriteOp::PollState { room, poll, target, words };
                        // Waits for the commit, so the next look does not find it again.
                        if let Err(e) = app.store.write(op).await {
                            tracing::warn!(error = %e, "closing a poll by the clock failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "poll close scan failed"),
            },
        }
    }
}
