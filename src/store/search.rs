//! Full-text search over messages and questions: the index rows kept in step with writes
//! (inside the same transaction), and the ranked query, which is the one place the two
//! backends need different SQL (SQLite FTS5 with bm25, PostgreSQL tsvector with ts_rank).

use super::writer::Tx;
use super::{Backend, Result, Store, StoreError, StoreOptions};
use crate::protocol::RoomId;
pub use crate::protocol::views::SearchHit;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[allow(clippy::too_many_arguments)]
pub(super) async fn index(
    tx: &mut Tx<'_>,
    room: &RoomId,
    kind: &str,
    id: &str,
    seq: i64,
    ts: i64,
    text: &str,
    pending: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO search_docs (room_id, kind, ref_id, seq, ts, pending, text) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(room.as_str())
    .bind(kind)
    .bind(id)
    .bind(seq)
    .bind(ts)
    .bind(i64::from(pending))
    .bind(text)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) async fn reindex(tx: &mut Tx<'_>, kind: &str, id: &str, text: &str) -> Result<()> {
    sqlx::query("UPDATE search_docs SET text = $1 WHERE kind = $2 AND ref_id = $3")
        .bind(text)
        .bind(kind)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn unindex(tx: &mut Tx<'_>, kind: &str, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM search_docs WHERE kind = $1 AND ref_id = $2")
        .bind(kind)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn set_pending(
    tx: &mut Tx<'_>,
    kind: &str,
    id: &str,
    pending: bool,
) -> Result<()> {
    sqlx::query("UPDATE search_docs SET pending = $1 WHERE kind = $2 AND ref_id = $3")
        .bind(i64::from(pending))
        .bind(kind)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The words of a query (letters and digits), at most 16, each at most 64 characters.
fn terms(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .take(16)
        .map(|t| t.chars().take(64).collect::<String>().to_lowercase())
        .collect()
}

/// How much of the database searches may hold: a search takes a slot for as long as its
/// query runs (even past the time its caller waited), so a burst of expensive searches uses at
/// most `search_concurrency` pool connections and never starves history, joins or the API.
pub(super) struct Limits {
    slots: Arc<Semaphore>,
    wait: Duration,
    budget: Duration,
}

impl Limits {
    pub(super) fn new(opts: &StoreOptions) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(opts.search_concurrency.max(1))),
            wait: Duration::from_millis(opts.search_wait_ms),
            budget: Duration::from_millis(opts.search_timeout_ms),
        }
    }
}

impl Store {
    /// Ranked search of a room's messages and questions: every word must match. Pending
    /// questions only when `include_pending` (host/ta). Returns one page and whether more follow.
    /// `Busy` when no search slot frees up in time or the query runs past its budget.
    pub async fn search(
        &self,
        room: &RoomId,
        q: &str,
        include_pending: bool,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<SearchHit>, bool)> {
        let words = terms(q);
        if words.is_empty() {
            return Err(StoreError::BadRequest(
                "search needs at least one word".into(),
            ));
        }
        let limits = &self.inner.search;
        let slot = tokio::time::timeout(limits.wait, limits.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(|s| s.ok())
            .ok_or_else(|| StoreError::Busy("search is busy: try again shortly".into()))?;
        let store = self.clone();
        let room = room.clone();
        // The query runs in a task that holds the slot until it is done, whether or not the
        // caller is still waiting for it.
        let query = tokio::spawn(async move {
            let _slot = slot;
            store
                .search_rows(&room, &words, include_pending, limit, offset)
                .await
        });
        match tokio::time::timeout(limits.budget, query).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(StoreError::Corrupt(format!("search task failed: {e}"))),
            Err(_) => Err(StoreError::Busy(
                "search took too long: try fewer or rarer words".into(),
            )),
        }
    }

    async fn search_rows(
        &self,
        room: &RoomId,
        words: &[String],
        include_pending: bool,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<SearchHit>, bool)> {
        let (sql, terms) = match self.backend() {
            // Each word quoted: FTS5 syntax in user input is matched literally.
            Backend::Sqlite => (
                "SELECT d.kind, d.ref_id, d.seq, d.ts, d.text FROM search_fts f \
                 JOIN search_docs d ON d.rowid = f.rowid \
                 WHERE search_fts MATCH $1 AND d.room_id = $2 AND (d.pending = 0 OR $3 = 1) \
                 ORDER BY bm25(search_fts), d.seq DESC LIMIT CAST($4 AS BIGINT) OFFSET $5",
                words
                    .iter()
                    .map(|w| format!("\"{w}\""))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Backend::Postgres => (
                "SELECT kind, ref_id, seq, ts, text FROM search_docs \
                 WHERE tsv @@ plainto_tsquery('simple', $1) AND room_id = $2 AND (pending = 0 OR $3 = 1) \
                 ORDER BY ts_rank(tsv, plainto_tsquery('simple', $1)) DESC, seq DESC \
                 LIMIT CAST($4 AS BIGINT) OFFSET $5",
                words.join(" "),
            ),
        };
        let rows = sqlx::query(sql)
            .bind(terms)
            .bind(room.as_str())
            .bind(i64::from(include_pending))
            .bind(i64::from(limit) + 1)
            .bind(i64::from(offset))
            .fetch_all(self.pool())
            .await?;
        let mut hits = rows
            .iter()
            .map(|r| {
                Ok(SearchHit {
                    kind: r.try_get("kind")?,
                    id: r.try_get("ref_id")?,
                    seq: r.try_get("seq")?,
                    ts: r.try_get("ts")?,
                    text: r.try_get("text")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let more = hits.len() > limit as usize;
        hits.truncate(limit as usize);
        Ok((hits, more))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn terms_are_words_only() {
        assert_eq!(
            super::terms("Hello, \"World\" OR x*"),
            vec!["hello", "world", "or", "x"]
        );
        assert!(super::terms("  -- ").is_empty());
    }
}
