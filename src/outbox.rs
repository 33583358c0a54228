//! A session's outbox: the bounded queue of frames between their producers (the hub's fan-out,
//! directed frames, the session's own replies) and the session's write loop. It allocates
//! nothing until a frame is queued, grows with a burst and gives the memory back once the
//! write loop has drained it, so an idle connection pays a few dozen bytes for it instead of
//! a channel's preallocated block. Fan-out never waits: a full outbox is refused and the hub
//! closes the session as a slow consumer. The session's own replies may wait for room
//! ([`Outbox::send`]): a join replaying hundreds of events keeps pace with the socket instead
//! of overflowing it. An idle reader may park ([`OutboxReader::park`]): the write loop ends,
//! and the next frame, ping, wake or the last sender's going hands the reader to the resume
//! it left, which starts a new one; so an idle connection holds no write task at all. Knows
//! nothing of sockets, rooms or the wire.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One encoded text frame, shared by every outbox it is queued in.
pub type Frame = Utf8Bytes;

/// A frame queued for one session. A `lazy` frame (presence, typing, an online count) may
/// wait a little (`presence_flush_ms`) to leave in the same write as what follows it, so a
/// join storm costs each session one write per flush instead of one per joiner.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub frame: Frame,
    pub lazy: bool,
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Self { frame, lazy: false }
    }
}

impl From<String> for Outgoing {
    fn from(frame: String) -> Self {
        Frame::from(frame).into()
    }
}

/// Capacity kept when the queue drains empty; a larger one is released.
const KEEP: usize = 4;

struct Queue {
    frames: VecDeque<Outgoing>,
    /// Live [`Outbox`] handles; at zero the reader ends once it has drained the queue.
    senders: usize,
    /// The reader was dropped: nothing queued from now on would be read.
    reader_gone: bool,
    /// A heartbeat ping is due (asked for once however often it is asked).
    ping: bool,
    /// The payload of the client's latest ping, to answer with a pong (RFC 6455 §5.5.3: an
    /// endpoint may answer only the most recent one).
    pong: Option<Bytes>,
    /// Senders waiting in [`Outbox::send`] for room.
    waiting: usize,
    /// The parked reader and what resumes it.
    parked: Option<Parked>,
    /// [`Outbox::wake`] was called with no reader parked: the next park is refused, so that
    /// what the wake was for (a close) is looked at first.
    woken: bool,
}

/// What starts the reading again, given the parked reader: called once, by whoever queues the
/// next frame or ping, wakes the outbox, or drops the last sender (on that thread, after the
/// queue's lock is released).
pub type Resume = Box<dyn FnOnce(OutboxReader) + Send>;

struct Parked {
    resume: Resume,
    reader: OutboxReader,
}

impl Queue {
    /// Takes the parked reader out, to be resumed once the lock is released.
    fn unpark(&mut self) -> Option<Parked> {
        self.parked.take()
    }
}

impl Parked {
    fn resume(self) {
        (self.resume)(self.reader);
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// Woken when a frame is queued or the last sender goes.
    ready: Notify,
    /// Woken when a frame leaves a queue that a sender is waiting on, or the reader goes.
    space: Notify,
    cap: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` under the held lock, then, with the lock released, wakes the reader.
    fn push(&self, mut q: MutexGuard<'_, Queue>, frame: Outgoing) {
        q.frames.push_back(frame);
        let parked = q.unpark();
        drop(q);
        self.ready.notify_one();
        if let Some(p) = parked {
            p.resume();
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug)]
pub enum Refused {
    /// `cap` frames are already waiting; the frame is handed back.
    Full(Outgoing),
    /// The reader is gone.
    Closed,
}

/// The producing side; clones share the queue.
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The write loop's side.
pub struct OutboxReader {
    shared: Arc<Shared>,
}

/// A new outbox of at most `cap` waiting frames.
pub fn outbox(cap: usize) -> (Outbox, OutboxReader) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            frames: VecDeque::new(),
            senders: 1,
            reader_gone: false,
            ping: false,
            pong: None,
            waiting: 0,
            parked: None,
            woken: false,
        }),
        ready: Notify::new(),
        space: Notify::new(),
        cap,
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReader { shared },
    )
}

impl Outbox {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: impl Into<Outgoing>) -> Result<(), Refused> {
        let q = self.shared.lock();
        if q.reader_gone {
            return Err(Refused::Closed);
        }
        let frame = frame.into();
        if q.frames.len() >= self.shared.cap {
            return Err(Refused::Full(frame));
        }
        self.shared.push(q, frame);
        Ok(())
    }

    /// Resumes a parked reader even though nothing was queued (it has something else to look
    /// at: a close was asked for).
    pub fn wake(&self) {
        let parked = {
            let mut q = self.shared.lock();
            let parked = q.unpark();
            // A reader about to park must not miss it.
            q.woken |= parked.is_none();
            parked
        };
        if let Some(p) = parked {
            p.resume();
        }
    }
}

impl Outbox {
    /// Queues a frame, waiting while the outbox is full; refused only once the reader is gone.
    pub async fn send(&self, frame: impl Into<Outgoing>) -> Result<(), Refused> {
        let frame = frame.into();
        loop {
            let space = self.shared.space.notified();
            {
                let mut q = self.shared.lock();
                if q.reader_gone {
                    return Err(Refused::Closed);
                }
                if q.frames.len() < self.shared.cap {
                    self.shared.push(q, frame);
                    return Ok(());
                }
                q.waiting += 1;
            }
            space.await;
            self.shared.lock().waiting -= 1;
        }
    }

    /// Asks the write loop to send a WebSocket ping ahead of the frames already queued.
    pub fn ping(&self) {
        self.ask(|q| q.ping = true);
    }

    /// Asks the write loop to answer the client's ping (ahead of the frames already queued).
    pub fn pong(&self, payload: Bytes) {
        self.ask(|q| q.pong = Some(payload));
    }

    /// Sets what the write loop is asked for under the queue's lock, then wakes it (starting it
    /// again if it parked).
    fn ask(&self, set: impl FnOnce(&mut Queue)) {
        let parked = {
            let mut q = self.shared.lock();
            set(&mut q);
            q.unpark()
        };
        self.shared.ready.notify_one();
        if let Some(p) = parked {
            p.resume();
        }
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let (last, parked) = {
            let mut q = self.shared.lock();
            q.senders -= 1;
            let last = q.senders == 0;
            (last, if last { q.unpark() } else { None })
        };
        if last {
            self.shared.ready.notify_one();
        }
        if let Some(p) = parked {
            p.resume();
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// What the write loop is to do next.
pub enum Next {
    Frame(Outgoing),
    Ping,
    /// Answer the client's ping with this payload.
    Pong(Bytes),
}

impl OutboxReader {
    /// The next frame or ping; `None` once every sender is gone and the queue is drained.
    pub async fn recv(&mut self) -> Option<Next> {
        loop {
            let ready = self.shared.ready.notified();
            {
                let mut q = self.shared.lock();
                if let Some(payload) = q.pong.take() {
                    return Some(Next::Pong(payload));
                }
                if std::mem::take(&mut q.ping) {
                    return Some(Next::Ping);
                }
                if let Some(frame) = self.pop(&mut q) {
                    return Some(Next::Frame(frame));
                }
                if q.senders == 0 {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// The next frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let mut q = self.shared.lock();
        self.pop(&mut q)
    }

    /// Parks this reader with nothing to read: `resume` gets it back at the next frame, ping,
    /// [`Outbox::wake`] or when the last sender goes. Refused, handing both back, when one of
    /// these is already there (a wake since the last refused park included).
    pub fn park(self, resume: Resume) -> Result<(), (OutboxReader, Resume)> {
        let shared = self.shared.clone();
        let mut q = shared.lock();
        if q.ping || q.pong.is_some() || q.woken || !q.frames.is_empty() || q.senders == 0 {
            q.woken = false;
            drop(q);
            return Err((self, resume));
        }
        q.parked = Some(Parked {
            resume,
            reader: self,
        });
        Ok(())
    }
}

impl Drop for OutboxReader {
    fn drop(&mut self) {
        {
            let mut q = self.shared.lock();
            q.reader_gone = true;
            q.frames = VecDeque::new();
        }
        self.shared.space.notify_waiters();
    }
}

impl OutboxReader {
    fn pop(&self, q: &mut Queue) -> Option<Outgoing> {
        let frame = q.frames.pop_front()?;
        if q.frames.is_empty() && q.frames.capacity() > KEEP {
            // A burst is over: give its memory back.
            q.frames = VecDeque::new();
        }
        if q.waiting > 0 {
            self.shared.space.notify_one();
        }
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(q: Option<Outgoing>) -> Option<String> {
        q.map(|o| o.frame.as_str().to_owned())
    }

    fn frame(n: Option<Next>) -> Option<Outgoing> {
        match n? {
            Next::Frame(f) => Some(f),
            Next::Ping | Next::Pong(_) => panic!("a ping or pong where a frame was expected"),
        }
    }

    #[tokio::test]
    async fn bounded_in_order_and_ends_when_the_senders_go() {
        let (tx, mut rx) = outbox(2);
        let tx2 = tx.clone();
        tx.try_send(Frame::from("a")).unwrap();
        tx2.try_send(Frame::from("b")).unwrap();
        assert!(matches!(
            tx.try_send(Frame::from("c")),
            Err(Refused::Full(_))
        ));
        assert_eq!(text(frame(rx.recv().await)).as_deref(), Some("a"));
        tx.try_send(Frame::from("c")).unwrap();
        tx.ping();
        tx.ping();
        assert!(
            matches!(rx.recv().await, Some(Next::Ping)),
            "one ping, first"
        );
        drop(tx);
        drop(tx2);
        assert_eq!(text(frame(rx.recv().await)).as_deref(), Some("b"));
        assert_eq!(text(rx.try_recv()).as_deref(), Some("c"));
        assert!(rx.recv().await.is_none(), "drained and no sender left");
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_and_a_burst_is_given_back() {
        let (tx, mut rx) = outbox(1000);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        for i in 0..500 {
            tx.try_send(Frame::from(format!("{i}"))).unwrap();
        }
        let (first, mut rx) = reader.await.unwrap();
        assert_eq!(text(frame(first)).as_deref(), Some("0"));
        while rx.try_recv().is_some() {}
        assert!(rx.shared.lock().frames.capacity() <= KEEP);
    }

    #[tokio::test]
    async fn a_waiting_sender_goes_on_when_room_is_made() {
        let (tx, mut rx) = outbox(1);
        tx.try_send(Frame::from("a")).unwrap();
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(Frame::from("b")).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "full: the sender waits");
        assert_eq!(text(frame(rx.recv().await)).as_deref(), Some("a"));
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(text(frame(rx.recv().await)).as_deref(), Some("b"));
        // A sender waiting when the reader goes is let go.
        tx.try_send(Frame::from("c")).unwrap();
        let tx3 = tx.clone();
        let waiting = tokio::spawn(async move { tx3.send(Frame::from("d")).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert!(matches!(waiting.await.unwrap(), Err(Refused::Closed)));
    }

    /// A resume that hands the reader back over a channel, as a new write loop would get it.
    fn resumer() -> (Resume, std::sync::mpsc::Receiver<OutboxReader>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let resume: Resume = Box::new(move |reader| {
            let _ = tx.send(reader);
        });
        (resume, rx)
    }

    #[test]
    fn a_parked_reader_is_resumed_by_the_next_frame_ping_wake_or_last_sender() {
        let (tx, rx) = outbox(4);
        // Refused while something waits: the reader and its resume come back.
        tx.try_send(Frame::from("a")).unwrap();
        let (resume, _) = resumer();
        let Err((mut rx, _)) = rx.park(resume) else {
            panic!("parked with a frame waiting")
        };
        assert_eq!(text(rx.try_recv()).as_deref(), Some("a"));
        // Parked: a frame resumes it, once, with the frame there to read.
        let (resume, resumed) = resumer();
        assert!(rx.park(resume).is_ok());
        assert!(resumed.try_recv().is_err(), "nothing yet");
        tx.try_send(Frame::from("b")).unwrap();
        let mut rx = resumed.try_recv().expect("resumed by a frame");
        tx.try_send(Frame::from("c")).unwrap();
        assert!(resumed.try_recv().is_err(), "resumed once");
        assert_eq!(text(rx.try_recv()).as_deref(), Some("b"));
        assert_eq!(text(rx.try_recv()).as_deref(), Some("c"));
        // A ping, a wake (a close was asked for) and the last sender's going resume it too.
        let (resume, resumed) = resumer();
        assert!(rx.park(resume).is_ok());
        tx.ping();
        let rx = resumed.try_recv().expect("resumed by a ping");
        let (resume, resumed) = resumer();
        let Err((rx, _)) = rx.park(resume) else {
            panic!("parked with a ping waiting")
        };
        assert!(rx.shared.lock().ping);
        rx.shared.lock().ping = false;
        let (resume, resumed2) = resumer();
        assert!(rx.park(resume).is_ok());
        drop(resumed);
        tx.wake();
        let rx = resumed2.try_recv().expect("resumed by a wake");
        // A wake with nothing parked (a close asked for while the reader was on its way to
        // park) refuses the next park, once.
        tx.wake();
        let (resume, _) = resumer();
        let Err((rx, _)) = rx.park(resume) else {
            panic!("parked past a wake")
        };
        let (resume, resumed) = resumer();
        assert!(rx.park(resume).is_ok());
        let tx2 = tx.clone();
        drop(tx);
        assert!(resumed.try_recv().is_err(), "a sender is left");
        drop(tx2);
        let mut rx = resumed
            .try_recv()
            .expect("resumed by the last sender going");
        assert!(rx.try_recv().is_none());
        let (resume, _) = resumer();
        assert!(
            rx.park(resume).is_err(),
            "no sender left: nothing to park for"
        );
    }

    #[test]
    fn refuses_once_the_reader_is_gone() {
        let (tx, rx) = outbox(4);
        drop(rx);
        assert!(matches!(
            tx.try_send(Frame::from("x")),
            Err(Refused::Closed)
        ));
    }
}
