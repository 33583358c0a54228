//! PostgreSQL specifics: connect options and the PostgreSQL migrations. Sequence numbers need
//! no special care here: the `UPDATE rooms ... RETURNING last_seq` in the write transaction
//! takes the room row's lock, which serialises writers of one room across processes.

use super::{Result, StoreError, StoreOptions};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection};
use std::str::FromStr;
use std::time::Duration;

/// How a batched write transaction begins on PostgreSQL (READ COMMITTED is enough: every
/// read that matters follows the room-row lock taken by the seq bump or is keyed by a unique
/// index).
pub(super) const BEGIN_WRITE: &str = "BEGIN";

/// The group-commit writer's own connection.
pub(super) async fn connect_one(opts: &StoreOptions) -> Result<AnyConnection> {
    let connect = AnyConnectOptions::from_str(&opts.url)?.disable_statement_logging();
    Ok(AnyConnection::connect_with(&connect).await?)
}

/// How long the first connection at start may take before the start fails.
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a PostgreSQL URL points, as `host:port` (or the socket directory of `?host=/dir`),
/// for error messages: never the user or password.
pub fn target(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let socket_dir = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("host="))
        .filter(|h| h.starts_with('/'));
    if let Some(dir) = socket_dir {
        return format!("socket directory {dir}");
    }
    let host_port = if host_port.is_empty() {
        "localhost"
    } else {
        host_port
    };
    let has_port = match host_port.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host_port.contains(':'),
    };
    if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    }
}

pub(super) async fn connect(opts: &StoreOptions) -> Result<AnyPool> {
    let connect = AnyConnectOptions::from_str(&opts.url)?.disable_statement_logging();
    // One connection first, so an unreachable or refusing server fails the start at once
    // with its address and the cause, not after the pool's acquire timeout as "pool timed
    // out".
    let failed = |cause: String| StoreError::Connect {
        target: target(&opts.url),
        cause,
    };
    match tokio::time::timeout(FIRST_CONNECT_TIMEOUT, AnyConnection::connect_with(&connect)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no connection within {} s",
                FIRST_CONNECT_TIMEOUT.as_secs()
            )));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn the_target_names_host_and_port_and_never_the_password() {
        assert_eq!(
            target("postgres://u:secret@db.internal:6543/app"),
            "db.internal:6543"
        );
        assert_eq!(target("postgresql://u:secret@db/app"), "db:5432");
        assert_eq!(target("postgres://[::1]:5433/app"), "[::1]:5433");
        assert_eq!(target("postgres://[::1]/app"), "[::1]:5432");
        assert_eq!(target("postgres:///app"), "localhost:5432");
        assert_eq!(
            target("postgres://u@localhost/db?host=/var/run/postgresql"),
            "socket directory /var/run/postgresql"
        );
    }
}
