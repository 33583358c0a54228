//! SQLite specifics: the file is created on first start, WAL journal, the configured
//! `synchronous` level, a busy timeout so that several processes on one file wait rather than
//! fail, and the SQLite migrations. Write transactions begin IMMEDIATE so two writers never
//! deadlock upgrading a read lock. Nothing here knows the schema beyond running migrations.

use super::{Result, StoreError, StoreOptions};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Executor};
use std::str::FromStr;

/// How a batched write transaction begins on SQLite.
pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

fn connect_options(opts: &StoreOptions) -> Result<AnyConnectOptions> {
    let mut url = opts.url.clone();
    if !url.contains("mode=") && !url.contains(":memory:") {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("mode=rwc");
    }
    Ok(AnyConnectOptions::from_str(&url)?.disable_statement_logging())
}

fn synchronous(opts: &StoreOptions) -> Result<&'static str> {
    match opts.sqlite_synchronous.as_str() {
        "normal" => Ok("PRAGMA synchronous = NORMAL"),
        "extra" => Ok("PRAGMA synchronous = EXTRA"),
        "full" => Ok("PRAGMA synchronous = FULL"),
        other => Err(StoreError::BadRequest(format!(
            "sqlite_synchronous {other:?}"
        ))),
    }
}

/// Sets up a new connection: WAL, the durability level, and the settings below.
async fn prepare(
    conn: &mut AnyConnection,
    synchronous: &'static str,
    cache_kib: u32,
) -> sqlx::Result<()> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute(synchronous).await?;
    conn.execute("PRAGMA busy_timeout = 10000").await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    // Statement journals (an upsert or multi-row insert inside the write transaction needs
    // one) in memory, not in a temporary file per statement.
    conn.execute("PRAGMA temp_store = MEMORY").await?;
    // A batch touches a few hundred pages of several indexes: a cache that holds them does
    // not spill dirty pages mid-transaction or re-read them (`sqlite_cache_kib`).
    // (A number from the configuration, not user input.)
    conn.execute(sqlx::AssertSqlSafe(format!(
        "PRAGMA cache_size = -{cache_kib}"
    )))
    .await?;
    // No memory map (`mmap_size` stays 0): in WAL mode a connection that starts a read after
    // another one committed drops its whole map (and its page cache), so with the writer
    // committing all the time every pooled read would pay an munmap of the pages it touched.
    // Checkpoint every ~40 MB of log instead of every ~4 MB: the pages a busy writer keeps
    // dirtying (each room's index leaves, the counters) are copied back to the database once
    // per checkpoint, not once per commit or two.
    conn.execute("PRAGMA wal_autocheckpoint = 10000").await?;
    // The log file is cut back to this size after a checkpoint.
    conn.execute("PRAGMA journal_size_limit = 67108864").await?;
    Ok(())
}

pub(super) async fn connect(opts: &StoreOptions) -> Result<AnyPool> {
    let connect = connect_options(opts)?;
    let synchronous = synchronous(opts)?;
    let cache_kib = opts.sqlite_cache_kib;
    let pool = AnyPoolOptions::new()
        .max_connections(opts.pool_size.max(2))
        // A connection to a local file does not go stale: the liveness ping before each
        // acquire would be one more hand-over to the connection's thread and back per query.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| Box::pin(prepare(conn, synchronous, cache_kib)))
        .connect_with(connect)
        .await?;
    Ok(pool)
}

/// The group-commit writer's own connection, set up like the pool's; when the writer syncs
/// the log itself ([`deferred_log`]), its `COMMIT`s do not wait for the disk.
pub(super) async fn connect_one(opts: &StoreOptions) -> Result<AnyConnection> {
    let mut conn = AnyConnection::connect_with(&connect_options(opts)?).await?;
    prepare(&mut conn, synchronous(opts)?, opts.sqlite_cache_kib).await?;
    if deferred_log(opts)?.is_some() {
        conn.execute("PRAGMA synchronous = NORMAL").await?;
    }
    Ok(conn)
}

/// The log file the writer syncs after each group commit, before answering it, when the
/// configured level is `full` and `sqlite_commit_syncs` is off: its commits then run at
/// `NORMAL` (written to the log, not synced), and that sync before any `ok` makes every
/// acknowledged write survive power loss (other connections may read a batch before its
/// sync). The path is the configured file's; SQLite's own may differ for a symlinked file or
/// a `file:` URI, and then the sync fails and stops the writer. `None` for other levels and
/// for in-memory databases.
pub(super) fn deferred_log(opts: &StoreOptions) -> Result<Option<std::path::PathBuf>> {
    synchronous(opts)?;
    let memory = opts.url.contains(":memory:") || opts.url.contains("mode=memory");
    if opts.sqlite_synchronous != "full" || opts.sqlite_commit_syncs || memory {
        return Ok(None);
    }
    let file = sqlx::sqlite::SqliteConnectOptions::from_str(&opts.url)?;
    let mut wal = file.get_filename().as_os_str().to_owned();
    if wal.is_empty() {
        return Ok(None);
    }
    wal.push("-wal");
    Ok(Some(wal.into()))
}

pub(super) async fn migrate(pool: &AnyPool) -> Result<()> {
    sqlx::migrate!("migrations/sqlite").run(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// SQLite plans a bare `LIMIT $n` with its bound value and re-prepares the statement each
    /// time that parameter is bound again; the store writes `LIMIT CAST($n AS BIGINT)`.
    #[test]
    fn no_statement_binds_a_bare_limit() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store");
        // Built here so that this file's own text does not match.
        let (bare, formatted) = (["LIMIT ", "$"].concat(), ["LIMIT ", "{}"].concat());
        let mut offenders = Vec::new();
        for entry in std::fs::read_dir(dir).expect("src/store") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("source");
            for (n, line) in text.lines().enumerate() {
                let code = !line.trim_start().starts_with("//");
                if code && (line.contains(&bare) || line.contains(&formatted)) {
                    offenders.push(format!("{}:{}", path.display(), n + 1));
                }
            }
        }
        assert!(offenders.is_empty(), "bare LIMIT parameters: {offenders:?}");
    }
}
