//! Live Q&A commands: ask (optionally anonymous; pending in moderated rooms), vote, answer,
//! question_status and the questions listing. Rights: members ask and vote; host/ta answer
//! (members too when the room allows peer answers) and change status; viewers only read.

use super::{check_room_id, readable_role};
use crate::command::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::protocol::{ClientMsg, QuestionId, QuestionStatus, QuestionsOk, RoomId};
use crate::store::{QuestionFilter, QuestionSort, View, WriteOp, now_ms};

fn check_question_id(id: &QuestionId) -> Result<()> {
    if id.as_str().is_empty() || id.as_str().len() > 64 {
        return Err(Error::bad_request("question id must be 1..=64 characters"));
    }
    Ok(())
}

pub(super) async fn ask(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    text: String,
    anonymous: bool,
) -> Result<Outcome> {
    let role = super::writable(ctx, &room)?;
    super::check_len(&text, ctx.app.config.max_question_chars, "question")?;
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    if !policy.qa_enabled() {
        return Err(Error::Forbidden("Q&A is not enabled in this room".into()));
    }
    let pending = policy.room.qa.moderated && !role.can_moderate();
    super::submit_post(ctx, rid, &policy, role, text, |author, text| WriteOp::Ask {
        room,
        author,
        text,
        anonymous,
        pending,
    })
    .await
}

pub(super) async fn vote(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    question: QuestionId,
    up: bool,
) -> Result<Outcome> {
    check_room_id(&room)?;
    check_question_id(&question)?;
    super::writer(ctx.joined_role(&room)?)?;
    let op = WriteOp::Vote {
        room,
        question,
        user: ctx.me.user.clone(),
        up,
    };
    super::submit(ctx, rid, op).await
}

pub(super) async fn answer(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    question: QuestionId,
    text: String,
) -> Result<Outcome> {
    check_room_id(&room)?;
    check_question_id(&question)?;
    let role = ctx.joined_role(&room)?;
    super::check_len(&text, ctx.app.config.max_text_chars, "answer")?;
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    if !(role.can_moderate() || (policy.room.qa.peer_answers && role.can_write())) {
        return Err(Error::Forbidden(
            "only host/ta answer questions in this room".into(),
        ));
    }
    super::submit_post(ctx, rid, &policy, role, text, |author, text| {
        WriteOp::Answer {
            room,
            question,
            author,
            text,
        }
    })
    .await
}

/// `approved`/`approve`/`open`/`reopen` -> open; `pinned`/`pin`; `answered`; `dismissed`/`dismiss`.
fn parse_target_status(s: &str) -> Result<QuestionStatus> {
    match s {
        "approved" | "approve" | "open" | "reopen" => Ok(QuestionStatus::Open),
        "pinned" | "pin" => Ok(QuestionStatus::Pinned),
        "answered" => Ok(QuestionStatus::Answered),
        "dismissed" | "dismiss" => Ok(QuestionStatus::Dismissed),
        _ => Err(Error::bad_request(
            "status must be approved, open, reopen, pinned, answered or dismissed",
        )),
    }
}

pub(super) async fn set_status(
    ctx: &mut Ctx,
    rid: Option<i64>,
    room: RoomId,
    question: QuestionId,
    status: String,
) -> Result<Outcome> {
    check_room_id(&room)?;
    check_question_id(&question)?;
    let role = ctx.joined_role(&room)?;
    if !role.can_moderate() {
        return Err(Error::Forbidden(
            "only host/ta change a question's status".into(),
        ));
    }
    let status = parse_target_status(&status)?;
    let op = WriteOp::SetQuestionStatus {
        room,
        question,
        status,
    };
    super::submit(ctx, rid, op).await
}

pub(super) async fn list(
    ctx: &mut Ctx,
    room: RoomId,
    sort: Option<String>,
    status: Option<String>,
) -> Result<Outcome> {
    let role = readable_role(ctx, &room).await?;
    let sort = match sort.as_deref() {
        None | Some("top") => QuestionSort::Top,
        Some("recent") => QuestionSort::Recent,
        Some(_) => return Err(Error::bad_request("sort must be top or recent")),
    };
    let mut filter = QuestionFilter::default();
    match status.as_deref() {
        None => {}
        Some("overdue") => filter.overdue_only = true,
        Some(s) => {
            filter.status = Some(
                QuestionStatus::parse(s)
                    .ok_or_else(|| Error::bad_request("unknown status filter"))?,
            );
        }
    }
    let policy = ctx.app.policies.get(&ctx.app.store, &room).await?;
    let questions = ctx
        .app
        .store
        .questions(
            &room,
            &filter,
            sort,
            View::of(role),
            policy.room.answer_sla_s,
            now_ms(),
        )
        .await?;
    Ok(Outcome::ok(QuestionsOk { questions }))
}

/// Routes a Q&A command: questions, votes, answers, statuses, listings.
pub(super) async fn dispatch(ctx: &mut Ctx, rid: Option<i64>, msg: ClientMsg) -> Result<Outcome> {
    match msg {
        ClientMsg::Ask {
            room,
            text,
            anonymous,
        } => ask(ctx, rid, room, text, anonymous).await,
        ClientMsg::Vote { room, question, up } => vote(ctx, rid, room, question, up).await,
        ClientMsg::Answer {
            room,
            question,
            text,
        } => answer(ctx, rid, room, question, text).await,
        ClientMsg::QuestionStatus {
            room,
            question,
            status,
        } => set_status(ctx, rid, room, question, status).await,
        ClientMsg::Questions { room, sort, status } => list(ctx, room, sort, status).await,
        other => Err(crate::command::misrouted(&other)),
    }
}
