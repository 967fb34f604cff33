//! The `echo` scenario: N connections send binary messages of a fixed size to an echo
//! endpoint and time each round trip.
//!
//! Closed loop (default): each connection keeps `--inflight` messages outstanding and sends
//! the next when an echo arrives (uWebSockets' load_test model). Open loop (`--rate`): each
//! connection sends on a fixed schedule whatever the server does, and latency is measured from
//! the *scheduled* send time, so a stalled server shows up as latency instead of being hidden
//! by a client that politely waited (coordinated omission).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use wsedge::proto::{CloseCode, Event, MessageKind};

use crate::client::{self, Target, WsClient};
use crate::end::End;
use crate::stats::{Live, WorkerStats};

/// How long the final write (what is still queued, and the close frame) may take.
const CLOSE_WRITE: Duration = Duration::from_millis(500);

/// Parameters of one echo run.
#[derive(Clone, Debug)]
pub struct EchoParams {
    /// Target endpoint.
    pub target: Target,
    /// Total connections.
    pub conns: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Closed loop: messages outstanding per connection.
    pub inflight: usize,
    /// Open loop: total messages per second (None = closed loop).
    pub rate: Option<f64>,
    /// Measured window.
    pub duration: Duration,
    /// Excluded warm-up before the window.
    pub warmup: Duration,
    /// Source addresses to spread connections over (empty = let the kernel choose).
    pub sources: Vec<IpAddr>,
}

/// When the measured window starts and ends; set once every connection is up.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Start of the measured window (after warm-up).
    pub measure_start: Instant,
    /// End of the run.
    pub end: Instant,
    /// Start of the warm-up.
    pub start: Instant,
}

/// Run one worker: connect its share of connections, report, wait for the start signal,
/// drive them until the end, return what it measured.
pub fn worker(
    params: Arc<EchoParams>,
    first_conn: usize,
    n_conns: usize,
    live: Arc<Live>,
    connected: std::sync::mpsc::Sender<()>,
    timing: Arc<OnceLock<Timing>>,
) -> WorkerStats {
    let (rt, _) = wsedge::shard::thread_runtime().expect("runtime builds");
    rt.block_on(async move {
        let stats = Rc::new(RefCell::new(WorkerStats::new()));
        let mut clients = Vec::with_capacity(n_conns);
        let range = first_conn..first_conn + n_conns;
        for (i, r) in
            client::connect_batched(range, &params.sources, 0x5EED, |_| &params.target).await
        {
            match r {
                Ok(c) => {
                    Live::add(&live.connections, 1);
                    stats.borrow_mut().connected += 1;
                    clients.push((i, c));
                }
                Err(e) => {
                    Live::add(&live.errors, 1);
                    stats.borrow_mut().error(e.label());
                }
            }
        }
        let (timing, end, ender) = crate::end::start(&connected, &timing, Duration::ZERO).await;
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|(i, c)| {
                let (params, live, stats) = (params.clone(), live.clone(), stats.clone());
                let end = end.clone();
                compio::runtime::spawn(async move {
                    let schedule = params.rate.map(|rate| {
                        let interval = Duration::from_secs_f64(params.conns as f64 / rate);
                        // Stagger connections evenly over one interval.
                        (interval, interval.mul_f64(i as f64 / params.conns as f64))
                    });
                    let r = drive(c, &params, &timing, &end, schedule, &stats, &live).await;
                    live.connections
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(label) = r {
                        Live::add(&live.errors, 1);
                        stats.borrow_mut().error(label);
                    }
                })
            })
            .collect();
        let stats = crate::stats::collect(tasks, stats).await;
        ender.detach();
        stats
    })
}

/// Record a completed message if it falls in the measured window.
fn complete(stats: &RefCell<WorkerStats>, live: &Live, t: &Timing, now: Instant, sent: Instant) {
    Live::add(&live.messages, 1);
    if now >= t.measure_start && now < t.end {
        let second = (now - t.measure_start).as_secs() as usize;
        stats
            .borrow_mut()
            .record(second, now.saturating_duration_since(sent), live);
    }
}

/// The payload of message `seq`: `size` bytes, the first 8 (if there is room) the sequence
/// number, so that each echo is matched to its send.
fn fill(payload: &mut [u8], seq: u64) {
    if let Some(head) = payload.get_mut(..8) {
        head.copy_from_slice(&seq.to_le_bytes());
    }
}

/// Why an echo does not answer the oldest outstanding message, or `None` if it does.
fn mismatch(kind: MessageKind, data: &[u8], size: usize, seq: u64) -> Option<&'static str> {
    if kind != MessageKind::Binary {
        Some("unexpected reply: not binary")
    } else if data.len() != size {
        Some("unexpected reply: wrong length")
    } else if data.get(..8).is_some_and(|h| h != seq.to_le_bytes()) {
        Some("unexpected reply: out of sequence (an echo was lost or reordered)")
    } else {
        None
    }
}

/// Handle received bytes; returns the number of messages completed. `sent` holds the send
/// (or scheduled) times of the outstanding messages, oldest first, the oldest being number
/// `*answered`.
fn on_input(
    c: &mut WsClient,
    sent: &mut VecDeque<Instant>,
    answered: &mut u64,
    size: usize,
    stats: &RefCell<WorkerStats>,
    live: &Live,
    t: &Timing,
) -> Result<usize, String> {
    c.conn
        .handle_input(&mut c.rbuf)
        .map_err(|e| format!("protocol error: {e}"))?;
    let now = Instant::now();
    let mut n = 0;
    while let Some(ev) = c.conn.poll_event() {
        match ev {
            Event::Message { kind, data } => {
                let s = sent
                    .pop_front()
                    .ok_or("unexpected message (more echoes than sends)")?;
                if let Some(why) = mismatch(kind, &data, size, *answered) {
                    return Err(why.into());
                }
                *answered += 1;
                complete(stats, live, t, now, s);
                n += 1;
            }
            Event::Close { code, .. } => {
                return Err(format!(
                    "closed by server: {}",
                    code.map_or("no code".to_string(), |c| c.0.to_string())
                ));
            }
            Event::Ping(_) | Event::Pong(_) => {}
        }
    }
    Ok(n)
}

/// Drive one connection until the end of the run. Reads, writes and the send schedule run
/// concurrently, so a server that pushes back (stops reading while its replies are not
/// read) can never deadlock the client: replies are always being read.
///
/// `schedule` = `None`: closed loop (keep `inflight` messages outstanding);
/// `Some((interval, offset))`: open loop, one message every `interval` starting at
/// `start + offset`, latency measured from the scheduled time.
async fn drive(
    mut c: WsClient,
    p: &EchoParams,
    t: &Timing,
    end: &End,
    schedule: Option<(Duration, Duration)>,
    stats: &RefCell<WorkerStats>,
    live: &Live,
) -> Result<(), String> {
    let mut payload = vec![0xA5u8; p.size];
    let mut sent = VecDeque::new();
    // Messages sent and answered so far (the next send's and the next echo's numbers).
    let (mut seq, mut answered) = (0u64, 0u64);
    let mut out = Some(Vec::new());
    let mut next = schedule.map(|(_, offset)| t.start + offset);
    let stream = c.stream.clone();
    let read_fut = pin!(Fuse::terminated());
    let write_fut = pin!(Fuse::terminated());
    let timer = pin!(Fuse::terminated());
    let (mut read_fut, mut write_fut, mut timer) = (read_fut, write_fut, timer);
    // Created once: it registers this connection's waker with the worker's end signal.
    let mut end_wait = pin!(end.wait());
    if let Some(n) = next {
        timer.set(compio::time::sleep_until(n).fuse());
    }
    loop {
        let now = Instant::now();
        if now >= t.end {
            break;
        }
        if schedule.is_none() {
            while sent.len() < p.inflight {
                fill(&mut payload, seq);
                c.conn
                    .send(MessageKind::Binary, &payload)
                    .map_err(|e| e.to_string())?;
                seq += 1;
                sent.push_back(now);
            }
        }
        if write_fut.is_terminated() && c.conn.pending_transmit() > 0 {
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = out.take().expect("out buffer present");
            c.conn.poll_transmit(&mut o);
            write_fut.set(stream.write_all(o).fuse());
        }
        if read_fut.is_terminated() {
            let mut b = std::mem::take(&mut c.rbuf);
            if b.capacity() - b.len() < 4096 {
                b.reserve(64 * 1024);
            }
            read_fut.set(stream.read(b).fuse());
        }
        select_biased! {
            BufResult(r, b) = read_fut => {
                c.rbuf = b;
                match r {
                    Ok(0) => return Err("connection closed by server".into()),
                    Err(e) => return Err(format!("read: {}", client::io_kind(&e))),
                    Ok(_) => {
                        on_input(&mut c, &mut sent, &mut answered, p.size, stats, live, t)?;
                    }
                }
            }
            BufResult(r, mut o) = write_fut => {
                r.map_err(|e| format!("write: {}", client::io_kind(&e)))?;
                o.clear();
                out = Some(o);
            }
            () = timer => {
                if let (Some((interval, _)), Some(n)) = (schedule, next.as_mut()) {
                    // Queue everything that is due; latency counts from the scheduled time.
                    let now = Instant::now();
                    while *n <= now {
                        if sent.len() >= crate::stats::MAX_OUTSTANDING
                            || c.conn.pending_transmit() >= crate::stats::MAX_QUEUED_BYTES
                        {
                            stats.borrow_mut().skipped_sends += 1;
                            *n += interval;
                            continue;
                        }
                        if now - *n > Duration::from_millis(1) {
                            stats.borrow_mut().late_sends += 1;
                        }
                        fill(&mut payload, seq);
                        c.conn.send(MessageKind::Binary, &payload).map_err(|e| e.to_string())?;
                        seq += 1;
                        sent.push_back(*n);
                        *n += interval;
                    }
                }
                if let Some(n) = next {
                    timer.set(compio::time::sleep_until(n).fuse());
                }
            }
            () = end_wait => break,
        }
    }
    // What is still unanswered has a latency of at least its age at the end: record that
    // lower bound, so that a server that stopped answering shows as latency instead of
    // vanishing from the results.
    if let Some(&oldest) = sent.front() {
        let last_second = (t.end - t.measure_start).as_secs_f64().ceil() as usize;
        let mut st = stats.borrow_mut();
        for &s in &sent {
            st.record_n(
                last_second.saturating_sub(1),
                0,
                t.end.saturating_duration_since(s),
                live,
            );
        }
        st.unanswered += sent.len() as u64;
        st.oldest_unanswered = st
            .oldest_unanswered
            .max(t.end.saturating_duration_since(oldest));
    }
    // A write still in flight is dropped with the connection; the close is best effort, and
    // bounded: behind it may be megabytes a server that stopped reading will never take.
    if write_fut.is_terminated() {
        let mut o = out.take().unwrap_or_default();
        let _ = c.conn.close(CloseCode::NORMAL, "");
        c.conn.poll_transmit(&mut o);
        let _ = compio::time::timeout(CLOSE_WRITE, stream.write_all(o)).await;
    }
    Ok(())
}
