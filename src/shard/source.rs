//! Sources: wsedge as a client of an upstream WebSocket stream, publishing every valid
//! message it receives into a topic (the broadcast routes fan it out).
//!
//! One task per enabled `[[source]]`, on shard `index mod shards`. The task connects (TCP and
//! upgrade under `connect_timeout`), sends the configured subscribe messages, then reads.
//! Liveness is checked, not assumed: a WebSocket ping every `ping_interval`, an optional
//! application heartbeat, and when nothing (or not the expected heartbeat reply) arrives
//! within `pong_timeout` of one, the connection is dropped and re-made, so a half-open TCP
//! connection never becomes a silent zombie. Reconnects wait with exponential backoff and
//! full jitter; the failure count resets once a connection has delivered a message; after
//! `max_attempts` consecutive failures the source stops in state `failed` (logged at error
//! and visible in `/metrics` and `/stats`). On drain the upstream gets close 1001.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt, LocalBoxFuture};
use futures_util::select_biased;
use tracing::{debug, error, info, warn};

use super::ShardCtx;
use super::client::{self, Rng, Side};
use crate::config::{SourceConfig, SourceFormat};
use crate::metrics::SourceSnapshot;
use crate::proto::{CloseCode, Event, Limits, MessageKind, State};

/// Where a source is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connecting,
    Connected,
    Backoff,
    Failed,
    Stopped,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Backoff => "backoff",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// A source's state and counters, owned by its shard.
pub(crate) struct SourceStats {
    name: String,
    topic: String,
    phase: Cell<Phase>,
    connects: Cell<u64>,
    disconnects: Cell<u64>,
    messages: Cell<u64>,
    bytes: Cell<u64>,
    invalid: Cell<u64>,
    last_error: RefCell<String>,
}

impl SourceStats {
    pub(crate) fn new(cfg: &SourceConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            topic: cfg.topic.clone(),
            phase: Cell::new(Phase::Connecting),
            connects: Cell::new(0),
            disconnects: Cell::new(0),
            messages: Cell::new(0),
            bytes: Cell::new(0),
            invalid: Cell::new(0),
            last_error: RefCell::new(String::new()),
        }
    }

    /// True while a connection to the upstream is up.
    pub(crate) fn connected(&self) -> bool {
        self.phase.get() == Phase::Connected
    }

    pub(crate) fn snapshot(&self) -> SourceSnapshot {
        SourceSnapshot {
            name: self.name.clone(),
            topic: self.topic.clone(),
            state: self.phase.get().label(),
            connects: self.connects.get(),
            disconnects: self.disconnects.get(),
            messages: self.messages.get(),
            bytes: self.bytes.get(),
            invalid: self.invalid.get(),
            last_error: self.last_error.borrow().clone(),
        }
    }
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// How long a session that received messages must have lasted to reset the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(1);

/// Run one source until it fails for good or the shard drains.
pub(crate) async fn run(ctx: Rc<ShardCtx>, cfg: SourceConfig, stats: Rc<SourceStats>) {
    let topic: Arc<str> = Arc::from(cfg.topic.as_str());
    let protocols: Vec<String> = cfg.subprotocol.iter().cloned().collect();
    let mut rng = Rng::new();
    let mut failures: u32 = 0;
    loop {
        stats.phase.set(Phase::Connecting);
        let conn = client::connect(
            &cfg.url,
            &cfg.headers,
            None,
            &protocols,
            cfg.deflate.as_ref(),
            cfg.connect_timeout,
        )
        .await;
        let (reason, productive) = match conn {
            Ok(up) => {
                bump(&stats.connects, 1);
                stats.phase.set(Phase::Connected);
                info!(source = %cfg.name, url = %cfg.url, "source connected");
                let since = Instant::now();
                let (reason, got_messages) =
                    Box::pin(session(&ctx, &cfg, &topic, up, &stats)).await;
                bump(&stats.disconnects, 1);
                // Working means messages *and* staying up: an upstream that sends one (an
                // error, say) and hangs up at once must be backed off and, with
                // reconnect_max_attempts, given up on, not redialled every few ms forever.
                (reason, got_messages && since.elapsed() >= STABLE_SESSION)
            }
            Err(e) => (format!("connect: {e}"), false),
        };
        *stats.last_error.borrow_mut() = reason.clone();
        if ctx.conns.draining() {
            stats.phase.set(Phase::Stopped);
            return;
        }
        if productive {
            failures = 0;
        }
        failures += 1;
        if cfg.backoff.max_attempts.is_some_and(|max| failures >= max) {
            stats.phase.set(Phase::Failed);
            error!(source = %cfg.name, url = %cfg.url, error = %reason, failures,
                   "source gave up after reconnect_max_attempts consecutive failures");
            return;
        }
        let delay = cfg.backoff.delay(failures, rng.next_u64());
        if failures == 1 {
            warn!(source = %cfg.name, error = %reason, "source disconnected; reconnecting");
        } else {
            debug!(source = %cfg.name, error = %reason, failures, ?delay, "source retry");
        }
        stats.phase.set(Phase::Backoff);
        compio::time::sleep(delay).await;
    }
}

/// Is `data` a valid message of `format`?
fn valid(format: SourceFormat, kind: MessageKind, data: &[u8]) -> bool {
    match format {
        SourceFormat::Text => kind == MessageKind::Text,
        SourceFormat::Binary => kind == MessageKind::Binary,
        SourceFormat::Json => crate::schema::is_json(data),
    }
}

/// How long a source connection's close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One connection's life. Returns why it ended and whether it delivered any message.
async fn session(
    ctx: &ShardCtx,
    cfg: &SourceConfig,
    topic: &Arc<str>,
    up: client::Upstream,
    stats: &SourceStats,
) -> (String, bool) {
    let mut conn = up.conn(Limits::default(), &ctx.metrics);
    for m in &cfg.subscribe {
        let _ = conn.send(MessageKind::Text, m.as_bytes());
    }
    let stream = up.stream;
    let mut side = Side::new(&stream, conn, up.rest);
    let registration = ctx.conns.register(0, 0);
    let signal = &*registration.signal;
    let mut productive = false;
    let mut ended: Option<String> = None;
    // Liveness: when a probe (ping, or heartbeat without an expected reply) went out and
    // nothing has arrived since; when a heartbeat went out and its reply has not come.
    let mut probe_since: Option<Instant> = None;
    let mut heartbeat_since: Option<Instant> = None;
    let start = Instant::now();
    let mut next_ping = cfg.ping_interval.map(|p| start + p);
    let mut next_heartbeat = cfg.heartbeat.as_ref().map(|(_, every, _)| start + *every);
    let mut close_deadline: Option<Instant> = None;
    let tick = [
        cfg.ping_interval,
        cfg.heartbeat.as_ref().map(|h| h.1),
        Some(cfg.pong_timeout),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(Duration::from_secs(1))
    .div_f64(4.0)
    .clamp(Duration::from_millis(5), Duration::from_secs(1));
    let mut timer: Fuse<LocalBoxFuture<'_, ()>> = compio::time::sleep(tick).boxed_local().fuse();
    let mut drain_seen = false;

    loop {
        if side.pending_input {
            side.pending_input = false;
            // Invariant: pending_input is only set while we own the read buffer.
            let buf = side.rbuf.as_mut().expect("read buffer present");
            let failed = side.conn.handle_input(buf).err();
            if let Some(e) = &failed {
                ended.get_or_insert(format!("protocol error: {e}"));
            }
            super::driver::note_deflate(ctx, &mut side.conn, failed.as_ref());
            let mut published = false;
            while let Some(ev) = side.conn.poll_event() {
                match ev {
                    Event::Message { kind, data } => {
                        let expected = cfg.heartbeat.as_ref().and_then(|h| h.2.as_deref());
                        if expected.is_some_and(|x| x.as_bytes() == &data[..]) {
                            heartbeat_since = None;
                        } else if valid(cfg.format, kind, &data) {
                            productive = true;
                            bump(&stats.messages, 1);
                            bump(&stats.bytes, data.len() as u64);
                            ctx.publish(topic, kind, &data);
                            published = true;
                        } else {
                            bump(&stats.invalid, 1);
                            debug!(source = %cfg.name, "message does not match the format");
                        }
                    }
                    Event::Close { code, reason } => {
                        ended.get_or_insert(format!(
                            "closed by upstream: {} {}",
                            code.map_or(1005, |c| c.0),
                            String::from_utf8_lossy(&reason)
                        ));
                    }
                    Event::Ping(_) | Event::Pong(_) => {}
                }
            }
            if published {
                ctx.link.flush();
            }
            side.trim_read_buffer();
        }
        side.start_write();
        if side.failed || side.eof {
            ended.get_or_insert_with(|| {
                if side.eof {
                    "connection closed by upstream".into()
                } else {
                    "connection failed".into()
                }
            });
        }
        let finished =
            side.failed || side.eof || matches!(side.conn.state(), State::Closed | State::Failed);
        if finished && side.write.is_terminated() {
            break;
        }
        side.start_read(false);
        // Closing, whoever began it (our drain, the upstream's close, a protocol error): the
        // close handshake gets CLOSE_GRACE, also when our reply cannot be written because the
        // upstream stopped reading; then the connection goes and the source reconnects.
        if side.conn.state() != State::Open && close_deadline.is_none() {
            close_deadline = Some(Instant::now() + CLOSE_GRACE);
        }

        select_biased! {
            BufResult(res, buf) = &mut side.read => {
                if matches!(res, Ok(n) if n > 0) && cfg.heartbeat.as_ref().is_none_or(|h| h.2.is_none()) {
                    heartbeat_since = None;
                }
                if matches!(res, Ok(n) if n > 0) {
                    probe_since = None;
                }
                side.on_read(res, buf);
            }
            BufResult(res, o) = &mut side.write => side.on_write(res, o),
            () = timer => {
                let now = Instant::now();
                timer = compio::time::sleep(tick).boxed_local().fuse();
                if close_deadline.is_some_and(|d| now >= d) {
                    ended.get_or_insert("close handshake timed out".into());
                    break;
                }
                if side.conn.state() == State::Open {
                    if let Some(t) = next_ping.filter(|t| now >= *t) {
                        let _ = side.conn.send_ping(b"wsedge");
                        probe_since.get_or_insert(now);
                        next_ping = cfg.ping_interval.map(|p| t + p);
                    }
                    if let (Some(t), Some((msg, every, expect))) = (next_heartbeat, &cfg.heartbeat) {
                        if now >= t {
                            let _ = side.conn.send(MessageKind::Text, msg.as_bytes());
                            if expect.is_some() {
                                heartbeat_since.get_or_insert(now);
                            } else {
                                probe_since.get_or_insert(now);
                            }
                            next_heartbeat = Some(t + *every);
                        }
                    }
                    let dead = |since: Option<Instant>| {
                        since.is_some_and(|s| now.duration_since(s) > cfg.pong_timeout)
                    };
                    if dead(probe_since) || dead(heartbeat_since) {
                        let what = if dead(heartbeat_since) { "heartbeat reply" } else { "traffic" };
                        ended.get_or_insert(format!(
                            "no {what} within pong_timeout ({:?})",
                            cfg.pong_timeout
                        ));
                        // A dead peer will not answer a close: just drop the connection.
                        break;
                    }
                }
            }
            flags = signal.wait() => {
                if flags & super::signal::DRAIN != 0 && !drain_seen {
                    drain_seen = true;
                    let _ = side.conn.close(CloseCode::GOING_AWAY, "wsedge shutting down");
                    close_deadline = Some(Instant::now() + CLOSE_GRACE);
                    ended.get_or_insert("draining".into());
                }
            }
            complete => break,
        }
    }
    (
        ended.unwrap_or_else(|| "connection ended".into()),
        productive,
    )
}
