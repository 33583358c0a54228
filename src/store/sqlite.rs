//! SQLite specifics: the file is created on first start, WAL journal, the configured
//! `synchronous` level, a busy timeout so that several processes on one file wait rather than
//! fail, and the SQLite migrations. Write transactions begin IMMEDIATE so two writers never
//! deadlock upgrading a read lock. Nothing here knows the schema beyond running migrations.

use super::{Result, StoreError, StoreOptions};
use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{ConnectOptions, Executor};
use std::str::FromStr;

/// How a batched write transaction begins on SQLite.
pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

pub(super) async fn connect(opts: &StoreOptions) -> Result<AnyPool> {
    let mut url = opts.url.clone();
    if !url.contains("mode=") && !url.contains(":memory:") {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("mode=rwc");
    }
    let connect = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
    let synchronous = match opts.sqlite_synchronous.as_str() {
        "normal" => "PRAGMA synchronous = NORMAL",
        "extra" => "PRAGMA synchronous = EXTRA",
        "full" => "PRAGMA synchronous = FULL",
        other => {
            return Err(StoreError::BadRequest(format!(
                "sqlite_synchronous {other:?}"
            )));
        }
    };
    let pool = AnyPoolOptions::new()
        .max_connections(opts.pool_size.max(2))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute(synchronous).await?;
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                // Statement journals (an upsert or multi-row insert inside the write
                // transaction needs one) in memory, not in a temporary file per statement.
                conn.execute("PRAGMA temp_store = MEMORY").await?;
                // A batch touches a few hundred pages of several indexes: a cache that holds
                // them does not spill dirty pages mid-transaction or re-read them.
                conn.execute("PRAGMA cache_size = -32768").await?;
                // Reads through the page map instead of one pread per page.
                conn.execute("PRAGMA mmap_size = 268435456").await?;
                // Checkpoint every ~40 MB of log instead of every ~4 MB: the pages a busy
                // writer keeps dirtying (each room's index leaves, the counters) are copied
                // back to the database once per checkpoint, not once per commit or two.
                conn.execute("PRAGMA wal_autocheckpoint = 10000").await?;
                // The log file is cut back to this size after a checkpoint.
                conn.execute("PRAGMA journal_size_limit = 67108864").await?;
                Ok(())
            })
        })
        .connect_with(connect)
        .await?;
    Ok(pool)
}

pub(super) async fn migrate(pool: &AnyPool) -> Result<()> {
    sqlx::migrate!("migrations/sqlite").run(pool).await?;
    Ok(())
}
