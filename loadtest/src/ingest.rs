//! The `ingest` scenario: N connections send JSON text messages to an ingest endpoint and
//! measure the server's backpressure as the client sees it.
//!
//! This module owns the message format ([`write_message`]), the per-connection send loop
//! (closed or open loop), the end-of-run close handshake and the worker that runs a share of
//! the connections. Options, the progress line, the `/metrics` comparison and the report live
//! in `main.rs`; histograms and the timeline in `stats.rs`.
//!
//! A message counts as **sent** when the write that carries it has completed: the kernel took
//! all of its bytes (they are in the socket's send buffer; the server may not have read them
//! yet). Closed loop (default): a connection writes one message and the next when that write
//! has completed, so it sends as fast as the server reads. Open loop (`--rate`): a connection
//! queues each message at its scheduled time whatever the server does, and writes everything
//! queued whenever no write is in flight.
//!
//! Backpressure shows in two measures. *Write latency*: from the start of a write to its
//! completion; a server that stops reading fills the socket buffers and the write waits (one
//! that took more than [`BLOCKED`] counts as blocked). *Lag* (open loop): from a message's
//! scheduled time to the completion of the write that carried it. At the end of the measured
//! window the write in flight and every message not yet sent are recorded with their wait so
//! far (a lower bound), so a server that stopped reading for good shows too.
//!
//! At the end every connection sends what is queued and closes with 1000, then reads until
//! the server's close: wsedge answers a close only after handing every message read before
//! it to the sink, so once every close is answered the server's counters are final.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use hdrhistogram::Histogram;
use wsedge::proto::{CloseCode, Event, MessageKind, State};

use crate::client::{self, Target, WsClient};
use crate::echo::Timing;
use crate::end::End;
use crate::stats::{Live, MAX_OUTSTANDING, MAX_QUEUED_BYTES, WorkerStats, new_hist};

/// A write that took longer than this to complete counts as blocked: on an unloaded socket a
/// write completes in microseconds, so it waited for the server to read.
pub const BLOCKED: Duration = Duration::from_millis(1);

/// Open loop: a message sent more than this after its scheduled time counts as late.
pub const LATE: Duration = Duration::from_millis(1);

/// After the end of the run, how long a connection may take to finish its write, send its
/// close and receive the server's.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Parameters of one ingest run.
#[derive(Clone, Debug)]
pub struct IngestParams {
    /// Target endpoint.
    pub target: Target,
    /// Total connections.
    pub conns: usize,
    /// Bytes each message is padded to.
    pub size: usize,
    /// Open loop: total messages per second (None = closed loop).
    pub rate: Option<f64>,
    /// Every K-th message of each connection is invalid JSON.
    pub invalid_every: Option<u64>,
    /// Telemetry-like messages with varied values (realistic compression) instead of padding.
    pub telemetry: bool,
    /// Measured window.
    pub duration: Duration,
    /// Excluded warm-up before the window.
    pub warmup: Duration,
    /// Source addresses to spread connections over (empty = let the kernel choose).
    pub sources: Vec<IpAddr>,
}

/// Write message `seq` of connection `conn` into `buf`: the JSON object
/// `{"conn":C,"seq":S,"pad":"xx…"}`, padded to `size` bytes (longer when the fields alone
/// are); if `invalid`, the same bytes with the closing `}` replaced by `,` (not JSON, still
/// UTF-8 text).
pub fn write_message(buf: &mut Vec<u8>, conn: usize, seq: u64, size: usize, invalid: bool) {
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "{{\"conn\":{conn},\"seq\":{seq},\"pad\":\"");
    let pad = size.saturating_sub(buf.len() + 2);
    buf.resize(buf.len() + pad, b'x');
    buf.extend_from_slice(if invalid { b"\"," } else { b"\"}" });
}

/// Write message `seq` of connection `conn` as a telemetry reading of about 200 bytes whose
/// values vary like real ones (a device id, a timestamp, readings with decimals, a status,
/// a position), so that a sink's compression ratio means something; `invalid` as in
/// [`write_message`].
pub fn write_telemetry(buf: &mut Vec<u8>, conn: usize, seq: u64, invalid: bool) {
    let r = crate::client::splitmix((conn as u64) << 40 ^ seq);
    let f = |shift: u32, m: u64| (r >> shift) % m;
    const STATUS: [&str; 4] = ["ok", "ok", "degraded", "charging"];
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(
        buf,
        "{{\"conn\":{conn},\"seq\":{seq},\"device\":\"sensor-{:05}\",\
         \"ts\":\"2026-12-01T{:02}:{:02}:{:02}.{:03}Z\",\"temp\":{}.{:02},\"humidity\":{}.{},\
         \"pressure\":{}.{},\"battery\":{},\"status\":\"{}\",\
         \"loc\":{{\"lat\":52.{:05},\"lon\":13.{:05}}}",
        (conn * 7919 + 13) % 100_000,
        f(0, 24),
        f(5, 60),
        f(11, 60),
        f(17, 1000),
        f(27, 35),
        f(33, 100),
        f(40, 100),
        f(47, 10),
        980 + f(50, 60),
        f(56, 10),
        f(3, 101),
        STATUS[f(60, 4) as usize],
        f(8, 100_000),
        f(23, 100_000),
    );
    buf.extend_from_slice(if invalid { b"," } else { b"}" });
}

/// Is message `seq` (from 0) of a connection one of the deliberately invalid ones: the K-th,
/// 2K-th, ... message?
pub fn is_invalid(seq: u64, every: Option<u64>) -> bool {
    every.is_some_and(|k| k > 0 && (seq + 1) % k == 0)
}

/// Counters the progress line reads besides [`Live`]'s (single writer per worker each).
#[derive(Default)]
pub struct IngestLive {
    /// Payload bytes sent so far, warm-up included.
    pub bytes: AtomicU64,
    /// Blocked writes in the measured window so far.
    pub blocked: AtomicU64,
    /// Late messages in the measured window so far (open loop).
    pub late: AtomicU64,
}

/// Counts of a run, summed over connections (see docs/loadtest.md for each).
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// Messages sent (the write carrying them completed), over the whole run.
    pub sent: u64,
    /// Payload bytes of those.
    pub sent_bytes: u64,
    /// Of `sent`, the deliberately invalid ones.
    pub invalid_sent: u64,
    /// Messages queued but not sent when the connection ended.
    pub unsent: u64,
    /// Payload bytes sent in the measured window.
    pub measured_bytes: u64,
    /// Writes in the write latency: completed in the measured window, or in flight at its end.
    pub writes: u64,
    /// Of those, the ones that took longer than [`BLOCKED`].
    pub blocked_writes: u64,
    /// Time the blocked writes took, in total, ns.
    pub blocked_ns: u64,
    /// Close frames received from the server, by code (`none` for an empty close).
    pub close_codes: BTreeMap<String, u64>,
    /// Connections that ended with the close handshake: both close frames exchanged.
    pub closes_completed: u64,
    /// Payload bytes sent per second of the measured window.
    pub bytes_timeline: Vec<u64>,
}

impl Tally {
    /// Fold `o` into `self`.
    pub fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.sent_bytes += o.sent_bytes;
        self.invalid_sent += o.invalid_sent;
        self.unsent += o.unsent;
        self.measured_bytes += o.measured_bytes;
        self.writes += o.writes;
        self.blocked_writes += o.blocked_writes;
        self.blocked_ns += o.blocked_ns;
        for (k, v) in &o.close_codes {
            *self.close_codes.entry(k.clone()).or_default() += v;
        }
        self.closes_completed += o.closes_completed;
        if self.bytes_timeline.len() < o.bytes_timeline.len() {
            self.bytes_timeline.resize(o.bytes_timeline.len(), 0);
        }
        for (i, b) in o.bytes_timeline.iter().enumerate() {
            self.bytes_timeline[i] += b;
        }
    }
}

/// What one worker measured.
pub struct IngestStats {
    /// Write latency (histogram and timeline: messages sent and the p99 of the writes per
    /// second), errors, connections, late and skipped sends.
    pub stats: WorkerStats,
    /// Counts.
    pub tally: Tally,
    /// Open loop: lag of each message, ns.
    pub lag: Histogram<u64>,
}

impl IngestStats {
    /// Empty stats.
    pub fn new() -> Self {
        Self {
            stats: WorkerStats::new(),
            tally: Tally::default(),
            lag: new_hist(),
        }
    }

    /// Fold `o` into `self`.
    pub fn merge(&mut self, o: IngestStats) {
        self.stats.merge(o.stats);
        self.tally.merge(&o.tally);
        // Invariant: all histograms share the same bounds, so add cannot fail.
        self.lag.add(&o.lag).expect("same bounds");
    }

    /// Record one write of the measured window: `messages` messages of `bytes` payload
    /// bytes, which took `took`.
    fn record_write(
        &mut self,
        second: usize,
        messages: u64,
        bytes: u64,
        took: Duration,
        live: &Live,
        il: &IngestLive,
    ) {
        self.stats.record_n(second, messages, took, live);
        let t = &mut self.tally;
        t.writes += 1;
        if took > BLOCKED {
            t.blocked_writes += 1;
            t.blocked_ns += took.as_nanos() as u64;
            Live::add(&il.blocked, 1);
        }
        t.measured_bytes += bytes;
        if t.bytes_timeline.len() <= second {
            t.bytes_timeline.resize(second + 1, 0);
        }
        t.bytes_timeline[second] += bytes;
    }

    /// Record the lag of one message of the measured window.
    fn record_lag(&mut self, lag: Duration, il: &IngestLive) {
        let ns = crate::stats::capped_ns(lag, &mut self.stats.capped);
        // Invariant: ns is clamped into the histogram's bounds.
        self.lag.record(ns).expect("in bounds");
        if lag > LATE {
            self.stats.late_sends += 1;
            Live::add(&il.late, 1);
        }
    }
}

/// Second of the measured window that `now` falls in; the end itself counts in the last.
fn second_of(t: &Timing, now: Instant) -> usize {
    let last = ((t.end - t.measure_start).as_secs_f64().ceil() as usize).saturating_sub(1);
    (now.saturating_duration_since(t.measure_start).as_secs() as usize).min(last)
}

/// What every connection of a worker shares: the run's parameters and timing, the worker's
/// stats and the live counters.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    p: &'a IngestParams,
    t: &'a Timing,
    stats: &'a RefCell<IngestStats>,
    live: &'a Live,
    il: &'a IngestLive,
}

/// Run one worker: connect its share of connections, report, wait for the start signal,
/// drive them until the end and through the close handshake, return what it measured.
pub fn worker(
    params: Arc<IngestParams>,
    first_conn: usize,
    n_conns: usize,
    live: Arc<Live>,
    il: Arc<IngestLive>,
    connected: std::sync::mpsc::Sender<()>,
    timing: Arc<OnceLock<Timing>>,
) -> IngestStats {
    // A worker without a runtime cannot run: its panic ends the run with "a worker died while
    // connecting" (as in the echo scenario).
    let (rt, _) = wsedge::shard::thread_runtime().expect("runtime builds");
    rt.block_on(async move {
        let stats = Rc::new(RefCell::new(IngestStats::new()));
        let mut clients = Vec::with_capacity(n_conns);
        let range = first_conn..first_conn + n_conns;
        let salt = 0x1A6E_5700;
        for (i, r) in
            client::connect_batched(range, &params.sources, salt, |_| &params.target).await
        {
            match r {
                Ok(c) => {
                    Live::add(&live.connections, 1);
                    stats.borrow_mut().stats.connected += 1;
                    clients.push((i, c));
                }
                Err(e) => {
                    Live::add(&live.errors, 1);
                    stats.borrow_mut().stats.error(e.label());
                }
            }
        }
        let (timing, end, ender) = crate::end::start(&connected, &timing, Duration::ZERO).await;
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|(i, c)| {
                let (params, live, il, stats) =
                    (params.clone(), live.clone(), il.clone(), stats.clone());
                let end = end.clone();
                compio::runtime::spawn(async move {
                    let cx = Ctx {
                        p: &params,
                        t: &timing,
                        stats: &stats,
                        live: &live,
                        il: &il,
                    };
                    drive(c, i, cx, &end).await;
                    live.connections
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                })
            })
            .collect();
        for t in tasks {
            // A task that panicked has nothing more to record.
            let _ = t.await;
        }
        ender.detach();
        // Invariant: every clone of `stats` lived in a task that has now finished.
        Rc::try_unwrap(stats)
            .ok()
            .expect("all tasks finished")
            .into_inner()
    })
}

/// Make room in a connection's read buffer.
fn read_buffer(c: &mut WsClient) -> BytesMut {
    let mut b = std::mem::take(&mut c.rbuf);
    let want = c.conn.bytes_needed().max(4096);
    if b.capacity() - b.len() < want {
        b.reserve(want);
    }
    b
}

/// The error label of a close frame from the server, e.g. `closed by server: 1007 not a
/// JSON value`.
fn close_label(code: Option<CloseCode>, reason: &Bytes) -> String {
    let reason = String::from_utf8_lossy(reason);
    match code {
        None => "closed by server: no code".into(),
        Some(c) if reason.is_empty() => format!("closed by server: {}", c.0),
        Some(c) => format!("closed by server: {} {reason}", c.0),
    }
}

/// A message in the connection's transmit queue, not yet sent.
struct Queued {
    /// Its scheduled time (open loop) or when it was queued (closed loop).
    at: Instant,
    /// Payload bytes.
    len: usize,
    /// Deliberately invalid.
    invalid: bool,
}

/// One connection's messages: numbering, the transmit queue, and the accounting of each
/// write.
struct Outbox<'a> {
    id: usize,
    cx: Ctx<'a>,
    /// Next sequence number.
    seq: u64,
    /// Messages queued in the protocol core, oldest first; the first `in_write` of them are
    /// in the write in flight.
    queued: VecDeque<Queued>,
    in_write: usize,
    /// When the write in flight started.
    write_started: Instant,
    /// The message being built.
    msg: Vec<u8>,
}

impl Outbox<'_> {
    /// Queue the next message, scheduled (or queued) at `at`.
    fn queue(&mut self, c: &mut WsClient, at: Instant) -> Result<(), String> {
        let p = self.cx.p;
        let invalid = is_invalid(self.seq, p.invalid_every);
        if p.telemetry {
            write_telemetry(&mut self.msg, self.id, self.seq, invalid);
        } else {
            write_message(&mut self.msg, self.id, self.seq, p.size, invalid);
        }
        c.conn
            .send(MessageKind::Text, &self.msg)
            .map_err(|e| e.to_string())?;
        self.seq += 1;
        self.queued.push_back(Queued {
            at,
            len: self.msg.len(),
            invalid,
        });
        Ok(())
    }

    /// A write of everything queued starts now.
    fn start_write(&mut self, now: Instant) {
        self.in_write = self.queued.len();
        self.write_started = now;
    }

    /// The write in flight completed at `now`: its messages are sent. In the measured
    /// window, the write's latency and the messages' lag are recorded.
    fn written(&mut self, now: Instant) {
        let Ctx { p, t, live, il, .. } = self.cx;
        let window = now >= t.measure_start && now < t.end;
        let open_loop = p.rate.is_some();
        let mut guard = self.cx.stats.borrow_mut();
        let s = &mut *guard;
        let (mut n, mut bytes) = (0u64, 0u64);
        for q in self.queued.drain(..self.in_write) {
            n += 1;
            bytes += q.len as u64;
            s.tally.invalid_sent += u64::from(q.invalid);
            if window && open_loop {
                s.record_lag(now.saturating_duration_since(q.at), il);
            }
        }
        self.in_write = 0;
        s.tally.sent += n;
        s.tally.sent_bytes += bytes;
        Live::add(&live.messages, n);
        Live::add(&il.bytes, bytes);
        if window {
            let took = now.saturating_duration_since(self.write_started);
            s.record_write(second_of(t, now), n, bytes, took, live, il);
        }
    }

    /// The measured window ends at `now`: record the write in flight (if `writing`) and the
    /// lag of every message not yet sent with their waits so far. Their completion, after the
    /// window, is not recorded again.
    fn window_end(&self, now: Instant, writing: bool) {
        let Ctx { p, t, live, il, .. } = self.cx;
        let mut s = self.cx.stats.borrow_mut();
        if writing {
            let took = now.saturating_duration_since(self.write_started);
            s.record_write(second_of(t, now), 0, 0, took, live, il);
        }
        if p.rate.is_some() {
            for q in &self.queued {
                s.record_lag(now.saturating_duration_since(q.at), il);
            }
        }
    }
}

/// How the sending part of a connection ended.
enum Ended {
    /// The run's end: send what is queued, close with 1000, wait for the server's close.
    Run,
    /// The server closed first: send our reply, read until its FIN.
    ServerClosed,
    /// The connection failed: only let the write in flight finish.
    Broken,
}

/// Drive one connection until the end of the run, then through the close handshake. Reads,
/// writes and the send schedule run concurrently: pings are answered and a close from the
/// server is seen while a write waits. Errors are counted in `stats`.
async fn drive(mut c: WsClient, id: usize, cx: Ctx<'_>, end: &End) {
    let Ctx {
        p, t, stats, live, ..
    } = cx;
    let fail = |label: String| {
        Live::add(&live.errors, 1);
        stats.borrow_mut().stats.error(label);
    };
    let mut ob = Outbox {
        id,
        cx,
        seq: 0,
        queued: VecDeque::new(),
        in_write: 0,
        write_started: Instant::now(),
        msg: Vec::with_capacity(p.size + 64),
    };
    // Open loop: one message every `interval`, connections staggered evenly over one.
    let schedule = p.rate.map(|rate| {
        let interval = Duration::from_secs_f64(p.conns as f64 / rate);
        (interval, interval.mul_f64(id as f64 / p.conns as f64))
    });
    let mut next = schedule.map(|(_, offset)| t.start + offset);
    let mut out = Some(Vec::new());
    let stream = c.stream.clone();
    let read_fut = pin!(Fuse::terminated());
    let write_fut = pin!(Fuse::terminated());
    let timer = pin!(Fuse::terminated());
    let (mut read_fut, mut write_fut, mut timer) = (read_fut, write_fut, timer);
    // Created once: it registers this connection's waker with the worker's end signal.
    let mut end_wait = pin!(end.wait());
    if let Some(n) = next.filter(|&n| n < t.end) {
        timer.set(compio::time::sleep_until(n).fuse());
    }
    let ended = loop {
        if schedule.is_none() && write_fut.is_terminated() && ob.queued.is_empty() {
            // Closed loop: the next message once the previous write has completed.
            if let Err(e) = ob.queue(&mut c, Instant::now()) {
                fail(e);
                break Ended::Broken;
            }
        }
        if write_fut.is_terminated() && c.conn.pending_transmit() > 0 {
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = out.take().expect("out buffer present");
            c.conn.poll_transmit(&mut o);
            ob.start_write(Instant::now());
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
                    Ok(0) => {
                        fail("connection closed by server without a close frame".into());
                        break Ended::Broken;
                    }
                    Err(e) => {
                        fail(format!("read: {}", client::io_kind(&e)));
                        break Ended::Broken;
                    }
                    Ok(_) => match on_input(&mut c, stats) {
                        Err(e) => {
                            fail(e);
                            break Ended::Broken;
                        }
                        Ok(Some(label)) => {
                            fail(label);
                            break Ended::ServerClosed;
                        }
                        Ok(None) => {}
                    },
                }
            }
            BufResult(r, mut o) = write_fut => {
                if let Err(e) = r {
                    fail(format!("write: {}", client::io_kind(&e)));
                    break Ended::Broken;
                }
                ob.written(Instant::now());
                o.clear();
                out = Some(o);
            }
            () = timer => {
                if let (Some((interval, _)), Some(n)) = (schedule, next.as_mut()) {
                    // Queue everything that is due; lag counts from the scheduled time.
                    let now = Instant::now();
                    let mut queue_failed = None;
                    while *n <= now && *n < t.end {
                        if ob.queued.len() >= MAX_OUTSTANDING
                            || c.conn.pending_transmit() >= MAX_QUEUED_BYTES
                        {
                            // The server is not reading: skip rather than queue without bound.
                            stats.borrow_mut().stats.skipped_sends += 1;
                        } else if let Err(e) = ob.queue(&mut c, *n) {
                            queue_failed = Some(e);
                            break;
                        }
                        *n += interval;
                    }
                    if let Some(e) = queue_failed {
                        fail(e);
                        break Ended::Broken;
                    }
                    if *n < t.end {
                        timer.set(compio::time::sleep_until(*n).fuse());
                    }
                }
            }
            () = end_wait => {
                ob.window_end(Instant::now(), !write_fut.is_terminated());
                break Ended::Run;
            }
        }
    };

    // The close handshake, bounded by one deadline.
    let deadline = Instant::now() + CLOSE_WAIT;
    let finished: Result<(), String> = async {
        if matches!(ended, Ended::Broken) {
            // The write in flight still counts if it completes; its failure is not another
            // error of this connection.
            if !write_fut.is_terminated() {
                if let Ok(BufResult(Ok(()), _)) =
                    compio::time::timeout_at(deadline, write_fut.as_mut()).await
                {
                    ob.written(Instant::now());
                }
            }
            return Ok(());
        }
        if !write_fut.is_terminated() {
            let BufResult(r, o) = compio::time::timeout_at(deadline, write_fut.as_mut())
                .await
                .map_err(|_| {
                    format!(
                        "end: a write did not complete within {} s (the server stopped \
                         reading)",
                        CLOSE_WAIT.as_secs()
                    )
                })?;
            r.map_err(|e| format!("write: {}", client::io_kind(&e)))?;
            ob.written(Instant::now());
            out = Some(o);
        }
        if c.conn.state() == State::Open {
            let _ = c.conn.close(CloseCode::NORMAL, "");
        }
        if c.conn.pending_transmit() > 0 {
            let mut o = out.take().unwrap_or_default();
            o.clear();
            c.conn.poll_transmit(&mut o);
            ob.start_write(Instant::now());
            let BufResult(r, _) = compio::time::timeout_at(deadline, stream.write_all(o))
                .await
                .map_err(|_| {
                    format!(
                        "end: the last write and the close did not complete within {} s \
                         (the server stopped reading)",
                        CLOSE_WAIT.as_secs()
                    )
                })?;
            r.map_err(|e| format!("write: {}", client::io_kind(&e)))?;
            ob.written(Instant::now());
        }
        // Read until the server's close (ours was the first) and then its FIN.
        let mut got_close = matches!(ended, Ended::ServerClosed);
        loop {
            if read_fut.is_terminated() {
                let b = read_buffer(&mut c);
                read_fut.set(stream.read(b).fuse());
            }
            let Ok(BufResult(r, b)) = compio::time::timeout_at(deadline, read_fut.as_mut()).await
            else {
                if got_close {
                    // The close handshake is complete; the FIN is only late.
                    break;
                }
                return Err(format!(
                    "end: no close from the server within {} s",
                    CLOSE_WAIT.as_secs()
                ));
            };
            c.rbuf = b;
            match r {
                Ok(n) if n > 0 => {}
                _ if got_close => break,
                Ok(_) => return Err("end: connection closed without the server's close".into()),
                Err(e) => return Err(format!("end: read: {}", client::io_kind(&e))),
            }
            match on_input(&mut c, stats) {
                Ok(Some(_)) => got_close = true,
                Ok(None) => {}
                Err(_) if got_close => break,
                Err(e) => return Err(e),
            }
        }
        stats.borrow_mut().tally.closes_completed += 1;
        Ok(())
    }
    .await;
    if let Err(e) = finished {
        fail(e);
    }
    stats.borrow_mut().tally.unsent += ob.queued.len() as u64;
}

/// Decode what was read: a close from the server is counted by code and returned as an
/// error label (`Ok(Some)`); messages from the server are ignored; pongs for its pings are
/// queued by the protocol core.
fn on_input(c: &mut WsClient, stats: &RefCell<IngestStats>) -> Result<Option<String>, String> {
    c.conn
        .handle_input(&mut c.rbuf)
        .map_err(|e| format!("protocol error: {e}"))?;
    let mut closed = None;
    while let Some(ev) = c.conn.poll_event() {
        if let Event::Close { code, reason } = ev {
            let key = code.map_or("none".to_string(), |c| c.0.to_string());
            *stats.borrow_mut().tally.close_codes.entry(key).or_default() += 1;
            closed = Some(close_label(code, &reason));
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_messages_are_varied_json_of_about_200_bytes() {
        let mut seen = std::collections::HashSet::new();
        let mut b = Vec::new();
        for seq in 0..50 {
            write_telemetry(&mut b, 7, seq, false);
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["seq"], seq);
            assert!((170..=230).contains(&b.len()), "{}", b.len());
            seen.insert(v["temp"].to_string());
        }
        assert!(seen.len() > 20, "values vary");
        write_telemetry(&mut b, 7, 1, true);
        assert!(serde_json::from_slice::<serde_json::Value>(&b).is_err());
    }

    #[test]
    fn messages_are_padded_json_and_invalid_ones_are_not_json() {
        let mut b = Vec::new();
        write_message(&mut b, 3, 41, 100, false);
        assert_eq!(b.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!((v["conn"].as_u64(), v["seq"].as_u64()), (Some(3), Some(41)));
        write_message(&mut b, 3, 41, 100, true);
        assert_eq!(b.len(), 100);
        assert!(serde_json::from_slice::<serde_json::Value>(&b).is_err());
        assert!(std::str::from_utf8(&b).is_ok());
        // Smaller than the fields: not truncated.
        write_message(&mut b, 123, 456_789, 4, false);
        assert_eq!(b, br#"{"conn":123,"seq":456789,"pad":""}"#);
    }

    #[test]
    fn every_kth_message_is_invalid() {
        let bad: Vec<u64> = (0..10).filter(|&s| is_invalid(s, Some(3))).collect();
        assert_eq!(bad, [2, 5, 8]);
        assert!((0..10).all(|s| is_invalid(s, Some(1))));
        assert!(!(0..10).any(|s| is_invalid(s, None)));
    }
}
