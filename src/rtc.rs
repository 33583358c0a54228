//! Calls and audio/video, wired into sessions: the commands `call`, `call_accept`,
//! `call_reject`, `call_hangup`, `call_resume`, `av_join`, `av_leave` and `signal` drive the
//! sans-I/O machines of `studyhall-signaling` under one short mutex (never held across an
//! await), and what they ask to send goes out as directed frames through the hub's bounded
//! outboxes. A ticker ends missed and abandoned calls; finished calls go to the call log.
//! In cluster mode a room's SFU runs on one node (claimed in the store, see
//! `Store::sfu_claim`); the SFU commands of sessions on other nodes are forwarded there.

use crate::App;
use crate::command::{Ctx, Outcome, check_room_id};
use crate::error::{Error, Result};
use crate::hub::Frame;
use crate::node::{AvChange, CallAction, CallCommand, SfuAction, SfuCommand, SfuReply};
use crate::protocol::{
    self, AvJoinOk, AvMode, AvPeerRef, AvRoomMode, AvTrackKind, CallOk, CallParty, ClientMsg,
    EmptyOk, IceServer, Media, RoomId, RoomKind, RoomRole, ServerMsg, UserId,
};
use crate::sfu::{Member, Notice, Notify, SfuConfig, SfuError, TrackKind};
use crate::store::{AvJoin, CallLogEntry, now_ms};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use studyhall_signaling::av::{AvKind, AvRooms, Membership};
use studyhall_signaling::calls::{CallConfig, CallRequest, Calls};
use studyhall_signaling::turn::IceConfig;
use studyhall_signaling::{Msg, Out, Peer, SignalError};

struct State {
    calls: Calls,
    av: AvRooms,
    /// call id -> the room it was placed in, for the call log.
    call_rooms: HashMap<String, RoomId>,
    /// Cluster mode: (room, session) -> the node whose SFU holds this node's session's peer
    /// connection, when it is another node.
    sfu_remote: HashMap<(String, String), String>,
}

/// The node's call and A/V state.
pub struct Rtc {
    state: Mutex<State>,
    ice: IceConfig,
    /// Cluster mode: ended A/V memberships (room, session, generation) whose store delete
    /// failed; the A/V sweep tries them again.
    unforgotten: Arc<Mutex<Vec<(RoomId, String, u64)>>>,
    /// Cluster mode: held while this node claims a room's SFU and joins it, or releases the
    /// claim of a room its SFU no longer holds, so a release never drops a room a join filled.
    sfu_claims: tokio::sync::Mutex<()>,
}

impl From<SignalError> for Error {
    fn from(e: SignalError) -> Self {
        match e {
            SignalError::BadRequest(m) => Error::BadRequest(m),
            SignalError::Forbidden(m) => Error::Forbidden(m),
            SignalError::NotFound(m) => Error::NotFound(m),
            SignalError::Conflict(m) => Error::Conflict(m),
            SignalError::Unavailable(m) => Error::Unavailable(m),
        }
    }
}

impl From<SfuError> for Error {
    fn from(e: SfuError) -> Self {
        match e {
            SfuError::BadRequest(m) => Error::BadRequest(m),
            SfuError::Forbidden(m) => Error::Forbidden(m),
            SfuError::Full(m) => Error::Conflict(m),
            SfuError::Unavailable(m) => Error::Unavailable(m),
        }
    }
}

/// The SFU's peer name in `signal`: `to:"sfu"`, and `from {user:"studyhall", session:"sfu"}`.
pub const SFU_PEER: &str = "sfu";
/// The user the SFU signs its signals with (a reserved `sub`: no token can claim it).
pub const SFU_USER: &str = "studyhall";

/// The SFU's settings from the config.
pub(crate) fn sfu_config(cfg: &crate::config::Config) -> SfuConfig {
    SfuConfig {
        udp_addr: cfg.sfu_udp_addr,
        room_max: cfg.sfu_room_max,
        sessions_max: cfg.sfu_sessions_max,
        speakers_ms: cfg.sfu_speakers_ms,
        keyframe_ms: cfg.sfu_keyframe_ms,
        ice_grace_ms: cfg.sfu_ice_grace_ms,
        connect_wait_ms: cfg.sfu_connect_wait_ms,
        ice_lost_ms: cfg.sfu_ice_lost_ms,
        bwe_start_kbps: cfg.sfu_bwe_start_kbps,
        viewer_max_kbps: cfg.sfu_viewer_max_kbps,
    }
}

/// Turns what the SFU says into frames for its sessions, wherever they are connected (in
/// cluster mode a room's SFU serves the sessions of every node). Rooms the SFU no longer holds
/// go to `emptied` (cluster mode: their claim is released).
pub(crate) fn sfu_notify(
    out: Arc<dyn crate::node::Broker>,
    emptied: Option<tokio::sync::mpsc::UnboundedSender<RoomId>>,
) -> Notify {
    Arc::new(move |n: Notice| match n {
        Notice::Signal {
            session,
            room,
            data,
        } => {
            let frame = protocol::encode(&ServerMsg::Signal {
                call_id: None,
                room: Some(&room),
                from: CallParty {
                    user: SFU_USER,
                    session: SFU_PEER,
                    name: None,
                },
                data: &data,
            });
            out.send_to_session(&session, &Frame::from(frame));
        }
        Notice::Speakers {
            sessions,
            room,
            users,
        } => {
            let frame = Frame::from(protocol::encode(&ServerMsg::ActiveSpeakers {
                room: &room,
                users: &users,
            }));
            for s in sessions {
                out.send_to_session(&s, &frame);
            }
        }
        Notice::Closed {
            session,
            room,
            reason,
        } => {
            let room = RoomId::from(room.as_str());
            let frame = protocol::encode(&ServerMsg::AvClosed {
                room: &room,
                reason,
            });
            out.send_to_session(&session, &Frame::from(frame));
        }
        Notice::Peer {
            to,
            room,
            session,
            user,
            joined,
        } => {
            let frame = protocol::encode(&ServerMsg::AvPeer {
                room: &room,
                session: &session,
                user: &user,
                joined,
            });
            out.send_to_session(&to, &Frame::from(frame));
        }
        Notice::Emptied { room } => {
            if let Some(tx) = &emptied {
                let _ = tx.send(RoomId(room));
            }
        }
    })
}

/// Cluster mode: releases the claim of each room this node's SFU no longer holds (unless a
/// join filled it again meanwhile).
pub(crate) async fn run_sfu_releases(
    app: Arc<App>,
    mut emptied: tokio::sync::mpsc::UnboundedReceiver<RoomId>,
) {
    while let Some(room) = emptied.recv().await {
        release_if_empty(&app, &room).await;
    }
}

async fn release_if_empty(app: &App, room: &RoomId) {
    let (Some(node), Some(sfu)) = (app.broker.node_id(), &app.sfu) else {
        return;
    };
    let _claims = app.rtc.sfu_claims.lock().await;
    if sfu.room_size(room.as_str()).await > 0 {
        return;
    }
    if let Err(e) = app.store.sfu_release(room, node).await {
        // Left claimed: the next join on another node finds this node live and forwards here,
        // where the join claims it again. Only a node's restart clears it otherwise.
        tracing::warn!(error = %e, room = %room, "could not release a room's SFU");
    }
}

impl Rtc {
    pub fn new(cfg: &crate::config::Config) -> Self {
        Self {
            state: Mutex::new(State {
                calls: Calls::new(CallConfig {
                    ring_timeout_ms: cfg.ring_timeout_s * 1000,
                    grace_ms: cfg.call_grace_s * 1000,
                }),
                av: AvRooms::new(cfg.av_mesh_max),
                call_rooms: HashMap::new(),
                sfu_remote: HashMap::new(),
            }),
            unforgotten: Arc::default(),
            sfu_claims: tokio::sync::Mutex::new(()),
            ice: IceConfig {
                stun_urls: cfg.stun_urls.clone(),
                turn_urls: cfg.turn_urls.clone(),
                turn_secret: cfg.turn_secret.clone(),
                turn_ttl_s: cfg.turn_ttl_s,
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain maps updated without awaiting; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ice_servers(&self, user: &UserId) -> Vec<IceServer> {
        self.ice.servers_for(user.as_str(), crate::auth::now_s())
    }

    /// Rooms whose A/V this node keeps state for (a leak test's measure: none once everyone
    /// left).
    pub fn av_rooms(&self) -> usize {
        self.lock().av.rooms()
    }

    /// Live calls on this node (for metrics and the leak test).
    pub fn live_calls(&self) -> usize {
        self.lock().calls.live_calls()
    }
}

fn peer(ctx: &Ctx) -> Peer {
    Peer::new(ctx.me.user.as_str(), ctx.handle.id.as_str())
}

/// Encodes and queues what the machines asked to send. `caller_name` names the caller in
/// `call_incoming`.
fn deliver(app: &App, outs: Vec<Out>, caller_name: Option<&str>, room: Option<&RoomId>) {
    for o in outs {
        let frame = match &o.msg {
            Msg::CallIncoming {
                call_id,
                from,
                media,
            } => protocol::encode(&ServerMsg::CallIncoming {
                call_id,
                from: CallParty {
                    user: &from.user,
                    session: &from.session,
                    name: caller_name,
                },
                media: *media,
                room,
            }),
            Msg::CallState { call_id, state } => protocol::encode(&ServerMsg::CallState {
                call_id,
                state: *state,
            }),
            Msg::CallEnded {
                call_id,
                reason,
                duration_ms,
            } => protocol::encode(&ServerMsg::CallEnded {
                call_id,
                reason: *reason,
                duration_ms: *duration_ms,
            }),
            Msg::Signal {
                call_id,
                room,
                from,
                data,
            } => protocol::encode(&ServerMsg::Signal {
                call_id: call_id.as_deref(),
                room: room.as_deref(),
                from: CallParty {
                    user: &from.user,
                    session: &from.session,
                    name: None,
                },
                data,
            }),
            Msg::AvPeer { room, peer, joined } => protocol::encode(&ServerMsg::AvPeer {
                room,
                session: &peer.session,
                user: &peer.user,
                joined: *joined,
            }),
        };
        app.send_to_session(&o.to, &Frame::from(frame));
    }
}

/// Writes finished calls to the call log (in the background: the log is not on the
/// signaling path).
fn log_finished(app: &Arc<App>, state: &mut State) {
    let done = state.calls.take_finished();
    if done.is_empty() {
        return;
    }
    let entries: Vec<CallLogEntry> = done
        .into_iter()
        .map(|r| CallLogEntry {
            room: state.call_rooms.remove(&r.id),
            id: r.id,
            caller: UserId(r.caller),
            callee: UserId(r.callee),
            media: r.media,
            created_at: r.created_ms as i64,
            answered_at: r.answered_ms.map(|a| a as i64),
            ended_at: r.ended_ms as i64,
            end_reason: r.reason.as_str().to_owned(),
            duration_ms: r.duration_ms as i64,
        })
        .collect();
    let store = app.store.clone();
    tokio::spawn(async move {
        for e in entries {
            tracing::info!(call = %e.id, reason = %e.end_reason, duration_ms = e.duration_ms, "call ended");
            if let Err(err) = store.insert_call(&e).await {
                tracing::warn!(error = %err, call = %e.id, "could not log call");
            }
        }
    });
}

fn now() -> u64 {
    now_ms().max(0) as u64
}

pub(crate) async fn call(
    ctx: &mut Ctx,
    to: UserId,
    media: Media,
    room: Option<RoomId>,
) -> Result<Outcome> {
    if to.as_str().is_empty() || to.as_str().chars().count() > 64 {
        return Err(Error::bad_request(
            "to must be a user id of 1..=64 characters",
        ));
    }
    if let Some(room) = &room {
        check_room_id(room)?;
        if !ctx.joined_role(room)?.can_write() {
            return Err(Error::Forbidden(
                "viewers cannot place calls from this room".into(),
            ));
        }
        let callee = ctx
            .app
            .policies
            .get(&ctx.app.store, room)
            .await?
            .stored_role(&to);
        if callee.is_none() && ctx.app.hub.online_role(room, &to).is_none() {
            return Err(Error::Forbidden(format!("{to} is not a member of {room}")));
        }
    }
    let mut callee_sessions = ctx.app.hub.session_ids(&to);
    let mut waiting = ctx.app.hub.call_waiting(&to);
    if callee_sessions.is_empty() {
        // Not here and not in the heartbeat directory: the callee may have connected to
        // another node a moment ago, before its next heartbeat. Ask the other nodes now
        // rather than refuse a user who is online.
        for (session, w) in ctx.app.broker.ask_sessions(&to).await {
            waiting |= w;
            callee_sessions.push(session);
        }
    }
    let app = ctx.app.clone();
    let id = app.new_call_id();
    let (call_id, outs) = {
        let mut st = app.rtc.lock();
        let (call_id, outs) = st.calls.call(
            now(),
            CallRequest {
                id,
                from: peer(ctx),
                to: to.as_str(),
                media,
                callee_sessions: &callee_sessions,
                callee_accepts_waiting: waiting,
            },
        )?;
        if let Some(room) = &room {
            st.call_rooms.insert(call_id.clone(), room.clone());
        }
        log_finished(&app, &mut st);
        (call_id, outs)
    };
    deliver(&app, outs, Some(&ctx.me.name), room.as_ref());
    Ok(Outcome::ok(CallOk {
        call_id,
        ice_servers: Some(app.rtc.ice_servers(&ctx.me.user)),
    }))
}

/// Runs a call command on this node's machine and delivers what it asks to send.
fn apply_call_action(app: &Arc<App>, me: &Peer, action: CallAction, call_id: &str) -> Result<()> {
    let outs = {
        let mut st = app.rtc.lock();
        let outs = match action {
            CallAction::Accept => st.calls.accept(now(), me, call_id)?,
            CallAction::Reject => st.calls.reject(now(), me, call_id)?,
            CallAction::Hangup => st.calls.hangup(now(), me, call_id)?,
            CallAction::Resume => st.calls.resume(me, call_id)?,
            CallAction::Signal => {
                return Err(Error::bad_request("a signal is not a call action"));
            }
        };
        log_finished(app, &mut st);
        outs
    };
    deliver(app, outs, None, None);
    Ok(())
}

pub(crate) fn call_action(
    ctx: &mut Ctx,
    rid: Option<i64>,
    action: CallAction,
    call_id: String,
) -> Result<Outcome> {
    if call_id.is_empty() || call_id.len() > 64 {
        return Err(Error::bad_request("call_id must be 1..=64 characters"));
    }
    let app = ctx.app.clone();
    let me = peer(ctx);
    let reply = CallOk {
        call_id: call_id.clone(),
        ice_servers: matches!(action, CallAction::Accept | CallAction::Resume)
            .then(|| app.rtc.ice_servers(&ctx.me.user)),
    };
    if let Some(node) = app.broker.call_owner(&call_id) {
        // Another node owns this call: its machine decides, and we relay the answer.
        let cmd = CallCommand {
            action,
            call_id: call_id.clone(),
            user: ctx.me.user.0.clone(),
            session: ctx.handle.id.0.clone(),
            data: None,
        };
        return Ok(forwarded(&app, node, cmd, rid, reply));
    }
    apply_call_action(&app, &me, action, &call_id)?;
    Ok(Outcome::ok(reply))
}

/// The reply to a call command forwarded to the node that owns the call.
fn forwarded<R: Serialize + Send + 'static>(
    app: &App,
    node: String,
    cmd: CallCommand,
    rid: Option<i64>,
    reply: R,
) -> Outcome {
    let answer = app.broker.forward_call(node, cmd);
    Outcome::Deferred(Box::pin(async move {
        match answer.await {
            Ok(()) => rid.map(|rid| protocol::encode_ok_as(rid, &reply)),
            Err(e) => Some(crate::command::error_frame(rid, &e)),
        }
    }))
}

/// A call command forwarded by another node for a call this node owns.
pub(crate) fn remote_call(app: &Arc<App>, cmd: CallCommand) -> Result<()> {
    let me = Peer::new(&cmd.user, &cmd.session);
    if cmd.action == CallAction::Signal {
        let data = cmd.data.unwrap_or(Value::Null);
        let out = app.rtc.lock().calls.relay(&me, &cmd.call_id, &data)?;
        deliver(app, vec![out], None, None);
        return Ok(());
    }
    apply_call_action(app, &me, cmd.action, &cmd.call_id)
}

/// A session on another node ended: calls here give it the grace period, and this node's SFU
/// drops its peer connections.
pub(crate) fn remote_session_closed(app: &Arc<App>, user: &UserId, session: &str) {
    if let Some(sfu) = &app.sfu {
        // Its peer connections in the rooms whose SFU runs here.
        sfu.session_closed(session);
    }
    let outs = app
        .rtc
        .lock()
        .calls
        .session_closed(now(), &Peer::new(user.as_str(), session));
    deliver(app, outs, None, None);
}

pub(crate) async fn av_join(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    let role = ctx.joined_role(&room)?;
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    let kind = match policy.room.kind {
        RoomKind::Class => AvKind::Class,
        RoomKind::Live => AvKind::Live,
        _ => {
            return Err(Error::bad_request(
                "audio/video rooms are class and live rooms; use call for 1v1",
            ));
        }
    };
    let can_publish = match kind {
        AvKind::Class => role.can_write(),
        AvKind::Live => role == RoomRole::Host || ctx.app.hub.on_stage(&room, &ctx.me.user),
    };
    let app = ctx.app.clone();
    let me = peer(ctx);
    if uses_sfu(&app, &room, &me.session, policy.room.av.mode).await? {
        return sfu_join(&app, &room, me, can_publish).await;
    }
    let (peers, outs) = match app.broker.node_id() {
        None => app
            .rtc
            .lock()
            .av
            .join(room.as_str(), kind, me, can_publish)?,
        Some(node) => {
            match cluster_av_join(&app, node, &room, kind, me.clone(), can_publish).await {
                // `auto`: the store found the mesh full (this node had not heard of every
                // member yet): the SFU, as if this node had known.
                Err(Error::Conflict(_)) if policy.room.av.mode == AvRoomMode::Auto => {
                    return sfu_join(&app, &room, me, can_publish).await;
                }
                joined => joined?,
            }
        }
    };
    deliver(&app, outs, None, None);
    let peers = peers
        .into_iter()
        .map(|p| AvPeerRef {
            session: p.session,
            user: p.user,
        })
        .collect();
    Ok(Outcome::ok(AvJoinOk {
        peers,
        ice_servers: app.rtc.ice_servers(&ctx.me.user),
        mode: AvMode::Mesh,
        publish: can_publish,
    }))
}

/// Whether this `av_join` goes to the SFU. `sfu`: always; `mesh`: never; `auto`: when the
/// room's SFU already holds sessions, or the mesh is full (a session already in the mesh stays
/// there). In cluster mode "the room's SFU holds sessions" is read from the store: the room
/// has an SFU claim (some node's SFU holds, or is about to hold, sessions of the room).
async fn uses_sfu(app: &App, room: &RoomId, session: &str, mode: AvRoomMode) -> Result<bool> {
    let Some(sfu) = &app.sfu else {
        return match mode {
            AvRoomMode::Sfu => Err(Error::Unavailable("the SFU is not running".into())),
            _ => Ok(false),
        };
    };
    match mode {
        AvRoomMode::Mesh => Ok(false),
        AvRoomMode::Sfu => Ok(true),
        AvRoomMode::Auto => {
            let (in_mesh, mesh) = {
                let st = app.rtc.lock();
                (
                    st.av.local_generation(room.as_str(), session).is_some(),
                    st.av.peers(room.as_str()),
                )
            };
            if in_mesh {
                return Ok(false);
            }
            if mesh >= app.config.av_mesh_max {
                return Ok(true);
            }
            Ok(match app.broker.node_id() {
                None => sfu.room_size(room.as_str()).await > 0,
                Some(_) => app.store.sfu_owner(room).await?.is_some(),
            })
        }
    }
}

/// `av_join` in SFU mode: the session's one peer is the server (in cluster mode, the SFU of
/// the node that runs the room's SFU).
async fn sfu_join(app: &App, room: &RoomId, me: Peer, can_publish: bool) -> Result<Outcome> {
    let user = UserId(me.user.clone());
    let key = (room.0.clone(), me.session.clone());
    let who = Member {
        user: me.user,
        session: me.session,
    };
    let others = match join_here(app, room, who.clone(), can_publish).await? {
        Ok(others) => {
            app.rtc.lock().sfu_remote.remove(&key);
            others
        }
        Err(node) => {
            let cmd = SfuCommand {
                room: room.0.clone(),
                user: who.user,
                session: who.session,
                action: SfuAction::Join { can_publish },
            };
            let reply = app.broker.forward_sfu(node.clone(), cmd).await?;
            app.rtc.lock().sfu_remote.insert(key, node);
            reply
                .peers
                .into_iter()
                .map(|(session, user)| Member { user, session })
                .collect()
        }
    };
    Ok(Outcome::ok(AvJoinOk {
        peers: others
            .into_iter()
            .map(|m| AvPeerRef {
                session: m.session,
                user: m.user,
            })
            .collect(),
        ice_servers: app.rtc.ice_servers(&user),
        mode: AvMode::Sfu,
        publish: can_publish,
    }))
}

/// Joins `who` to the room's SFU on this node; `Ok(Err(node))` when the room's SFU runs on
/// another node. In cluster mode a room this node's SFU holds is this node's (its claim stays
/// until the room empties); otherwise this node claims the room in the store first.
async fn join_here(
    app: &App,
    room: &RoomId,
    who: Member,
    can_publish: bool,
) -> Result<std::result::Result<Vec<Member>, String>> {
    let sfu = app
        .sfu
        .as_ref()
        .ok_or_else(|| Error::Unavailable("the SFU is not running".into()))?;
    let Some(node) = app.broker.node_id() else {
        return Ok(Ok(sfu.join(room.as_str(), who, can_publish).await?));
    };
    let _claims = app.rtc.sfu_claims.lock().await;
    if sfu.room_size(room.as_str()).await == 0 {
        let live = app.broker.live_nodes();
        let owner = app
            .store
            .sfu_claim(room, node, live.as_deref(), now_ms())
            .await?;
        if owner != node {
            return Ok(Err(owner));
        }
    }
    let joined = sfu.join(room.as_str(), who, can_publish).await;
    if joined.is_err() && sfu.room_size(room.as_str()).await == 0 {
        // Refused, and the room is empty: no claim without a session.
        if let Err(e) = app.store.sfu_release(room, node).await {
            tracing::warn!(error = %e, room = %room, "could not release a room's SFU");
        }
    }
    Ok(Ok(joined?))
}

/// Cluster mode: the node whose SFU holds this node's `session` in the room, when another.
fn sfu_remote(app: &App, room: &RoomId, session: &str) -> Option<String> {
    app.rtc
        .lock()
        .sfu_remote
        .get(&(room.0.clone(), session.to_owned()))
        .cloned()
}

/// An SFU command of a session on another node, for a room whose SFU runs on this node. The
/// sending node checked the session's rights in the room, as for its own SFU.
pub(crate) async fn remote_sfu(app: &App, cmd: SfuCommand) -> Result<SfuReply> {
    let sfu = app
        .sfu
        .as_ref()
        .ok_or_else(|| Error::Unavailable("the SFU is not running".into()))?;
    let room = RoomId(cmd.room);
    match cmd.action {
        SfuAction::Join { can_publish } => {
            let who = Member {
                user: cmd.user,
                session: cmd.session,
            };
            match join_here(app, &room, who, can_publish).await? {
                Ok(others) => Ok(SfuReply {
                    peers: others.into_iter().map(|m| (m.session, m.user)).collect(),
                    found: false,
                }),
                Err(node) => Err(Error::Unavailable(format!(
                    "the room's SFU moved to node {node}: join the A/V again"
                ))),
            }
        }
        SfuAction::Signal { data } => {
            sfu.signal(room.as_str(), &cmd.session, data).await?;
            Ok(SfuReply::default())
        }
        SfuAction::Leave => {
            sfu.leave_now(room.as_str(), &cmd.session).await?;
            Ok(SfuReply::default())
        }
        SfuAction::Mute { user, video } => Ok(SfuReply {
            found: mute_here(sfu, &room, &user, video, true).await?,
            ..SfuReply::default()
        }),
        SfuAction::Unmute { user, video } => Ok(SfuReply {
            found: mute_here(sfu, &room, &user, video, false).await?,
            ..SfuReply::default()
        }),
        SfuAction::SetPublisher { user, on } => {
            sfu.set_publisher(room.as_str(), &user, on);
            Ok(SfuReply::default())
        }
    }
}

/// Mutes or unmutes `user`'s tracks of one kind in this node's SFU; whether the user is there.
async fn mute_here(
    sfu: &crate::sfu::Sfu,
    room: &RoomId,
    user: &str,
    video: bool,
    muted: bool,
) -> Result<bool> {
    let kind = if video {
        TrackKind::Video
    } else {
        TrackKind::Audio
    };
    Ok(if muted {
        sfu.mute(room.as_str(), user, kind).await?
    } else {
        sfu.unmute(room.as_str(), user, kind).await?
    })
}

/// `av_mute {room, user, kind}` (host/ta, SFU mode): the SFU stops forwarding that track (in
/// cluster mode the SFU of the node that runs the room's), and the owner's sessions get
/// `av_muted`; `av_unmute` (`muted` false) undoes it, and they get `av_unmuted`.
pub(crate) async fn av_mute(
    ctx: &mut Ctx,
    room: RoomId,
    user: UserId,
    kind: AvTrackKind,
    muted: bool,
) -> Result<Outcome> {
    check_room_id(&room)?;
    if !matches!(ctx.joined_role(&room)?, RoomRole::Host | RoomRole::Ta) {
        return Err(Error::Forbidden("only host and ta may mute A/V".into()));
    }
    let app = ctx.app.clone();
    let sfu = app
        .sfu
        .as_ref()
        .ok_or_else(|| Error::Unavailable("the SFU is not running".into()))?;
    let track = match kind {
        AvTrackKind::Audio => TrackKind::Audio,
        AvTrackKind::Video => TrackKind::Video,
    };
    let here = mute_here(sfu, &room, user.as_str(), track == TrackKind::Video, muted);
    let found = match app.broker.node_id() {
        None => here.await?,
        Some(node) => match app.store.sfu_owner(&room).await? {
            None => false,
            Some(owner) if owner == node => here.await?,
            Some(owner) => {
                let (user, video) = (user.0.clone(), track == TrackKind::Video);
                let cmd = SfuCommand {
                    room: room.0.clone(),
                    user: ctx.me.user.0.clone(),
                    session: ctx.handle.id.0.clone(),
                    action: if muted {
                        SfuAction::Mute { user, video }
                    } else {
                        SfuAction::Unmute { user, video }
                    },
                };
                app.broker.forward_sfu(owner, cmd).await?.found
            }
        },
    };
    if !found {
        return Err(Error::NotFound(format!("{user} is not in the room's SFU")));
    }
    let by = &ctx.me.user;
    let frame = Frame::from(protocol::encode(&if muted {
        ServerMsg::AvMuted {
            room: &room,
            kind,
            by,
        }
    } else {
        ServerMsg::AvUnmuted {
            room: &room,
            kind,
            by,
        }
    }));
    for sid in app.hub.session_ids(&user) {
        app.send_to_session(&sid, &frame);
    }
    Ok(Outcome::ok(EmptyOk {}))
}

/// Cluster mode's `av_join`: the store admits the join cluster-wide (mesh limit, one join
/// order); meanwhile peers joining on other nodes are remembered here, so none is missed.
async fn cluster_av_join(
    app: &Arc<App>,
    node: &str,
    room: &RoomId,
    kind: AvKind,
    me: Peer,
    can_publish: bool,
) -> Result<(Vec<Peer>, Vec<Out>)> {
    app.rtc
        .lock()
        .av
        .begin_join(room.as_str(), kind, &me.session);
    let live = app.broker.live_nodes();
    let admitted = admit(app, room, &me, app.config.av_mesh_max, live.as_deref()).await;
    let admitted = match admitted {
        Ok(a) => a,
        Err(e) => {
            app.rtc.lock().av.abort_join(room.as_str(), &me.session);
            return Err(e.into());
        }
    };
    let generation = admitted.generation.max(0) as u64;
    let joined = {
        let mut st = app.rtc.lock();
        let before = own_rows_held(&st.av, node, room, admitted.before);
        st.av.finish_join(
            room.as_str(),
            kind,
            me.clone(),
            can_publish,
            generation,
            before,
        )
    };
    announce(app, room, &me, generation, true);
    Ok(joined)
}

/// Asks the store to admit this node's session `peer` to the room's A/V.
async fn admit(
    app: &App,
    room: &RoomId,
    peer: &Peer,
    mesh_max: usize,
    live_nodes: Option<&[String]>,
) -> std::result::Result<crate::store::AvAdmitted, crate::store::StoreError> {
    let user = UserId(peer.user.clone());
    app.store
        .av_join(&AvJoin {
            room,
            session: &peer.session,
            user: &user,
            node: app.broker.node_id().unwrap_or_default(),
            epoch: app.broker.run() as i64,
            mesh_max,
            live_nodes,
            now_ms: now_ms(),
        })
        .await
}

/// Tells the other nodes that this node's session `peer` joined or left the room's A/V.
fn announce(app: &App, room: &RoomId, peer: &Peer, generation: u64, joined: bool) {
    app.broker.av_changed(
        room,
        AvChange {
            session: peer.session.clone(),
            user: peer.user.clone(),
            generation,
            run: app.broker.run(),
            joined,
        },
    );
}

/// A stored membership as the A/V machine takes it.
fn membership(m: crate::store::AvMember) -> Membership {
    Membership {
        peer: Peer::new(m.user.0, m.session),
        generation: m.generation.max(0) as u64,
        run: m.epoch as u64,
    }
}

pub(crate) async fn av_leave(ctx: &mut Ctx, room: RoomId) -> Result<Outcome> {
    check_room_id(&room)?;
    let app = ctx.app.clone();
    let session = ctx.handle.id.as_str();
    if let Some(node) = take_sfu_remote(&app, &room, session) {
        // Awaited: the peer connection is gone when `ok` arrives. An owner that does not
        // answer is gone, and its peer connection with it.
        let cmd = SfuCommand {
            room: room.0.clone(),
            user: ctx.me.user.0.clone(),
            session: session.to_owned(),
            action: SfuAction::Leave,
        };
        if let Err(e) = app.broker.forward_sfu(node, cmd).await {
            tracing::info!(error = %e, room = %room, "an SFU leave went unanswered");
        }
    } else if let Some(sfu) = &app.sfu {
        // Awaited: the peer connection is gone when `ok` arrives.
        sfu.leave_now(room.as_str(), session).await?;
    }
    if let Some(left) = av_left(&app, &room, &ctx.me.user, ctx.handle.id.as_str(), false) {
        // Awaited: a re-join right after must find the store without this membership.
        left.await;
    }
    Ok(Outcome::ok(EmptyOk {}))
}

/// A local session leaves a room's A/V (if it was in it): its local peers hear it here. In
/// cluster mode the returned future makes the store forget the membership and then tells the
/// other nodes.
fn av_left(
    app: &App,
    room: &RoomId,
    user: &UserId,
    session: &str,
    was_on_stage: bool,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    if was_on_stage && !app.hub.on_stage(room, user) {
        sfu_set_publisher(app, room, user, false);
    }
    if let Some(sfu) = &app.sfu {
        sfu.leave(room.as_str(), session);
    }
    if let Some(node) = take_sfu_remote(app, room, session) {
        let cmd = SfuCommand {
            room: room.0.clone(),
            user: user.0.clone(),
            session: session.to_owned(),
            action: SfuAction::Leave,
        };
        let answer = app.broker.forward_sfu(node, cmd);
        tokio::spawn(async move {
            if let Err(e) = answer.await {
                tracing::info!(error = %e, "an SFU leave went unanswered");
            }
        });
    }
    let (generation, outs) = {
        let mut st = app.rtc.lock();
        if was_on_stage && !app.hub.on_stage(room, user) {
            st.av.set_publisher(room.as_str(), user.as_str(), false);
        }
        st.av.leave_local(room.as_str(), session)
    };
    deliver(app, outs, None, None);
    cluster_av_left(
        app,
        room.clone(),
        user.clone(),
        session.to_owned(),
        generation?,
    )
}

/// Cluster mode (`None` on one node): deletes the stored membership, then tells the other
/// nodes (in that order, so a join that reads the store after the notice never lists it). A
/// delete that fails is left to the A/V sweep to try again.
fn cluster_av_left(
    app: &App,
    room: RoomId,
    user: UserId,
    session: String,
    generation: u64,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    app.broker.node_id()?;
    let (store, broker) = (app.store.clone(), app.broker.clone());
    let unforgotten = app.rtc.unforgotten.clone();
    Some(async move {
        if let Err(e) = store.av_leave(&room, &session, generation as i64).await {
            tracing::warn!(error = %e, room = %room, "could not forget an A/V member: will retry");
            lock_list(&unforgotten).push((room.clone(), session.clone(), generation));
        }
        broker.av_changed(
            &room,
            AvChange {
                session,
                user: user.0,
                generation,
                run: broker.run(),
                joined: false,
            },
        );
    })
}

/// Cluster mode: forgets (and returns) the node whose SFU holds this node's `session` in the
/// room, when another.
fn take_sfu_remote(app: &App, room: &RoomId, session: &str) -> Option<String> {
    app.rtc
        .lock()
        .sfu_remote
        .remove(&(room.0.clone(), session.to_owned()))
}

/// Grants or withdraws publishing for `user` in the room's SFU: this node's, and in cluster
/// mode the SFUs of other nodes that hold this node's sessions in the room (in the
/// background: a stage change does not wait on them).
fn sfu_set_publisher(app: &App, room: &RoomId, user: &UserId, on: bool) {
    if let Some(sfu) = &app.sfu {
        sfu.set_publisher(room.as_str(), user.as_str(), on);
    }
    let owners: std::collections::BTreeSet<String> = app
        .rtc
        .lock()
        .sfu_remote
        .iter()
        .filter(|((r, _), _)| r == room.as_str())
        .map(|(_, node)| node.clone())
        .collect();
    for node in owners {
        let cmd = SfuCommand {
            room: room.0.clone(),
            user: user.0.clone(),
            session: String::new(),
            action: SfuAction::SetPublisher {
                user: user.0.clone(),
                on,
            },
        };
        let answer = app.broker.forward_sfu(node, cmd);
        tokio::spawn(async move {
            if let Err(e) = answer.await {
                tracing::info!(error = %e, "an SFU stage change went unanswered");
            }
        });
    }
}

fn lock_list<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cluster mode: a session on another node joined or left a room's A/V.
pub(crate) fn remote_av(app: &App, room: &RoomId, change: AvChange) {
    let outs = {
        let mut st = app.rtc.lock();
        if change.joined {
            st.av.remote_joined(
                room.as_str(),
                &Membership {
                    peer: Peer::new(change.user, change.session.clone()),
                    generation: change.generation,
                    run: change.run,
                },
            )
        } else {
            st.av
                .remote_left(room.as_str(), &change.session, change.generation)
        }
    };
    deliver(app, outs, None, None);
}

/// Cluster mode: a run of a node left or died; its sessions leave every A/V room known here,
/// and the store forgets them (every surviving node tries; the delete is idempotent, and
/// spares a later run of the same node).
pub(crate) fn remote_node_gone(app: &App, node: &str, epoch: u64) {
    sfu_node_gone(app, node);
    let outs =
        app.rtc.lock().av.remote_gone(|session, run| {
            run == epoch && crate::node::node_of(session) == Some(node)
        });
    deliver(app, outs, None, None);
    let (store, node) = (app.store.clone(), node.to_owned());
    tokio::spawn(async move {
        match store.av_forget_node(&node, Some(epoch as i64)).await {
            Ok(n) if n > 0 => {
                tracing::info!(node = %node, members = n, "forgot a gone node's A/V members")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, node = %node, "could not forget a gone node's A/V members")
            }
        }
    });
}

/// Cluster mode: a node is gone. This node's sessions whose SFU peer connection was on it are
/// told `av_closed {reason:"connection_lost"}` (they may join again: the room's SFU is then
/// claimed anew); this node's SFU drops the gone node's sessions and the store its SFU claims,
/// unless the node is live again (it started again under its name: its new sessions stay).
fn sfu_node_gone(app: &App, node: &str) {
    let lost: Vec<(String, String)> = {
        let mut st = app.rtc.lock();
        let lost = st
            .sfu_remote
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(k, _)| k.clone())
            .collect();
        st.sfu_remote.retain(|_, n| n.as_str() != node);
        lost
    };
    for (room, session) in lost {
        let room = RoomId(room);
        let frame = protocol::encode(&ServerMsg::AvClosed {
            room: &room,
            reason: "connection_lost",
        });
        app.hub.send_to_session(&session, &Frame::from(frame));
    }
    let back = app
        .broker
        .live_nodes()
        .is_some_and(|live| live.iter().any(|n| n == node));
    if let Some(sfu) = &app.sfu
        && !back
    {
        let gone = node.to_owned();
        sfu.sessions_closed_where(move |s| crate::node::node_of(s) == Some(gone.as_str()));
        // Its SFU claims go too: a node that never comes back would otherwise hold its rooms
        // (every `auto` join there would go to an SFU nobody runs) until a join takes one over.
        // Every node does this; the delete is the same from each.
        let store = app.store.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            match store.sfu_release_node(&node).await {
                Ok(n) if n > 0 => {
                    tracing::info!(node = %node, rooms = n, "released a gone node's SFU claims")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, node = %node, "could not release a gone node's SFU claims")
                }
            }
        });
    }
}

/// A session left a room: it leaves the room's A/V, and if that took the user off stage,
/// publishing ends for their other sessions there too.
pub(crate) fn left_room(
    app: &App,
    room: &RoomId,
    user: &UserId,
    session: &str,
    was_on_stage: bool,
) {
    if let Some(left) = av_left(app, room, user, session, was_on_stage) {
        tokio::spawn(left);
    }
}

/// The class of `room` ended: every session of this node in the room's A/V leaves it (its
/// peers hear `av_peer {joined:false}`, the SFU drops its peer connection) and is told
/// `av_closed {reason:"class_ended"}`, since A/V opens only while a class is live.
pub(crate) fn class_ended(app: &App, room: &RoomId) {
    // The room's SFU (on this node if it runs it; a no-op elsewhere) drops every session of
    // any node and tells each.
    if let Some(sfu) = &app.sfu {
        sfu.class_ended(room.as_str());
    }
    let members = app.rtc.lock().av.local_members(room.as_str());
    if members.is_empty() {
        return;
    }
    let frame = Frame::from(protocol::encode(&ServerMsg::AvClosed {
        room,
        reason: "class_ended",
    }));
    for m in &members {
        let user = UserId::from(m.user.as_str());
        if let Some(left) = av_left(app, room, &user, &m.session, false) {
            tokio::spawn(left);
        }
        app.hub.send_to_session(&m.session, &frame);
    }
    tracing::info!(room = %room, sessions = members.len(), "class ended: A/V closed");
}

/// Stage changes grant or withdraw publishing in the room's A/V.
pub(crate) fn stage_changed(app: &App, room: &RoomId, user: &UserId, on: bool) {
    sfu_set_publisher(app, room, user, on);
    app.rtc
        .lock()
        .av
        .set_publisher(room.as_str(), user.as_str(), on);
}

pub(crate) async fn signal(
    ctx: &mut Ctx,
    rid: Option<i64>,
    call_id: Option<String>,
    room: Option<RoomId>,
    to: Option<String>,
    data: Value,
) -> Result<Outcome> {
    if let Some(room) = &room {
        // A/V signals need the sender to still be in the room (not only in its A/V).
        check_room_id(room)?;
        ctx.joined_role(room)?;
    }
    let me = peer(ctx);
    let app = ctx.app.clone();
    if let (None, Some(room), Some(SFU_PEER)) = (&call_id, &room, to.as_deref()) {
        if let Some(node) = sfu_remote(&app, room, &me.session) {
            // Awaited in the command's turn, so the session's signals keep their order.
            let cmd = SfuCommand {
                room: room.0.clone(),
                user: me.user.clone(),
                session: me.session.clone(),
                action: SfuAction::Signal { data },
            };
            app.broker.forward_sfu(node, cmd).await?;
            return Ok(Outcome::ok(EmptyOk {}));
        }
        let sfu = app
            .sfu
            .as_ref()
            .ok_or_else(|| Error::Unavailable("the SFU is not running".into()))?;
        sfu.signal(room.as_str(), &me.session, data).await?;
        return Ok(Outcome::ok(EmptyOk {}));
    }
    if let (Some(id), None) = (&call_id, &room)
        && let Some(node) = app.broker.call_owner(id)
    {
        if id.len() > 64 {
            return Err(Error::bad_request("call_id must be 1..=64 characters"));
        }
        let cmd = CallCommand {
            action: CallAction::Signal,
            call_id: id.clone(),
            user: me.user.clone(),
            session: me.session.clone(),
            data: Some(data),
        };
        return Ok(forwarded(&app, node, cmd, rid, EmptyOk {}));
    }
    if let (Some(node), None, Some(room), Some(to)) = (app.broker.node_id(), &call_id, &room, &to)
        && crate::node::node_of(to).is_some_and(|n| n != node)
    {
        learn_remote_peer(&app, room, &me, to).await?;
    }
    let out = {
        let st = app.rtc.lock();
        match (call_id, room, to) {
            (Some(call_id), None, None) => st.calls.relay(&me, &call_id, &data)?,
            (None, Some(room), Some(to)) => st.av.relay(room.as_str(), &me, &to, &data)?,
            _ => return Err(Error::bad_request("signal takes call_id, or room and to")),
        }
    };
    deliver(&app, vec![out], None, None);
    Ok(Outcome::ok(EmptyOk {}))
}

/// Cluster mode: before a signal to `to`, a session on another node, that this node has not
/// heard joined the room's A/V (its join is still crossing the bus), asks the store. Awaited
/// in the command's turn, so the session's signals keep their order.
async fn learn_remote_peer(app: &App, room: &RoomId, me: &Peer, to: &str) -> Result<()> {
    {
        let st = app.rtc.lock();
        if st.av.knows(room.as_str(), to) {
            return Ok(());
        }
        // Only a member of the A/V may make a signal cost a store read.
        if st.av.local_generation(room.as_str(), &me.session).is_none() {
            return Err(Error::Forbidden("join the room's A/V first".into()));
        }
    }
    if to.len() > 128 {
        return Err(Error::bad_request("to must be a session id"));
    }
    let Some(m) = app.store.av_member(room, to).await? else {
        return Ok(()); // `relay` refuses it
    };
    let outs = app
        .rtc
        .lock()
        .av
        .remote_joined(room.as_str(), &membership(m));
    deliver(app, outs, None, None);
    Ok(())
}

/// A session ended: its calls get the grace period, its A/V rooms hear it left.
pub(crate) fn session_closed(app: &Arc<App>, user: &UserId, session: &str) {
    if let Some(sfu) = &app.sfu {
        sfu.session_closed(session);
    }
    // Other nodes' SFUs drop it when they hear it closed (`remote_session_closed`).
    app.rtc
        .lock()
        .sfu_remote
        .retain(|(_, s), _| s.as_str() != session);
    let (ended, outs) = {
        let mut st = app.rtc.lock();
        let mut outs = st
            .calls
            .session_closed(now(), &Peer::new(user.as_str(), session));
        let (ended, av_outs) = st.av.session_closed(session);
        outs.extend(av_outs);
        (ended, outs)
    };
    deliver(app, outs, None, None);
    for (room, generation) in ended {
        if let Some(left) = cluster_av_left(
            app,
            RoomId(room),
            user.clone(),
            session.to_owned(),
            generation,
        ) {
            tokio::spawn(left);
        }
    }
}

/// Cluster mode: every `bus_sweep_ms`, brings this node's A/V rooms in line with the store,
/// which repairs what the bus lost (a join or leave notice), drops members of node runs that
/// died unseen, and admits again a local member whose row was deleted while this node was
/// taken for dead.
pub(crate) async fn run_av_sweep(app: Arc<App>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(app.config.bus_sweep_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = av_sweep(&app).await {
            tracing::warn!(error = %e, "A/V sweep failed");
        }
    }
}

async fn av_sweep(app: &Arc<App>) -> Result<()> {
    let Some(node) = app.broker.node_id() else {
        return Ok(());
    };
    if let Err(e) = sfu_sweep(app, node).await {
        tracing::warn!(error = %e, "SFU sweep failed");
    }
    // Ended memberships whose delete failed.
    let retry = std::mem::take(&mut *lock_list(&app.rtc.unforgotten));
    for (i, (room, session, generation)) in retry.iter().enumerate() {
        if let Err(e) = app.store.av_leave(room, session, *generation as i64).await {
            lock_list(&app.rtc.unforgotten).extend(retry[i..].iter().cloned());
            return Err(e.into());
        }
    }
    let rooms: Vec<RoomId> = app
        .rtc
        .lock()
        .av
        .local_rooms()
        .into_iter()
        .map(RoomId)
        .collect();
    if rooms.is_empty() {
        return Ok(());
    }
    // Only a node that hears the cluster may judge others dead, or itself lost.
    let live = app.broker.live_nodes();
    for (room, version, mut members) in app.store.av_snapshot(&rooms).await? {
        if let Some(live) = &live {
            // Rows of nodes not heard (they died unseen) go from the store and from here.
            let unheard = |m: &crate::store::AvMember| m.node != node && !live.contains(&m.node);
            if members.iter().any(unheard) {
                let n = app.store.av_forget_other_nodes(&room, node, live).await?;
                tracing::info!(room = %room, members = n, "forgot A/V members of nodes that are gone");
                members.retain(|m| !unheard(m));
            }
        }
        let (outs, lost) = {
            let mut st = app.rtc.lock();
            let stored = own_rows_held(&st.av, node, &room, members);
            st.av
                .reconcile(room.as_str(), version.max(0) as u64, &stored)
        };
        deliver(app, outs, None, None);
        if live.is_none() {
            continue;
        }
        for peer in lost {
            if let Err(e) = readmit(app, &room, peer).await {
                tracing::warn!(error = %e, room = %room, "could not admit an A/V member again");
            }
        }
    }
    Ok(())
}

/// Cluster mode, with the A/V sweep: each room this node's SFU holds must be claimed by this
/// node. A room with no claim (a release raced, or failed), or a dead node's, is claimed
/// again; a room another live node has claimed (this node was taken for dead and the room was taken over) is split
/// in two: this node's SFU drops its sessions there and tells them `av_closed
/// {reason:"connection_lost"}`, so that they join the owner's. Only a node that hears the
/// cluster judges.
async fn sfu_sweep(app: &App, node: &str) -> Result<()> {
    let (Some(sfu), Some(live)) = (&app.sfu, app.broker.live_nodes()) else {
        return Ok(());
    };
    for (room, sessions) in sfu.rooms().await {
        let room = RoomId(room);
        let _claims = app.rtc.sfu_claims.lock().await;
        // Emptied since the list was read (and its claim released): nothing to claim.
        if sfu.room_size(room.as_str()).await == 0
            || app.store.sfu_owner(&room).await?.as_deref() == Some(node)
        {
            continue;
        }
        // No claim, or a dead node's: this node's again.
        let owner = app
            .store
            .sfu_claim(&room, node, Some(&live), now_ms())
            .await?;
        if owner == node {
            tracing::info!(room = %room, "an SFU room held here is claimed again");
            continue;
        }
        tracing::warn!(room = %room, owner = %owner, sessions = sessions.len(), "another node runs this room's SFU: closing it here");
        let frame = Frame::from(protocol::encode(&ServerMsg::AvClosed {
            room: &room,
            reason: "connection_lost",
        }));
        for session in sessions {
            sfu.leave(room.as_str(), &session);
            app.send_to_session(&session, &frame);
        }
    }
    Ok(())
}

/// Stored memberships as the A/V machine takes them, less this node's rows whose session is
/// no longer a member here (leftovers the sweep deletes: never a remote member).
fn own_rows_held(
    av: &AvRooms,
    node: &str,
    room: &RoomId,
    members: Vec<crate::store::AvMember>,
) -> Vec<Membership> {
    members
        .into_iter()
        .filter(|m| {
            m.node != node
                || av.local_generation(room.as_str(), &m.session).is_some()
                || av.is_joining(room.as_str(), &m.session)
        })
        .map(membership)
        .collect()
}

/// Admits a local member again whose stored membership was deleted (by nodes that took this
/// one for dead), as the newest member, and tells the other nodes.
async fn readmit(app: &Arc<App>, room: &RoomId, peer: Peer) -> Result<()> {
    let admitted = admit(app, room, &peer, usize::MAX, None).await?;
    let generation = admitted.generation.max(0) as u64;
    let still = {
        let mut st = app.rtc.lock();
        st.av.readmitted(room.as_str(), &peer.session, generation);
        st.av
            .local_generation(room.as_str(), &peer.session)
            .is_some()
    };
    if !still {
        // It left meanwhile.
        app.store
            .av_leave(room, &peer.session, generation as i64)
            .await?;
        return Ok(());
    }
    tracing::info!(room = %room, "A/V member admitted again after the store lost it");
    announce(app, room, &peer, generation, true);
    Ok(())
}

/// Ends missed and abandoned calls on time.
pub(crate) async fn run_timers(app: Arc<App>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(app.config.call_tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let outs = {
            let mut st = app.rtc.lock();
            let outs = st.calls.tick(now());
            log_finished(&app, &mut st);
            outs
        };
        deliver(&app, outs, None, None);
    }
}

/// Routes a call or room A/V command, and signaling.
pub(crate) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::Call { to, media, room } => call(ctx, to, media, room).await,
        ClientMsg::CallAccept { call_id } => call_action(ctx, rid, CallAction::Accept, call_id),
        ClientMsg::CallReject { call_id } => call_action(ctx, rid, CallAction::Reject, call_id),
        ClientMsg::CallHangup { call_id } => call_action(ctx, rid, CallAction::Hangup, call_id),
        ClientMsg::CallResume { call_id } => call_action(ctx, rid, CallAction::Resume, call_id),
        ClientMsg::AvJoin { room } => av_join(ctx, room).await,
        ClientMsg::AvLeave { room } => av_leave(ctx, room).await,
        ClientMsg::AvMute { room, user, kind } => av_mute(ctx, room, user, kind, true).await,
        ClientMsg::AvUnmute { room, user, kind } => av_mute(ctx, room, user, kind, false).await,
        ClientMsg::Signal {
            call_id,
            room,
            to,
            data,
        } => signal(ctx, rid, call_id, room, to, data).await,
        other => Err(crate::command::misrouted(&other)),
    }
}
