//! Calls and A/V signaling over WebSockets: ringing on every device, first accept wins,
//! relay rights, missed/busy/reject, resume within the grace period, A/V rooms with live-room
//! publishing rights, the call log, and a leak check over 200 call set-ups.

use crate::common::*;
use serde_json::{Value, json};
use std::time::Duration;
use studyhall::protocol::{PlatformRole, RoomRole};

pub const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n";
pub const RECV_ONLY: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n";

fn offer() -> Value {
    json!({"sdp": {"type": "offer", "sdp": OFFER}})
}

#[tokio::test]
async fn a_1v1_call_rings_every_device_relays_only_between_the_two_and_is_logged() {
    let s = Server::sqlite(|_| {}).await;
    let mut tutor = s.client("tutor").await;
    let mut kid_phone = s.client("kid").await;
    let mut kid_laptop = s.client("kid").await;
    let mut eve = s.client("eve").await;
    let ok = tutor
        .ok(json!({"type":"call","to":"kid","media":{"audio":true,"video":true}}))
        .await;
    let call_id = ok["call_id"].clone();
    assert!(ok["ice_servers"].is_array());
    for c in [&mut kid_phone, &mut kid_laptop] {
        let ring = c.until("call_incoming").await;
        assert_eq!(
            (ring["call_id"].clone(), ring["from"]["user"].as_str()),
            (call_id.clone(), Some("tutor"))
        );
        assert_eq!(ring["from"]["name"], "TUTOR");
        assert_eq!(
            ring["from"]["session"].as_str(),
            Some(tutor.session.as_str())
        );
    }
    assert_eq!(
        eve.err(json!({"type":"call_accept","call_id":call_id}))
            .await,
        "forbidden"
    );
    assert_eq!(
        tutor
            .err(json!({"type":"signal","call_id":call_id,"data":offer()}))
            .await,
        "conflict",
        "not accepted yet"
    );
    let acc = kid_laptop
        .ok(json!({"type":"call_accept","call_id":call_id}))
        .await;
    assert!(acc["ice_servers"].is_array());
    assert_eq!(tutor.until("call_state").await["state"], "accepted");
    assert_eq!(
        kid_phone.until("call_state").await["state"],
        "answered_elsewhere"
    );
    assert_eq!(
        kid_phone
            .err(json!({"type":"call_accept","call_id":call_id}))
            .await,
        "conflict"
    );
    tutor
        .ok(json!({"type":"signal","call_id":call_id,"data":offer()}))
        .await;
    let sig = kid_laptop.until("signal").await;
    assert_eq!(
        (sig["call_id"].clone(), sig["from"]["user"].as_str()),
        (call_id.clone(), Some("tutor"))
    );
    assert_eq!(sig["data"]["sdp"]["type"], "offer");
    let cand = json!({"candidate":{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}});
    kid_laptop
        .ok(json!({"type":"signal","call_id":call_id,"data":cand}))
        .await;
    assert_eq!(
        tutor.until("signal").await["data"]["candidate"]["sdpMid"],
        "0"
    );
    // An ICE restart is a new offer mid-call: relayed like the first.
    tutor
        .ok(json!({"type":"signal","call_id":call_id,"data":offer()}))
        .await;
    assert_eq!(
        kid_laptop.until("signal").await["data"]["sdp"]["type"],
        "offer"
    );
    assert_eq!(
        eve.err(json!({"type":"signal","call_id":call_id,"data":offer()}))
            .await,
        "forbidden"
    );
    assert_eq!(
        kid_phone
            .err(json!({"type":"signal","call_id":call_id,"data":offer()}))
            .await,
        "forbidden"
    );
    for junk in [
        json!("x"),
        json!({"sdp":{"type":"offer","sdp":"hello"}}),
        json!({"candidate":{"candidate":"nope"}}),
    ] {
        assert_eq!(
            tutor
                .err(json!({"type":"signal","call_id":call_id,"data":junk}))
                .await,
            "bad_request"
        );
    }
    assert_eq!(
        eve.err(json!({"type":"call_hangup","call_id":call_id}))
            .await,
        "forbidden"
    );
    tutor
        .ok(json!({"type":"call_hangup","call_id":call_id}))
        .await;
    assert_eq!(kid_laptop.until("call_state").await["state"], "ended");
    let ended = kid_laptop.until("call_ended").await;
    assert_eq!(ended["reason"], "ended");
    let log = within("call log", async {
        loop {
            let (_, body) = http(s.addr, "GET", "/api/calls?user=kid", Some(API_KEY), None).await;
            if !body["calls"].as_array().unwrap().is_empty() {
                return body;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let rec = &log["calls"][0];
    assert_eq!(
        (
            rec["caller"].as_str(),
            rec["callee"].as_str(),
            rec["end_reason"].as_str()
        ),
        (Some("tutor"), Some("kid"), Some("ended"))
    );
    assert!(rec["answered_at"].is_i64() && rec["duration_ms"].is_i64());
    assert_eq!(rec["media"], json!({"audio": true, "video": true}));
    assert_eq!(
        http(s.addr, "GET", "/api/calls", Some(API_KEY), None)
            .await
            .0,
        400
    );
    s.stop().await;
}

#[tokio::test]
async fn missed_busy_rejected_and_offline() {
    let s = Server::sqlite(|c| {
        c.ring_timeout_s = 1;
        c.call_tick_ms = 50;
    })
    .await;
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    let mut c = s.client("c").await;
    let id = a.ok(json!({"type":"call","to":"b"})).await["call_id"].clone();
    b.until("call_incoming").await;
    assert!(c.ok(json!({"type":"call","to":"b"})).await["call_id"].is_string());
    assert_eq!(c.until("call_state").await["state"], "busy");
    assert_eq!(c.until("call_ended").await["reason"], "busy");
    let missed = a.until("call_ended").await;
    assert_eq!(
        (missed["call_id"].clone(), missed["reason"].as_str()),
        (id, Some("missed"))
    );
    assert_eq!(b.until("call_ended").await["reason"], "missed");
    let id = a.ok(json!({"type":"call","to":"b"})).await["call_id"].clone();
    b.until("call_incoming").await;
    b.ok(json!({"type":"call_reject","call_id":id})).await;
    assert_eq!(a.until("call_state").await["state"], "rejected");
    assert_eq!(
        a.err(json!({"type":"call","to":"nobody"})).await,
        "unavailable"
    );
    assert_eq!(a.err(json!({"type":"call","to":"a"})).await, "bad_request");
    // A call placed from a room needs the callee to belong to it.
    s.room("tut", "invite").await;
    let mut t = Client::connect(
        s.addr,
        &token("t", PlatformRole::Tutor, &[("tut", RoomRole::Host)]),
    )
    .await;
    t.join("tut").await;
    assert_eq!(
        t.err(json!({"type":"call","to":"b","room":"tut"})).await,
        "forbidden"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_dropped_caller_resumes_within_the_grace_period() {
    let s = Server::sqlite(|_| {}).await;
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    let id = a.ok(json!({"type":"call","to":"b"})).await["call_id"].clone();
    b.until("call_incoming").await;
    b.ok(json!({"type":"call_accept","call_id":id})).await;
    assert_eq!(b.until("call_state").await["state"], "accepted");
    a.until("call_state").await;
    drop(a);
    assert_eq!(b.until("call_state").await["state"], "reconnecting");
    let mut a2 = s.client("a").await;
    a2.ok(json!({"type":"call_resume","call_id":id})).await;
    assert_eq!(b.until("call_state").await["state"], "resumed");
    a2.ok(json!({"type":"signal","call_id":id,"data":offer()}))
        .await;
    assert_eq!(
        b.until("signal").await["from"]["session"].as_str(),
        Some(a2.session.as_str())
    );
    s.stop().await;
}

#[tokio::test]
async fn av_rooms_relay_between_peers_and_enforce_live_publishing() {
    let s = Server::sqlite(|c| c.av_mesh_max = 3).await;
    let (st, _) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id":"cls","kind":"class","av":{"mode":"mesh"}})),
    )
    .await;
    assert_eq!(st, 201);
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    let mut c = s.client("c").await;
    let mut d = s.client("d").await;
    for x in [&mut a, &mut b, &mut c, &mut d] {
        x.join("cls").await;
    }
    assert_eq!(
        a.err(json!({"type":"av_join","room":"nope"})).await,
        "not_member"
    );
    let first = a.ok(json!({"type":"av_join","room":"cls"})).await;
    assert_eq!(
        (
            first["mode"].as_str(),
            first["peers"].as_array().unwrap().len()
        ),
        (Some("mesh"), 0)
    );
    let second = b.ok(json!({"type":"av_join","room":"cls"})).await;
    assert_eq!(
        second["peers"][0]["session"].as_str(),
        Some(a.session.as_str())
    );
    let joined = a.until("av_peer").await;
    assert_eq!(
        (joined["session"].as_str(), joined["joined"].as_bool()),
        (Some(b.session.as_str()), Some(true))
    );
    c.ok(json!({"type":"av_join","room":"cls"})).await;
    assert_eq!(
        d.err(json!({"type":"av_join","room":"cls"})).await,
        "conflict",
        "mesh is full"
    );
    a.ok(json!({"type":"signal","room":"cls","to":b.session,"data":offer()}))
        .await;
    let sig = b.until("signal").await;
    assert_eq!(
        (sig["room"].as_str(), sig["from"]["session"].as_str()),
        (Some("cls"), Some(a.session.as_str()))
    );
    assert_eq!(
        d.err(json!({"type":"signal","room":"cls","to":a.session,"data":offer()}))
            .await,
        "forbidden",
        "not in the A/V room"
    );
    assert_eq!(
        a.err(json!({"type":"signal","room":"cls","to":d.session,"data":offer()}))
            .await,
        "forbidden",
        "target not in the A/V room"
    );
    b.ok(json!({"type":"av_leave","room":"cls"})).await;
    let left = loop {
        let ev = a.until("av_peer").await;
        if ev["joined"] == false {
            break ev;
        }
    };
    assert_eq!(left["session"].as_str(), Some(b.session.as_str()));
    // Live room: only the host and people on stage publish.
    let (st, _) = http(
        s.addr,
        "POST",
        "/api/rooms",
        Some(API_KEY),
        Some(json!({"id":"lv","kind":"live"})),
    )
    .await;
    assert_eq!(st, 201);
    let mut host = Client::connect(
        s.addr,
        &token("host", PlatformRole::Tutor, &[("lv", RoomRole::Host)]),
    )
    .await;
    host.join("lv").await;
    let mut kid = s.client("kid").await;
    kid.join("lv").await;
    assert_eq!(
        host.ok(json!({"type":"av_join","room":"lv"})).await["publish"],
        true
    );
    assert_eq!(
        kid.ok(json!({"type":"av_join","room":"lv"})).await["publish"],
        false
    );
    let send = json!({"sdp":{"type":"offer","sdp":OFFER}});
    let recv = json!({"sdp":{"type":"answer","sdp":RECV_ONLY}});
    assert_eq!(
        kid.err(json!({"type":"signal","room":"lv","to":host.session,"data":send}))
            .await,
        "forbidden"
    );
    kid.ok(json!({"type":"signal","room":"lv","to":host.session,"data":recv}))
        .await;
    host.ok(json!({"type":"stage","room":"lv","user":"kid","on":true}))
        .await;
    kid.ok(json!({"type":"signal","room":"lv","to":host.session,"data":send}))
        .await;
    // Leaving the room leaves its A/V and gives up the stage: no more publishing.
    kid.ok(json!({"type":"leave","room":"lv"})).await;
    let send = json!({"sdp":{"type":"offer","sdp":OFFER}});
    assert_eq!(
        kid.err(json!({"type":"signal","room":"lv","to":host.session,"data":send}))
            .await,
        "not_member"
    );
    kid.join("lv").await;
    assert_eq!(
        kid.err(json!({"type":"signal","room":"lv","to":host.session,"data":send}))
            .await,
        "forbidden",
        "not in the A/V any more"
    );
    assert_eq!(
        kid.ok(json!({"type":"av_join","room":"lv"})).await["publish"],
        false,
        "off stage after leaving"
    );
    assert_eq!(
        kid.err(json!({"type":"signal","room":"lv","to":host.session,"data":send}))
            .await,
        "forbidden"
    );
    assert_eq!(
        kid.err(json!({"type":"av_join","room":"nope-room"})).await,
        "not_member"
    );
    s.room("grp", "open").await;
    kid.join("grp").await;
    assert_eq!(
        kid.err(json!({"type":"av_join","room":"grp"})).await,
        "bad_request",
        "group rooms have no A/V"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_call_setups_leave_fds_and_tasks_at_baseline() {
    let s = Server::sqlite(|_| {}).await;
    let mut a = s.client("a").await;
    let mut b = s.client("b").await;
    // Warm up once so lazily created pool connections are part of the baseline.
    let id = a.ok(json!({"type":"call","to":"b"})).await["call_id"].clone();
    b.until("call_incoming").await;
    a.ok(json!({"type":"call_hangup","call_id":id})).await;
    let rt = tokio::runtime::Handle::current();
    let settle = |target: (usize, usize)| {
        let rt = rt.clone();
        async move {
            within("back to baseline", async {
                loop {
                    let now = (open_fds(), rt.metrics().num_alive_tasks());
                    if now.0 <= target.0 && now.1 <= target.1 {
                        return now;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }
    };
    let baseline = (open_fds(), rt.metrics().num_alive_tasks());
    assert!(baseline.0 > 0, "the fd count must be real, not a fallback");
    for _ in 0..200 {
        let id = a
            .ok(json!({"type":"call","to":"b","media":{"audio":true,"video":false}}))
            .await["call_id"]
            .clone();
        b.until("call_incoming").await;
        b.ok(json!({"type":"call_accept","call_id":id})).await;
        a.ok(json!({"type":"signal","call_id":id,"data":offer()}))
            .await;
        b.until("signal").await;
        b.ok(json!({"type":"call_hangup","call_id":id})).await;
        a.until("call_ended").await;
        a.pending.clear();
        b.pending.clear();
    }
    // The call log's inserts may have opened more of the pool's connections than the warm-up
    // did (they run concurrently when the machine is busy), and an idle pool connection stays
    // open: up to three descriptors (database, WAL, shared memory) each. A leak per call would
    // be hundreds.
    let pool_slack = 3 * s.app.config.db_pool_size as usize;
    let after = settle((baseline.0 + pool_slack, baseline.1)).await;
    assert!(
        after.0 <= baseline.0 + pool_slack && after.1 <= baseline.1,
        "baseline {baseline:?}, after {after:?}, pool slack {pool_slack}"
    );
    assert_eq!(s.app.rtc.live_calls(), 0);
    s.stop().await;
}

#[tokio::test]
async fn av_modes_pick_mesh_or_sfu_and_only_sfu_members_signal_the_sfu() {
    let s = Server::sqlite(|c| c.av_mesh_max = 2).await;
    for (id, av) in [("auto", json!(null)), ("fixed", json!({"mode": "mesh"}))] {
        let mut body = json!({"id": id, "kind": "class"});
        if !av.is_null() {
            body["av"] = av;
        }
        let (st, room) = http(s.addr, "POST", "/api/rooms", Some(API_KEY), Some(body)).await;
        assert_eq!(st, 201, "{room}");
    }
    let (_, room) = http(s.addr, "GET", "/api/rooms/auto", Some(API_KEY), None).await;
    assert_eq!(room["av"]["mode"], "auto");
    let (st, _) = http(
        s.addr,
        "PATCH",
        "/api/rooms/fixed",
        Some(API_KEY),
        Some(json!({"av": {"mode": "nope"}})),
    )
    .await;
    assert_eq!(st, 400);
    let mut c: Vec<Client> = Vec::new();
    for u in ["a", "b", "c"] {
        let mut x = s.client(u).await;
        x.join("auto").await;
        x.join("fixed").await;
        c.push(x);
    }
    // auto: a mesh up to av_mesh_max, the SFU past it; a mesh peer stays in the mesh.
    let modes = [
        c[0].ok(json!({"type":"av_join","room":"auto"})).await["mode"].clone(),
        c[1].ok(json!({"type":"av_join","room":"auto"})).await["mode"].clone(),
        c[2].ok(json!({"type":"av_join","room":"auto"})).await["mode"].clone(),
        c[0].ok(json!({"type":"av_join","room":"auto"})).await["mode"].clone(),
    ];
    assert_eq!(
        modes,
        [json!("mesh"), json!("mesh"), json!("sfu"), json!("mesh")]
    );
    assert_eq!(s.app.sfu.as_ref().unwrap().sessions(), 1);
    // mesh: the limit holds.
    c[0].ok(json!({"type":"av_join","room":"fixed"})).await;
    c[1].ok(json!({"type":"av_join","room":"fixed"})).await;
    assert_eq!(
        c[2].err(json!({"type":"av_join","room":"fixed"})).await,
        "conflict"
    );
    // Switched to sfu by PATCH: the next join goes to the SFU.
    let (st, _) = http(
        s.addr,
        "PATCH",
        "/api/rooms/fixed",
        Some(API_KEY),
        Some(json!({"av": {"mode": "sfu"}})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        c[2].ok(json!({"type":"av_join","room":"fixed"})).await["mode"],
        "sfu"
    );
    let cand = json!({"candidate": null});
    // A non-member cannot signal the SFU; a member outside its SFU is refused too.
    let mut outsider = s.client("outsider").await;
    assert_eq!(
        outsider
            .err(json!({"type":"signal","room":"fixed","to":"sfu","data":cand}))
            .await,
        "not_member"
    );
    outsider.join("fixed").await;
    assert_eq!(
        outsider
            .err(json!({"type":"signal","room":"fixed","to":"sfu","data":cand}))
            .await,
        "forbidden"
    );
    c[2].ok(json!({"type":"signal","room":"fixed","to":"sfu","data":cand}))
        .await;
    assert_eq!(
        c[2].err(json!({"type":"signal","room":"fixed","to":"sfu","data":{"sdp":{"type":"answer","sdp":"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}}}))
            .await,
        "bad_request",
        "no offer of the SFU is waiting"
    );
    // Only host/ta mute.
    assert_eq!(
        c[0].err(json!({"type":"av_mute","room":"fixed","user":"c","kind":"audio"}))
            .await,
        "forbidden"
    );
    // Leaving the room closes the SFU peer.
    c[2].ok(json!({"type":"leave","room":"fixed"})).await;
    c[2].ok(json!({"type":"leave","room":"auto"})).await;
    within("the SFU forgets the leavers", async {
        while s.app.sfu.as_ref().unwrap().sessions() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    s.stop().await;
}
