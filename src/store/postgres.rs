//! PostgreSQL specifics: connect options and the PostgreSQL migrations. Sequence numbers need
//! no special care here: the `UPDATE rooms ... RETURNING last_seq` in the write transaction
//! takes the room row's lock, which serialises writers of one room across processes.

use super::{Result, StoreOptions};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection};
use std::str::FromStr;

/// How a batched write transaction begins on PostgreSQL (READ COMMITTED is enough: every
/// read that matters follows the room-row lock taken by the seq bump or is keyed by a unique
/// index).
pub(super) const BEGIN_WRITE: &str = "BEGIN";

/// The group-commit writer's own connection.
pub(super) async fn connect_one(opts: &StoreOptions) -> Result<AnyConnection> {
    let connect = AnyConnectOptions::from_str(&opts.url)?.disable_statement_logging();
    Ok(AnyConnection::connect_with(&connect).await?)
}

pub(super) async fn connect(opts: &StoreOptions) -> Result<AnyPool> {
    let connect = AnyConnectOptions::from_str(&opts.url)?.disable_statement_logging();
    let pool = AnyPoolOptions::new()
        .max_connections(opts.pool_size.max(2))
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(connect)
        .await?;
    Ok(pool)
}

pub(super) async fn migrate(pool: &AnyPool) -> Result<()> {
    sqlx::migrate!("migrations/postgres").run(pool).await?;
    Ok(())
}
