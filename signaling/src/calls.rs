//! The 1v1 call state machine. A call rings on every session of the callee; the first accept
//! wins and the other sessions are told `answered_elsewhere`. Calls end as rejected, cancelled
//! (caller hung up while ringing), missed (ring timeout), busy (callee already in a call and
//! not accepting call waiting), ended (hang-up after accept) or failed (a party's connection
//! dropped and did not come back within the grace period). Glare (A calls B while B's call to
//! A rings) resolves to one call: the second `call` accepts the first. Time comes in as `now`
//! in milliseconds; nothing here sleeps or spawns.

use crate::sdp::{self, Payload};
use crate::{Media, Msg, Out, Peer, SignalError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy, Debug)]
pub struct CallConfig {
    /// How long a call rings before it is missed.
    pub ring_timeout_ms: u64,
    /// How long a party whose connection dropped has to resume before the call ends.
    pub grace_ms: u64,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            ring_timeout_ms: 30_000,
            grace_ms: 15_000,
        }
    }
}

/// States reported to clients in `call_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    Accepted,
    Rejected,
    Ended,
    Missed,
    Busy,
    Cancelled,
    Failed,
    /// To the callee's other sessions once one of them accepted.
    AnsweredElsewhere,
    /// The other party's connection dropped; the call waits for them (grace period).
    Reconnecting,
    /// The party is back (possibly on another session); renegotiate (ICE restart).
    Resumed,
}

/// Why a call ended (the `call_ended` reason and the stored record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Ended,
    Rejected,
    Missed,
    Busy,
    Cancelled,
    Failed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ended => "ended",
            Self::Rejected => "rejected",
            Self::Missed => "missed",
            Self::Busy => "busy",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    fn state(self) -> CallState {
        match self {
            Self::Ended => CallState::Ended,
            Self::Rejected => CallState::Rejected,
            Self::Missed => CallState::Missed,
            Self::Busy => CallState::Busy,
            Self::Cancelled => CallState::Cancelled,
            Self::Failed => CallState::Failed,
        }
    }
}

/// A finished call, for the call log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub id: String,
    pub caller: String,
    pub callee: String,
    pub media: Media,
    pub created_ms: u64,
    pub answered_ms: Option<u64>,
    pub ended_ms: u64,
    pub reason: EndReason,
    /// Connected time (0 if never answered).
    pub duration_ms: u64,
}

#[derive(Debug)]
struct Call {
    caller: Peer,
    callee: String,
    /// Callee sessions that are ringing (before accept).
    ringing: Vec<String>,
    /// The callee session that accepted.
    answered: Option<String>,
    media: Media,
    created_ms: u64,
    answered_ms: Option<u64>,
    /// Parties whose connection dropped: user -> deadline.
    dropped: HashMap<String, u64>,
}

impl Call {
    fn is_party(&self, user: &str) -> bool {
        self.caller.user == user || self.callee == user
    }

    /// The session currently speaking for the other side of `user`.
    fn other_session(&self, user: &str) -> Option<&str> {
        if self.caller.user == user {
            self.answered.as_deref()
        } else {
            Some(self.caller.session.as_str())
        }
    }

    fn own_session(&self, user: &str) -> Option<&str> {
        if self.caller.user == user {
            Some(self.caller.session.as_str())
        } else {
            self.answered.as_deref()
        }
    }

    /// Every session that should hear about the call's end.
    fn audience(&self) -> Vec<String> {
        let mut to = vec![self.caller.session.clone()];
        match &self.answered {
            Some(s) => to.push(s.clone()),
            None => to.extend(self.ringing.iter().cloned()),
        }
        to
    }
}

/// A new call: `from` calls `to`, whose online sessions are `callee_sessions`. `id` is the new
/// call's id (the caller of [`Calls::call`] makes it unique).
#[derive(Clone, Debug)]
pub struct CallRequest<'a> {
    pub id: String,
    pub from: Peer,
    pub to: &'a str,
    pub media: Media,
    pub callee_sessions: &'a [String],
    /// The callee takes a second call while in one (call waiting) instead of `busy`.
    pub callee_accepts_waiting: bool,
}

/// Refuses a call to oneself and a call with neither audio nor video.
fn check_request(from: &Peer, to: &str, media: Media) -> Result<(), SignalError> {
    if to == from.user {
        return Err(SignalError::BadRequest("you cannot call yourself".into()));
    }
    if !media.audio && !media.video {
        return Err(SignalError::BadRequest(
            "a call needs audio or video".into(),
        ));
    }
    Ok(())
}

/// All live calls of a node.
#[derive(Debug, Default)]
pub struct Calls {
    cfg: CallConfig,
    calls: BTreeMap<String, Call>,
    /// user -> the live call they are in (as caller or callee).
    by_user: HashMap<String, String>,
    finished: Vec<CallRecord>,
}

fn out(to: &str, msg: Msg) -> Out {
    Out {
        to: to.to_owned(),
        msg,
    }
}

impl Calls {
    pub fn new(cfg: CallConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// The live call `user` is in, if any.
    pub fn call_of(&self, user: &str) -> Option<&str> {
        self.by_user.get(user).map(String::as_str)
    }

    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// Finished calls since the last call, for the call log.
    pub fn take_finished(&mut self) -> Vec<CallRecord> {
        std::mem::take(&mut self.finished)
    }

    /// Starts a call. Returns the id of the call the caller is now in (on glare, the other
    /// call's, which this accepts).
    pub fn call(
        &mut self,
        now: u64,
        req: CallRequest<'_>,
    ) -> Result<(String, Vec<Out>), SignalError> {
        let CallRequest {
            id,
            from,
            to,
            media,
            callee_sessions,
            callee_accepts_waiting,
        } = req;
        check_request(&from, to, media)?;
        if let Some(existing) = self.by_user.get(&from.user).cloned() {
            let glare = self.calls.get(&existing).is_some_and(|c| {
                c.answered.is_none() && c.caller.user == to && c.callee == from.user
            });
            if glare {
                let outs = self.accept(now, &from, &existing)?;
                return Ok((existing, outs));
            }
            return Err(SignalError::Conflict("you are already in a call".into()));
        }
        if callee_sessions.is_empty() {
            return Err(SignalError::Unavailable(format!("{to} is not online")));
        }
        if self.by_user.contains_key(to) && !callee_accepts_waiting {
            let outs = self.busy(now, &id, &from, to, media);
            return Ok((id, outs));
        }
        if self.calls.contains_key(&id) {
            return Err(SignalError::Conflict("call id in use".into()));
        }
        let outs = self.ring(now, &id, from, to, media, callee_sessions);
        Ok((id, outs))
    }

    /// The callee is in another call and takes no second one: the attempt goes to the call
    /// log as busy, and the caller is told so.
    fn busy(&mut self, now: u64, id: &str, from: &Peer, to: &str, media: Media) -> Vec<Out> {
        self.finished.push(CallRecord {
            id: id.to_owned(),
            caller: from.user.clone(),
            callee: to.to_owned(),
            media,
            created_ms: now,
            answered_ms: None,
            ended_ms: now,
            reason: EndReason::Busy,
            duration_ms: 0,
        });
        vec![
            out(
                &from.session,
                Msg::CallState {
                    call_id: id.to_owned(),
                    state: CallState::Busy,
                },
            ),
            out(
                &from.session,
                Msg::CallEnded {
                    call_id: id.to_owned(),
                    reason: EndReason::Busy,
                    duration_ms: 0,
                },
            ),
        ]
    }

    /// Records a new ringing call between `from` and `to`; the incoming-call notices for
    /// every session of the callee.
    fn ring(
        &mut self,
        now: u64,
        id: &str,
        from: Peer,
        to: &str,
        media: Media,
        callee_sessions: &[String],
    ) -> Vec<Out> {
        let outs = callee_sessions
            .iter()
            .map(|s| {
                out(
                    s,
                    Msg::CallIncoming {
                        call_id: id.to_owned(),
                        from: from.clone(),
                        media,
                    },
                )
            })
            .collect();
        self.by_user.insert(from.user.clone(), id.to_owned());
        self.by_user.insert(to.to_owned(), id.to_owned());
        self.calls.insert(
            id.to_owned(),
            Call {
                caller: from,
                callee: to.to_owned(),
                ringing: callee_sessions.to_vec(),
                answered: None,
                media,
                created_ms: now,
                answered_ms: None,
                dropped: HashMap::new(),
            },
        );
        outs
    }

    fn get(&self, id: &str, by: &Peer) -> Result<&Call, SignalError> {
        let call = self
            .calls
            .get(id)
            .ok_or_else(|| SignalError::NotFound("no such call".into()))?;
        if !call.is_party(&by.user) {
            return Err(SignalError::Forbidden("not your call".into()));
        }
        Ok(call)
    }

    pub fn accept(&mut self, now: u64, by: &Peer, id: &str) -> Result<Vec<Out>, SignalError> {
        let call = self.get(id, by)?;
        if call.callee != by.user {
            return Err(SignalError::Forbidden(
                "only the callee accepts a call".into(),
            ));
        }
        if let Some(answered) = &call.answered {
            return if answered == &by.session {
                Ok(Vec::new())
            } else {
                Err(SignalError::Conflict(
                    "the call was answered on another device".into(),
                ))
            };
        }
        let Some(call) = self.calls.get_mut(id) else {
            return Ok(Vec::new());
        };
        call.answered = Some(by.session.clone());
        call.answered_ms = Some(now);
        let id = id.to_owned();
        let mut outs = vec![
            out(
                &call.caller.session,
                Msg::CallState {
                    call_id: id.clone(),
                    state: CallState::Accepted,
                },
            ),
            out(
                &by.session,
                Msg::CallState {
                    call_id: id.clone(),
                    state: CallState::Accepted,
                },
            ),
        ];
        for s in call.ringing.drain(..).filter(|s| s != &by.session) {
            outs.push(out(
                &s,
                Msg::CallState {
                    call_id: id.clone(),
                    state: CallState::AnsweredElsewhere,
                },
            ));
        }
        Ok(outs)
    }

    pub fn reject(&mut self, now: u64, by: &Peer, id: &str) -> Result<Vec<Out>, SignalError> {
        let call = self.get(id, by)?;
        if call.callee != by.user {
            return Err(SignalError::Forbidden(
                "only the callee rejects a call".into(),
            ));
        }
        let reason = if call.answered.is_some() {
            EndReason::Ended
        } else {
            EndReason::Rejected
        };
        Ok(self.finish(now, id, reason))
    }

    pub fn hangup(&mut self, now: u64, by: &Peer, id: &str) -> Result<Vec<Out>, SignalError> {
        let call = self.get(id, by)?;
        let reason = match (call.answered.is_some(), call.caller.user == by.user) {
            (true, _) => EndReason::Ended,
            (false, true) => EndReason::Cancelled,
            (false, false) => EndReason::Rejected,
        };
        Ok(self.finish(now, id, reason))
    }

    fn finish(&mut self, now: u64, id: &str, reason: EndReason) -> Vec<Out> {
        let Some(call) = self.calls.remove(id) else {
            return Vec::new();
        };
        for user in [&call.caller.user, &call.callee] {
            if self.by_user.get(user).is_some_and(|c| c == id) {
                self.by_user.remove(user);
            }
        }
        let duration_ms = call.answered_ms.map_or(0, |a| now.saturating_sub(a));
        let mut outs = Vec::new();
        for s in call.audience() {
            outs.push(out(
                &s,
                Msg::CallState {
                    call_id: id.to_owned(),
                    state: reason.state(),
                },
            ));
            outs.push(out(
                &s,
                Msg::CallEnded {
                    call_id: id.to_owned(),
                    reason,
                    duration_ms,
                },
            ));
        }
        self.finished.push(CallRecord {
            id: id.to_owned(),
            caller: call.caller.user,
            callee: call.callee,
            media: call.media,
            created_ms: call.created_ms,
            answered_ms: call.answered_ms,
            ended_ms: now,
            reason,
            duration_ms,
        });
        outs
    }

    /// Ends calls that rang too long (missed) or whose dropped party did not come back.
    pub fn tick(&mut self, now: u64) -> Vec<Out> {
        let mut due = Vec::new();
        for (id, call) in &self.calls {
            if call.answered.is_none() && now >= call.created_ms + self.cfg.ring_timeout_ms {
                due.push((id.clone(), EndReason::Missed));
            } else if call.dropped.values().any(|deadline| now >= *deadline) {
                due.push((id.clone(), EndReason::Failed));
            }
        }
        due.into_iter()
            .flat_map(|(id, reason)| self.finish(now, &id, reason))
            .collect()
    }

    /// A session's connection is gone. A ringing callee device just stops ringing; a party
    /// of the call gets the grace period and the other side hears `reconnecting`.
    pub fn session_closed(&mut self, now: u64, peer: &Peer) -> Vec<Out> {
        let Some(id) = self.by_user.get(&peer.user).cloned() else {
            return Vec::new();
        };
        let grace = self.cfg.grace_ms;
        let Some(call) = self.calls.get_mut(&id) else {
            return Vec::new();
        };
        call.ringing.retain(|s| s != &peer.session);
        if call.own_session(&peer.user) != Some(peer.session.as_str()) {
            return Vec::new();
        }
        call.dropped.insert(peer.user.clone(), now + grace);
        match call.other_session(&peer.user) {
            Some(other) => vec![out(
                other,
                Msg::CallState {
                    call_id: id,
                    state: CallState::Reconnecting,
                },
            )],
            None => Vec::new(),
        }
    }

    /// A party comes back (after a drop, or from another of its sessions) and takes the call.
    pub fn resume(&mut self, by: &Peer, id: &str) -> Result<Vec<Out>, SignalError> {
        let call = self.get(id, by)?;
        if call.callee == by.user && call.answered.is_none() {
            return Err(SignalError::Conflict(
                "the call is still ringing: accept it".into(),
            ));
        }
        let Some(call) = self.calls.get_mut(id) else {
            return Ok(Vec::new());
        };
        if call.caller.user == by.user {
            call.caller.session = by.session.clone();
        } else {
            call.answered = Some(by.session.clone());
        }
        call.dropped.remove(&by.user);
        let mut outs = vec![out(
            &by.session,
            Msg::CallState {
                call_id: id.to_owned(),
                state: CallState::Resumed,
            },
        )];
        if let Some(other) = call.other_session(&by.user) {
            outs.push(out(
                other,
                Msg::CallState {
                    call_id: id.to_owned(),
                    state: CallState::Resumed,
                },
            ));
        }
        Ok(outs)
    }

    /// Relays a validated `signal` from one side of an accepted call to the other.
    pub fn relay(&self, from: &Peer, id: &str, data: &Value) -> Result<Out, SignalError> {
        let call = self
            .calls
            .get(id)
            .ok_or_else(|| SignalError::Forbidden("not your call".into()))?;
        if call.own_session(&from.user) != Some(from.session.as_str()) {
            return Err(SignalError::Forbidden(
                "this session is not in that call".into(),
            ));
        }
        let to = call
            .other_session(&from.user)
            .ok_or_else(|| SignalError::Conflict("the call is not accepted yet".into()))?;
        if call.dropped.contains_key(if call.caller.user == from.user {
            &call.callee
        } else {
            &call.caller.user
        }) {
            return Err(SignalError::Conflict(
                "the other party is reconnecting".into(),
            ));
        }
        let _: Payload = sdp::parse_payload(data)?;
        Ok(out(
            to,
            Msg::Signal {
                call_id: Some(id.to_owned()),
                room: None,
                from: from.clone(),
                data: data.clone(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AV: Media = Media {
        audio: true,
        video: true,
    };

    fn p(user: &str, s: &str) -> Peer {
        Peer::new(user, s)
    }

    fn states(outs: &[Out]) -> Vec<(String, String)> {
        outs.iter()
            .filter_map(|o| match &o.msg {
                Msg::CallState { state, .. } => Some((
                    o.to.clone(),
                    serde_json::to_value(state)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// An audio and video call from `from` to `to`, ringing `sessions`, without call waiting.
    fn request<'a>(id: &str, from: Peer, to: &'a str, sessions: &'a [String]) -> CallRequest<'a> {
        CallRequest {
            id: id.into(),
            from,
            to,
            media: AV,
            callee_sessions: sessions,
            callee_accepts_waiting: false,
        }
    }

    fn calls() -> Calls {
        Calls::new(CallConfig {
            ring_timeout_ms: 30_000,
            grace_ms: 15_000,
        })
    }

    #[test]
    fn rings_every_device_and_the_first_accept_wins() {
        let mut c = calls();
        let (id, outs) = c
            .call(
                0,
                request("c1", p("tutor", "t1"), "kid", &["k1".into(), "k2".into()]),
            )
            .unwrap();
        assert_eq!(outs.len(), 2);
        assert!(
            outs.iter()
                .all(|o| matches!(o.msg, Msg::CallIncoming { .. }))
        );
        let outs = c.accept(1_000, &p("kid", "k2"), &id).unwrap();
        assert_eq!(
            states(&outs),
            vec![
                ("t1".into(), "accepted".into()),
                ("k2".into(), "accepted".into()),
                ("k1".into(), "answered_elsewhere".into())
            ]
        );
        assert_eq!(
            c.accept(1_001, &p("kid", "k1"), &id),
            Err(SignalError::Conflict(
                "the call was answered on another device".into()
            ))
        );
        assert!(
            c.accept(1_002, &p("kid", "k2"), &id).unwrap().is_empty(),
            "idempotent for the same device"
        );
        assert!(matches!(
            c.accept(1_003, &p("tutor", "t1"), &id),
            Err(SignalError::Forbidden(_))
        ));
        let outs = c.hangup(61_000, &p("tutor", "t1"), &id).unwrap();
        assert!(outs.iter().any(|o| matches!(
            o.msg,
            Msg::CallEnded {
                reason: EndReason::Ended,
                duration_ms: 60_000,
                ..
            }
        )));
        let rec = c.take_finished();
        assert_eq!(
            (rec[0].reason, rec[0].answered_ms, rec[0].duration_ms),
            (EndReason::Ended, Some(1_000), 60_000)
        );
        assert_eq!(c.call_of("tutor"), None);
    }

    #[test]
    fn missed_after_the_ring_timeout() {
        let mut c = calls();
        let (id, _) = c
            .call(0, request("c1", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        assert!(c.tick(29_999).is_empty());
        let outs = c.tick(30_000);
        assert_eq!(
            states(&outs),
            vec![
                ("a1".into(), "missed".into()),
                ("b1".into(), "missed".into())
            ]
        );
        assert!(outs.iter().any(|o| o.to == "a1"
            && matches!(
                o.msg,
                Msg::CallEnded {
                    reason: EndReason::Missed,
                    ..
                }
            )));
        assert_eq!(c.take_finished()[0].reason, EndReason::Missed);
        assert!(matches!(
            c.accept(30_001, &p("b", "b1"), &id),
            Err(SignalError::NotFound(_))
        ));
    }

    #[test]
    fn busy_unless_the_callee_accepts_call_waiting() {
        let mut c = calls();
        c.call(0, request("c1", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        let (id, outs) = c
            .call(5, request("c2", p("x", "x1"), "b", &["b1".into()]))
            .unwrap();
        assert_eq!(id, "c2");
        assert_eq!(states(&outs), vec![("x1".into(), "busy".into())]);
        assert_eq!(c.take_finished()[0].reason, EndReason::Busy);
        assert_eq!(c.call_of("x"), None, "a busy call leaves nothing behind");
        let (_, outs) = c
            .call(
                6,
                CallRequest {
                    callee_accepts_waiting: true,
                    ..request("c3", p("x", "x1"), "b", &["b1".into()])
                },
            )
            .unwrap();
        assert!(
            matches!(outs[0].msg, Msg::CallIncoming { .. }),
            "call waiting rings"
        );
    }

    #[test]
    fn glare_resolves_to_one_call() {
        let mut c = calls();
        let (first, _) = c
            .call(0, request("c1", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        let (second, outs) = c
            .call(10, request("c2", p("b", "b1"), "a", &["a1".into()]))
            .unwrap();
        assert_eq!(second, first);
        assert_eq!(states(&outs)[0], ("a1".into(), "accepted".into()));
        assert_eq!(c.live_calls(), 1);
    }

    #[test]
    fn reject_cancel_and_rights() {
        let mut c = calls();
        let (id, _) = c
            .call(
                0,
                request("c1", p("a", "a1"), "b", &["b1".into(), "b2".into()]),
            )
            .unwrap();
        assert!(matches!(
            c.reject(1, &p("a", "a1"), &id),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            c.hangup(1, &p("eve", "e1"), &id),
            Err(SignalError::Forbidden(_))
        ));
        let outs = c.reject(2, &p("b", "b2"), &id).unwrap();
        assert_eq!(states(&outs).len(), 3, "caller and both ringing devices");
        let (id, _) = c
            .call(3, request("c2", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        let outs = c.hangup(4, &p("a", "a1"), &id).unwrap();
        assert!(states(&outs).contains(&("b1".into(), "cancelled".into())));
        assert!(matches!(
            c.call(5, request("c3", p("a", "a1"), "a", &["a1".into()])),
            Err(SignalError::BadRequest(_))
        ));
        assert!(matches!(
            c.call(5, request("c3", p("a", "a1"), "z", &[])),
            Err(SignalError::Unavailable(_))
        ));
        assert!(matches!(
            c.call(
                5,
                CallRequest {
                    media: Media::default(),
                    ..request("c3", p("a", "a1"), "b", &["b1".into()])
                }
            ),
            Err(SignalError::BadRequest(_))
        ));
    }

    #[test]
    fn relay_only_between_the_two_answering_sessions() {
        let mut c = calls();
        let (id, _) = c
            .call(
                0,
                request("c1", p("a", "a1"), "b", &["b1".into(), "b2".into()]),
            )
            .unwrap();
        let cand = json!({"candidate": null});
        assert!(
            matches!(
                c.relay(&p("a", "a1"), &id, &cand),
                Err(SignalError::Conflict(_))
            ),
            "not accepted yet"
        );
        c.accept(1, &p("b", "b1"), &id).unwrap();
        let o = c.relay(&p("a", "a1"), &id, &cand).unwrap();
        assert_eq!(o.to, "b1");
        assert_eq!(c.relay(&p("b", "b1"), &id, &cand).unwrap().to, "a1");
        assert!(
            matches!(
                c.relay(&p("b", "b2"), &id, &cand),
                Err(SignalError::Forbidden(_))
            ),
            "the other device"
        );
        assert!(matches!(
            c.relay(&p("eve", "e1"), &id, &cand),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            c.relay(&p("eve", "e1"), "nope", &cand),
            Err(SignalError::Forbidden(_))
        ));
        assert!(matches!(
            c.relay(
                &p("a", "a1"),
                &id,
                &json!({"sdp": {"type": "offer", "sdp": "junk"}})
            ),
            Err(SignalError::BadRequest(_))
        ));
    }

    #[test]
    fn a_dropped_party_may_resume_within_the_grace_period() {
        let mut c = calls();
        let (id, _) = c
            .call(0, request("c1", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        c.accept(1, &p("b", "b1"), &id).unwrap();
        let outs = c.session_closed(100, &p("a", "a1"));
        assert_eq!(states(&outs), vec![("b1".into(), "reconnecting".into())]);
        assert!(
            c.relay(&p("b", "b1"), &id, &json!({"candidate": null}))
                .is_err()
        );
        assert!(c.tick(15_099).is_empty());
        let outs = c.resume(&p("a", "a9"), &id).unwrap();
        assert_eq!(
            states(&outs),
            vec![
                ("a9".into(), "resumed".into()),
                ("b1".into(), "resumed".into())
            ]
        );
        assert_eq!(
            c.relay(&p("b", "b1"), &id, &json!({"candidate": null}))
                .unwrap()
                .to,
            "a9"
        );
        assert!(c.tick(100_000).is_empty(), "no longer dropped");
    }

    #[test]
    fn a_dropped_party_that_stays_away_fails_the_call() {
        let mut c = calls();
        let (id, _) = c
            .call(0, request("c1", p("a", "a1"), "b", &["b1".into()]))
            .unwrap();
        c.accept(1, &p("b", "b1"), &id).unwrap();
        c.session_closed(100, &p("b", "b1"));
        let outs = c.tick(15_100);
        assert!(outs.iter().any(|o| o.to == "a1"
            && matches!(
                o.msg,
                Msg::CallEnded {
                    reason: EndReason::Failed,
                    ..
                }
            )));
        assert_eq!(c.take_finished()[0].reason, EndReason::Failed);
        assert!(c.resume(&p("b", "b2"), &id).is_err());
        // A ringing device that disconnects just stops ringing.
        let (id, _) = c
            .call(
                200,
                request("c2", p("a", "a1"), "b", &["b1".into(), "b2".into()]),
            )
            .unwrap();
        assert!(c.session_closed(201, &p("b", "b1")).is_empty());
        let outs = c.accept(202, &p("b", "b2"), &id).unwrap();
        assert_eq!(
            states(&outs).len(),
            2,
            "no answered_elsewhere to the gone device"
        );
    }
}
