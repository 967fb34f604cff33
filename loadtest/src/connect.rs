//! The `connect` scenario: open N connections on a fixed schedule (a ramp at `--rate`
//! connections per second), hold them open answering pings, then close them; measure the
//! connect + upgrade latency of each (from its *scheduled* start, so a server that stalls
//! accepts shows up as latency) and count failures by cause.
//!
//! With `--churn R`, during the hold R connections per second (over all of them) are closed
//! with the close handshake and opened again at once: each connection cycles every
//! `conns / R` seconds, phases spread evenly, and every re-connection's handshake is measured
//! like the first (from when it started).

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use compio::BufResult;
use wsedge::proto::{CloseCode, Event};

use crate::client::{self, Target, WsClient};
use crate::stats::{Live, WorkerStats};

/// Parameters of one connect run.
#[derive(Clone, Debug)]
pub struct ConnectParams {
    /// Target endpoint.
    pub target: Target,
    /// Connections to open in total.
    pub conns: usize,
    /// Connections opened per second (all workers together).
    pub rate: f64,
    /// How long every connection stays open after the ramp ends.
    pub hold: Duration,
    /// Connections closed and re-opened per second during the hold (`None` = no churn).
    pub churn: Option<f64>,
    /// Source addresses to spread connections over.
    pub sources: Vec<IpAddr>,
}

impl ConnectParams {
    /// Length of the ramp.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.conns as f64 / self.rate)
    }
}

/// Open connections `first..first + n` of the global schedule starting at `start`.
pub fn worker(
    params: Arc<ConnectParams>,
    first: usize,
    n: usize,
    live: Arc<Live>,
    start: Instant,
) -> WorkerStats {
    let (rt, _) = wsedge::shard::thread_runtime().expect("runtime builds");
    rt.block_on(async move {
        let stats = Rc::new(RefCell::new(WorkerStats::new()));
        let ramp_end = start + params.ramp();
        let end = ramp_end + params.hold;
        // With churn, each connection is re-opened every `period`, at its own phase.
        let period = params
            .churn
            .map(|r| Duration::from_secs_f64(params.conns as f64 / r));
        let tasks: Vec<_> = (first..first + n)
            .map(|i| {
                let (params, live, stats) = (params.clone(), live.clone(), stats.clone());
                compio::runtime::spawn(async move {
                    let mut at = start + Duration::from_secs_f64(i as f64 / params.rate);
                    let mut next_cycle =
                        period.map(|p| ramp_end + p.mul_f64(i as f64 / params.conns as f64));
                    let mut cycle = 0u64;
                    compio::time::sleep_until(at).await;
                    loop {
                        let src = (!params.sources.is_empty())
                            .then(|| params.sources[i % params.sources.len()]);
                        let seed = client::splitmix((i as u64 ^ 0xC0FFEE) + (cycle << 32));
                        let c = match client::connect(&params.target, src, seed).await {
                            Ok(c) => c,
                            Err(e) => {
                                Live::add(&live.errors, 1);
                                stats.borrow_mut().error(e.label());
                                break;
                            }
                        };
                        let now = Instant::now();
                        let second = now.saturating_duration_since(start).as_secs() as usize;
                        {
                            let mut s = stats.borrow_mut();
                            s.connected += 1;
                            s.churned += u64::from(cycle > 0);
                            s.record(second, now.saturating_duration_since(at), &live);
                        }
                        Live::add(&live.connections, 1);
                        Live::add(&live.messages, 1);
                        // Hold until this connection's next churn turn, or the end.
                        let until = next_cycle.filter(|t| *t < end).unwrap_or(end);
                        let held = hold(c, until).await;
                        live.connections
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        if let Err(label) = held {
                            Live::add(&live.errors, 1);
                            stats.borrow_mut().error(label);
                            break;
                        }
                        if until >= end {
                            break;
                        }
                        // Re-open at once; its handshake is timed from now.
                        cycle += 1;
                        at = Instant::now();
                        next_cycle = next_cycle.zip(period).map(|(t, p)| t + p);
                    }
                })
            })
            .collect();
        crate::stats::collect(tasks, stats).await
    })
}

/// Keep a connection open until `end`, answering pings; then close it with 1000.
async fn hold(mut c: WsClient, end: Instant) -> Result<(), String> {
    let stream = c.stream.clone();
    let mut out = Vec::new();
    loop {
        let mut buf = std::mem::take(&mut c.rbuf);
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        match compio::time::timeout_at(end, stream.read(buf)).await {
            // The hold is over: close politely (best effort).
            Err(_elapsed) => break,
            Ok(BufResult(Ok(0), _)) => return Err("closed by server while held".into()),
            Ok(BufResult(Err(e), _)) => {
                return Err(format!("read while held: {}", client::io_kind(&e)));
            }
            Ok(BufResult(Ok(_), b)) => {
                c.rbuf = b;
                c.conn
                    .handle_input(&mut c.rbuf)
                    .map_err(|e| format!("protocol error: {e}"))?;
                while let Some(ev) = c.conn.poll_event() {
                    if let Event::Close { code, .. } = ev {
                        return Err(format!(
                            "closed by server: {}",
                            code.map_or("no code".to_string(), |c| c.0.to_string())
                        ));
                    }
                }
                // Pongs for the server's keepalive pings were queued by the protocol core.
                if c.conn.pending_transmit() > 0 {
                    c.conn.poll_transmit(&mut out);
                    let BufResult(r, o) = stream.write_all(std::mem::take(&mut out)).await;
                    r.map_err(|e| format!("write while held: {}", client::io_kind(&e)))?;
                    out = o;
                    out.clear();
                }
            }
        }
    }
    let _ = c.conn.close(CloseCode::NORMAL, "");
    c.conn.poll_transmit(&mut out);
    let _ = compio::time::timeout(Duration::from_secs(1), stream.write_all(out)).await;
    // Wait (briefly) for the server's close and FIN, so the connection ends with the close
    // handshake instead of a reset.
    let _ = compio::time::timeout(Duration::from_secs(1), async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            let BufResult(res, b) = stream.read(buf).await;
            buf = b;
            buf.clear();
            if !matches!(res, Ok(n) if n > 0) {
                break;
            }
        }
    })
    .await;
    Ok(())
}
