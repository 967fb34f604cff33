//! WebSocket sinks (`kind = "websocket"`): every batch is one WebSocket message to an
//! upstream (text when uncompressed, binary when gzip/zstd), delivered at least once.
//!
//! Confirmation. WebSocket has no acknowledgements, but RFC 6455 makes an endpoint answer a
//! ping with a pong, and a peer reads its input in order: when the pong to a ping arrives,
//! the peer's WebSocket endpoint has read every frame written before that ping. So after each
//! round of batches the sink sends a ping carrying the id of the last batch of the round
//! (`wsedge-ack:` + 8 bytes), and a matching pong confirms that batch and every one before
//! it (cumulative, so a peer that answers only the latest of several pings still confirms
//! everything). Only then is a batch counted as delivered and released. No pong within
//! `ack_timeout` means the connection is dead: it is dropped and re-made.
//!
//! What that proves is that the upstream's WebSocket layer read the batch, not that its
//! application stored it; an upstream that acknowledges in its application would need an
//! application-level ack (not implemented). See `docs/design/005-websocket-sink-acks.md`.
//!
//! Unconfirmed batches (the outbox) are kept, in order, and re-sent after every reconnect;
//! each re-send is counted (`redeliveries`, `redelivered_messages`), so the upstream may see a
//! batch twice, never zero times. The outbox is bounded by `max_pending_batches` and
//! `max_pending_bytes`: when it is full the sink stops taking chunks (checked before each
//! chunk, so it is exceeded by at most the batches of one chunk), its channel fills and the
//! ingest clients stop being read. Reconnects back off exponentially with full jitter (the
//! sources' [`crate::config::Backoff`]). At shutdown the sink takes what is left in its
//! channel, seals the last batch and has `flush_timeout` to deliver and confirm everything
//! (reconnecting if needed); what is still unconfirmed then is counted as dropped and logged.

use std::collections::VecDeque;
use std::pin::pin;
use std::time::{Duration, Instant};

use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use tracing::{debug, error, info, warn};

use super::{Batch, Chunk, Phase, SealError, Sealed, SinkStats, bump};
use crate::config::{Compression, SinkConfig, WsSinkConfig};
use crate::proto::{CloseCode, Conn, Event, Limits, MessageKind, Role, State};
use crate::shard::client::{self, Rng, Side, random_16};

/// Prefix of the pings that confirm batches; the id of the last batch follows (big endian).
const ACK_TAG: &[u8] = b"wsedge-ack:";

/// Bytes queued on the connection per round of batches (at least one batch): bounds the copy
/// the protocol core holds next to the outbox.
const ROUND_BYTES: usize = 1 << 20;

/// How long a close handshake (ours at shutdown, or our reply to the upstream's) may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The id a pong of ours confirms, if it is one.
fn parse_ack(p: &[u8]) -> Option<u64> {
    let id = p.strip_prefix(ACK_TAG)?;
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

fn ack_payload(id: u64) -> [u8; 19] {
    let mut p = [0u8; 19];
    p[..ACK_TAG.len()].copy_from_slice(ACK_TAG);
    p[ACK_TAG.len()..].copy_from_slice(&id.to_be_bytes());
    p
}

/// The next chunk from `rx` when there is `room` for it (a future borrowing the channel,
/// not the sink, so the sink can take the chunk while it exists).
fn next_chunk(
    rx: &async_channel::Receiver<Chunk>,
    room: bool,
) -> Fuse<async_channel::Recv<'_, Chunk>> {
    if room {
        rx.recv().fuse()
    } else {
        Fuse::terminated()
    }
}

/// A sealed batch waiting for confirmation.
struct Pending {
    id: u64,
    /// The message payload: framed and compressed.
    data: Vec<u8>,
    messages: u64,
    /// Times written to a connection (more than one: redelivered).
    sends: u32,
}

/// The sink's state across connections.
struct WsSink<'a> {
    cfg: &'a SinkConfig,
    ws: &'a WsSinkConfig,
    rx: &'a async_channel::Receiver<Chunk>,
    stats: &'a SinkStats,
    batch: Batch,
    /// Unconfirmed batches, oldest first; ids increase by one.
    outbox: VecDeque<Pending>,
    outbox_bytes: usize,
    next_id: u64,
    /// Set at shutdown: by then everything must be confirmed.
    deadline: Option<Instant>,
    kind: MessageKind,
}

pub(super) async fn run(
    cfg: &SinkConfig,
    ws: &WsSinkConfig,
    rx: &async_channel::Receiver<Chunk>,
    stats: &SinkStats,
) {
    let mut s = WsSink {
        cfg,
        ws,
        rx,
        stats,
        batch: Batch::new(),
        outbox: VecDeque::new(),
        outbox_bytes: 0,
        next_id: 1,
        deadline: None,
        kind: match cfg.compression {
            Compression::None => MessageKind::Text,
            Compression::Gzip | Compression::Zstd => MessageKind::Binary,
        },
    };
    let protocols: Vec<String> = ws.subprotocol.iter().cloned().collect();
    let mut rng = Rng::new();
    let mut failures: u32 = 0;
    loop {
        stats.set_phase(Phase::Connecting);
        let reason = match s.connect(&protocols).await {
            None => break,
            Some(Ok(up)) => {
                bump(&stats.connects, 1);
                stats.set_phase(Phase::Connected);
                info!(sink = %cfg.name, url = %ws.url, "sink connected");
                let (reason, productive) = Box::pin(s.session(up)).await;
                bump(&stats.disconnects, 1);
                if productive {
                    failures = 0;
                }
                reason
            }
            Some(Err(e)) => {
                bump(&stats.connect_failures, 1);
                format!("upstream {e}")
            }
        };
        stats.set_last_error(reason.clone());
        if s.done() || s.expired(Instant::now()) {
            break;
        }
        failures += 1;
        if ws.backoff.max_attempts.is_some_and(|max| failures >= max) {
            s.give_up(&reason, failures).await;
            return;
        }
        let delay = ws.backoff.delay(failures, rng.next_u64());
        if failures == 1 {
            warn!(sink = %cfg.name, error = %reason, pending = s.outbox.len(),
                  "sink disconnected; reconnecting");
        } else {
            debug!(sink = %cfg.name, error = %reason, failures, ?delay, "sink retry");
        }
        stats.set_phase(Phase::Backoff);
        s.pause(delay).await;
    }
    s.drop_all("shutdown: the upstream did not confirm them within flush_timeout_ms");
}

impl WsSink<'_> {
    /// May another chunk be taken?
    fn room(&self) -> bool {
        self.deadline.is_none()
            && self.outbox.len() < self.ws.max_pending_batches
            && self.outbox_bytes < self.ws.max_pending_bytes
    }

    /// Shutting down and nothing left to deliver.
    fn done(&self) -> bool {
        self.deadline.is_some() && self.outbox.is_empty() && self.batch.messages == 0
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    fn take(&mut self, chunk: Chunk) {
        for m in &chunk.msgs {
            self.batch.push(self.cfg, chunk.json, m);
            if self.batch.full(self.cfg) {
                self.seal();
            }
        }
    }

    fn seal(&mut self) {
        match self.batch.seal(self.cfg) {
            Ok(Some(Sealed { data, messages })) => {
                self.outbox_bytes += data.len();
                self.outbox.push_back(Pending {
                    id: self.next_id,
                    data,
                    messages,
                    sends: 0,
                });
                self.next_id += 1;
                self.update_gauges();
            }
            Ok(None) => {}
            Err(SealError { error, messages }) => {
                error!(sink = %self.cfg.name, %error, "compression failed; batch dropped");
                bump(&self.stats.dropped, messages);
            }
        }
    }

    fn update_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.stats;
        s.pending_batches.store(self.outbox.len() as u64, Relaxed);
        s.pending_bytes.store(self.outbox_bytes as u64, Relaxed);
    }

    fn on_recv(&mut self, r: Result<Chunk, async_channel::RecvError>) {
        match r {
            Ok(chunk) => self.take(chunk),
            // Every sender is gone: the shards have exited.
            Err(_) => self.begin_shutdown(),
        }
    }

    /// Take what is left in the channel (bounded by its capacity), seal the last batch and
    /// start the `flush_timeout` clock.
    fn begin_shutdown(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        self.deadline = Some(Instant::now() + self.ws.flush_timeout);
        while let Ok(chunk) = self.rx.try_recv() {
            self.take(chunk);
        }
        self.seal();
        if !self.outbox.is_empty() {
            info!(sink = %self.cfg.name, pending = self.outbox.len(),
                  "shutdown: delivering pending batches");
        }
    }

    /// Timer work common to every phase: seal a batch that is due; notice the shutdown
    /// while not receiving (the channel closing cannot wake a receive that is not polled).
    fn on_tick(&mut self, now: Instant) {
        if self.batch.due(self.cfg).is_some_and(|t| now >= t) {
            self.seal();
        }
        if self.deadline.is_none() && !self.room() && self.rx.is_closed() {
            self.begin_shutdown();
        }
    }

    /// When [`WsSink::on_tick`] has work next.
    fn wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let blocked = (self.deadline.is_none() && !self.room())
            .then(|| Instant::now() + Duration::from_millis(50));
        [self.batch.due(self.cfg), self.deadline, blocked]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far)
    }

    /// Delivered: release every batch up to `id`. Returns how many.
    fn confirm(&mut self, id: u64) -> usize {
        let mut n = 0;
        while let Some(p) = self.outbox.front().filter(|p| p.id <= id) {
            bump(&self.stats.batches, 1);
            bump(&self.stats.messages, p.messages);
            bump(&self.stats.bytes_written, p.data.len() as u64);
            self.outbox_bytes -= p.data.len();
            self.outbox.pop_front();
            n += 1;
        }
        self.update_gauges();
        n
    }

    /// Count everything held as dropped, with one log line.
    fn drop_all(&mut self, why: &str) {
        self.seal();
        let messages: u64 = self.outbox.iter().map(|p| p.messages).sum();
        if messages > 0 {
            error!(sink = %self.cfg.name, batches = self.outbox.len(), messages,
                   "sink dropped undelivered batches: {why}");
            bump(&self.stats.dropped, messages);
        }
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.update_gauges();
    }

    /// Connect, taking chunks meanwhile. `None` if the shutdown deadline passed (or there
    /// is nothing left to deliver at shutdown).
    async fn connect(
        &mut self,
        protocols: &[String],
    ) -> Option<Result<client::Upstream, client::UpstreamError>> {
        let (ws, rx) = (self.ws, self.rx);
        let mut attempt = pin!(
            client::connect(
                &ws.url,
                &ws.headers,
                None,
                protocols,
                None,
                ws.connect_timeout
            )
            .fuse()
        );
        loop {
            let now = Instant::now();
            self.on_tick(now);
            if self.done() || self.expired(now) {
                return None;
            }
            let wake = self.wake();
            let mut recv = pin!(next_chunk(rx, self.room()));
            let mut timer = pin!(compio::time::sleep_until(wake).fuse());
            select_biased! {
                r = attempt => return Some(r),
                r = recv => self.on_recv(r),
                () = timer => {}
            }
        }
    }

    /// Wait `delay` before the next attempt, taking chunks meanwhile.
    async fn pause(&mut self, delay: Duration) {
        let rx = self.rx;
        let until = Instant::now() + delay;
        loop {
            let now = Instant::now();
            self.on_tick(now);
            if now >= until || self.done() || self.expired(now) {
                return;
            }
            let wake = self.wake().min(until);
            let mut recv = pin!(next_chunk(rx, self.room()));
            let mut timer = pin!(compio::time::sleep_until(wake).fuse());
            select_biased! {
                r = recv => self.on_recv(r),
                () = timer => {}
            }
        }
    }

    /// `reconnect_max_attempts` reached: drop (and count) what is held and everything that
    /// arrives until shutdown, so the ingest clients are not blocked forever.
    async fn give_up(&mut self, reason: &str, failures: u32) {
        self.stats.set_phase(Phase::Failed);
        error!(sink = %self.cfg.name, url = %self.ws.url, error = %reason, failures,
               "sink gave up after reconnect_max_attempts consecutive failures; \
                its messages are dropped from now on (wsedge_sink_dropped_total)");
        self.drop_all("the sink gave up");
        while let Ok(chunk) = self.rx.recv().await {
            bump(&self.stats.dropped, chunk.msgs.len() as u64);
        }
    }

    /// One connection's life: write batches in rounds, each followed by an ack ping; release
    /// them as pongs arrive. Returns why it ended and whether it was productive (confirmed
    /// a batch, or stayed up for `ack_timeout`), which resets the backoff.
    async fn session(&mut self, up: client::Upstream) -> (String, bool) {
        let started = Instant::now();
        let (ws, rx) = (self.ws, self.rx);
        let mut conn = Conn::new(Role::Client, Limits::default());
        conn.set_mask_seed(u64::from_le_bytes(
            random_16()[..8].try_into().unwrap_or([5; 8]),
        ));
        let stream = up.stream;
        let mut side = Side::new(&stream, conn, up.rest);
        // The outbox's first `sent` batches have been written on this connection.
        let mut sent = 0usize;
        // Ack pings in flight: (last batch id they confirm, when sent).
        let mut pings: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut confirmed = false;
        let mut ack_timed_out = false;
        let mut ended: Option<String> = None;
        let mut close_by: Option<Instant> = None;
        // The write in flight carries the newest ack ping: its pong is awaited from when the
        // write completes, so a long write does not count against the peer.
        let mut ping_in_write = false;
        // When the last ack pong came: a peer that answers is alive however much it has
        // still to read, so each pong restarts the clock of the next written ping.
        let mut last_pong = Instant::now();
        loop {
            if side.pending_input {
                side.pending_input = false;
                // Invariant: pending_input is only set while we own the read buffer.
                let buf = side.rbuf.as_mut().expect("read buffer present");
                if let Err(e) = side.conn.handle_input(buf) {
                    ended.get_or_insert(format!("protocol error: {e}"));
                }
                while let Some(ev) = side.conn.poll_event() {
                    match ev {
                        Event::Pong(p) => {
                            if let Some(id) = parse_ack(&p) {
                                last_pong = Instant::now();
                                while pings.front().is_some_and(|(i, _)| *i <= id) {
                                    pings.pop_front();
                                }
                                let n = self.confirm(id);
                                sent = sent.saturating_sub(n);
                                confirmed |= n > 0;
                            }
                        }
                        Event::Close { code, reason } => {
                            ended.get_or_insert(format!(
                                "closed by upstream: {} {}",
                                code.map_or(1005, |c| c.0),
                                String::from_utf8_lossy(&reason)
                            ));
                        }
                        Event::Message { .. } => {
                            debug!(sink = %self.cfg.name, "upstream message ignored");
                        }
                        Event::Ping(_) => {}
                    }
                }
            }
            let now = Instant::now();
            self.on_tick(now);
            if self.expired(now) {
                ended.get_or_insert("shutdown: flush_timeout_ms reached".into());
                break;
            }
            if close_by.is_some_and(|t| now >= t) {
                ended.get_or_insert("close handshake timed out".into());
                break;
            }
            // The oldest written ping's pong is due `ack_timeout` after that ping's write
            // completed, or after the previous pong if that came later: a slow reader that
            // answers each round within ack_timeout keeps its connection, however deep the
            // queue in front of it. The newest ping may still be in the write in flight (at
            // most one write, one ping each). If it is the only one outstanding, its write
            // gets one ack_timeout and its pong another: a peer that stopped reading (zero
            // window) is not waited for forever.
            let written = pings.len() - usize::from(ping_in_write && !pings.is_empty());
            let due = pings.front().map(|(_, t)| {
                let wait = if written > 0 { 1 } else { 2 };
                (*t).max(last_pong) + ws.ack_timeout * wait
            });
            if due.is_some_and(|d| now >= d) {
                ack_timed_out = true;
                ended.get_or_insert(format!(
                    "no pong within ack_timeout_ms ({:?}){}",
                    ws.ack_timeout,
                    if written > 0 {
                        ""
                    } else {
                        ": the round's write did not complete"
                    }
                ));
                // A peer that does not answer pings will not answer a close either.
                break;
            }
            if side.conn.state() != State::Open && close_by.is_none() {
                // Closing (the upstream's close, a protocol error): our reply may sit behind
                // a write that never completes, so the handshake gets a deadline.
                close_by = Some(now + CLOSE_GRACE);
            }
            if side.conn.state() == State::Open {
                if self.done() {
                    let _ = side
                        .conn
                        .close(CloseCode::GOING_AWAY, "wsedge shutting down");
                    close_by = Some(now + CLOSE_GRACE);
                    ended.get_or_insert("shutting down: everything delivered".into());
                } else if side.write.is_terminated() && sent < self.outbox.len() {
                    ping_in_write = self.write_round(&mut side.conn, &mut sent, &mut pings, now);
                }
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
            let finished = side.failed
                || side.eof
                || matches!(side.conn.state(), State::Closed | State::Failed);
            if finished && side.write.is_terminated() {
                break;
            }
            side.start_read(false);
            let wake = [Some(self.wake()), due, close_by]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(|| now + Duration::from_secs(3600));
            let mut recv = pin!(next_chunk(rx, self.room()));
            let mut timer = pin!(compio::time::sleep_until(wake).fuse());
            select_biased! {
                BufResult(res, buf) = &mut side.read => side.on_read(res, buf),
                BufResult(res, o) = &mut side.write => {
                    side.on_write(res, o);
                    if std::mem::take(&mut ping_in_write) {
                        if let Some(p) = pings.back_mut() {
                            p.1 = Instant::now();
                        }
                    }
                }
                r = recv => self.on_recv(r),
                () = timer => {}
            }
        }
        // A session resets the backoff if it confirmed something, or lasted ack_timeout
        // without failing to confirm: one that ended on a missing pong did not work, however
        // long it took to notice (else an upstream that never answers pings would be
        // reconnected to at the initial delay forever, and never given up on).
        let productive = confirmed || (!ack_timed_out && started.elapsed() >= ws.ack_timeout);
        (
            ended.unwrap_or_else(|| "connection ended".into()),
            productive,
        )
    }

    /// Queue the next unsent batches (about [`ROUND_BYTES`], at least one), then the ping
    /// that will confirm them. Returns whether a ping was queued.
    fn write_round(
        &mut self,
        conn: &mut Conn,
        sent: &mut usize,
        pings: &mut VecDeque<(u64, Instant)>,
        now: Instant,
    ) -> bool {
        let mut last = None;
        for p in self.outbox.iter_mut().skip(*sent) {
            if last.is_some() && conn.pending_transmit() >= ROUND_BYTES {
                break;
            }
            if p.sends > 0 {
                bump(&self.stats.redeliveries, 1);
                bump(&self.stats.redelivered_messages, p.messages);
            }
            p.sends += 1;
            // A send fails only once we closed, which this round is never called after.
            let _ = conn.send(self.kind, &p.data);
            *sent += 1;
            last = Some(p.id);
        }
        match last {
            Some(id) => {
                let _ = conn.send_ping(&ack_payload(id));
                pings.push_back((id, now));
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_payloads_round_trip_and_foreign_pongs_are_ignored() {
        for id in [0, 1, 42, u64::MAX] {
            let p = ack_payload(id);
            assert!(p.len() <= 125, "a control frame payload");
            assert_eq!(parse_ack(&p), Some(id));
        }
        assert_eq!(parse_ack(b"wsedge"), None);
        assert_eq!(parse_ack(b"wsedge-ack:123"), None);
        assert_eq!(parse_ack(b""), None);
    }
}
