//! The `studyhall` binary as a newcomer meets it: `token` against a database that is not
//! there, room grants in either spelling, `serve` with PostgreSQL unreachable, and logs
//! without colour codes when stderr is no terminal. Each test runs the built binary.

use crate::common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};
use studyhall::auth::Tokens;
use studyhall::protocol::RoomRole;
use tokio::process::Command;

/// The binary with no `STUDYHALL_*` settings from the test's own environment.
fn studyhall(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_studyhall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STUDYHALL_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir)
        .env("NO_COLOR", "")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> (bool, String, String) {
    let out = within("studyhall runs", cmd.output()).await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn token_refuses_to_mint_against_a_database_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("studyhall.db");
    let mut cmd = studyhall(dir.path());
    cmd.args(["token", "--user", "alice"]);
    let (ok, stdout, stderr) = run(cmd).await;
    assert!(!ok, "minted against a missing database: {stdout}");
    assert!(stdout.is_empty(), "no token is printed: {stdout}");
    assert!(
        stderr.contains(&db.display().to_string()) && stderr.contains("--create"),
        "the error names the file and the way out: {stderr}"
    );
    assert!(!db.exists(), "no database is created");

    // --create makes it, says so, and then the same command works without it.
    let mut cmd = studyhall(dir.path());
    cmd.args(["token", "--user", "alice", "--create"]);
    let (ok, stdout, stderr) = run(cmd).await;
    assert!(ok, "{stderr}");
    assert!(!stdout.is_empty());
    assert!(stderr.contains("new token secret"), "{stderr}");
    assert!(db.exists());
    let mut cmd = studyhall(dir.path());
    cmd.args(["token", "--user", "alice"]);
    let (ok, stdout, stderr) = run(cmd).await;
    assert!(ok && !stdout.is_empty(), "{stderr}");
    assert!(!stderr.contains("new token secret"), "{stderr}");

    // With an explicit secret no database is needed, and none is created.
    let other = tempfile::tempdir().unwrap();
    let mut cmd = studyhall(other.path());
    cmd.args(["token", "--user", "bob", "--jwt-secret", SECRET]);
    let (ok, stdout, stderr) = run(cmd).await;
    assert!(ok, "{stderr}");
    assert!(Tokens::new(SECRET.as_bytes()).verify(&stdout).is_ok());
    assert!(!other.path().join("studyhall.db").exists());
}

#[tokio::test]
async fn token_takes_room_grants_with_either_separator_and_explains_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = studyhall(dir.path());
    cmd.args([
        "token",
        "--user",
        "ann",
        "--jwt-secret",
        SECRET,
        "--rooms",
        "lobby:host,algebra=ta,physics",
    ]);
    let (ok, stdout, stderr) = run(cmd).await;
    assert!(ok, "{stderr}");
    let id = Tokens::new(SECRET.as_bytes()).verify(&stdout).unwrap();
    assert_eq!(id.grants["lobby"], RoomRole::Host);
    assert_eq!(id.grants["algebra"], RoomRole::Ta);
    assert_eq!(id.grants["physics"], RoomRole::Member);

    for bad in ["lobby:boss", "lobby:host:ta", "no room=host"] {
        let mut cmd = studyhall(dir.path());
        cmd.args([
            "token",
            "--user",
            "ann",
            "--jwt-secret",
            SECRET,
            "--rooms",
            bad,
        ]);
        let (ok, _, stderr) = run(cmd).await;
        assert!(!ok, "{bad} was accepted");
        assert!(
            stderr.contains(bad) && stderr.contains("room:role or room=role"),
            "{bad}: {stderr}"
        );
    }
}

#[tokio::test]
async fn serve_names_an_unreachable_postgres_and_why_at_once() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = studyhall(dir.path());
    cmd.args(["serve", "--addr", "127.0.0.1:0"]).env(
        "STUDYHALL_DATABASE_URL",
        format!("postgres://studyhall:hunter2-secret@127.0.0.1:{port}/studyhall"),
    );
    let started = Instant::now();
    let (ok, _, stderr) = run(cmd).await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "names host and port: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("refused"),
        "names the cause: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "leaks the password: {stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}, not failing fast",
        started.elapsed()
    );
}

#[tokio::test]
async fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = studyhall(dir.path());
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .env("STUDYHALL_LOG", "info")
        .env("STUDYHALL_JWT_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, _addr) = spawn_listening(cmd, "serve").await;
    use tokio::io::AsyncBufReadExt;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let logged = within("the listening log line", async {
        let mut logged = String::new();
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            logged += &line;
            logged.push('\n');
            if line.contains("listening") {
                return logged;
            }
        }
        panic!("serve exited before logging: {logged}");
    })
    .await;
    child.start_kill().unwrap();
    assert!(
        !logged.contains('\u{1b}'),
        "colour codes in logs: {logged:?}"
    );
}
