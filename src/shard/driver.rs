//! The connection driver: one task per connection, on the shard that accepted it.
//!
//! Phase 1, handshake: read the HTTP upgrade request under `handshake_timeout`, match a route,
//! reserve a slot under `max_connections`, answer 101 (or 4xx/503 and close).
//!
//! Phase 2, WebSocket: a single select loop over at most one read, one write, the connection's
//! shard signal (drain, keepalive; see [`super::signal`]) and, only while closing, one timer.
//! Bytes read go to the sans-IO [`Conn`]; its events go to the route logic; its queued output
//! is written in one `write_all` per batch, so everything produced by one read (many echoes,
//! pongs) leaves in one submission. While a write is in flight and more than
//! `max_pending_write_bytes` are queued, no new read is started: a client that does not read
//! its replies stops being read from (TCP backpressure) instead of growing our memory.
//!
//! Memory while idle: the read buffer starts at [`MIN_READ`] bytes, grows while reads fill it
//! (and to the frame size once a large frame's header is known), shrinks when reads come back
//! small, and is released once drained if it is much larger than the current read size; so an
//! idle connection holds one small buffer plus the task state.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt, LocalBoxFuture};
use futures_util::select_biased;
use tracing::debug;

use super::stream::{Stream, accept_tls};
use super::{ListenerShared, ShardCtx, proxy, signal};
use crate::config::{ListenerConfig, Route, RouteKind};
use crate::fanout::{self, SubscriberDeflate, Subscription};
use crate::metrics::HandshakeFailure;
use crate::proto::handshake::{
    self, HandshakeLimits, UpgradeRequest, write_error_response, write_response_101,
};
use crate::proto::{
    CloseCode, Conn, DeflateParams, Event, HandshakeError, MessageKind, ProtoError, Role,
    SendError, State, deflate,
};
use crate::ratelimit::MessageLimiter;

/// Smallest read submitted; also the read buffer of a connection that has gone quiet. Small
/// because an idle connection holds exactly one of these in its pending read.
const MIN_READ: usize = 128;
/// Largest read submitted for streams of small frames.
const MAX_READ: usize = 64 * 1024;

/// The size of the next read on one connection: doubles while reads fill it (a stream of
/// large messages is read in one receive each, not in pieces), halves when reads come back
/// under a quarter of it (a connection that went quiet returns to a small buffer). Never
/// below the bytes the protocol core already knows it needs (the rest of a large frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadSize(usize);

impl Default for ReadSize {
    /// The idle size, [`MIN_READ`].
    fn default() -> Self {
        Self::new(MIN_READ)
    }
}

impl ReadSize {
    /// Starting at `initial`, within [`MIN_READ`]..=[`MAX_READ`].
    pub(crate) fn new(initial: usize) -> Self {
        Self(initial.clamp(MIN_READ, MAX_READ))
    }

    /// The current read size.
    #[cfg(test)]
    fn get(self) -> usize {
        self.0
    }

    /// Bytes to have free in the read buffer for the next read, given what the protocol
    /// core still `needed` for the frame it is in.
    pub(crate) fn want(self, needed: usize) -> usize {
        needed.max(self.0)
    }

    /// Adapt to a read that returned `n` bytes.
    pub(crate) fn observe(&mut self, n: usize) {
        if n >= self.0 && self.0 < MAX_READ {
            self.0 *= 2;
        } else if n < self.0 / 4 && self.0 > MIN_READ {
            self.0 /= 2;
        }
    }

    /// Release `buf` if it is drained and much larger than the current read size, so a
    /// connection that goes quiet after a burst (or after its handshake) does not keep the
    /// larger buffer; the next read allocates what it wants.
    pub(crate) fn trim(self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 2 * self.0 {
            *buf = BytesMut::new();
        }
    }
}

/// An output buffer is kept for reuse after a write unless it is larger than both this and
/// four times what that write carried (a burst's buffer is not kept by a quiet connection).
const KEEP_BUFFER: usize = 16 * 1024;
/// How long an error response or a final close frame may take to be read by the peer.
const LINGER: Duration = Duration::from_secs(1);
/// A subscriber's write takes queued frames up to this many bytes (latency stays bounded: one
/// write never carries more than this, and the next batch is taken when it completes)...
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// ...and at most this many frames (iovecs; the kernel's IOV_MAX is 1024).
const MAX_BATCH_FRAMES: usize = 512;
/// Echoed payloads of at least this size go out by reference (a vectored write of header
/// and payload) instead of being copied into the output buffer; below it the copy is
/// cheaper than the extra iovec and holding on to the read buffer.
pub(crate) const SHARE_MIN: usize = 4096;

/// Queue a received message (echoed or relayed) on `conn`, the cheapest way its hop allows:
/// compressed with the shard's compressor if `conn` negotiated permessage-deflate; large
/// payloads on plain TCP by reference ([`SHARE_MIN`]; TLS copies into records anyway, so
/// sharing gains nothing there); otherwise copied into the output buffer.
pub(crate) fn send_on(
    ctx: &ShardCtx,
    conn: &mut Conn,
    stream: &Stream,
    kind: MessageKind,
    data: Bytes,
) -> Result<(), SendError> {
    if conn.deflate_enabled() {
        let mut z = ctx.deflater.borrow_mut();
        conn.send_compressed(kind, &data, &mut z).map(drop)
    } else if data.len() >= SHARE_MIN && stream.tls().is_none() {
        conn.send_shared(kind, data)
    } else {
        conn.send(kind, &data)
    }
}

/// Drive one accepted connection to its end.
///
/// Memory: this future is the connection task's allocation for the whole life of the
/// connection, so it is sized for the WebSocket phase only. The handshake phase (~1.5 KB of
/// state: request parsing, timeout, response write) runs in its own box, freed before the
/// WebSocket loop starts. A plain `async move` block rather than an `async fn`, because an
/// `async fn` keeps its arguments twice in its state (as captured upvars and as locals).
#[allow(clippy::manual_async_fn)] // deliberate: see the memory note above
pub(crate) fn serve(
    live: LiveGuard,
    listener_idx: usize,
    stream: Stream,
    seq: u64,
) -> impl Future<Output = ()> + 'static {
    async move {
        // (`ctx` and `shared` are re-derived after each await so that no copy of them is kept
        // in the task state.)
        let ctx = &*live.0;
        // Latency over throughput for small frames; batching is done by the write path itself.
        let _ = stream.tcp().set_nodelay(true);
        let hs = boxed_handshake(ctx, listener_idx, &stream, seq);
        let Some(Accepted {
            route,
            target,
            rest,
            deflate,
            _ip_slot,
        }) = hs.await
        else {
            return;
        };
        let ctx = &*live.0;
        ctx.metrics.on_open();
        let shared = &ctx.listeners[listener_idx];
        let code = match target {
            Target::Upstream(up) => {
                // Boxed, and built in a plain function: a future constructed in this async
                // block would take its size in the task state of every connection.
                boxed_relay(
                    ctx,
                    shared,
                    &shared.cfg.routes[route],
                    &stream,
                    rest,
                    up,
                    deflate,
                )
                .await
            }
            Target::Ingest(meta) => {
                let r = &shared.cfg.routes[route];
                boxed_ingest(ctx, shared, &stream, rest, r, meta, deflate).await
            }
            Target::Topic(topic) => {
                // Built in a plain function that takes `deflate` by value: a local borrowed
                // in this async block is kept in the task state until its scope ends.
                let (fan, conn) = topic_conn(ctx, listener_idx, route, topic, deflate);
                let route = &shared.cfg.routes[route];
                websocket(ctx, shared, &stream, Some(rest), route, fan, seq, conn).await
            }
        };
        let ctx = &*live.0;
        ctx.listeners[listener_idx]
            .open
            .fetch_sub(1, Ordering::Relaxed);
        ctx.metrics.on_close(code);
        // The peer address is logged with `conn` at open (not kept: 32 bytes of task state).
        debug!(shard = ctx.id, conn = seq, code, "connection closed");
    }
}

/// The handshake future, on the heap: built in a plain function so that it never takes room
/// in the connection task's state.
fn boxed_handshake<'a>(
    ctx: &'a ShardCtx,
    listener_idx: usize,
    stream: &'a Stream,
    seq: u64,
) -> LocalBoxFuture<'a, Option<Accepted>> {
    Box::pin(async move {
        let r = handshake(ctx, listener_idx, stream).await;
        if r.is_some() && tracing::enabled!(tracing::Level::DEBUG) {
            let peer = stream.peer_addr().ok();
            let tls = stream.tls();
            let sni = tls.and_then(|t| t.server_name());
            let client = tls
                .and_then(|t| t.peer_identity.as_ref())
                .map(|i| i.display_name().to_string());
            debug!(
                shard = ctx.id,
                conn = seq,
                ?peer,
                tls = tls.is_some(),
                ?sni,
                ?client,
                "connection open"
            );
        }
        r
    })
}

/// The ingest loop, on the heap (see `boxed_relay`).
fn boxed_ingest<'a>(
    ctx: &'a ShardCtx,
    shared: &'a ListenerShared,
    stream: &'a Stream,
    rest: BytesMut,
    route: &'a Route,
    meta: Option<Box<str>>,
    deflate: Option<DeflateParams>,
) -> LocalBoxFuture<'a, u16> {
    Box::pin(async move {
        let conn = server_conn(ctx, &shared.cfg, deflate.as_ref());
        super::ingest::serve(ctx, shared, stream, rest, route, meta, conn).await
    })
}

/// The proxy relay future, on the heap (see its call site).
fn boxed_relay<'a>(
    ctx: &'a ShardCtx,
    shared: &'a ListenerShared,
    route: &'a Route,
    stream: &'a Stream,
    rest: BytesMut,
    up: super::client::Upstream,
    deflate: Option<DeflateParams>,
) -> LocalBoxFuture<'a, u16> {
    let conn = server_conn(ctx, &shared.cfg, deflate.as_ref());
    Box::pin(proxy::relay(ctx, shared, route, stream, rest, up, conn))
}

/// A topic or echo route's topic state (if it has a topic) and protocol core.
fn topic_conn<'a>(
    ctx: &'a ShardCtx,
    listener: usize,
    route: usize,
    topic: Option<Arc<str>>,
    deflate: Option<DeflateParams>,
) -> (Option<Box<Fan<'a>>>, Conn) {
    let fan = topic.map(|t| Fan::new(ctx, listener, route, t, deflate.as_ref()));
    let conn = server_conn(ctx, &ctx.listeners[listener].cfg, deflate.as_ref());
    (fan, conn)
}

/// The protocol core of an accepted connection, with permessage-deflate if it was
/// negotiated.
pub(crate) fn server_conn(
    ctx: &ShardCtx,
    cfg: &ListenerConfig,
    deflate: Option<&DeflateParams>,
) -> Conn {
    let mut conn = Conn::new(Role::Server, cfg.limits.clone());
    if let (Some(p), Some(d)) = (deflate, cfg.deflate.as_ref()) {
        conn.set_deflate(p, d.threshold_bytes);
        ctx.metrics.on_deflate_negotiated();
    }
    conn
}

/// Count what a connection's protocol core compressed and inflated since the last call, and
/// a decompression bomb among its errors.
pub(crate) fn note_deflate(ctx: &ShardCtx, conn: &mut Conn, error: Option<&ProtoError>) {
    if let Some(s) = conn.take_deflate_stats() {
        ctx.metrics.on_deflate(&s);
    }
    if error == Some(&ProtoError::InflatedTooLarge) {
        ctx.metrics.on_inflate_bomb();
    }
}

/// Counts a connection task in the shard's live-task count (for the drain) from its creation
/// until it ends (or is dropped).
pub(crate) struct LiveGuard(Rc<ShardCtx>);

impl LiveGuard {
    pub(crate) fn new(ctx: Rc<ShardCtx>) -> Self {
        ctx.live.set(ctx.live.get() + 1);
        Self(ctx)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.set(self.0.live.get() - 1);
    }
}

enum ReadRequestError {
    Io,
    Http(HandshakeError),
}

async fn read_request(
    stream: &Stream,
    limits: &HandshakeLimits,
) -> Result<(UpgradeRequest, BytesMut), ReadRequestError> {
    let mut buf = BytesMut::with_capacity(1024);
    let s = stream;
    loop {
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        let BufResult(res, b) = s.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return Err(ReadRequestError::Io),
            Ok(_) => {}
        }
        match handshake::parse_request(&buf, limits) {
            Ok(None) => {}
            Ok(Some((req, consumed))) => {
                let _ = buf.split_to(consumed);
                return Ok((req, buf));
            }
            Err(e) => return Err(ReadRequestError::Http(e)),
        }
    }
}

/// The bearer token of a request: `Authorization: Bearer <t>`, else `?access_token=<t>`.
fn presented_token(req: &UpgradeRequest) -> Option<&[u8]> {
    let header = req
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .and_then(|(_, v)| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().as_bytes())
        });
    header.or_else(|| {
        let query = req.path.split_once('?')?.1;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("access_token="))
            .map(str::as_bytes)
    })
}

/// Verify a JWT for a route (and its topic, on topic routes). The error is the metric
/// reason; the client only learns 401 or 403.
fn check_jwt(
    jwt: &crate::config::JwtAuth,
    token: Option<&[u8]>,
    topic: &str,
) -> Result<(), HandshakeFailure> {
    use jsonwebtoken::errors::ErrorKind;
    let token = token.ok_or(HandshakeFailure::AuthMissing)?;
    let token = std::str::from_utf8(token).map_err(|_| HandshakeFailure::AuthInvalid)?;
    let mut v = jsonwebtoken::Validation::new(jwt.algorithm);
    v.leeway = 5;
    v.validate_nbf = true;
    // jsonwebtoken checks `aud` and `iss` only when the token carries them; a route that
    // names them must also require them, or a token that leaves them out would pass.
    let mut required = vec!["exp"];
    match &jwt.audience {
        Some(a) => {
            v.set_audience(&[a]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(i) = &jwt.issuer {
        v.set_issuer(&[i]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    let data =
        jsonwebtoken::decode::<serde_json::Value>(token, &jwt.key, &v).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => HandshakeFailure::JwtExpired,
                ErrorKind::ImmatureSignature => HandshakeFailure::JwtNotYetValid,
                ErrorKind::InvalidAudience
                | ErrorKind::InvalidIssuer
                | ErrorKind::MissingRequiredClaim(_) => HandshakeFailure::JwtClaims,
                _ => HandshakeFailure::AuthInvalid,
            }
        })?;
    if let (Some(claim), false) = (&jwt.topics_claim, topic.is_empty()) {
        let allowed = data.claims[claim.as_str()]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t == "*" || t == topic));
        if !allowed {
            return Err(HandshakeFailure::TopicForbidden);
        }
    }
    Ok(())
}

/// Equality that takes the same time wherever the inputs differ (lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A completed handshake.
pub(crate) struct Accepted {
    route: usize,
    target: Target,
    /// Bytes the client sent after its request.
    rest: BytesMut,
    /// permessage-deflate parameters, if negotiated.
    deflate: Option<DeflateParams>,
    /// Held for the life of the connection when `max_connections_per_ip` is set.
    _ip_slot: Option<Box<IpSlot>>,
}

/// One connection counted against its IP's `max_connections_per_ip`, until dropped.
pub(crate) struct IpSlot {
    shared: Arc<ListenerShared>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(shared: &Arc<ListenerShared>, ip: std::net::IpAddr, cap: usize) -> Option<Self> {
        // A poisoned lock only means another shard panicked mid-update; the map is still a
        // valid map of counts.
        let mut map = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Where an accepted WebSocket goes after its handshake.
enum Target {
    /// Served here: echo (no topic) or a topic route.
    Topic(Option<Arc<str>>),
    /// Relayed to a connected upstream (proxy routes).
    Upstream(super::client::Upstream),
    /// Validated and handed to a sink (ingest routes), with the connection's metadata
    /// object if the route asks for one.
    Ingest(Option<Box<str>>),
}

/// Phase 1. On success the connection holds a `max_connections` slot; returned are the index
/// of its route, where it goes, and any bytes the client sent after the request.
async fn handshake(ctx: &ShardCtx, listener_idx: usize, stream: &Stream) -> Option<Accepted> {
    let shared = &ctx.listeners[listener_idx];
    let cfg = &shared.cfg;
    let limits = HandshakeLimits {
        max_request_bytes: cfg.max_handshake_bytes,
        max_headers: 64,
    };
    let mut out = Vec::new();
    // Accept rate: refused before the request is read, so a flood costs as little as possible.
    let admitted = ctx.accept_buckets[listener_idx]
        .borrow_mut()
        .as_mut()
        .is_none_or(|bucket| bucket.take(1.0, Instant::now()));
    // The TLS configuration in use now (a reload swaps it for later handshakes).
    let tls = ctx.tls[listener_idx].borrow().clone();
    if !admitted {
        ctx.metrics
            .on_handshake_failure(HandshakeFailure::AcceptRate);
        if tls.is_some() {
            // No response is possible without paying for the TLS handshake first: close.
            return None;
        }
        write_error_response(
            503,
            "too many new connections",
            &[("Retry-After", "1")],
            &mut out,
        );
        respond_and_close(stream, out).await;
        return None;
    }
    // One deadline for the TLS handshake and the upgrade request together.
    let deadline = Instant::now() + cfg.handshake_timeout;
    if let Some(config) = tls {
        // Boxed: the TLS handshake's state (a rustls connection) is large, and would
        // otherwise be part of every connection's handshake box, TLS or not.
        let tls_accept = Box::pin(accept_tls(stream.tcp(), &config));
        match compio::time::timeout(cfg.handshake_timeout, tls_accept).await {
            Err(_elapsed) => {
                ctx.metrics.on_handshake_failure(HandshakeFailure::Timeout);
                return None;
            }
            Ok(Err(e)) => {
                debug!(shard = ctx.id, error = %e, "TLS handshake failed");
                ctx.metrics.on_handshake_failure(HandshakeFailure::Tls);
                return None;
            }
            Ok(Ok(t)) => stream.set_tls(t),
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let (req, rest) = match compio::time::timeout(left, read_request(stream, &limits)).await {
        Err(_elapsed) => {
            ctx.metrics.on_handshake_failure(HandshakeFailure::Timeout);
            return None;
        }
        Ok(Err(ReadRequestError::Io)) => {
            ctx.metrics.on_handshake_failure(HandshakeFailure::Io);
            return None;
        }
        Ok(Err(ReadRequestError::Http(e))) => {
            ctx.metrics
                .on_handshake_failure(HandshakeFailure::from_status(e.status()));
            e.write_response(&mut out);
            respond_and_close(stream, out).await;
            return None;
        }
        Ok(Ok(v)) => v,
    };
    let path = req.path.split('?').next().unwrap_or_default();
    let found = cfg
        .routes
        .iter()
        .enumerate()
        .find_map(|(i, r)| Some((i, r, r.matches(path)?)));
    let Some((route_idx, route, topic)) = found else {
        ctx.metrics.on_handshake_failure(HandshakeFailure::NoRoute);
        write_error_response(404, "no WebSocket route for this path", &[], &mut out);
        respond_and_close(stream, out).await;
        return None;
    };
    if !route.client_cert_names.is_empty() {
        let identity = stream.tls().and_then(|t| t.peer_identity.as_ref());
        let failure = match identity {
            None => Some(HandshakeFailure::ClientCertMissing),
            Some(id) if !id.is_any_of(&route.client_cert_names) => {
                Some(HandshakeFailure::ClientCertForbidden)
            }
            Some(_) => None,
        };
        if let Some(why) = failure {
            ctx.metrics.on_handshake_failure(why);
            write_error_response(403, "forbidden", &[], &mut out);
            respond_and_close(stream, out).await;
            return None;
        }
    }
    if !route.bearer_tokens.is_empty() {
        let failure = match presented_token(&req) {
            None => Some(HandshakeFailure::AuthMissing),
            Some(t) if !route.bearer_tokens.iter().any(|k| ct_eq(k.as_bytes(), t)) => {
                Some(HandshakeFailure::AuthInvalid)
            }
            Some(_) => None,
        };
        if let Some(why) = failure {
            ctx.metrics.on_handshake_failure(why);
            // No detail: which of missing or wrong is the metric's business, not the client's.
            write_error_response(
                401,
                "unauthorized",
                &[("WWW-Authenticate", "Bearer")],
                &mut out,
            );
            respond_and_close(stream, out).await;
            return None;
        }
    }
    if let Some(jwt) = &route.jwt {
        if let Err(why) = check_jwt(jwt, presented_token(&req), topic) {
            ctx.metrics.on_handshake_failure(why);
            let (status, body, extra): (u16, &str, &[(&str, &str)]) = match why {
                HandshakeFailure::TopicForbidden => (403, "forbidden", &[]),
                _ => (401, "unauthorized", &[("WWW-Authenticate", "Bearer")]),
            };
            write_error_response(status, body, extra, &mut out);
            respond_and_close(stream, out).await;
            return None;
        }
    }
    if let Some(origin) = &req.origin {
        if !route.allowed_origins.is_empty() && !route.allowed_origins.contains(origin) {
            ctx.metrics
                .on_handshake_failure(HandshakeFailure::OriginForbidden);
            write_error_response(403, "origin not allowed", &[], &mut out);
            respond_and_close(stream, out).await;
            return None;
        }
    }
    // permessage-deflate: the first acceptable offer, if the listener negotiates it.
    let deflate = match cfg.deflate.as_ref() {
        None => None,
        Some(d) => match deflate::negotiate(&req.extensions, d) {
            Ok(p) => p,
            Err(e) => {
                ctx.metrics
                    .on_handshake_failure(HandshakeFailure::from_status(e.status()));
                e.write_response(&mut out);
                respond_and_close(stream, out).await;
                return None;
            }
        },
    };
    if shared.open.fetch_add(1, Ordering::Relaxed) >= cfg.max_connections.get() {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        ctx.metrics
            .on_handshake_failure(HandshakeFailure::OverCapacity);
        write_error_response(
            503,
            "server at connection capacity",
            &[("Retry-After", "1")],
            &mut out,
        );
        respond_and_close(stream, out).await;
        return None;
    }
    // Per-IP cap: released when the returned slot is dropped (connection end or failure).
    let ip_slot = match cfg.max_connections_per_ip {
        None => None,
        Some(cap) => {
            let ip = stream
                .peer_addr()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            match IpSlot::take(shared, ip, cap.get()) {
                Some(slot) => Some(Box::new(slot)),
                None => {
                    shared.open.fetch_sub(1, Ordering::Relaxed);
                    ctx.metrics
                        .on_handshake_failure(HandshakeFailure::PerIpLimit);
                    write_error_response(
                        429,
                        "too many connections from this address",
                        &[("Retry-After", "1")],
                        &mut out,
                    );
                    respond_and_close(stream, out).await;
                    return None;
                }
            }
        }
    };
    let mut target = match &route.ingest {
        Some(ing) => Target::Ingest(super::ingest::metadata(&ing.metadata, stream, &req)),
        None => Target::Topic((route.kind != RouteKind::Echo).then(|| Arc::from(topic))),
    };
    let mut protocol = route.select_subprotocol(&req.protocols).map(str::to_string);
    if let Some(t) = &route.proxy {
        // The client's address, for X-Forwarded-For (asked of the socket here rather than
        // kept in every connection's task state).
        let peer = stream
            .peer_addr()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        match proxy::connect(t, peer, stream.tls().is_some(), &req).await {
            Ok(up) => {
                protocol = up.protocol.clone();
                target = Target::Upstream(up);
            }
            Err(e) => {
                debug!(shard = ctx.id, upstream = %t.url, error = %e, "upstream unavailable");
                shared.open.fetch_sub(1, Ordering::Relaxed);
                ctx.metrics
                    .on_handshake_failure(HandshakeFailure::BadGateway);
                write_error_response(502, "upstream unavailable", &[], &mut out);
                respond_and_close(stream, out).await;
                return None;
            }
        }
    }
    let extension = deflate.map(|p| p.header_value());
    let extra: Vec<(&str, &str)> = extension
        .iter()
        .map(|v| ("Sec-WebSocket-Extensions", v.as_str()))
        .collect();
    write_response_101(&req.key, protocol.as_deref(), &extra, &mut out);
    if stream.write_all(out).await.0.is_err() {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        ctx.metrics.on_handshake_failure(HandshakeFailure::Io);
        return None;
    }
    Some(Accepted {
        route: route_idx,
        target,
        rest,
        deflate,
        _ip_slot: ip_slot,
    })
}

/// Write a final response, send FIN, and let the peer read it before the socket closes
/// (closing with unread input would reset the connection and could destroy the response).
async fn respond_and_close(stream: &Stream, out: Vec<u8>) {
    let _ = compio::time::timeout(LINGER, async {
        if stream.write_all(out).await.0.is_ok() {
            let _ = stream.shutdown().await;
            let mut buf = BytesMut::with_capacity(512);
            loop {
                buf.clear();
                let BufResult(res, b) = stream.read(buf).await;
                buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    break;
                }
            }
        }
    })
    .await;
}

pub(crate) fn read_op(
    stream: &Stream,
    buf: BytesMut,
) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
    stream.read(buf)
}

/// What a write carries: the protocol core's own output (echo replies, control frames), or
/// broadcast frames shared with other subscribers, written as one vectored write.
enum WriteBuf {
    Plain(Vec<u8>),
    Frames(Vec<Bytes>),
}

fn write_op(
    stream: &Stream,
    buf: WriteBuf,
) -> impl Future<Output = (std::io::Result<()>, WriteBuf)> + '_ {
    let s = stream;
    async move {
        match buf {
            WriteBuf::Plain(v) => {
                let BufResult(r, v) = s.write_all(v).await;
                (r, WriteBuf::Plain(v))
            }
            WriteBuf::Frames(f) => {
                let BufResult(r, f) = s.write_vectored_all(f).await;
                (r, WriteBuf::Frames(f))
            }
        }
    }
}

/// What the closing timer is counting down to (it is idle in normal operation).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TimerMode {
    /// No timer armed.
    Off,
    /// Drain: this connection's turn to be sent 1001.
    DrainTurn,
    /// Our close frame is out; give up waiting for the peer's.
    CloseWait,
    /// Final close: FIN sent, waiting for the peer's FIN.
    Linger,
}

/// Phase 2. Returns the close code that ended the connection (for metrics).
///
/// Memory: this future lives as long as the connection, idle or not. Only the read is kept
/// inline (one is in flight almost always); the write and the closing timer, which an idle
/// connection does not have, are boxed while they exist. (`async move` block: see [`serve`].)
#[allow(clippy::manual_async_fn)] // deliberate: see the memory note above
#[allow(clippy::too_many_arguments)] // each is stored once in the task state; see above
fn websocket<'a>(
    ctx: &'a ShardCtx,
    shared: &'a ListenerShared,
    stream: &'a Stream,
    // The bytes that came after the upgrade request (`Some`); the read buffer from then on.
    // A parameter used in place, not moved into a local, so it is stored only once.
    mut rbuf: Option<BytesMut>,
    route: &'a Route,
    // Topic state of a publish/subscribe/pubsub route (see [`Fan`]).
    mut fan: Option<Box<Fan<'a>>>,
    seq: u64,
    // The protocol core, with permessage-deflate if negotiated. (Made by the caller: the
    // negotiated parameters would otherwise stay in the task state as an argument.)
    mut conn: Conn,
) -> impl Future<Output = u16> + 'a {
    async move {
        // Per-connection inbound limits (boxed: most routes have none).
        let mut limiter = MessageLimiter::new(
            route.max_messages_per_second,
            route.max_bytes_per_second,
            Instant::now(),
        )
        .map(Box::new);

        // The handshake buffer (1 KiB) is only kept if the client pipelined frames behind its
        // request; otherwise start small. (Assigned over, which frees it: a shadowing `let` would
        // keep the 1 KiB allocation alive in the task state until the connection ends.)
        if rbuf.as_ref().is_some_and(|b| b.is_empty()) {
            rbuf = Some(BytesMut::new());
        }
        let mut out: Option<Vec<u8>> = Some(Vec::new());
        let mut read_size = ReadSize::default();
        let mut peer_eof = false;
        let mut io_failed = false;
        let mut fin_sent = false;
        // Close code seen for this connection: peer's, ours, or 1006 if none.
        let mut code: Option<u16> = None;
        // Keepalive and drain come from the shard (one sweeper for all connections).
        let registration = match shared.cfg.idle_timeout {
            Some(idle) => {
                let ping_after = ticks(idle, ctx.tick);
                ctx.conns.register(
                    ping_after,
                    ping_after.saturating_add(ticks(shared.cfg.pong_timeout, ctx.tick)),
                )
            }
            None => ctx.conns.register(0, 0),
        };
        let signal = &*registration.signal;

        let mut read_fut = pin!(Fuse::terminated());
        let mut write_fut: Fuse<LocalBoxFuture<'_, (std::io::Result<()>, WriteBuf)>> =
            Fuse::terminated();
        let mut timer: Fuse<LocalBoxFuture<'_, ()>> = Fuse::terminated();
        let mut mode = TimerMode::Off;
        // Process bytes that arrived together with the upgrade request.
        let mut pending_input = rbuf.as_ref().is_some_and(|b| !b.is_empty());

        loop {
            // 1. Feed input to the protocol core and run the route logic on its events.
            if pending_input {
                pending_input = false;
                // Invariant: pending_input is only set while we own the read buffer.
                let buf = rbuf.as_mut().expect("read buffer present");
                let failed = conn.handle_input(buf).err();
                if let Some(e) = &failed {
                    code.get_or_insert(close_code_for(e));
                    debug!(shard = ctx.id, error = %e, "protocol error");
                }
                let now = limiter.is_some().then(Instant::now);
                while let Some(ev) = conn.poll_event() {
                    match ev {
                        Event::Message { kind, data } => {
                            ctx.metrics.on_message_in(data.len());
                            // After a policy close (rate limit, slow consumer) the client's
                            // further messages are not routed. After a drain or idle close
                            // (1001) they are: the client sent them before it saw our close.
                            if code == Some(CloseCode::POLICY.0) {
                                continue;
                            }
                            if let (Some(l), Some(now)) = (limiter.as_deref_mut(), now) {
                                if let Err(why) = l.admit(data.len(), now) {
                                    if conn.state() == State::Open {
                                        ctx.metrics.on_rate_limit_close(why);
                                        code.get_or_insert(CloseCode::POLICY.0);
                                        start_close(
                                            &mut conn,
                                            CloseCode::POLICY,
                                            "rate limit exceeded",
                                        );
                                        mode = TimerMode::CloseWait;
                                        timer = compio::time::sleep(shared.cfg.close_timeout)
                                            .boxed_local()
                                            .fuse();
                                    }
                                    continue;
                                }
                            }
                            match (route.kind, fan.as_deref()) {
                                (RouteKind::Echo, _) => {
                                    let n = data.len();
                                    let sent = send_on(ctx, &mut conn, stream, kind, data);
                                    if sent.is_ok() {
                                        ctx.metrics.on_message_out(n);
                                    }
                                }
                                (RouteKind::Publish | RouteKind::PubSub, Some(f)) => {
                                    ctx.publish(&f.topic, kind, &data);
                                }
                                // Subscribers' own messages are not routed anywhere.
                                _ => {}
                            }
                        }
                        Event::Close { code: c, .. } => {
                            code.get_or_insert(c.map_or(CloseCode::NO_STATUS.0, |c| c.0));
                        }
                        Event::Ping(_) | Event::Pong(_) => {}
                    }
                }
                note_deflate(ctx, &mut conn, failed.as_ref());
                // Everything this read published goes to the other shards as one batch each.
                if route.kind.publishes() {
                    ctx.link.flush();
                }
                read_size.trim(buf);
            }

            // A subscriber that fell too far behind under the `close` policy: 1008.
            if let Some(f) = fan
                .as_deref_mut()
                .filter(|f| !f.overflow_seen && f.sub.as_ref().is_some_and(|s| s.overflowed()))
            {
                f.overflow_seen = true;
                if conn.state() == State::Open {
                    code.get_or_insert(CloseCode::POLICY.0);
                    start_close(&mut conn, CloseCode::POLICY, "slow consumer");
                    mode = TimerMode::CloseWait;
                    timer = compio::time::sleep(shared.cfg.close_timeout)
                        .boxed_local()
                        .fuse();
                }
            }

            // Closing (either side began it, or the peer broke the protocol): nothing may
            // follow the close frame, so broadcasts are of no more use to this connection.
            // Leave the topic now rather than at the end of the linger: what is queued is
            // released with the subscription, and no more is queued.
            if conn.state() != State::Open {
                if let Some(f) = fan.as_deref_mut().filter(|f| f.sub.is_some()) {
                    f.sub = None;
                }
                // Whoever began the close, it gets `close_timeout` to finish: also when the
                // peer's close (or its protocol error) came in and our last writes stall
                // because it stopped reading. (A pending drain turn is moot now.)
                if matches!(mode, TimerMode::Off | TimerMode::DrainTurn) {
                    mode = TimerMode::CloseWait;
                    timer = compio::time::sleep(shared.cfg.close_timeout)
                        .boxed_local()
                        .fuse();
                }
            }

            // 2. Start a write if output is queued and none is in flight: the protocol core's
            //    own output first, then broadcast frames (only while open: nothing may follow
            //    our close frame).
            if write_fut.is_terminated() && !io_failed {
                if conn.has_shared() {
                    // Large echoes: header and payload by reference, one vectored write.
                    let mut f = Vec::new();
                    conn.poll_transmit_frames(&mut f);
                    write_fut = write_op(stream, WriteBuf::Frames(f)).boxed_local().fuse();
                } else if conn.pending_transmit() > 0 {
                    // Invariant: `out` is only absent while a write is in flight.
                    let mut o = out.take().expect("out buffer present");
                    conn.poll_transmit(&mut o);
                    write_fut = write_op(stream, WriteBuf::Plain(o)).boxed_local().fuse();
                } else if let Some(fan) = fan.as_deref_mut().filter(|f| {
                    conn.state() == State::Open && f.sub.as_ref().is_some_and(|s| s.has_frames())
                }) {
                    // Invariant: `frames` is only absent while a write is in flight, and the
                    // filter above checked that there is a subscription.
                    let mut f = fan.frames.take().expect("frame list present");
                    let sub = fan.sub.as_ref().expect("subscribed");
                    sub.take(&mut f, MAX_BATCH_BYTES, MAX_BATCH_FRAMES);
                    write_fut = write_op(stream, WriteBuf::Frames(f)).boxed_local().fuse();
                }
            }

            // 3. Close states: once the final frames are written, send FIN and linger.
            let finished = matches!(conn.state(), State::Closed | State::Failed);
            if finished && !fin_sent && write_fut.is_terminated() && !io_failed {
                fin_sent = true;
                // Boxed: a once-per-connection future kept out of the long-lived task state.
                let _ = Box::pin(stream.shutdown()).await;
                mode = TimerMode::Linger;
                timer = compio::time::sleep(LINGER).boxed_local().fuse();
            }
            if io_failed || (peer_eof && write_fut.is_terminated() && conn.pending_transmit() == 0)
            {
                break;
            }

            // 4. Start a read unless backpressure says otherwise.
            let backpressured = !write_fut.is_terminated()
                && conn.pending_transmit() >= shared.cfg.max_pending_write_bytes.get();
            if read_fut.is_terminated() && !backpressured && !peer_eof {
                // Invariant: the buffer is ours whenever no read is in flight.
                let mut buf = rbuf.take().expect("read buffer present");
                let want = read_size.want(conn.bytes_needed());
                if buf.capacity() - buf.len() < want {
                    buf.reserve(want);
                }
                read_fut.set(read_op(stream, buf).fuse());
            }

            select_biased! {
                BufResult(res, buf) = read_fut => {
                    match res {
                        Ok(0) => {
                            peer_eof = true;
                        }
                        Ok(n) => {
                            signal.touch();
                            read_size.observe(n);
                            if fin_sent {
                                // Lingering: discard whatever the peer still sends.
                                let mut b = buf;
                                b.clear();
                                rbuf = Some(b);
                                continue;
                            }
                            pending_input = true;
                        }
                        Err(e) => {
                            debug!(shard = ctx.id, error = %e, "read failed");
                            io_failed = true;
                        }
                    }
                    rbuf = Some(buf);
                }
                (res, buf) = write_fut => {
                    if let Err(e) = res {
                        debug!(shard = ctx.id, error = %e, "write failed");
                        io_failed = true;
                    }
                    match buf {
                        WriteBuf::Plain(mut o) => {
                            let written = o.len();
                            o.clear();
                            if o.capacity() > KEEP_BUFFER.max(4 * written) {
                                o = Vec::new();
                            }
                            out = Some(o);
                        }
                        WriteBuf::Frames(mut f) => {
                            // Drops this write's references; keeps the list's allocation.
                            f.clear();
                            if let Some(fan) = fan.as_deref_mut() {
                                fan.frames = Some(f);
                            }
                        }
                    }
                }
                // Woken for frames only when step 2 would write them (open, no write in
                // flight): a wake-up it would not act on would spin this loop.
                () = ready_fut(
                    fan.as_deref(),
                    write_fut.is_terminated() && conn.state() == State::Open,
                ) => {}
                flags = signal.wait() => {
                    if flags & signal::PING != 0 {
                        if conn.send_ping(b"wsedge").is_ok() {
                            ctx.metrics.on_ping_sent();
                        }
                        // Quiet for idle_timeout: give back the output buffer.
                        if let Some(o) = out.as_mut().filter(|o| o.capacity() > 0) {
                            *o = Vec::new();
                        }
                    }
                    if flags & signal::IDLE_CLOSE != 0 && conn.state() == State::Open {
                        ctx.metrics.on_idle_close();
                        code.get_or_insert(CloseCode::GOING_AWAY.0);
                        start_close(&mut conn, CloseCode::GOING_AWAY, "idle timeout");
                        mode = TimerMode::CloseWait;
                        timer = compio::time::sleep(shared.cfg.close_timeout).boxed_local().fuse();
                    }
                    if flags & signal::DRAIN != 0 && conn.state() == State::Open {
                        // Spread the closes over the drain window so clients reconnect gradually.
                        let window = ctx.drain_window.as_millis() as u64;
                        let turn = if window == 0 { 0 } else { spread(seq) % window };
                        mode = TimerMode::DrainTurn;
                        timer = compio::time::sleep(Duration::from_millis(turn)).boxed_local().fuse();
                    }
                }
                () = timer => {
                    match mode {
                        TimerMode::Off => {}
                        TimerMode::DrainTurn => {
                            code.get_or_insert(CloseCode::GOING_AWAY.0);
                            start_close(&mut conn, CloseCode::GOING_AWAY, "server shutting down");
                            mode = TimerMode::CloseWait;
                            timer = compio::time::sleep(shared.cfg.close_timeout).boxed_local().fuse();
                        }
                        TimerMode::CloseWait | TimerMode::Linger => break,
                    }
                }
                // Unreachable by construction (a read or a write is always in flight here), but
                // never spin or panic if that changes.
                complete => break,
            }
        }
        code.unwrap_or(CloseCode::ABNORMAL.0)
    }
}

/// The subscriber's wake-up for this loop turn: new frames matter only when no write is in
/// flight (the next batch is taken when it completes), an overflow matters until seen.
fn ready_fut<'s>(fan: Option<&'s Fan<'_>>, idle_writer: bool) -> fanout::Ready<'s> {
    match fan.and_then(|f| Some((f.sub.as_ref()?, f.overflow_seen))) {
        Some((s, overflow_seen)) => s.ready(idle_writer, !overflow_seen),
        None => fanout::Ready::never(),
    }
}

/// The topic state of a connection on a publish, subscribe or pubsub route, boxed so that
/// echo connections (and their idle memory) do not carry it.
pub(crate) struct Fan<'a> {
    topic: Arc<str>,
    /// The subscription (subscribe and pubsub routes).
    sub: Option<Subscription<'a>>,
    /// Frame list of a subscriber's vectored write, kept between writes (absent while one
    /// is in flight).
    frames: Option<Vec<Bytes>>,
    /// The slow-consumer close has been started (so the overflow is acted on once).
    overflow_seen: bool,
}

impl<'a> Fan<'a> {
    fn new(
        ctx: &'a ShardCtx,
        listener: usize,
        route: usize,
        topic: Arc<str>,
        deflate: Option<&DeflateParams>,
    ) -> Box<Self> {
        let cfg = &ctx.listeners[listener].cfg;
        let r = &cfg.routes[route];
        // A subscriber that negotiated permessage-deflate takes the shard's compressed
        // variant of each broadcast (compressed once, shared).
        let pref = deflate
            .zip(cfg.deflate.as_ref())
            .and_then(|(p, d)| SubscriberDeflate::new(p, d.threshold_bytes));
        let sub = r.kind.subscribes().then(|| {
            ctx.hub.subscribe_with(
                &topic,
                r.queue,
                ctx.route_labels[listener][route].clone(),
                pref,
            )
        });
        Box::new(Self {
            topic,
            sub,
            frames: Some(Vec::new()),
            overflow_seen: false,
        })
    }
}

/// Whole sweeper ticks in `d` (at least 1).
pub(crate) fn ticks(d: Duration, tick: Duration) -> u32 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1))).clamp(1, u32::MAX as u128) as u32
}

fn start_close(conn: &mut Conn, code: CloseCode, reason: &str) {
    // Err means a close frame is already queued: nothing more to do.
    let _ = conn.close(code, reason);
}

fn close_code_for(e: &ProtoError) -> u16 {
    e.close_code().0
}

/// A cheap integer hash (splitmix64) so that sequential connection numbers spread evenly.
fn spread(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::{MAX_READ, MIN_READ, ReadSize};

    /// Reads that fill the buffer double the next one up to MAX_READ; short reads halve it
    /// back to MIN_READ; a frame's known remainder always wins over the adaptive size.
    #[test]
    fn read_size_follows_the_traffic_within_its_bounds() {
        let mut r = ReadSize::new(4096);
        assert_eq!(r.want(20_000), 20_000);
        assert_eq!(r.want(2), 4096);
        // A stream of 16 KiB frames (16,392 bytes with the header): after the few reads that
        // came back full, a whole frame fits one read.
        r.observe(4096);
        r.observe(8192);
        r.observe(16_384);
        assert!(r.get() >= 16 * 1024 + 8);
        for _ in 0..20 {
            r.observe(r.get());
        }
        assert_eq!(r.get(), MAX_READ);
        // A reply of a few bytes per read: back to the small idle buffer, and no lower.
        for _ in 0..20 {
            r.observe(26);
        }
        assert_eq!(r.get(), MIN_READ);
        // Reads between a quarter and the whole size keep it where it is.
        let mut s = ReadSize::new(1024);
        s.observe(300);
        s.observe(1023);
        assert_eq!(s.get(), 1024);
        // A drained buffer much larger than the read size is released; others are kept.
        let idle = ReadSize::default();
        let mut big = bytes::BytesMut::with_capacity(1024);
        idle.trim(&mut big);
        assert_eq!(big.capacity(), 0);
        let mut small = bytes::BytesMut::with_capacity(MIN_READ);
        idle.trim(&mut small);
        assert!(small.capacity() >= MIN_READ);
        let mut busy = bytes::BytesMut::with_capacity(1024);
        busy.extend_from_slice(b"x");
        idle.trim(&mut busy);
        assert!(busy.capacity() >= 1024);
        assert_eq!(ReadSize::new(1).get(), MIN_READ);
        assert_eq!(ReadSize::new(usize::MAX).get(), MAX_READ);
    }
}
