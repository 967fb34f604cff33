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
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use compio::BufResult;
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::TcpStream;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use wsedge::proto::{CloseCode, Event, MessageKind};

use crate::client::{self, Target, WsClient};
use crate::stats::{Live, WorkerStats};

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
    let rt = compio::runtime::Runtime::new().expect("runtime builds");
    rt.block_on(async move {
        let stats = Rc::new(RefCell::new(WorkerStats::new()));
        let mut clients = Vec::with_capacity(n_conns);
        // Connect in small batches so a large run does not overflow the server's backlog.
        for chunk in (first_conn..first_conn + n_conns)
            .collect::<Vec<_>>()
            .chunks(64)
        {
            let futs = chunk.iter().map(|&i| {
                let src =
                    (!params.sources.is_empty()).then(|| params.sources[i % params.sources.len()]);
                let target = params.target.clone();
                async move {
                    (
                        i,
                        client::connect(&target, src, client::splitmix(i as u64 ^ 0x5EED)).await,
                    )
                }
            });
            for (i, r) in futures_util::future::join_all(futs).await {
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
        }
        let _ = connected.send(());
        while timing.get().is_none() {
            compio::time::sleep(Duration::from_millis(1)).await;
        }
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|(i, c)| {
                let (params, live, stats) = (params.clone(), live.clone(), stats.clone());
                let timing = timing.clone();
                compio::runtime::spawn(async move {
                    // Invariant: the loop above waited until the timing was set.
                    let timing = timing.get().expect("timing set");
                    let r = match params.rate {
                        None => closed_loop(c, &params, timing, &stats, &live).await,
                        Some(rate) => {
                            let interval = Duration::from_secs_f64(params.conns as f64 / rate);
                            // Stagger connections evenly over one interval.
                            let offset = interval.mul_f64(i as f64 / params.conns as f64);
                            open_loop(c, &params, timing, interval, offset, &stats, &live).await
                        }
                    };
                    live.connections
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(label) = r {
                        Live::add(&live.errors, 1);
                        stats.borrow_mut().error(label);
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        Rc::try_unwrap(stats)
            .ok()
            .expect("all tasks finished")
            .into_inner()
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

/// Handle received bytes; returns the number of messages completed.
fn on_input(
    c: &mut WsClient,
    sent: &mut VecDeque<Instant>,
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
            Event::Message { .. } => {
                let s = sent
                    .pop_front()
                    .ok_or("unexpected message (more echoes than sends)")?;
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

async fn flush(c: &mut WsClient, out: &mut Vec<u8>) -> Result<(), String> {
    if c.conn.pending_transmit() == 0 {
        return Ok(());
    }
    c.conn.poll_transmit(out);
    let mut s = &c.stream;
    let BufResult(r, mut o) = s.write_all(std::mem::take(out)).await;
    o.clear();
    *out = o;
    r.map_err(|e| format!("write: {}", client::io_kind(&e)))
}

async fn read_more(c: &mut WsClient) -> Result<(), String> {
    if c.rbuf.capacity() - c.rbuf.len() < 4096 {
        c.rbuf.reserve(64 * 1024);
    }
    let mut s = &c.stream;
    let BufResult(r, b) = s.append(std::mem::take(&mut c.rbuf)).await;
    c.rbuf = b;
    match r {
        Ok(0) => Err("connection closed by server".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {}", client::io_kind(&e))),
    }
}

async fn goodbye(c: &mut WsClient, out: &mut Vec<u8>) {
    let _ = c.conn.close(CloseCode::NORMAL, "");
    let _ = flush(c, out).await;
}

async fn closed_loop(
    mut c: WsClient,
    p: &EchoParams,
    t: &Timing,
    stats: &RefCell<WorkerStats>,
    live: &Live,
) -> Result<(), String> {
    let payload = vec![0xA5u8; p.size];
    let mut sent = VecDeque::with_capacity(p.inflight);
    let mut out = Vec::new();
    while Instant::now() < t.end {
        let now = Instant::now();
        while sent.len() < p.inflight {
            c.conn
                .send(MessageKind::Binary, &payload)
                .map_err(|e| e.to_string())?;
            sent.push_back(now);
        }
        flush(&mut c, &mut out).await?;
        loop {
            if on_input(&mut c, &mut sent, stats, live, t)? > 0 {
                break;
            }
            read_more(&mut c).await?;
        }
    }
    goodbye(&mut c, &mut out).await;
    Ok(())
}

fn read_op(s: &TcpStream, buf: BytesMut) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
    let mut s = s;
    async move { s.append(buf).await }
}

async fn open_loop(
    mut c: WsClient,
    p: &EchoParams,
    t: &Timing,
    interval: Duration,
    offset: Duration,
    stats: &RefCell<WorkerStats>,
    live: &Live,
) -> Result<(), String> {
    let payload = vec![0xA5u8; p.size];
    let mut sent = VecDeque::new();
    let mut out = Vec::new();
    let mut next = t.start + offset;
    let stream = c.stream.clone();
    let read_fut = pin!(Fuse::terminated());
    let timer = pin!(Fuse::terminated());
    let (mut read_fut, mut timer) = (read_fut, timer);
    timer.set(compio::time::sleep_until(next).fuse());
    while Instant::now() < t.end {
        if read_fut.is_terminated() {
            let mut b = std::mem::take(&mut c.rbuf);
            if b.capacity() - b.len() < 4096 {
                b.reserve(64 * 1024);
            }
            read_fut.set(read_op(&stream, b).fuse());
        }
        select_biased! {
            BufResult(r, b) = read_fut => {
                c.rbuf = b;
                match r {
                    Ok(0) => return Err("connection closed by server".into()),
                    Err(e) => return Err(format!("read: {}", client::io_kind(&e))),
                    Ok(_) => { on_input(&mut c, &mut sent, stats, live, t)?; }
                }
            }
            () = timer => {
                // Send everything that is due; latency counts from the scheduled time.
                let now = Instant::now();
                while next <= now {
                    if now - next > Duration::from_millis(1) {
                        stats.borrow_mut().late_sends += 1;
                    }
                    c.conn.send(MessageKind::Binary, &payload).map_err(|e| e.to_string())?;
                    sent.push_back(next);
                    next += interval;
                }
                flush(&mut c, &mut out).await?;
                timer.set(compio::time::sleep_until(next).fuse());
            }
        }
    }
    goodbye(&mut c, &mut out).await;
    Ok(())
}
