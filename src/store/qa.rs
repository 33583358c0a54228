//! Live Q&A in the store: questions, votes and answers as sequenced writes (applied inside the
//! group-commit transaction, one event each), and the reads behind `questions`, the FAQ export
//! and the answer-SLA scan. Each question event is rendered twice when the audiences differ:
//! host/ta see everything, members see anonymous authors removed and pending questions as
//! `hidden`.

use super::engagement::{self, Contribution, Effects, Kind};
use super::writer::{Applied, Tx, WriteOutcome, bump_seq, insert_event, new_id};
use super::{Result, Store, StoreError, View, now_ms, search};
use crate::engagement::EngagementConfig;
use crate::protocol::{
    AnswerView, QuestionId, QuestionStatus, QuestionUpdate, QuestionView, RoomEvent, RoomId,
    ShownRole, UserId, UserRef,
};
use sqlx::AnyConnection;
use sqlx::Row;
use std::collections::HashMap;

/// Most questions one listing returns.
const MAX_LISTED: i64 = 500;

/// A question with its answers, as stored.
#[derive(Clone, Debug)]
pub struct QuestionRecord {
    pub id: QuestionId,
    pub room: RoomId,
    pub seq: i64,
    pub author: UserRef,
    pub anonymous: bool,
    pub text: String,
    pub status: QuestionStatus,
    pub votes: i64,
    pub ts: i64,
    pub first_answer_at: Option<i64>,
    pub answers: Vec<AnswerView>,
    /// Approved by host/ta (or never needed approval). An unapproved question stays hidden
    /// from members even when it is dismissed.
    pub approved: bool,
}

impl QuestionRecord {
    /// The question as `view` sees it; `overdue` when unanswered past `sla_s` at `now_ms`.
    pub fn view(&self, view: View, sla_s: i64, now_ms: i64) -> QuestionView {
        QuestionView {
            id: self.id.clone(),
            text: self.text.clone(),
            author: (!self.anonymous || view == View::Moderator).then(|| self.author.clone()),
            anonymous: self.anonymous,
            votes: self.votes,
            status: self.status,
            ts: self.ts,
            answers: self.answers.clone(),
            answered_at: self.first_answer_at,
            overdue: self.status.is_unanswered() && self.ts + sla_s.saturating_mul(1000) < now_ms,
        }
    }

    /// What members see of an event about this question, when it differs from host/ta's.
    fn public(&self, make: impl FnOnce(QuestionView) -> RoomEvent) -> Option<RoomEvent> {
        if self.status == QuestionStatus::Pending || !self.approved {
            Some(RoomEvent::Hidden {})
        } else if self.anonymous {
            Some(make(self.view(View::Member, i64::MAX / 2000, 0)))
        } else {
            None
        }
    }

    fn full(&self) -> QuestionView {
        self.view(View::Moderator, i64::MAX / 2000, 0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuestionSort {
    /// Most votes first, then oldest first.
    Top,
    /// Newest first.
    Recent,
}

#[derive(Clone, Debug, Default)]
pub struct QuestionFilter {
    pub status: Option<QuestionStatus>,
    pub overdue_only: bool,
}

fn parse_status(s: &str) -> Result<QuestionStatus> {
    QuestionStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("question status {s}")))
}

fn author_of(row: &sqlx::any::AnyRow, prefix: &str) -> Result<UserRef> {
    Ok(UserRef {
        id: UserId(row.try_get(format!("{prefix}_id").as_str())?),
        name: row.try_get(format!("{prefix}_name").as_str())?,
        role: ShownRole::parse(row.try_get(format!("{prefix}_role").as_str())?).unwrap_or_default(),
    })
}

fn question_from_row(row: &sqlx::any::AnyRow) -> Result<QuestionRecord> {
    Ok(QuestionRecord {
        id: QuestionId(row.try_get("id")?),
        room: RoomId(row.try_get("room_id")?),
        seq: row.try_get("seq")?,
        author: author_of(row, "author")?,
        anonymous: row.try_get::<i64, _>("anonymous")? != 0,
        text: row.try_get("text")?,
        status: parse_status(&row.try_get::<String, _>("status")?)?,
        votes: row.try_get("votes")?,
        ts: row.try_get("ts")?,
        first_answer_at: row.try_get("first_answer_at")?,
        answers: Vec::new(),
        approved: row.try_get::<i64, _>("approved")? != 0,
    })
}

fn answer_from_row(row: &sqlx::any::AnyRow) -> Result<AnswerView> {
    Ok(AnswerView {
        id: row.try_get("id")?,
        text: row.try_get("text")?,
        author: author_of(row, "author")?,
        ts: row.try_get("ts")?,
        helpful: row.try_get::<i64, _>("helpful")? != 0,
    })
}

/// Loads a question of `room` with its answers.
pub(super) async fn load(
    conn: &mut AnyConnection,
    room: &RoomId,
    id: &QuestionId,
) -> Result<QuestionRecord> {
    let row = sqlx::query(
        "SELECT id, room_id, seq, author_id, author_name, author_role, anonymous, text, status, \
         votes, ts, first_answer_at, approved FROM questions WHERE id = $1 AND room_id = $2",
    )
    .bind(id.as_str())
    .bind(room.as_str())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound("question"))?;
    let mut q = question_from_row(&row)?;
    let answers = sqlx::query(
        "SELECT id, text, author_id, author_name, author_role, ts, helpful FROM answers \
         WHERE question_id = $1 ORDER BY ts, id",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    q.answers = answers.iter().map(answer_from_row).collect::<Result<_>>()?;
    Ok(q)
}

pub(super) async fn emit_update(
    tx: &mut Tx<'_>,
    q: &QuestionRecord,
    change: &str,
    seq: i64,
    ts: i64,
) -> Result<Applied> {
    let make = |view: QuestionView| {
        RoomEvent::QuestionUpdated(QuestionUpdate {
            question: view,
            change: change.to_owned(),
        })
    };
    let (full, public) = (make(q.full()), q.public(make));
    insert_event(tx, &q.room, seq, ts, q.id.as_str(), full, public)
        .await
        .map(Applied::changed)
}

pub(super) async fn ask(
    tx: &mut Tx<'_>,
    room: &RoomId,
    author: &UserRef,
    text: &str,
    anonymous: bool,
    pending: bool,
) -> Result<Applied> {
    let seq = bump_seq(tx, room).await?;
    let ts = super::now_ms();
    let id = QuestionId(new_id('q'));
    let status = if pending {
        QuestionStatus::Pending
    } else {
        QuestionStatus::Open
    };
    sqlx::query(
        "INSERT INTO questions (id, room_id, seq, author_id, author_name, author_role, anonymous, \
         text, status, votes, ts, approved) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11)",
    )
    .bind(id.as_str())
    .bind(room.as_str())
    .bind(seq)
    .bind(author.id.as_str())
    .bind(author.name.as_str())
    .bind(author.role.as_str())
    .bind(i64::from(anonymous))
    .bind(text)
    .bind(status.as_str())
    .bind(ts)
    .bind(i64::from(!pending))
    .execute(&mut **tx)
    .await?;
    search::index(tx, room, "question", id.as_str(), seq, ts, text, pending).await?;
    let q = QuestionRecord {
        id: id.clone(),
        room: room.clone(),
        seq,
        author: author.clone(),
        anonymous,
        text: text.to_owned(),
        status,
        votes: 0,
        ts,
        first_answer_at: None,
        answers: Vec::new(),
        approved: !pending,
    };
    let committed = insert_event(
        tx,
        room,
        seq,
        ts,
        id.as_str(),
        RoomEvent::Question(q.full()),
        q.public(RoomEvent::Question),
    )
    .await?;
    Ok(Applied {
        outcome: WriteOutcome::Asked {
            id,
            seq,
            ts,
            status,
        },
        event: Some(committed),
    })
}

pub(super) async fn vote(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &QuestionId,
    user: &UserId,
    up: bool,
) -> Result<Applied> {
    let mut q = load(tx, room, id).await?;
    match q.status {
        // Members must not learn that a pending question exists.
        QuestionStatus::Pending => return Err(StoreError::NotFound("question")),
        _ if !q.approved => return Err(StoreError::NotFound("question")),
        QuestionStatus::Dismissed => {
            return Err(StoreError::BadRequest(
                "a dismissed question takes no votes".into(),
            ));
        }
        _ => {}
    }
    let mine: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM question_votes WHERE question_id = $1 AND user_id = $2")
            .bind(id.as_str())
            .bind(user.as_str())
            .fetch_optional(&mut **tx)
            .await?;
    if mine.is_some() == up {
        return Ok(Applied {
            outcome: WriteOutcome::Unchanged,
            event: None,
        });
    }
    let seq = bump_seq(tx, room).await?;
    let ts = super::now_ms();
    if up {
        sqlx::query("INSERT INTO question_votes (question_id, user_id, ts) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(user.as_str())
            .bind(ts)
            .execute(&mut **tx)
            .await?;
    } else {
        sqlx::query("DELETE FROM question_votes WHERE question_id = $1 AND user_id = $2")
            .bind(id.as_str())
            .bind(user.as_str())
            .execute(&mut **tx)
            .await?;
    }
    q.votes = sqlx::query_scalar("SELECT COUNT(*) FROM question_votes WHERE question_id = $1")
        .bind(id.as_str())
        .fetch_one(&mut **tx)
        .await?;
    sqlx::query("UPDATE questions SET votes = $1 WHERE id = $2")
        .bind(q.votes)
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    emit_update(tx, &q, "vote", seq, ts).await
}

pub(super) async fn answer(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &QuestionId,
    author: &UserRef,
    text: &str,
) -> Result<Applied> {
    let mut q = load(tx, room, id).await?;
    if q.status == QuestionStatus::Pending {
        return Err(StoreError::BadRequest(
            "approve the question before answering it".into(),
        ));
    }
    let seq = bump_seq(tx, room).await?;
    let ts = super::now_ms();
    let answer = AnswerView {
        id: new_id('a'),
        text: text.to_owned(),
        author: author.clone(),
        ts,
        helpful: false,
    };
    sqlx::query(
        "INSERT INTO answers (id, question_id, room_id, author_id, author_name, author_role, text, ts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(answer.id.as_str())
    .bind(id.as_str())
    .bind(room.as_str())
    .bind(author.id.as_str())
    .bind(author.name.as_str())
    .bind(author.role.as_str())
    .bind(text)
    .bind(ts)
    .execute(&mut **tx)
    .await?;
    q.first_answer_at = Some(q.first_answer_at.unwrap_or(ts));
    q.status = QuestionStatus::Answered;
    q.answers.push(answer);
    sqlx::query("UPDATE questions SET status = 'answered', first_answer_at = $1 WHERE id = $2")
        .bind(q.first_answer_at)
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    emit_update(tx, &q, "answer", seq, ts).await
}

/// Sets a question's status; also says who now earns the question's contribution (a pending
/// question that this approves, asked under its author's name: it counted nothing while it was
/// hidden, or the leaderboard would have shown it).
pub(super) async fn set_status(
    tx: &mut Tx<'_>,
    room: &RoomId,
    id: &QuestionId,
    status: QuestionStatus,
) -> Result<(Applied, Option<UserRef>)> {
    let mut q = load(tx, room, id).await?;
    if q.status == status {
        return Ok((
            Applied {
                outcome: WriteOutcome::Unchanged,
                event: None,
            },
            None,
        ));
    }
    let seq = bump_seq(tx, room).await?;
    let ts = super::now_ms();
    // Leaving `pending` for anything but `dismissed` approves the question; dismissing it
    // unapproved keeps it hidden from members (and out of their search).
    let mut earner = None;
    if !q.approved && status != QuestionStatus::Dismissed {
        q.approved = true;
        search::set_pending(tx, "question", id.as_str(), false).await?;
        if !q.anonymous {
            earner = Some(q.author.clone());
        }
    }
    q.status = status;
    sqlx::query("UPDATE questions SET status = $1, approved = $2 WHERE id = $3")
        .bind(status.as_str())
        .bind(i64::from(q.approved))
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    Ok((emit_update(tx, &q, "status", seq, ts).await?, earner))
}

/// Applies an `ask`: the question, and its engagement when the room sees who asked it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply_ask(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    author: &UserRef,
    text: &str,
    anonymous: bool,
    pending: bool,
    fx: &mut Effects,
) -> Result<Applied> {
    let applied = ask(tx, room, author, text, anonymous, pending).await?;
    // The room saw this question without its author (anonymous) or not at all
    // (pending): points, counters or a badge for it would show who asked, on the
    // leaderboard and in profiles. An anonymous question counts nothing; a pending one
    // counts when it is approved (`SetQuestionStatus`).
    if let WriteOutcome::Asked { id, ts, .. } = &applied.outcome
        && !anonymous
        && !pending
    {
        let c = Contribution::new(room, author, Kind::Question, id.as_str(), *ts);
        engagement::contribute(tx, cfg, &[c], fx)
            .await
            .map_err(engagement::abort)?;
    }
    Ok(applied)
}

/// Applies an `answer`: the answer, and its author's engagement.
pub(super) async fn apply_answer(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    question: &QuestionId,
    author: &UserRef,
    text: &str,
    fx: &mut Effects,
) -> Result<Applied> {
    let applied = answer(tx, room, question, author, text).await?;
    let c = Contribution::new(room, author, Kind::Answer, question.as_str(), now_ms());
    engagement::contribute(tx, cfg, &[c], fx)
        .await
        .map_err(engagement::abort)?;
    Ok(applied)
}

/// Applies a status change, counting the question for its author when this approves it.
pub(super) async fn apply_status(
    tx: &mut Tx<'_>,
    cfg: &EngagementConfig,
    room: &RoomId,
    question: &QuestionId,
    status: QuestionStatus,
    fx: &mut Effects,
) -> Result<Applied> {
    let (applied, earner) = set_status(tx, room, question, status).await?;
    if let Some(author) = earner {
        let ts = super::now_ms();
        let c = Contribution::new(room, &author, Kind::Question, question.as_str(), ts);
        engagement::contribute(tx, cfg, &[c], fx)
            .await
            .map_err(engagement::abort)?;
    }
    Ok(applied)
}

impl Store {
    /// Questions of a room as `view` sees them (members never see pending ones).
    pub async fn questions(
        &self,
        room: &RoomId,
        filter: &QuestionFilter,
        sort: QuestionSort,
        view: View,
        sla_s: i64,
        now_ms: i64,
    ) -> Result<Vec<QuestionView>> {
        let sql = match sort {
            QuestionSort::Top => {
                "SELECT id, room_id, seq, author_id, author_name, author_role, anonymous, text, status, \
                 votes, ts, first_answer_at, approved FROM questions WHERE room_id = $1 \
                 AND ($2 = '' OR status = $2) AND ($3 = 1 OR (status <> 'pending' AND approved = 1)) \
                 ORDER BY votes DESC, ts ASC, id LIMIT CAST($4 AS BIGINT)"
            }
            QuestionSort::Recent => {
                "SELECT id, room_id, seq, author_id, author_name, author_role, anonymous, text, status, \
                 votes, ts, first_answer_at, approved FROM questions WHERE room_id = $1 \
                 AND ($2 = '' OR status = $2) AND ($3 = 1 OR (status <> 'pending' AND approved = 1)) \
                 ORDER BY ts DESC, id DESC LIMIT CAST($4 AS BIGINT)"
            }
        };
        let rows = sqlx::query(sql)
            .bind(room.as_str())
            .bind(filter.status.map_or("", QuestionStatus::as_str))
            .bind(i64::from(view == View::Moderator))
            .bind(MAX_LISTED)
            .fetch_all(self.pool())
            .await?;
        let mut list: Vec<QuestionRecord> =
            rows.iter().map(question_from_row).collect::<Result<_>>()?;
        let answers = sqlx::query(
            "SELECT question_id, id, text, author_id, author_name, author_role, ts, helpful FROM answers \
             WHERE room_id = $1 ORDER BY ts, id",
        )
        .bind(room.as_str())
        .fetch_all(self.pool())
        .await?;
        let mut by_question: HashMap<String, Vec<AnswerView>> = HashMap::new();
        for row in &answers {
            by_question
                .entry(row.try_get("question_id")?)
                .or_default()
                .push(answer_from_row(row)?);
        }
        for q in &mut list {
            q.answers = by_question.remove(q.id.as_str()).unwrap_or_default();
        }
        Ok(list
            .iter()
            .map(|q| q.view(view, sla_s, now_ms))
            .filter(|q| !filter.overdue_only || q.overdue)
            .collect())
    }

    /// One question of a room, with its answers.
    pub async fn question(&self, room: &RoomId, id: &QuestionId) -> Result<QuestionRecord> {
        let mut conn = self.pool().acquire().await?;
        load(&mut conn, room, id).await
    }

    /// Unanswered questions past their room's SLA that have not been announced yet; each is
    /// claimed (marked announced) here, so it is returned once even with several nodes.
    pub async fn claim_overdue(&self, now_ms: i64) -> Result<Vec<(RoomId, QuestionId)>> {
        let rows = sqlx::query(
            "SELECT q.room_id, q.id FROM questions q JOIN rooms r ON r.id = q.room_id \
             WHERE q.overdue_announced = 0 AND q.status IN ('pending', 'open', 'pinned') \
             AND q.ts + r.answer_sla_s * 1000 < $1 ORDER BY q.ts LIMIT 500",
        )
        .bind(now_ms)
        .fetch_all(self.pool())
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let res = sqlx::query("UPDATE questions SET overdue_announced = 1 WHERE id = $1 AND overdue_announced = 0")
                .bind(id.as_str())
                .execute(self.pool())
                .await?;
            if res.rows_affected() == 1 {
                claimed.push((RoomId(row.try_get("room_id")?), QuestionId(id)));
            }
        }
        Ok(claimed)
    }
}
