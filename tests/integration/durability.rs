//! Durability: a restart keeps history and continues seq; a process killed with SIGKILL right
//! after acknowledging writes has lost none of them (the real binary, spawned).

use crate::common::*;
use serde_json::json;
use tokio::process::{Child, Command};

#[tokio::test]
async fn restart_keeps_history_and_continues_seq() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keep.db").display());
    let s = Server::start(base_config(url.clone())).await;
    s.room("r", "open").await;
    let mut a = s.client("alice").await;
    a.join("r").await;
    for i in 1..=5 {
        a.ok(
            json!({"type":"send","room":"r","text":format!("t{i}"),"client_msg_id":format!("{i}")}),
        )
        .await;
    }
    drop(a);
    s.stop().await;

    let s = Server::start(base_config(url)).await;
    let mut a = s.client("alice").await;
    let joined = a.join("r").await;
    assert_eq!(joined["last_seq"], 5);
    let h = a.ok(json!({"type":"history","room":"r"})).await;
    let texts: Vec<_> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["t1", "t2", "t3", "t4", "t5"]);
    let ok = a
        .ok(json!({"type":"send","room":"r","text":"t6","client_msg_id":"6"}))
        .await;
    assert_eq!(ok["seq"], 6);
    // The idempotency key survives the restart too.
    let again = a
        .ok(json!({"type":"send","room":"r","text":"t1","client_msg_id":"1"}))
        .await;
    assert_eq!(again["seq"], 1);
    s.stop().await;
}

struct Proc {
    child: Child,
    addr: std::net::SocketAddr,
}

async fn spawn_binary(db_url: &str) -> Proc {
    spawn_binary_with(db_url, Some(SECRET)).await
}

async fn spawn_binary_with(db_url: &str, secret: Option<&str>) -> Proc {
    let mut cmd = studyhall_serve(db_url);
    cmd.env_remove("STUDYHALL_JWT_SECRET");
    if let Some(secret) = secret {
        cmd.env("STUDYHALL_JWT_SECRET", secret);
    }
    let (child, addr) = spawn_listening(cmd, "binary listening").await;
    Proc { child, addr }
}

#[tokio::test]
async fn sigkill_right_after_acks_loses_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let mut p = spawn_binary(&url).await;
    let (st, _) = http(
        p.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id":"r","kind":"group"})),
    )
    .await;
    assert_eq!(st, 201);
    let mut c = Client::connect(
        p.addr,
        &token("alice", studyhall::protocol::PlatformRole::Student, &[]),
    )
    .await;
    c.join("r").await;
    const N: usize = 200;
    let mut rids = Vec::new();
    for i in 0..N {
        rids.push(c.fire(json!({"type":"send","room":"r","text":format!("n{i}"),"client_msg_id":format!("{i}")})).await);
    }
    let mut acked = Vec::new();
    for rid in rids {
        let ok = c.reply(rid).await;
        assert_eq!(ok["type"], "ok");
        acked.push((
            ok["id"].as_str().unwrap().to_owned(),
            ok["seq"].as_i64().unwrap(),
        ));
    }
    // Kill at once: no shutdown path runs.
    p.child.start_kill().unwrap();
    within("killed", p.child.wait()).await.unwrap();

    let p = spawn_binary(&url).await;
    let (st, page) = http(
        p.addr,
        "GET",
        "/api/rooms/r/messages?after_seq=0&limit=1000",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let stored: Vec<(String, i64)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    for a in &acked {
        assert!(stored.contains(a), "acked {a:?} lost");
    }
    let seqs: Vec<i64> = stored.iter().map(|s| s.1).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "gap-free after the crash"
    );
    drop(p);
}

#[tokio::test]
async fn sigterm_says_bye_closes_1001_and_exits_zero() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("term.db").display());
    let mut p = spawn_binary(&url).await;
    let mut c = Client::connect(
        p.addr,
        &token("alice", studyhall::protocol::PlatformRole::Student, &[]),
    )
    .await;
    let pid = p.child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let mut bye = false;
    let code = within("bye", async {
        while let Some(Ok(m)) = c.ws.next().await {
            match m {
                tokio_tungstenite::tungstenite::Message::Text(t) => bye |= t.contains("\"bye\""),
                tokio_tungstenite::tungstenite::Message::Close(f) => {
                    return f.map(|f| u16::from(f.code));
                }
                _ => {}
            }
        }
        None
    })
    .await;
    assert!(bye);
    assert_eq!(code, Some(1001));
    let exit = within("exit", p.child.wait()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn token_subcommand_signs_with_the_secret_kept_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("secret.db").display());
    let p = spawn_binary_with(&url, None).await;
    let out = Command::new(env!("CARGO_BIN_EXE_studyhall"))
        .args([
            "token", "--user", "alice", "--name", "Alice", "--role", "tutor", "--rooms", "r1=host",
            "--ttl", "10m",
        ])
        .env_remove("STUDYHALL_JWT_SECRET")
        .env("STUDYHALL_DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut c = Client::connect(p.addr, &token).await;
    let rooms = c.ok(json!({"type":"rooms"})).await;
    assert_eq!(rooms["rooms"], json!([]));
    // A token signed with any other secret is refused.
    let mut ws = raw_ws(p.addr).await;
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"type":"hello","token":token_signed_elsewhere()}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let bad = Command::new(env!("CARGO_BIN_EXE_studyhall"))
        .args(["token", "--user", "a", "--rooms", "bad id=host"])
        .env("STUDYHALL_DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success(), "bad --rooms is refused");
}

fn token_signed_elsewhere() -> String {
    token("alice", studyhall::protocol::PlatformRole::Student, &[])
}
