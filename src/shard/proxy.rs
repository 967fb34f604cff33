//! Proxy routes: connect to the upstream during the client's handshake, then relay messages
//! 1:1 between the two WebSocket connections.
//!
//! Each side has its own protocol core ([`Conn`]: server role towards the client, client role
//! towards the upstream), so each hop is validated, unmasked and re-masked as RFC 6455
//! requires; pings are answered per hop; data messages and close frames cross over.
//!
//! Backpressure is end to end: a side is not read while the other side has a write in flight
//! and at least `max_pending_write_bytes` queued behind it, so a slow reader on either end
//! stops the TCP flow from the other end instead of growing wsedge's memory.
//!
//! The route's `max_messages_per_second` / `max_bytes_per_second` apply to the client's
//! messages as on other routes: the first one over the limit closes the client with 1008
//! and the upstream with 1001, and is not passed on.
//!
//! Closing: a close frame from one side is passed to the other with the same code and reason
//! (1005 "no code" becomes 1000). A client that breaks the protocol has the upstream closed
//! with 1001 at once, and gets its own close (1002, 1007, 1009) after the upstream's close
//! reply, so that answers to its earlier valid messages reach it first. A side that disappears without a close frame closes the
//! other with 1001 (client gone) or 1014 (upstream gone: "bad gateway"). Once either side is
//! closing, both get `close_timeout` to finish before the sockets are dropped.

use std::net::IpAddr;
use std::pin::pin;
use std::time::Instant;

use bytes::BytesMut;
use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt};
use futures_util::select_biased;
use tracing::debug;

use super::client::{self, Side, Upstream, UpstreamError};
use super::stream::Stream;
use super::{ListenerShared, ShardCtx};
use crate::config::{ProxyTarget, Route};
use crate::proto::{CloseCode, Conn, Event, State, UpgradeRequest};
use crate::ratelimit::MessageLimiter;
use crate::upstream::Forwarding;

/// Connect a proxy route's upstream for the client request `req` from `peer`.
pub(crate) async fn connect(
    target: &ProxyTarget,
    peer: IpAddr,
    client_tls: bool,
    req: &UpgradeRequest,
) -> Result<Upstream, UpstreamError> {
    let xff = req
        .headers
        .iter()
        .find(|(n, _)| n == "x-forwarded-for")
        .map(|(_, v)| v.as_str());
    let fwd = Forwarding {
        peer,
        x_forwarded_for: xff,
        origin: req.origin.as_deref(),
        client_tls,
    };
    client::connect(
        &target.url,
        &target.headers,
        Some(&fwd),
        &req.protocols,
        target.deflate.as_ref(),
        target.connect_timeout,
    )
    .await
}

/// Which way a [`pump`] moves messages, for the shard's counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to upstream: counted as received from a client and as passed upstream.
    ToUpstream,
    /// Upstream to client: counted as received from the upstream and as queued for a client.
    ToClient,
}

/// Feed `from`'s input to its protocol core and pass messages and closes to `to`. Returns
/// the close code `from`'s peer sent (or that a protocol error of `from` calls for), if any.
///
/// Messages decoded before a protocol error are passed on first, then `to` is closed, so
/// `to`'s peer sees everything that was valid.
fn pump(
    from: &mut Side<'_>,
    to: &mut Side<'_>,
    dir: Direction,
    ctx: &ShardCtx,
    mut limit: Option<&mut ClientLimit>,
) -> Option<u16> {
    if !from.pending_input {
        return None;
    }
    from.pending_input = false;
    let mut seen = None;
    // Invariant: pending_input is only set while we own the read buffer.
    let buf = from.rbuf.as_mut().expect("read buffer present");
    let failed = from.conn.handle_input(buf).err();
    super::driver::note_deflate(ctx, &mut from.conn, failed.as_ref());
    let now = limit.is_some().then(Instant::now);
    while let Some(ev) = from.conn.poll_event() {
        match ev {
            // Err: `to` is closing; what it can no longer send is dropped with it.
            Event::Message { kind, data } => {
                let n = data.len();
                match dir {
                    Direction::ToUpstream => ctx.metrics.on_message_in(n),
                    Direction::ToClient => ctx.metrics.on_proxy_from_upstream(n),
                }
                // The route's inbound rates (client side only): the first message over them
                // closes the client with 1008 and the upstream with 1001; it and everything
                // after it stay here.
                if let (Some(l), Some(now)) = (limit.as_deref_mut(), now) {
                    if l.tripped {
                        continue;
                    }
                    if let Err(why) = l.limiter.admit(n, now) {
                        l.tripped = true;
                        // Only an open client is closed for it: one already closing (its
                        // close, a protocol error or a drain decoded in the same read)
                        // keeps its own close code, and so does the upstream.
                        if from.conn.state() == State::Open {
                            ctx.metrics.on_rate_limit_close(why);
                            seen.get_or_insert(CloseCode::POLICY.0);
                            let _ = from.conn.close(CloseCode::POLICY, "rate limit exceeded");
                            let _ = to.conn.close(CloseCode::GOING_AWAY, "client rate limited");
                        }
                        continue;
                    }
                }
                // Each hop negotiated compression on its own: compressed again if `to`
                // did; large payloads towards a plain-TCP client go out by reference
                // (towards the upstream they are masked, which copies anyway).
                // A side whose socket failed can take nothing; queueing for it would only
                // grow its buffer until the close timeout.
                if to.failed {
                    continue;
                }
                let sent = super::driver::send_on(ctx, &mut to.conn, to.stream, kind, data);
                if sent.is_ok() {
                    match dir {
                        Direction::ToUpstream => ctx.metrics.on_proxy_to_upstream(n),
                        Direction::ToClient => ctx.metrics.on_message_out(n),
                    }
                }
            }
            Event::Close { code, reason } => {
                let c = code.unwrap_or(CloseCode::NORMAL);
                seen.get_or_insert(code.map_or(CloseCode::NO_STATUS.0, |c| c.0));
                // Invariant: the core validated the reason as UTF-8.
                let _ = to.conn.close(c, std::str::from_utf8(&reason).unwrap_or(""));
            }
            Event::Ping(_) | Event::Pong(_) => {}
        }
    }
    super::driver::note_deflate(ctx, &mut to.conn, None);
    if let Some(e) = failed {
        debug!(error = %e, "proxy: protocol error");
        let _ = to.conn.close(CloseCode::GOING_AWAY, "peer protocol error");
        seen.get_or_insert(e.close_code().0);
    }
    from.trim_read_buffer();
    seen
}

/// The route's `max_messages_per_second` / `max_bytes_per_second` on a client's messages.
struct ClientLimit {
    limiter: MessageLimiter,
    /// Exceeded: the client is being closed and its further messages are dropped.
    tripped: bool,
}

/// Relay between the client and the upstream until both are done. Returns the close code
/// that ended the client connection (for metrics).
pub(crate) async fn relay(
    ctx: &ShardCtx,
    shared: &ListenerShared,
    route: &Route,
    client: &Stream,
    client_rest: BytesMut,
    upstream: Upstream,
    // The client's protocol core (permessage-deflate if negotiated with the client).
    client_conn: Conn,
) -> u16 {
    let cfg = &shared.cfg;
    let mut limit = MessageLimiter::new(
        route.max_messages_per_second,
        route.max_bytes_per_second,
        Instant::now(),
    )
    .map(|limiter| {
        Box::new(ClientLimit {
            limiter,
            tripped: false,
        })
    });
    let max_pending = cfg.max_pending_write_bytes.get();
    let up_conn = upstream.conn(cfg.limits.clone(), &ctx.metrics);
    let up_stream = upstream.stream;
    let mut c = Side::new(client, client_conn, client_rest);
    let mut u = Side::new(&up_stream, up_conn, upstream.rest);
    let registration = ctx.conns.register(0, 0);
    let signal = &*registration.signal;
    let mut code: Option<u16> = None;
    let mut closing = false;
    let mut timer = pin!(Fuse::terminated());

    loop {
        if let Some(cc) = pump(
            &mut c,
            &mut u,
            Direction::ToUpstream,
            ctx,
            limit.as_deref_mut(),
        ) {
            code.get_or_insert(cc);
        }
        if let Some(uc) = pump(&mut u, &mut c, Direction::ToClient, ctx, None) {
            // The upstream's close code is what the client will be told.
            code.get_or_insert(uc);
        }
        // A side that vanished without a close frame: close the other.
        if (c.eof || c.failed) && u.conn.state() == State::Open {
            let _ = u.conn.close(CloseCode::GOING_AWAY, "client went away");
        }
        if (u.eof || u.failed) && c.conn.state() == State::Open {
            code.get_or_insert(CloseCode::BAD_GATEWAY.0);
            let _ = c.conn.close(CloseCode::BAD_GATEWAY, "upstream went away");
        }
        // A client that broke the protocol gets its close frame only after the upstream has
        // answered ours (or is gone, or `close_timeout` passes): replies to the valid messages
        // it sent before the bad frame are still on their way back and go out first.
        let hold_client = c.conn.state() == State::Failed
            && u.conn.state() == State::CloseSent
            && !u.eof
            && !u.failed;
        if !hold_client {
            c.start_write();
        }
        u.start_write();
        if !closing && (c.conn.state() != State::Open || u.conn.state() != State::Open) {
            closing = true;
            timer.set(compio::time::sleep(cfg.close_timeout).fuse());
        }
        let flushed = |s: &Side<'_>| s.write.is_terminated() && s.conn.pending_transmit() == 0;
        if c.done() && u.done() && flushed(&c) && flushed(&u) {
            break;
        }
        if (c.failed || c.eof) && (u.failed || u.eof) {
            break;
        }
        // Backpressure: read a side only while the other can take more. Whether or not a
        // write is in flight: a client held back after its protocol error has none, and
        // what the upstream sends meanwhile must not pile up behind it.
        let c_blocked = u.conn.pending_transmit() >= max_pending;
        let u_blocked = c.conn.pending_transmit() >= max_pending;
        c.start_read(c_blocked);
        u.start_read(u_blocked);

        select_biased! {
            BufResult(res, buf) = &mut c.read => {
                if matches!(res, Ok(n) if n > 0) {
                    signal.touch();
                }
                c.on_read(res, buf);
            }
            BufResult(res, buf) = &mut u.read => u.on_read(res, buf),
            BufResult(res, o) = &mut c.write => c.on_write(res, o),
            BufResult(res, o) = &mut u.write => u.on_write(res, o),
            flags = signal.wait() => {
                if flags & super::signal::DRAIN != 0 {
                    code.get_or_insert(CloseCode::GOING_AWAY.0);
                    let _ = c.conn.close(CloseCode::GOING_AWAY, "server shutting down");
                    let _ = u.conn.close(CloseCode::GOING_AWAY, "proxy shutting down");
                }
            }
            () = timer => break,
            complete => break,
        }
    }
    // Best effort FIN on both sockets; the sockets close when dropped.
    let _ = Box::pin(async {
        let _ = client.shutdown().await;
        let _ = up_stream.shutdown().await;
    })
    .await;
    debug!(shard = ctx.id, code, "proxy connection closed");
    code.unwrap_or(CloseCode::ABNORMAL.0)
}
