//! The `broadcast` scenario: P publishers send binary messages on a fixed schedule to a
//! publish endpoint, N subscribers receive every message of the topic from a subscribe
//! endpoint, and each subscriber measures end-to-end latency and checks every publisher's
//! sequence for loss, duplicates and reordering.
//!
//! This module owns the message header ([`encode_header`], [`decode_header`]), the
//! per-publisher sequence check ([`Track`]), the publisher and subscriber connection loops and
//! the worker that runs a share of both. Parsing options, the progress line and the report
//! live in `main.rs`; histograms and the timeline in `stats.rs`.
//!
//! Publishers run open loop: message `k` of a publisher is sent at its scheduled time whatever
//! the server does, and the timestamp it carries is that *scheduled* time, so a stalled server
//! or fan-out shows up as latency instead of being hidden by a publisher that fell behind
//! (coordinated omission). All workers live in one process, so timestamps are nanoseconds since
//! one shared [`Instant`] ([`BroadcastParams::epoch`]) and a subscriber's latency is simply
//! `receive time − scheduled send time`.

use std::cell::RefCell;
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use wsedge::proto::{CloseCode, Event, MessageKind};

use crate::client::{self, Target, WsClient};
use crate::echo::Timing;
use crate::end::End;
use crate::stats::{Live, MAX_OUTSTANDING, MAX_QUEUED_BYTES, WorkerStats};

/// Bytes of the header at the start of every payload: publisher id (u32), sequence number
/// (u64), scheduled send time in ns since [`BroadcastParams::epoch`] (u64), all little-endian.
/// `--size` may not be smaller.
pub const HEADER_LEN: usize = 20;

/// Pause between "every connection is up" and the first publish, so the server has
/// registered the last subscribers (it does so just after writing their 101).
pub const SETTLE: Duration = Duration::from_millis(100);

/// How long subscribers keep reading after the last scheduled send, for messages still in
/// flight; whatever has not arrived by then is lost.
pub const GRACE: Duration = Duration::from_secs(1);

/// Sequence numbers a [`Track`] remembers behind the newest one. An arrival further behind
/// cannot be told apart from a duplicate and is counted as `stale`.
pub const WINDOW: u64 = 1024;

/// Parameters of one broadcast run.
#[derive(Clone, Debug)]
pub struct BroadcastParams {
    /// Where publishers connect.
    pub pub_target: Target,
    /// Where subscribers connect.
    pub sub_target: Target,
    /// Subscriber connections.
    pub subs: usize,
    /// Publisher connections.
    pub publishers: usize,
    /// Payload bytes per message (at least [`HEADER_LEN`]).
    pub size: usize,
    /// Total messages per second over all publishers.
    pub rate: f64,
    /// Measured window.
    pub duration: Duration,
    /// Excluded warm-up before the window.
    pub warmup: Duration,
    /// Source addresses to spread connections over (empty = let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// The instant send timestamps count from (shared by every worker of the process).
    pub epoch: Instant,
}

impl BroadcastParams {
    /// All connections, publishers and subscribers.
    pub fn total(&self) -> usize {
        self.subs + self.publishers
    }

    /// The publisher id of connection `i` (of `0..total()`), or `None` for a subscriber.
    /// Publisher `j` is connection `j * total / publishers`: publishers are spread evenly over
    /// the index space and so over the workers, which get contiguous blocks of it.
    pub fn publisher_at(&self, i: usize) -> Option<u32> {
        let (total, p) = (self.total(), self.publishers);
        let j = (i * p).div_ceil(total);
        (j < p && j * total / p == i).then(|| u32::try_from(j).unwrap_or(u32::MAX))
    }

    /// Time between two messages of one publisher.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.publishers as f64 / self.rate)
    }
}

/// State shared by all workers while the run goes on.
pub struct Shared {
    /// Per publisher: messages handed to the kernel in full so far (the publisher's next
    /// sequence number once its last write completed). Subscribers read the final value to
    /// count messages that never arrived.
    pub published: Vec<AtomicU64>,
}

impl Shared {
    /// Zeroed counters for `publishers` publishers.
    pub fn new(publishers: usize) -> Self {
        Self {
            published: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Messages published so far, all publishers.
    pub fn published_total(&self) -> u64 {
        self.published
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }
}

/// Delivery counts, summed over subscribers (see docs/loadtest.md for how each is counted).
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// Subscribers connected.
    pub subs_connected: u64,
    /// Subscribers that stayed connected for the whole run (until the end of the grace
    /// period); the counts below are theirs.
    pub subs_complete: u64,
    /// Publishers connected.
    pub pubs_connected: u64,
    /// Messages from this run received, duplicates included.
    pub delivered: u64,
    /// Messages received by subscribers that disconnected before the end (not in the counts
    /// above or below).
    pub delivered_to_disconnected: u64,
    /// Sequence numbers never received.
    pub lost: u64,
    /// Arrivals of a sequence number already received.
    pub duplicated: u64,
    /// Arrivals of a sequence number after a later one (it had been counted lost).
    pub reordered: u64,
    /// Arrivals more than [`WINDOW`] sequence numbers behind the newest.
    pub stale: u64,
    /// Publishers: messages queued (so published and expected) but not confirmed written to
    /// the server by the end, because it stopped reading or the connection failed.
    pub unwritten: u64,
}

impl Tally {
    /// Fold `o` into `self`.
    pub fn merge(&mut self, o: &Tally) {
        self.subs_connected += o.subs_connected;
        self.subs_complete += o.subs_complete;
        self.pubs_connected += o.pubs_connected;
        self.delivered += o.delivered;
        self.delivered_to_disconnected += o.delivered_to_disconnected;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.stale += o.stale;
        self.unwritten += o.unwritten;
    }
}

/// What one worker measured.
pub struct BroadcastStats {
    /// Latency (of deliveries whose scheduled send time is in the measured window), timeline,
    /// errors, late and skipped sends.
    pub stats: WorkerStats,
    /// Delivery counts.
    pub tally: Tally,
}

/// Write the header into the first [`HEADER_LEN`] bytes of `payload`.
pub fn encode_header(payload: &mut [u8], publisher: u32, seq: u64, sent_ns: u64) {
    payload[0..4].copy_from_slice(&publisher.to_le_bytes());
    payload[4..12].copy_from_slice(&seq.to_le_bytes());
    payload[12..20].copy_from_slice(&sent_ns.to_le_bytes());
}

/// Read a header: `(publisher, seq, sent_ns)`, or `None` if the payload is too short.
pub fn decode_header(payload: &[u8]) -> Option<(u32, u64, u64)> {
    let h = payload.get(..HEADER_LEN)?;
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let mut id = [0u8; 4];
    id.copy_from_slice(&h[..4]);
    Some((u32::from_le_bytes(id), u64_at(4), u64_at(12)))
}

/// One subscriber's view of one publisher's sequence: the next sequence number expected and
/// which of the last [`WINDOW`] numbers arrived.
pub struct Track {
    /// One past the highest sequence number received.
    next: u64,
    /// Bit `s % WINDOW` is set when `s` (in `next - WINDOW..next`) was received.
    seen: [u64; (WINDOW / 64) as usize],
}

impl Default for Track {
    fn default() -> Self {
        Self {
            next: 0,
            seen: [0; (WINDOW / 64) as usize],
        }
    }
}

impl Track {
    fn bit(s: u64) -> (usize, u64) {
        let b = s % WINDOW;
        ((b / 64) as usize, 1 << (b % 64))
    }

    fn is_seen(&self, s: u64) -> bool {
        let (w, m) = Self::bit(s);
        self.seen[w] & m != 0
    }

    fn set_seen(&mut self, s: u64, on: bool) {
        let (w, m) = Self::bit(s);
        if on {
            self.seen[w] |= m;
        } else {
            self.seen[w] &= !m;
        }
    }

    /// Account for the arrival of sequence number `s`:
    /// - `s == next`: in order;
    /// - `s > next`: the gap `next..s` is counted lost;
    /// - `s < next`, not received before: it was counted lost, so lost −1, reordered +1;
    /// - `s < next`, received before: duplicated +1;
    /// - `s < next − WINDOW`: too old to tell, stale +1 (lost unchanged).
    pub fn arrive(&mut self, s: u64, t: &mut Tally) {
        if s >= self.next {
            let gap = s - self.next;
            t.lost += gap;
            // The bit slots of next..=s held numbers WINDOW older: forget them.
            if gap >= WINDOW {
                self.seen = [0; (WINDOW / 64) as usize];
            } else {
                for q in self.next..s {
                    self.set_seen(q, false);
                }
            }
            self.set_seen(s, true);
            self.next = s + 1;
        } else if self.next - s > WINDOW {
            t.stale += 1;
        } else if self.is_seen(s) {
            t.duplicated += 1;
        } else {
            self.set_seen(s, true);
            // Invariant: `s` was skipped by a gap of this track, which added it to `lost`.
            t.lost -= 1;
            t.reordered += 1;
        }
    }

    /// End of the run: the publisher sent `published` messages (numbers `0..published`);
    /// those after the highest received never arrived.
    pub fn finish(&self, published: u64, t: &mut Tally) {
        t.lost += published.saturating_sub(self.next);
    }
}

/// A connection of this worker, by role.
enum Peer {
    Publisher(u32, WsClient),
    Subscriber(WsClient),
}

/// Run one worker: connect connections `first..first + n` (publishers and subscribers, see
/// [`BroadcastParams::publisher_at`]), report, wait for the start signal, drive them until
/// the end of the grace period, return what it measured.
pub fn worker(
    params: Arc<BroadcastParams>,
    shared: Arc<Shared>,
    first: usize,
    n: usize,
    live: Arc<Live>,
    connected: std::sync::mpsc::Sender<()>,
    timing: Arc<OnceLock<Timing>>,
) -> BroadcastStats {
    // A worker without a runtime cannot run: its panic ends the run with "a worker died while
    // connecting" (as in the echo scenario).
    let (rt, _) = wsedge::shard::thread_runtime().expect("runtime builds");
    rt.block_on(async move {
        let stats = Rc::new(RefCell::new(WorkerStats::new()));
        let tally = Rc::new(RefCell::new(Tally::default()));
        let mut peers = Vec::with_capacity(n);
        let target = |i| match params.publisher_at(i) {
            Some(_) => &params.pub_target,
            None => &params.sub_target,
        };
        let results =
            client::connect_batched(first..first + n, &params.sources, 0xB40A_DCA5, target).await;
        for (i, r) in results {
            let role = params.publisher_at(i);
            let who = if role.is_some() { "pub" } else { "sub" };
            match r {
                Ok(c) => {
                    Live::add(&live.connections, 1);
                    stats.borrow_mut().connected += 1;
                    let mut t = tally.borrow_mut();
                    peers.push(match role {
                        Some(id) => {
                            t.pubs_connected += 1;
                            Peer::Publisher(id, c)
                        }
                        None => {
                            t.subs_connected += 1;
                            Peer::Subscriber(c)
                        }
                    });
                }
                Err(e) => {
                    Live::add(&live.errors, 1);
                    stats.borrow_mut().error(format!("{who}: {}", e.label()));
                }
            }
        }
        let (timing, stop, stopper) = crate::end::start(&connected, &timing, GRACE).await;
        let tasks: Vec<_> = peers
            .into_iter()
            .map(|peer| {
                let (params, shared, live) = (params.clone(), shared.clone(), live.clone());
                let (stats, tally) = (stats.clone(), tally.clone());
                let stop = stop.clone();
                compio::runtime::spawn(async move {
                    let t = &timing;
                    let (who, r) = match peer {
                        Peer::Publisher(id, c) => (
                            "pub",
                            publish(c, id, &params, t, &shared, &stats, &tally).await,
                        ),
                        Peer::Subscriber(c) => {
                            let (sub, r) =
                                subscribe(c, &params, t, &stop, &shared, &stats, &live).await;
                            let mut total = tally.borrow_mut();
                            if r.is_ok() {
                                total.merge(&sub);
                                total.subs_complete += 1;
                            } else {
                                total.delivered_to_disconnected += sub.delivered;
                            }
                            ("sub", r)
                        }
                    };
                    live.connections.fetch_sub(1, Ordering::Relaxed);
                    if let Err(label) = r {
                        Live::add(&live.errors, 1);
                        stats.borrow_mut().error(format!("{who}: {label}"));
                    }
                })
            })
            .collect();
        let stats = crate::stats::collect(tasks, stats).await;
        stopper.detach();
        let tally = tally.take();
        BroadcastStats { stats, tally }
    })
}

/// Make room in a connection's read buffer: at least 4 KiB free, and the rest of a frame
/// whose header has been parsed.
fn read_buffer(c: &mut WsClient) -> BytesMut {
    let mut b = std::mem::take(&mut c.rbuf);
    let want = c.conn.bytes_needed().max(4096);
    if b.capacity() - b.len() < want {
        b.reserve(want.max(64 * 1024));
    }
    b
}

/// The error label of a close frame from the server, e.g. `closed by server: 1008 slow
/// consumer`.
fn close_label(code: Option<CloseCode>, reason: &Bytes) -> String {
    let reason = String::from_utf8_lossy(reason);
    match code {
        None => "closed by server: no code".into(),
        Some(c) if reason.is_empty() => format!("closed by server: {}", c.0),
        Some(c) => format!("closed by server: {} {reason}", c.0),
    }
}

/// Drive one publisher: send its messages at their scheduled times from the start of the
/// run until its end, then flush what is queued (within half the grace period) and close.
/// Reads run concurrently (pings are answered, a close from the server ends the run), so a
/// server that pushes back cannot deadlock the publisher. `shared.published[id]` is the
/// number of messages written in full while the run goes on (for the progress line), then
/// the number queued (the final count subscribers check against); queued messages not
/// written by the end are added to `tally.unwritten`.
async fn publish(
    mut c: WsClient,
    id: u32,
    p: &BroadcastParams,
    t: &Timing,
    shared: &Shared,
    stats: &RefCell<WorkerStats>,
    tally: &RefCell<Tally>,
) -> Result<(), String> {
    let interval = p.interval();
    let published = &shared.published[id as usize];
    let mut payload = vec![0u8; p.size];
    // Sequence numbers: `queued` = next to send; `in_write` = written once the write in
    // flight completes; `written` = handed to the kernel in full.
    let (mut queued, mut in_write, mut written) = (0u64, 0u64, 0u64);
    // Stagger publishers evenly over one interval.
    let mut next = t.start + interval.mul_f64(f64::from(id) / p.publishers as f64);
    let mut out = Some(Vec::new());
    let stream = c.stream.clone();
    let read_fut = pin!(Fuse::terminated());
    let write_fut = pin!(Fuse::terminated());
    let timer = pin!(compio::time::sleep_until(next.min(t.end)).fuse());
    let (mut read_fut, mut write_fut, mut timer) = (read_fut, write_fut, timer);
    let result = 'run: loop {
        if write_fut.is_terminated() && c.conn.pending_transmit() > 0 {
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = out.take().expect("out buffer present");
            c.conn.poll_transmit(&mut o);
            in_write = queued;
            write_fut.set(stream.write_all(o).fuse());
        }
        if read_fut.is_terminated() {
            let b = read_buffer(&mut c);
            read_fut.set(stream.read(b).fuse());
        }
        select_biased! {
            BufResult(r, b) = read_fut => {
                c.rbuf = b;
                match r {
                    Ok(0) => break Err("connection closed by server".into()),
                    Err(e) => break Err(format!("read: {}", client::io_kind(&e))),
                    Ok(_) => {
                        if let Err(e) = c.conn.handle_input(&mut c.rbuf) {
                            break Err(format!("protocol error: {e}"));
                        }
                        // Messages (a pubsub route echoes the topic back) are ignored; pongs
                        // for pings were queued by the protocol core.
                        let mut closed = None;
                        while let Some(ev) = c.conn.poll_event() {
                            if let Event::Close { code, reason } = ev {
                                closed = Some(close_label(code, &reason));
                            }
                        }
                        if let Some(label) = closed {
                            break Err(label);
                        }
                    }
                }
            }
            BufResult(r, mut o) = write_fut => {
                if let Err(e) = r {
                    break Err(format!("write: {}", client::io_kind(&e)));
                }
                written = in_write;
                published.store(written, Ordering::Relaxed);
                o.clear();
                out = Some(o);
            }
            () = timer => {
                let now = Instant::now();
                while next <= now && next < t.end {
                    if queued - written >= MAX_OUTSTANDING as u64
                        || c.conn.pending_transmit() >= MAX_QUEUED_BYTES
                    {
                        // The server is not reading: skip rather than queue without bound.
                        stats.borrow_mut().skipped_sends += 1;
                    } else {
                        if now - next > Duration::from_millis(1) {
                            stats.borrow_mut().late_sends += 1;
                        }
                        let sent_ns = u64::try_from((next - p.epoch).as_nanos())
                            .unwrap_or(u64::MAX);
                        encode_header(&mut payload, id, queued, sent_ns);
                        if let Err(e) = c.conn.send(MessageKind::Binary, &payload) {
                            break 'run Err(e.to_string());
                        }
                        queued += 1;
                    }
                    next += interval;
                }
                if now >= t.end {
                    break Ok(());
                }
                timer.set(compio::time::sleep_until(next.min(t.end)).fuse());
            }
        }
    };
    // Every message queued counts as published: subscribers expect `0..queued` and count
    // those that never reached the server (below) as lost.
    published.store(queued, Ordering::Relaxed);
    let flushed = match result {
        Err(e) => Err(e),
        Ok(()) => {
            // Finish the write in flight, then write what is still queued and the close.
            let deadline = t.end + GRACE / 2;
            let unwritten = || "messages not written by the end (the server stopped reading)";
            async {
                if !write_fut.is_terminated() {
                    let BufResult(r, o) = compio::time::timeout_at(deadline, write_fut.as_mut())
                        .await
                        .map_err(|_| unwritten())?;
                    r.map_err(|e| format!("write: {}", client::io_kind(&e)))?;
                    written = in_write;
                    out = Some(o);
                }
                let mut o = out.take().unwrap_or_default();
                o.clear();
                let _ = c.conn.close(CloseCode::NORMAL, "");
                c.conn.poll_transmit(&mut o);
                let BufResult(r, _) = compio::time::timeout_at(deadline, stream.write_all(o))
                    .await
                    .map_err(|_| unwritten())?;
                r.map_err(|e| format!("write: {}", client::io_kind(&e)))?;
                written = queued;
                Ok(())
            }
            .await
        }
    };
    tally.borrow_mut().unwritten += queued - written;
    flushed
}

/// Drive one subscriber until the stop signal (end of the run + [`GRACE`]): read, decode
/// every message of each read, track each publisher's sequence, record latency. Returns this
/// subscriber's tally (loss at the end included) and `Err` if it ended early.
async fn subscribe(
    mut c: WsClient,
    p: &BroadcastParams,
    t: &Timing,
    stop: &End,
    shared: &Shared,
    stats: &RefCell<WorkerStats>,
    live: &Live,
) -> (Tally, Result<(), String>) {
    let mut tally = Tally::default();
    let mut tracks: Vec<Track> = (0..p.publishers).map(|_| Track::default()).collect();
    let mut out = Some(Vec::new());
    let stream = c.stream.clone();
    let read_fut = pin!(Fuse::terminated());
    let write_fut = pin!(Fuse::terminated());
    let (mut read_fut, mut write_fut) = (read_fut, write_fut);
    // Created once: it registers this connection's waker with the worker's stop signal.
    let mut stop_wait = pin!(stop.wait());
    let result = loop {
        if write_fut.is_terminated() && c.conn.pending_transmit() > 0 {
            // Pongs for the server's keepalive pings.
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = out.take().expect("out buffer present");
            c.conn.poll_transmit(&mut o);
            write_fut.set(stream.write_all(o).fuse());
        }
        if read_fut.is_terminated() {
            let b = read_buffer(&mut c);
            read_fut.set(stream.read(b).fuse());
        }
        select_biased! {
            BufResult(r, b) = read_fut => {
                c.rbuf = b;
                match r {
                    Ok(0) => break Err("connection closed by server".into()),
                    Err(e) => break Err(format!("read: {}", client::io_kind(&e))),
                    Ok(_) => {
                        if let Err(e) = on_input(&mut c, &mut tracks, &mut tally, p, t, stats, live) {
                            break Err(e);
                        }
                    }
                }
            }
            BufResult(r, mut o) = write_fut => {
                if let Err(e) = r {
                    break Err(format!("write: {}", client::io_kind(&e)));
                }
                o.clear();
                out = Some(o);
            }
            () = stop_wait => break Ok(()),
        }
    };
    for (track, published) in tracks.iter().zip(&shared.published) {
        track.finish(published.load(Ordering::Relaxed), &mut tally);
    }
    if result.is_ok() && write_fut.is_terminated() {
        // Best effort: the connection is dropped right after.
        let mut o = out.take().unwrap_or_default();
        let _ = c.conn.close(CloseCode::NORMAL, "");
        c.conn.poll_transmit(&mut o);
        let _ = compio::time::timeout(Duration::from_millis(200), stream.write_all(o)).await;
    }
    (tally, result)
}

/// Decode every frame of what was read and account for each message.
fn on_input(
    c: &mut WsClient,
    tracks: &mut [Track],
    tally: &mut Tally,
    p: &BroadcastParams,
    t: &Timing,
    stats: &RefCell<WorkerStats>,
    live: &Live,
) -> Result<(), String> {
    c.conn
        .handle_input(&mut c.rbuf)
        .map_err(|e| format!("protocol error: {e}"))?;
    let now = Instant::now();
    let mut n = 0;
    let mut stats = stats.borrow_mut();
    while let Some(ev) = c.conn.poll_event() {
        match ev {
            Event::Message { data, .. } => match decode_header(&data) {
                Some((id, seq, sent_ns)) if (id as usize) < tracks.len() => {
                    n += 1;
                    tally.delivered += 1;
                    tracks[id as usize].arrive(seq, tally);
                    let sent = p.epoch + Duration::from_nanos(sent_ns);
                    if sent >= t.measure_start && sent < t.end {
                        let second = (sent - t.measure_start).as_secs() as usize;
                        stats.record(second, now.saturating_duration_since(sent), live);
                    }
                }
                _ => stats.error("sub: message without a valid header (not from this run)"),
            },
            Event::Close { code, reason } => return Err(close_label(code, &reason)),
            Event::Ping(_) | Event::Pong(_) => {}
        }
    }
    Live::add(&live.messages, n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64], published: u64) -> Tally {
        let mut t = Tally::default();
        let mut tr = Track::default();
        for &s in seqs {
            tr.arrive(s, &mut t);
        }
        tr.finish(published, &mut t);
        t
    }

    #[test]
    fn header_round_trips() {
        let mut p = vec![0u8; 32];
        encode_header(&mut p, 7, 1 << 40, 123_456_789);
        assert_eq!(decode_header(&p), Some((7, 1 << 40, 123_456_789)));
        assert_eq!(decode_header(&p[..19]), None);
    }

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let t = run(&[0, 1, 2, 3, 4], 5);
        assert_eq!((t.lost, t.duplicated, t.reordered), (0, 0, 0));
        // 2 missing, 4 twice, 6 before 5, the last one (7) never arrives.
        let t = run(&[0, 1, 3, 4, 4, 6, 5], 8);
        assert_eq!((t.lost, t.duplicated, t.reordered), (2, 1, 1));
        // A reordered message arriving twice: reordered once, then duplicated.
        let t = run(&[1, 0, 0], 2);
        assert_eq!((t.lost, t.duplicated, t.reordered), (0, 1, 1));
        // Nothing arrives.
        assert_eq!(run(&[], 3).lost, 3);
    }

    #[test]
    fn arrivals_behind_the_window_are_stale() {
        let mut seqs = vec![0];
        seqs.push(WINDOW + 5);
        seqs.push(1);
        let t = run(&seqs, WINDOW + 6);
        assert_eq!(t.stale, 1);
        assert_eq!(t.lost, WINDOW + 4);
        // A big gap forgets the whole window; numbers just below `next` are still tracked.
        let t = run(
            &[0, 3 * WINDOW, 3 * WINDOW - 1, 3 * WINDOW - 1],
            3 * WINDOW + 1,
        );
        assert_eq!((t.reordered, t.duplicated), (1, 1));
        assert_eq!(t.lost, 3 * WINDOW - 2);
    }

    #[test]
    fn publishers_are_spread_over_the_connections() {
        let p = |subs, publishers| BroadcastParams {
            pub_target: Target::parse("ws://127.0.0.1:1/pub/x").unwrap(),
            sub_target: Target::parse("ws://127.0.0.1:1/sub/x").unwrap(),
            subs,
            publishers,
            size: 64,
            rate: 1.0,
            duration: Duration::ZERO,
            warmup: Duration::ZERO,
            sources: vec![],
            epoch: Instant::now(),
        };
        for (subs, pubs) in [(1, 1), (1000, 1), (10, 3), (3, 10), (7, 7), (0, 4)] {
            let bp = p(subs, pubs);
            let ids: Vec<u32> = (0..bp.total()).filter_map(|i| bp.publisher_at(i)).collect();
            assert_eq!(ids, (0..pubs as u32).collect::<Vec<_>>(), "{subs} {pubs}");
        }
        let bp = p(1000, 2);
        assert_eq!(bp.publisher_at(0), Some(0));
        assert_eq!(bp.publisher_at(501), Some(1));
    }
}
