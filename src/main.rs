//! The `studyhall` binary: `serve`, `migrate` and `token` subcommands, logging set-up and
//! signal handling. The only place `anyhow` is used; everything else is in the library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use studyhall::config::{CONFIG_ENV, Config, ServeArgs, setting};
use studyhall::protocol::PlatformRole;
use studyhall::store::{Store, StoreOptions};
use studyhall::{App, auth};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "studyhall",
    version,
    about = "Real-time chat and live sessions for online education"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate(DbArgs),
    /// Print a signed client token (for development and scripts).
    Token(TokenArgs),
}

/// The settings `migrate` and `token` read: the file, and the database URL from env or flag.
#[derive(Args)]
struct DbArgs {
    /// TOML settings file, as for `serve`.
    #[arg(long, env = CONFIG_ENV)]
    config: Option<std::path::PathBuf>,
    #[arg(long, env = setting("database_url").env, help = setting("database_url").doc)]
    database_url: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    db: DbArgs,
    #[arg(long, env = setting("jwt_secret").env, hide_env_values = true,
          help = setting("jwt_secret").doc)]
    jwt_secret: Option<String>,
    /// User id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// Display name (defaults to the user id).
    #[arg(long)]
    name: Option<String>,
    /// Platform role (the token's `role`).
    #[arg(long, value_enum, default_value = "student")]
    role: RoleArg,
    /// Room grants: `room:role` or `room=role`, comma-separated (role defaults to member),
    /// e.g. `lobby:host,algebra=ta,physics`.
    #[arg(long, default_value = "")]
    rooms: String,
    /// Lifetime: e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Create the SQLite database (and with it a new token secret) if its file does not
    /// exist yet. Without it, a missing file is an error: a token signed with a new secret
    /// would be refused by a server that keeps its secret in another file.
    #[arg(long)]
    create: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Student,
    Tutor,
    Admin,
}

fn load(db: &DbArgs, jwt_secret: Option<String>) -> anyhow::Result<Config> {
    let args = ServeArgs {
        config: db.config.clone(),
        database_url: db.database_url.clone(),
        jwt_secret,
        ..Default::default()
    };
    Ok(Config::load(&args)?)
}

async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let metrics = std::sync::Arc::default();
    Store::open(&StoreOptions::from_config(cfg), metrics, None)
        .await
        .with_context(|| "cannot open the database (is STUDYHALL_DATABASE_URL right?)")
}

/// `token` signs with the secret kept in the database: minting against an SQLite file that
/// does not exist would create a new database with a new secret, whose tokens the running
/// server refuses. Refused unless `--create` asks for exactly that.
fn refuse_a_new_database(database_url: &str, create: bool) -> anyhow::Result<()> {
    let Some(path) = studyhall::config::sqlite_path(database_url) else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    if create {
        eprintln!(
            "studyhall token: created {} with a new token secret; only a server on this \
             database accepts the token",
            shown.display()
        );
        return Ok(());
    }
    anyhow::bail!(
        "no database at {}: the token secret is kept in the server's database, so run this \
         where the server runs, or point --database-url (STUDYHALL_DATABASE_URL) at its \
         database, or give --jwt-secret; --create makes a new database with a new secret",
        shown.display()
    )
}

/// Colour in logs only for a terminal, and never with `NO_COLOR` set to anything non-empty.
fn log_colours(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Resolves at the first SIGTERM or Ctrl-C. The handlers are installed here, at once, not
/// when the future is first polled: a signal sent as soon as the server says it is listening
/// must already be caught (else it kills the process without a goodbye).
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STUDYHALL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(log_colours(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve(args) => {
            let config = Config::load(&args)?;
            let (addr, backlog) = (config.addr, config.listen_backlog);
            let app = App::start(config).await.context("cannot start")?;
            let listener = studyhall::listener::bind(addr, backlog)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            let shutdown = shutdown_signal()?;
            // A stable line on stdout for scripts and tests that start us on port 0.
            println!("studyhall listening on http://{local}");
            tracing::info!(%local, dev = app.config.dev, "listening");
            studyhall::serve(app, listener, shutdown).await?;
            Ok(())
        }
        Cmd::Migrate(db) => {
            let cfg = load(&db, None)?;
            open_store(&cfg).await?.close().await;
            println!(
                "migrations applied to {}",
                studyhall::config::redact_url(&cfg.database_url)
            );
            Ok(())
        }
        Cmd::Token(t) => {
            let cfg = load(&t.db, t.jwt_secret.clone())?;
            let rooms =
                auth::parse_room_grants(&t.rooms).map_err(|e| anyhow::anyhow!("--rooms: {e}"))?;
            let secret = match &cfg.jwt_secret {
                Some(secret) => secret.clone(),
                None => {
                    refuse_a_new_database(&cfg.database_url, t.create)?;
                    let store = open_store(&cfg).await?;
                    let secret = studyhall::token_secret(&cfg, &store).await?;
                    store.close().await;
                    secret
                }
            };
            let ttl = auth::parse_ttl(&t.ttl).map_err(anyhow::Error::msg)?;
            if t.user.is_empty() || t.user.chars().count() > 64 {
                anyhow::bail!("--user must be 1..=64 characters");
            }
            let role = match t.role {
                RoleArg::Student => PlatformRole::Student,
                RoleArg::Tutor => PlatformRole::Tutor,
                RoleArg::Admin => PlatformRole::Admin,
            };
            let name = t.name.unwrap_or_else(|| t.user.clone());
            let token =
                auth::Tokens::new(secret.as_bytes()).sign(&t.user, &name, role, rooms, ttl)?;
            println!("{token}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, None));
        assert!(log_colours(true, Some("".into())));
        assert!(!log_colours(true, Some("1".into())));
        assert!(!log_colours(false, None));
    }

    #[test]
    fn the_cli_is_well_formed_and_every_flag_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for cmd in cli.get_subcommands() {
            for arg in cmd.get_arguments() {
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{} --{} has no help",
                    cmd.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
