//! The class lifecycle in the store: moving a room between `scheduled`, `live` and `ended`
//! (by the host or the clock) as sequenced `class_state` events, the attendance and stage log
//! (`room_presence`, one row per session in a room or per stage spell; no seq), the clock scan,
//! and the class summary read. Knows nothing of sessions, the hub or who may call what.

use super::writer::{Applied, Tx, WriteOutcome, bump_seq, insert_event};
use super::{Result, Store, StoreError, View, now_ms};
use crate::protocol::{
    Attendance, ClassState, ClassSummary, QuestionCounts, RoomEvent, RoomId, StageTime, UserId,
};
use sqlx::Row;
use std::collections::BTreeMap;

/// What a `room_presence` row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    /// A session in the room.
    Attend,
    /// The user on stage.
    Stage,
}

impl PresenceKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Attend => "attend",
            Self::Stage => "stage",
        }
    }
}

/// Moves the class on: to `target` (host), or wherever the clock says (`None`). A manual start
/// of a class already started, or a start or end of an ended class, is a `conflict`; the clock
/// changing nothing is `Unchanged`. `reopen` moves an ended class back to `live` (a `conflict`
/// unless it has ended): `ended_at` is cleared, and so is an `ends_at` that has passed (else
/// the clock would end it again at once).
pub(super) async fn change(
    tx: &mut Tx<'_>,
    room: &RoomId,
    target: Option<ClassState>,
    reopen: bool,
) -> Result<Applied> {
    let row =
        sqlx::query("SELECT class_state, starts_at, ends_at, started_at FROM rooms WHERE id = $1")
            .bind(room.as_str())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound("room"))?;
    let stored: String = row.try_get("class_state")?;
    let stored = ClassState::parse(&stored)
        .ok_or_else(|| StoreError::Corrupt(format!("class state {stored}")))?;
    let started_at: Option<i64> = row.try_get("started_at")?;
    let now = now_ms();
    let clock = stored.at(row.try_get("starts_at")?, row.try_get("ends_at")?, now);
    let next = match target {
        None if clock == stored => {
            return Ok(Applied {
                outcome: WriteOutcome::Unchanged,
                event: None,
            });
        }
        None => clock,
        Some(_) if reopen && clock != ClassState::Ended => {
            return Err(StoreError::Conflict("the class has not ended".into()));
        }
        Some(_) if reopen => ClassState::Live,
        Some(_) if clock == ClassState::Ended => {
            return Err(StoreError::Conflict(
                "the class has ended (class_reopen opens it again)".into(),
            ));
        }
        Some(ClassState::Live) if started_at.is_some() => {
            return Err(StoreError::Conflict("the class has started already".into()));
        }
        Some(t) => t,
    };
    let seq = bump_seq(tx, room).await?;
    sqlx::query(
        "UPDATE rooms SET class_state = $1, \
         started_at = CASE WHEN $1 = 'live' AND started_at IS NULL THEN $2 ELSE started_at END, \
         ended_at = CASE WHEN $1 = 'ended' THEN $2 WHEN $4 = 1 THEN NULL ELSE ended_at END, \
         ends_at = CASE WHEN $4 = 1 AND ends_at <= $2 THEN NULL ELSE ends_at END WHERE id = $3",
    )
    .bind(next.as_str())
    .bind(now)
    .bind(room.as_str())
    .bind(i64::from(reopen))
    .execute(&mut **tx)
    .await?;
    let event = RoomEvent::ClassState {
        state: next,
        ts: now,
    };
    let committed = insert_event(tx, room, seq, now, "", event, None).await?;
    Ok(Applied {
        outcome: WriteOutcome::Class { state: next, seq },
        event: Some(committed),
    })
}

/// One attendance or stage log write of a batch (see [`record_presence`]).
pub(super) struct LogWrite<'a> {
    pub room: &'a str,
    pub user: &'a str,
    pub name: &'a str,
    pub session: &'a str,
    pub kind: PresenceKind,
    pub on: bool,
    pub ts: i64,
}

/// Applies a batch's attendance and stage log writes, given in batch order, in at most two
/// statements, leaving what applying them one by one would (a start inserts an open row, an
/// end closes every open row of its session or spell): each start becomes a row, ended by the
/// first end of the same session (or spell) after it in the batch; the first end of each in
/// the batch also ends the rows left open before the batch (the update runs before the insert,
/// so it sees only those).
pub(super) async fn record_presence(
    tx: &mut Tx<'_>,
    backend: super::Backend,
    writes: &[LogWrite<'_>],
) -> Result<()> {
    use std::collections::{HashMap, HashSet};
    // (room, session, kind, user): the columns an end matches an open row on.
    type Key<'a> = (&'a str, &'a str, &'static str, &'a str);
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'static str,
        i64,
        Option<i64>,
    );
    let mut rows: Vec<Row<'_>> = Vec::new();
    let mut ends: Vec<(i64, &str, &str, &'static str, &str)> = Vec::new();
    let mut open: HashMap<Key<'_>, Vec<usize>> = HashMap::new();
    let mut ended: HashSet<Key<'_>> = HashSet::new();
    for w in writes {
        let key = (w.room, w.session, w.kind.as_str(), w.user);
        if w.on {
            open.entry(key).or_default().push(rows.len());
            rows.push((w.room, w.user, w.name, w.session, key.2, w.ts, None));
        } else {
            for i in open.remove(&key).unwrap_or_default() {
                rows[i].6 = Some(w.ts);
            }
            if ended.insert(key) {
                ends.push((w.ts, w.room, w.session, key.2, w.user));
            }
        }
    }
    if !ends.is_empty() {
        const END: super::rows::Sql = super::rows::Sql {
            sqlite: "UPDATE room_presence SET ended_at = e.value ->> 0 FROM jsonb_each($1) AS e \
                     WHERE room_presence.room_id = e.value ->> 1 \
                     AND room_presence.session_id = e.value ->> 2 \
                     AND room_presence.kind = e.value ->> 3 \
                     AND room_presence.user_id = e.value ->> 4 AND room_presence.ended_at IS NULL",
            postgres: "UPDATE room_presence AS p SET ended_at = (e ->> 0)::bigint \
                       FROM jsonb_array_elements($1::jsonb) AS e \
                       WHERE p.room_id = e ->> 1 AND p.session_id = e ->> 2 AND p.kind = e ->> 3 \
                       AND p.user_id = e ->> 4 AND p.ended_at IS NULL",
        };
        sqlx::query(END.get(backend))
            .bind(super::rows::json(&ends)?)
            .execute(&mut **tx)
            .await?;
    }
    if !rows.is_empty() {
        const START: super::rows::Sql = super::rows::Sql {
            sqlite: "INSERT INTO room_presence (room_id, user_id, user_name, session_id, kind, \
                     started_at, ended_at) SELECT value ->> 0, value ->> 1, value ->> 2, \
                     value ->> 3, value ->> 4, value ->> 5, value ->> 6 FROM jsonb_each($1)",
            postgres: "INSERT INTO room_presence (room_id, user_id, user_name, session_id, kind, \
                       started_at, ended_at) SELECT v ->> 0, v ->> 1, v ->> 2, v ->> 3, v ->> 4, \
                       (v ->> 5)::bigint, (v ->> 6)::bigint FROM jsonb_array_elements($1::jsonb) AS v",
        };
        sqlx::query(START.get(backend))
            .bind(super::rows::json(&rows)?)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Milliseconds covered by `spans` (start, end), overlaps counted once.
fn covered(mut spans: Vec<(i64, i64)>) -> i64 {
    spans.sort_unstable();
    let mut total = 0;
    let mut current: Option<(i64, i64)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + current.map_or(0, |(s, e)| e - s)
}

struct Spell {
    user: String,
    name: String,
    kind: String,
    start: i64,
    end: Option<i64>,
}

/// What a room holds that a late joiner's `join` reply shows, as one probe tells it: the
/// details are read only for what is there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomExtras {
    pub open_polls: bool,
    pub pinned: bool,
    pub breakout: bool,
    pub boards: bool,
}

impl Store {
    /// Whether the room has open polls, a pinned question, an open breakout, saved boards: one
    /// query, so a join into a plain room pays one round trip for all four.
    pub async fn room_extras(&self, room: &RoomId) -> Result<RoomExtras> {
        let row = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM polls WHERE room_id = $1 AND state = 'open') AS polls, \
             (SELECT COUNT(*) FROM questions WHERE room_id = $1 AND status = 'pinned') AS pinned, \
             (SELECT COUNT(*) FROM breakouts WHERE parent_id = $1 AND state = 'open') AS breakouts, \
             (SELECT COUNT(*) FROM boards WHERE room_id = $1) AS boards",
        )
        .bind(room.as_str())
        .fetch_one(self.pool())
        .await?;
        Ok(RoomExtras {
            open_polls: row.try_get::<i64, _>("polls")? > 0,
            pinned: row.try_get::<i64, _>("pinned")? > 0,
            breakout: row.try_get::<i64, _>("breakouts")? > 0,
            boards: row.try_get::<i64, _>("boards")? > 0,
        })
    }

    /// Rooms whose class the clock should move on now (a scheduled class past `starts_at`, a
    /// class not ended past `ends_at`).
    pub async fn due_classes(&self, now: i64) -> Result<Vec<RoomId>> {
        let rows = sqlx::query(
            "SELECT id FROM rooms WHERE class_state = 'scheduled' AND archived = 0 \
             AND (starts_at IS NULL OR starts_at <= $1) \
             UNION SELECT id FROM rooms WHERE class_state <> 'ended' AND archived = 0 \
             AND ends_at IS NOT NULL AND ends_at <= $1 LIMIT 500",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| Ok(RoomId(r.try_get("id")?))).collect()
    }

    /// The class summary of `room` at `now`: attendance, questions, polls (with results, as
    /// host/ta see them) and time on stage. Spells still open end at the class's end, or now.
    pub async fn class_summary(&self, room: &RoomId, now: i64, top: usize) -> Result<ClassSummary> {
        let r = self.room(room).await?.ok_or(StoreError::NotFound("room"))?;
        let until = r.ended_at.unwrap_or(now);
        let rows = sqlx::query(
            "SELECT user_id, user_name, kind, started_at, ended_at FROM room_presence \
             WHERE room_id = $1 ORDER BY started_at",
        )
        .bind(room.as_str())
        .fetch_all(self.pool())
        .await?;
        let spells = rows
            .iter()
            .map(|row| {
                Ok(Spell {
                    user: row.try_get("user_id")?,
                    name: row.try_get("user_name")?,
                    kind: row.try_get("kind")?,
                    start: row.try_get("started_at")?,
                    end: row.try_get("ended_at")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (attendance, stage) = aggregate(&spells, until);
        let q = sqlx::query(
            "SELECT COUNT(*) AS asked, COUNT(first_answer_at) AS answered FROM questions \
             WHERE room_id = $1",
        )
        .bind(room.as_str())
        .fetch_one(self.pool())
        .await?;
        Ok(ClassSummary {
            room: room.clone(),
            state: r.state,
            starts_at: r.starts_at,
            ends_at: r.ends_at,
            started_at: r.started_at,
            ended_at: r.ended_at,
            attendance,
            questions: QuestionCounts {
                asked: q.try_get("asked")?,
                answered: q.try_get("answered")?,
            },
            polls: self.polls(room, View::Moderator, top).await?,
            stage,
        })
    }
}

/// Per-user attendance and stage time from the spells, open ones ending at `until`.
fn aggregate(spells: &[Spell], until: i64) -> (Vec<Attendance>, Vec<StageTime>) {
    type Acc = (String, Vec<(i64, i64)>, Option<i64>, bool);
    let mut attend: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut stage: BTreeMap<&str, Acc> = BTreeMap::new();
    for s in spells {
        let map = if s.kind == "stage" {
            &mut stage
        } else {
            &mut attend
        };
        let acc = map
            .entry(s.user.as_str())
            .or_insert_with(|| (s.name.clone(), Vec::new(), None, false));
        let end = s.end.unwrap_or(until).max(s.start);
        acc.1.push((s.start, end));
        acc.2 = acc.2.max(s.end);
        acc.3 |= s.end.is_none();
    }
    let attendance = attend
        .into_iter()
        .map(|(user, (name, spans, last, open))| Attendance {
            user: UserId(user.to_owned()),
            name,
            first_join: spans.iter().map(|s| s.0).min().unwrap_or(0),
            last_leave: if open { None } else { last },
            sessions: i64::try_from(spans.len()).unwrap_or(i64::MAX),
            present_ms: covered(spans),
        })
        .collect();
    let stage = stage
        .into_iter()
        .map(|(user, (name, spans, _, _))| StageTime {
            user: UserId(user.to_owned()),
            name,
            on_stage_ms: covered(spans),
        })
        .collect();
    (attendance, stage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans_count_once() {
        assert_eq!(covered(vec![]), 0);
        assert_eq!(covered(vec![(0, 10), (5, 15), (20, 25)]), 20);
        assert_eq!(covered(vec![(20, 25), (0, 10)]), 15);
    }

    #[test]
    fn open_spells_run_until_the_end() {
        let spell = |user: &str, kind: &str, start, end| Spell {
            user: user.into(),
            name: user.to_uppercase(),
            kind: kind.into(),
            start,
            end,
        };
        let (a, s) = aggregate(
            &[
                spell("ann", "attend", 0, Some(10)),
                spell("ann", "attend", 5, None),
                spell("bob", "attend", 2, Some(4)),
                spell("ann", "stage", 3, Some(6)),
            ],
            20,
        );
        assert_eq!(a.len(), 2);
        assert_eq!(
            (a[0].present_ms, a[0].last_leave, a[0].sessions),
            (20, None, 2)
        );
        assert_eq!((a[1].present_ms, a[1].last_leave), (2, Some(4)));
        assert_eq!(s[0].on_stage_ms, 3);
    }
}
