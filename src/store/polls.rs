//! Polls, quizzes and word clouds in the store: creating, opening and closing a poll and
//! publishing its results as sequenced `poll` events (applied inside the group-commit
//! transaction), answers (one row per user, replaced while the poll is open; no seq), the tally,
//! and the reads behind `polls`, the auto-close scan and the class summary. Each poll event is
//! rendered twice when the audiences differ: host/ta see everything, members see a draft as
//! `hidden`, results only when `show_results` allows, and a quiz's `correct` (and its accuracy
//! and response times) only once closed. Closing a quiz judges its answers and awards the
//! engagement points of the correct ones in the same transaction. Also the reads behind
//! `poll_answers`, the results export and the quiz leaderboard. Knows nothing of sessions, the
//! hub or who may call what: the caller checked rights.

use super::engagement::{self, Contribution, Effects, Kind};
use super::writer::{Applied, Tx, WriteOutcome, bump_seq, insert_event, new_id};
use super::{Result, Store, StoreError, View, now_ms};
use crate::engagement::EngagementConfig;
use crate::protocol::views::UserBrief;
use crate::protocol::{
    PollAnswerEntry, PollKind, PollResults, PollState, PollView, QuizLeaderEntry, RoomEvent,
    RoomId, ShowResults, UserId, WordCount,
};
use sqlx::Row;
use std::collections::HashMap;

/// Most polls one `polls` listing (or summary) returns: the newest ones.
const MAX_LISTED: i64 = 200;

/// A new poll, as `poll_create` asked for it (already validated by the caller).
#[derive(Clone, Debug)]
pub struct PollSpec {
    pub kind: PollKind,
    pub question: String,
    pub options: Vec<String>,
    pub multiple: bool,
    pub correct: Option<Vec<u32>>,
    pub duration_s: Option<u32>,
    pub show_results: ShowResults,
}

/// A poll as stored.
#[derive(Clone, Debug)]
pub(super) struct PollRecord {
    id: String,
    room: RoomId,
    spec: PollSpec,
    state: PollState,
    closes_at: Option<i64>,
    /// When it was opened (`None` while a draft): response times count from here.
    opened_at: Option<i64>,
    created_at: i64,
}

impl PollRecord {
    fn is_quiz(&self) -> bool {
        self.spec.kind == PollKind::Quiz
    }

    /// Whether `choices` (sorted) is exactly the quiz's correct set; `None` for other kinds.
    fn judge(&self, choices: &[u32]) -> Option<bool> {
        let correct = self.spec.correct.as_ref().filter(|_| self.is_quiz())?;
        let mut want = correct.clone();
        want.sort_unstable();
        Some(want == choices)
    }

    /// Milliseconds from the open to an answer at `ts` (quizzes only).
    fn response_ms(&self, ts: i64) -> Option<i64> {
        self.opened_at
            .filter(|_| self.is_quiz())
            .map(|o| ts.saturating_sub(o).max(0))
    }

    /// The results of `given`: the tally, and for a quiz how many answers are correct and the
    /// mean response time.
    fn results(&self, given: &[Given], top: usize) -> PollResults {
        let pairs: Vec<(Vec<u32>, Option<String>)> = given
            .iter()
            .map(|g| (g.choices.clone(), g.text.clone()))
            .collect();
        let mut r = tally(self.spec.kind, self.spec.options.len(), &pairs, top);
        if self.is_quiz() {
            let right = given
                .iter()
                .filter(|g| self.judge(&g.choices) == Some(true))
                .count();
            r.correct_answers = Some(i64::try_from(right).unwrap_or(i64::MAX));
            let times: Vec<i64> = given
                .iter()
                .filter_map(|g| self.response_ms(g.ts))
                .collect();
            r.avg_response_ms = (!times.is_empty())
                .then(|| times.iter().sum::<i64>() / i64::try_from(times.len()).unwrap_or(1));
        }
        r
    }

    /// One answer as `poll_answers` and the export list it.
    fn entry(&self, g: Given) -> PollAnswerEntry {
        PollAnswerEntry {
            correct: self.judge(&g.choices),
            response_ms: self.response_ms(g.ts),
            user: UserBrief {
                name: if g.name.is_empty() {
                    g.user.clone()
                } else {
                    g.name
                },
                id: UserId(g.user),
            },
            choices: g.choices,
            text: g.text,
            ts: g.ts,
        }
    }

    /// The poll as host/ta (`View::Moderator`) or members see it; `None`: members do not see
    /// drafts at all.
    fn view(&self, results: &PollResults, view: View) -> Option<PollView> {
        let moderator = view == View::Moderator;
        if !moderator && self.state == PollState::Draft {
            return None;
        }
        let closed = self.state == PollState::Closed;
        let show = self.state != PollState::Draft
            && (moderator || closed || self.spec.show_results == ShowResults::Live);
        Some(PollView {
            id: self.id.clone(),
            kind: self.spec.kind,
            question: self.spec.question.clone(),
            options: self.spec.options.clone(),
            multiple: self.spec.multiple,
            show_results: self.spec.show_results,
            state: self.state,
            duration_s: self.spec.duration_s,
            closes_at: self.closes_at,
            correct: self.spec.correct.clone().filter(|_| moderator || closed),
            results: show.then(|| {
                let mut r = results.clone();
                // Accuracy and response times would tell members which option is right.
                if !(moderator || closed) {
                    r.correct_answers = None;
                    r.avg_response_ms = None;
                }
                r
            }),
            created_at: self.created_at,
        })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("poll {what}"))
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<PollRecord> {
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    let show: String = row.try_get("show_results")?;
    let options: String = row.try_get("options")?;
    let correct: Option<String> = row.try_get("correct")?;
    let duration: Option<i64> = row.try_get("duration_s")?;
    Ok(PollRecord {
        id: row.try_get("id")?,
        room: RoomId(row.try_get("room_id")?),
        spec: PollSpec {
            kind: PollKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
            question: row.try_get("question")?,
            options: serde_json::from_str(&options).map_err(|_| corrupt("options"))?,
            multiple: row.try_get::<i64, _>("multiple")? != 0,
            correct: correct
                .map(|c| serde_json::from_str(&c))
                .transpose()
                .map_err(|_| corrupt("correct"))?,
            duration_s: duration.and_then(|d| u32::try_from(d).ok()),
            show_results: ShowResults::parse(&show).ok_or_else(|| corrupt("show_results"))?,
        },
        state: PollState::parse(&state).ok_or_else(|| corrupt("state"))?,
        closes_at: row.try_get("closes_at")?,
        opened_at: row.try_get("opened_at")?,
        created_at: row.try_get("created_at")?,
    })
}

const COLUMNS: &str = "id, room_id, kind, question, options, multiple, correct, duration_s, \
                       show_results, state, closes_at, opened_at, created_at";

async fn load(tx: &mut Tx<'_>, room: &RoomId, id: &str) -> Result<PollRecord> {
    let sql = format!("SELECT {COLUMNS} FROM polls WHERE id = $1 AND room_id = $2");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(room.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("poll"))?;
    from_row(&row)
}

/// One stored answer.
#[derive(Clone, Debug)]
struct Given {
    user: String,
    /// '' for answers stored before names were kept.
    name: String,
    /// Sorted.
    choices: Vec<u32>,
    text: Option<String>,
    ts: i64,
}

fn given_of(r: &sqlx::any::AnyRow) -> Result<Given> {
    let choices: String = r.try_get("choices")?;
    Ok(Given {
        user: r.try_get("user_id")?,
        name: r.try_get("user_name")?,
        choices: serde_json::from_str(&choices).map_err(|_| corrupt("answer"))?,
        text: r.try_get("text")?,
        ts: r.try_get("ts")?,
    })
}

/// Every answer of a poll, oldest first (ties by user id).
async fn answers<'e, E>(exec: E, poll: &str) -> Result<Vec<Given>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(
        "SELECT user_id, user_name, choices, text, ts FROM poll_answers WHERE poll_id = $1 \
         ORDER BY ts, user_id",
    )
    .bind(poll)
    .fetch_all(exec)
    .await?;
    rows.iter().map(given_of).collect()
}

/// The lowercase words of a word-cloud answer, each once.
pub(crate) fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '-').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The results of `answers` for a poll of `kind` with `options`: per-option counts, or the
/// `top` most frequent words (each word counted once per answer; ties in word order).
pub(crate) fn tally(
    kind: PollKind,
    options: usize,
    answers: &[(Vec<u32>, Option<String>)],
    top: usize,
) -> PollResults {
    let total = i64::try_from(answers.len()).unwrap_or(i64::MAX);
    if kind == PollKind::WordCloud {
        let mut counts: HashMap<String, i64> = HashMap::new();
        for w in answers
            .iter()
            .filter_map(|(_, t)| t.as_deref())
            .flat_map(words)
        {
            *counts.entry(w).or_default() += 1;
        }
        let mut list: Vec<WordCount> = counts
            .into_iter()
            .map(|(word, count)| WordCount { word, count })
            .collect();
        list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.word.cmp(&b.word)));
        list.truncate(top);
        return PollResults {
            answers: total,
            words: Some(list),
            ..PollResults::default()
        };
    }
    let mut counts = vec![0i64; options];
    for (choices, _) in answers {
        for &c in choices {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        }
    }
    PollResults {
        answers: total,
        counts: Some(counts),
        ..PollResults::default()
    }
}

/// Stores the `poll` event for `p` as it is now (`change` says why) at `seq`.
async fn emit(
    tx: &mut Tx<'_>,
    p: &PollRecord,
    change: &str,
    seq: i64,
    top: usize,
) -> Result<Applied> {
    let given = answers(&mut **tx, &p.id).await?;
    let results = p.results(&given, top);
    let full = p
        .view(&results, View::Moderator)
        .ok_or_else(|| corrupt("view"))?;
    let public = match p.view(&results, View::Member) {
        Some(v) if v == full => None,
        // A results update members may not see yet is nothing to them.
        Some(v) if change == "results" && v.results.is_none() => Some(RoomEvent::Hidden {}),
        Some(v) => Some(RoomEvent::Poll {
            poll: v,
            change: change.to_owned(),
        }),
        None => Some(RoomEvent::Hidden {}),
    };
    let event = RoomEvent::Poll {
        poll: full.clone(),
        change: change.to_owned(),
    };
    let committed = insert_event(tx, &p.room, seq, now_ms(), &p.id, event, public).await?;
    Ok(Applied {
        outcome: WriteOutcome::Poll {
            poll: full,
            seq: Some(seq),
        },
        event: Some(committed),
    })
}

pub(super) async fn create(
    tx: &mut Tx<'_>,
    room: &RoomId,
    by: &UserId,
    spec: &PollSpec,
) -> Result<Applied> {
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    let p = PollRecord {
        id: new_id('p'),
        room: room.clone(),
        spec: spec.clone(),
        state: PollState::Draft,
        closes_at: None,
        opened_at: None,
        created_at: ts,
    };
    let json = |v: &dyn erased::Json| v.json();
    sqlx::query(
        "INSERT INTO polls (id, room_id, seq, kind, question, options, multiple, correct, \
         duration_s, show_results, state, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(p.id.as_str())
    .bind(room.as_str())
    .bind(seq)
    .bind(spec.kind.as_str())
    .bind(spec.question.as_str())
    .bind(json(&spec.options))
    .bind(i64::from(spec.multiple))
    .bind(spec.correct.as_ref().map(|c| json(c)))
    .bind(spec.duration_s.map(i64::from))
    .bind(spec.show_results.as_str())
    .bind(PollState::Draft.as_str())
    .bind(by.as_str())
    .bind(ts)
    .execute(&mut **tx)
    .await?;
    emit(tx, &p, "created", seq, 0).await
}

mod erased {
    /// JSON text of a value that always serialises (plain vectors).
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for Vec<T> {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "[]".into())
        }
    }
}

/// Opens a draft (`Open`) or closes an open poll (`Closed`). Opening sets `closes_at` from
/// `duration_s`. Closing a quiz judges its answers and awards the correct ones their points
/// (see [`award`]). Closing a closed poll changes nothing; anything else out of order is a
/// `conflict`.
pub(super) async fn set_state(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    id: &str,
    target: PollState,
    top: usize,
    fx: &mut Effects,
) -> Result<Applied> {
    let mut p = load(tx, room, id).await?;
    match (p.state, target) {
        (PollState::Draft, PollState::Open) | (PollState::Open, PollState::Closed) => {}
        (PollState::Closed, PollState::Closed) => {
            let given = answers(&mut **tx, &p.id).await?;
            let results = p.results(&given, top);
            let poll = p
                .view(&results, View::Moderator)
                .ok_or_else(|| corrupt("view"))?;
            return Ok(Applied {
                outcome: WriteOutcome::Poll { poll, seq: None },
                event: None,
            });
        }
        (from, to) => {
            return Err(StoreError::Conflict(format!(
                "the poll is {} and cannot become {}",
                from.as_str(),
                to.as_str()
            )));
        }
    }
    let seq = bump_seq(tx, room).await?;
    let ts = now_ms();
    p.state = target;
    if target == PollState::Open {
        p.closes_at = p.spec.duration_s.map(|d| ts + i64::from(d) * 1000);
        p.opened_at = Some(ts);
    }
    sqlx::query(
        "UPDATE polls SET state = $1, closes_at = $2, \
         opened_at = CASE WHEN $1 = 'open' THEN $3 ELSE opened_at END, \
         closed_at = CASE WHEN $1 = 'closed' THEN $3 ELSE closed_at END WHERE id = $4",
    )
    .bind(target.as_str())
    .bind(p.closes_at)
    .bind(ts)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    let change = if target == PollState::Open {
        "opened"
    } else {
        "closed"
    };
    let applied = emit(tx, &p, change, seq, top).await?;
    if target == PollState::Closed && p.is_quiz() {
        award(tx, cfg, &p, ts, fx).await?;
    }
    Ok(applied)
}

/// Judges a closing quiz's answers (`poll_answers.correct`, which the leaderboard sums) and
/// gives each correct one `quiz_correct` points within the earner's daily cap, in the close's
/// transaction: the close happens once, and the ledger takes one award per user and quiz
/// however often this runs (a retried batch, a second node), so it is idempotent.
async fn award(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    p: &PollRecord,
    ts: i64,
    fx: &mut Effects,
) -> Result<()> {
    let mut correct = p.spec.correct.clone().unwrap_or_default();
    correct.sort_unstable();
    // Stored choices are the JSON of a sorted list, as this is.
    sqlx::query(
        "UPDATE poll_answers SET correct = CASE WHEN choices = $1 THEN 1 ELSE 0 END \
         WHERE poll_id = $2",
    )
    .bind(erased::Json::json(&correct))
    .bind(p.id.as_str())
    .execute(&mut **tx)
    .await?;
    let items: Vec<Contribution> = answers(&mut **tx, &p.id)
        .await?
        .into_iter()
        .filter(|g| p.judge(&g.choices) == Some(true))
        .map(|g| Contribution {
            room: p.room.clone(),
            user: UserId(g.user),
            name: g.name,
            kind: Kind::QuizCorrect,
            ref_id: p.id.clone(),
            detail: String::new(),
            ts,
            no_points: false,
            quiet: false,
            zone: None,
        })
        .collect();
    engagement::contribute(tx, cfg, &items, fx)
        .await
        .map_err(engagement::abort)?;
    Ok(())
}

/// Publishes the results of an open poll as they are now (the coalesced `results` update);
/// nothing for a poll that is no longer open (its close event has the final results).
pub(super) async fn publish_results(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &str,
    top: usize,
) -> Result<Applied> {
    let p = load(tx, room, id).await?;
    if p.state != PollState::Open {
        return Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        });
    }
    let seq = bump_seq(tx, room).await?;
    emit(tx, &p, "results", seq, top).await
}

/// Stores (or replaces) `user`'s answer to an open poll, after checking it fits the poll.
pub(super) async fn answer(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &str,
    user: &UserId,
    name: &str,
    choices: &[u32],
    text: Option<&str>,
) -> Result<Applied> {
    let p = load(tx, room, id).await?;
    if p.state != PollState::Open {
        return Err(StoreError::Conflict(format!(
            "the poll is {}: answers are taken only while it is open",
            p.state.as_str()
        )));
    }
    check_answer(&p.spec, choices, text)?;
    let ts = now_ms();
    let mut sorted = choices.to_vec();
    sorted.sort_unstable();
    sqlx::query(
        "INSERT INTO poll_answers (poll_id, user_id, user_name, choices, text, ts) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (poll_id, user_id) DO UPDATE SET choices = excluded.choices, \
         text = excluded.text, ts = excluded.ts, user_name = excluded.user_name",
    )
    .bind(id)
    .bind(user.as_str())
    .bind(name)
    .bind(erased::Json::json(&sorted))
    .bind(text)
    .bind(ts)
    .execute(&mut **tx)
    .await?;
    Ok(Applied {
        outcome: WriteOutcome::PollAnswered {
            poll: id.to_owned(),
            choices: sorted,
            text: text.map(str::to_owned),
            ts,
        },
        event: None,
    })
}

/// Whether an answer fits its poll: choices for polls and quizzes (one unless `multiple`, each
/// an option's index, no repeats), text (and no choices) for word clouds.
pub(crate) fn check_answer(spec: &PollSpec, choices: &[u32], text: Option<&str>) -> Result<()> {
    let bad = |m: &str| Err(StoreError::BadRequest(m.to_owned()));
    if spec.kind == PollKind::WordCloud {
        if !choices.is_empty() {
            return bad("a word cloud takes text, not choices");
        }
        if text.is_none_or(|t| t.trim().is_empty()) {
            return bad("a word cloud answer needs text");
        }
        return Ok(());
    }
    if text.is_some() {
        return bad("this poll takes choices, not text");
    }
    if choices.is_empty() {
        return bad("choose at least one option");
    }
    if !spec.multiple && choices.len() > 1 {
        return bad("this poll takes one choice");
    }
    if choices.iter().any(|&c| c as usize >= spec.options.len()) {
        return bad("a choice is not an option's index");
    }
    let mut seen = choices.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != choices.len() {
        return bad("a choice is repeated");
    }
    Ok(())
}

impl Store {
    /// The room's polls (the newest `MAX_LISTED`, oldest first) as `view` sees them: members
    /// get no drafts, and results or `correct` only where they may. `top`: words per cloud.
    pub async fn polls(&self, room: &RoomId, view: View, top: usize) -> Result<Vec<PollView>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM polls WHERE room_id = $1 ORDER BY created_at DESC, id DESC \
             LIMIT {MAX_LISTED}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(room.as_str())
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows.iter().rev() {
            let p = from_row(row)?;
            if view == View::Member && p.state == PollState::Draft {
                continue;
            }
            let given = answers(self.pool(), &p.id).await?;
            let results = p.results(&given, top);
            out.extend(p.view(&results, view));
        }
        Ok(out)
    }

    async fn poll_record(&self, room: &RoomId, id: &str) -> Result<PollRecord> {
        let sql = format!("SELECT {COLUMNS} FROM polls WHERE id = $1 AND room_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(room.as_str())
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound("poll"))?;
        from_row(&row)
    }

    /// One page of a poll's answers, oldest first (by time, ties by user id), after `after`
    /// (the time and user of the previous page's last answer): at most `limit` answers, and
    /// whether more follow. `not_found` for a poll not of `room`.
    pub async fn poll_answer_page(
        &self,
        room: &RoomId,
        poll: &str,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<(Vec<PollAnswerEntry>, bool)> {
        let p = self.poll_record(room, poll).await?;
        let (ts, user) = after.unwrap_or((i64::MIN, ""));
        let rows = sqlx::query(
            "SELECT user_id, user_name, choices, text, ts FROM poll_answers WHERE poll_id = $1 \
             AND (ts > $2 OR (ts = $2 AND user_id > $3)) ORDER BY ts, user_id \
             LIMIT CAST($4 AS BIGINT)",
        )
        .bind(poll)
        .bind(ts)
        .bind(user)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1)
        .fetch_all(self.pool())
        .await?;
        let mut given = rows.iter().map(given_of).collect::<Result<Vec<_>>>()?;
        let more = given.len() > limit;
        given.truncate(limit);
        Ok((given.into_iter().map(|g| p.entry(g)).collect(), more))
    }

    /// A poll as host/ta see it, with every answer oldest first: the results export.
    pub async fn poll_export(
        &self,
        room: &RoomId,
        poll: &str,
        top: usize,
    ) -> Result<(PollView, Vec<PollAnswerEntry>)> {
        let p = self.poll_record(room, poll).await?;
        let given = answers(self.pool(), &p.id).await?;
        let view = p
            .view(&p.results(&given, top), View::Moderator)
            .ok_or_else(|| corrupt("view"))?;
        Ok((view, given.into_iter().map(|g| p.entry(g)).collect()))
    }

    /// The room's quiz leaderboard over its closed quizzes: how many there are, and the first
    /// `limit` users who answered any, by correct answers (most first), then by the total
    /// response time of their correct answers (fastest first), then by user id; ties in both
    /// share a rank (1, 2, 2, 4).
    pub async fn quiz_leaderboard(
        &self,
        room: &RoomId,
        limit: u32,
    ) -> Result<(i64, Vec<QuizLeaderEntry>)> {
        let quizzes: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM polls WHERE room_id = $1 AND kind = 'quiz' AND state = 'closed'",
        )
        .bind(room.as_str())
        .fetch_one(self.pool())
        .await?;
        let rows = sqlx::query(
            "SELECT a.user_id, MAX(a.user_name) AS name, COUNT(*) AS n_answered, \
             CAST(COALESCE(SUM(COALESCE(a.correct, 0)), 0) AS BIGINT) AS n_correct, \
             CAST(COALESCE(SUM(CASE WHEN a.correct = 1 \
               THEN a.ts - COALESCE(p.opened_at, a.ts) ELSE 0 END), 0) AS BIGINT) AS total_ms \
             FROM poll_answers a JOIN polls p ON p.id = a.poll_id \
             WHERE p.room_id = $1 AND p.kind = 'quiz' AND p.state = 'closed' \
             GROUP BY a.user_id ORDER BY n_correct DESC, total_ms, a.user_id \
             LIMIT CAST($2 AS BIGINT)",
        )
        .bind(room.as_str())
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        let mut out: Vec<QuizLeaderEntry> = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let id: String = r.try_get("user_id")?;
            let name: Option<String> = r.try_get("name")?;
            let correct: i64 = r.try_get("n_correct")?;
            let total = r.try_get::<i64, _>("total_ms")?.max(0);
            let rank = match out.last() {
                Some(prev) if prev.correct == correct && prev.total_response_ms == total => {
                    prev.rank
                }
                _ => i64::try_from(i).unwrap_or(i64::MAX) + 1,
            };
            out.push(QuizLeaderEntry {
                rank,
                user: UserBrief {
                    name: name.filter(|n| !n.is_empty()).unwrap_or_else(|| id.clone()),
                    id: UserId(id),
                },
                correct,
                answered: r.try_get("n_answered")?,
                total_response_ms: total,
            });
        }
        Ok((quizzes, out))
    }

    /// Open polls whose `closes_at` has passed: (room, poll).
    pub async fn due_polls(&self, now: i64) -> Result<Vec<(RoomId, String)>> {
        let rows = sqlx::query(
            "SELECT room_id, id FROM polls WHERE state = 'open' AND closes_at IS NOT NULL \
             AND closes_at <= $1 ORDER BY closes_at LIMIT 500",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((RoomId(r.try_get("room_id")?), r.try_get("id")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: PollKind, multiple: bool) -> PollSpec {
        PollSpec {
            kind,
            question: "q".into(),
            options: vec!["a".into(), "b".into(), "c".into()],
            multiple,
            correct: None,
            duration_s: None,
            show_results: ShowResults::Live,
        }
    }

    #[test]
    fn answers_must_fit_the_poll() {
        let single = spec(PollKind::Poll, false);
        assert!(check_answer(&single, &[1], None).is_ok());
        assert!(check_answer(&single, &[0, 1], None).is_err());
        assert!(check_answer(&single, &[3], None).is_err());
        assert!(check_answer(&single, &[], None).is_err());
        assert!(check_answer(&single, &[0], Some("x")).is_err());
        let multi = spec(PollKind::Quiz, true);
        assert!(check_answer(&multi, &[0, 2], None).is_ok());
        assert!(check_answer(&multi, &[2, 2], None).is_err());
        let cloud = spec(PollKind::WordCloud, false);
        assert!(check_answer(&cloud, &[], Some("hi")).is_ok());
        assert!(check_answer(&cloud, &[], Some("  ")).is_err());
        assert!(check_answer(&cloud, &[0], Some("hi")).is_err());
    }

    #[test]
    fn tallies_count_options_and_words() {
        let r = tally(
            PollKind::Poll,
            3,
            &[(vec![0], None), (vec![2], None), (vec![2], None)],
            10,
        );
        assert_eq!((r.answers, r.counts), (3, Some(vec![1, 0, 2])));
        let cloud = [
            (vec![], Some("Rust rust, Go!".to_owned())),
            (vec![], Some("go ZIG".to_owned())),
            (vec![], Some("rust".to_owned())),
        ];
        let r = tally(PollKind::WordCloud, 0, &cloud, 2);
        let words: Vec<_> = r
            .words
            .unwrap()
            .into_iter()
            .map(|w| (w.word, w.count))
            .collect();
        assert_eq!(words, vec![("go".into(), 2), ("rust".into(), 2)]);
        assert_eq!(r.answers, 3);
    }
}
