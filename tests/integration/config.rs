//! The `studyhall` binary reads its settings as documented: comma-separated lists in the
//! environment, and `serve --help` describing every flag.

use crate::common::*;
use studyhall::config::SETTINGS;
use tokio::process::Command;

#[tokio::test]
async fn an_env_list_is_split_on_commas() {
    // The second entry of the variable is refused by itself: the value was split.
    let out = within(
        "refusal",
        Command::new(env!("CARGO_BIN_EXE_studyhall"))
            .arg("serve")
            .env_remove("STUDYHALL_CONFIG")
            .env("STUDYHALL_ADDR", "127.0.0.1:0")
            .env("STUDYHALL_DATABASE_URL", "sqlite://never-created.db")
            .env("STUDYHALL_STUN_URLS", "stun:a.example:3478,,not-a-url")
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            r#"invalid setting stun_urls/turn_urls: "not-a-url" is not a stun:/turn: URL"#
        ),
        "{err}"
    );
    assert!(!std::path::Path::new("never-created.db").exists());
}

#[tokio::test]
async fn an_origin_allowlist_from_env_admits_each_listed_origin() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = studyhall_serve(&format!("sqlite://{}", dir.path().join("t.db").display()));
    cmd.env(
        "STUDYHALL_ALLOWED_ORIGINS",
        "https://a.example,,https://b.example",
    );
    let (mut child, addr) = spawn_listening(cmd, "binary listening").await;
    let attempt = |origin: &'static str| async move {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(within("a", attempt("https://a.example")).await, 101);
    assert_eq!(within("b", attempt("https://b.example")).await, 101);
    assert_eq!(within("evil", attempt("https://evil.example")).await, 403);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn serve_help_describes_every_flag() {
    let out = within(
        "help",
        Command::new(env!("CARGO_BIN_EXE_studyhall"))
            .args(["serve", "--help"])
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in SETTINGS {
        if let Some(flag) = s.flag {
            let listed = help
                .lines()
                .any(|l| l.split_whitespace().next() == Some(flag));
            assert!(listed, "{flag} missing:\n{help}");
            assert!(help.contains(s.doc), "{flag}'s help missing:\n{help}");
        }
    }
}
