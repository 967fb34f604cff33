//! Ingest routes: validate every message (JSON, text, or a declared schema), wrap valid ones
//! with the connection's metadata if the route asks for it, hand them to the route's sink,
//! invalid ones (with the reason) to its dead-letter sink, and stop reading while a sink is
//! full.
//!
//! The route's `max_messages_per_second` / `max_bytes_per_second` apply: the first message
//! over them closes the client with 1008, and it and the ones after it are refused
//! (`wsedge_ingest_refused_total`).
//!
//! A simpler loop than the general driver: ingest traffic flows client → server, so the loop
//! is sequential (read, validate, hand over, write what the protocol core queued: pongs,
//! the close). Handing a chunk to a full sink waits, and while it waits nothing is read from
//! the socket: the client's sends back up into TCP (backpressure, counted in
//! `wsedge_ingest_backpressure_waits_total`). Keepalive and drain come from the shard signal
//! as for every connection.

use std::borrow::Cow;
use std::pin::pin;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use futures_util::future::{Fuse, FusedFuture, FutureExt, LocalBoxFuture};
use futures_util::select_biased;
use tracing::debug;

use super::driver::{read_op, ticks};
use super::sink::Chunk;
use super::stream::Stream;
use super::{ListenerShared, ShardCtx, signal};
use crate::config::{IngestRoute, MetaField, Route};
use crate::proto::{CloseCode, Conn, Event, MessageKind, State, UpgradeRequest};
use crate::ratelimit::MessageLimiter;

/// Why a message is invalid for the route, or `None` if it is valid.
fn invalid(ing: &IngestRoute, kind: MessageKind, data: &[u8]) -> Option<Cow<'static, str>> {
    if let Some(schema) = &ing.schema {
        schema.check(data).err().map(Cow::Owned)
    } else if ing.json {
        (!crate::schema::is_json(data)).then_some(Cow::Borrowed("not a JSON value"))
    } else {
        (kind != MessageKind::Text).then_some(Cow::Borrowed("not a text message"))
    }
}

/// The `meta` object of a connection (JSON text, keys in configured order), for routes with
/// `metadata`; computed once at the handshake.
pub(crate) fn metadata(
    fields: &[MetaField],
    stream: &Stream,
    req: &UpgradeRequest,
) -> Option<Box<str>> {
    if fields.is_empty() {
        return None;
    }
    let tls = stream.tls();
    let mut out = String::from("{");
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = match f {
            MetaField::Peer => stream
                .peer_addr()
                .map_or(serde_json::Value::Null, |a| a.to_string().into()),
            MetaField::Tls => tls.is_some().into(),
            MetaField::Path => req.path.as_str().into(),
            MetaField::ClientCert => tls
                .and_then(|t| t.peer_identity.as_ref())
                .map_or(serde_json::Value::Null, |id| id.display_name().into()),
            MetaField::Header(h) => req.header(h).map_or(serde_json::Value::Null, |v| v.into()),
        };
        // Invariant: strings and scalars serialize infallibly.
        out.push_str(&serde_json::to_string(f.key()).expect("string"));
        out.push(':');
        out.push_str(&value.to_string());
    }
    out.push('}');
    Some(out.into_boxed_str())
}

/// `{"meta":<meta>,"message":<data>}`: a JSON message as is, a text message as a string.
fn wrap(meta: &str, json: bool, data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(meta.len() + data.len() + 24);
    v.extend_from_slice(b"{\"meta\":");
    v.extend_from_slice(meta.as_bytes());
    v.extend_from_slice(b",\"message\":");
    if json {
        v.extend_from_slice(data);
    } else {
        // Invariant: writing a string into a Vec cannot fail.
        serde_json::to_writer(&mut v, &String::from_utf8_lossy(data)).expect("string");
    }
    v.push(b'}');
    Bytes::from(v)
}

/// Hand a chunk to a sink, waiting (and counting the wait) if its queue is full. `false` if
/// the sink is gone (shutting down).
async fn hand_over(ctx: &ShardCtx, sink: usize, chunk: Chunk) -> bool {
    let tx = &ctx.sinks[sink];
    match tx.try_send(chunk) {
        Ok(()) => true,
        Err(async_channel::TrySendError::Full(chunk)) => {
            ctx.metrics.on_ingest_wait();
            // Counted while waiting (also if the task is dropped at the drain deadline).
            let _waiting = Waiting::new(ctx, chunk.msgs.len() as u64);
            tx.send(chunk).await.is_ok()
        }
        Err(async_channel::TrySendError::Closed(_)) => false,
    }
}

/// `n` messages in [`ShardCtx::ingest_waiting`] for as long as this lives.
struct Waiting<'a> {
    ctx: &'a ShardCtx,
    n: u64,
}

impl<'a> Waiting<'a> {
    fn new(ctx: &'a ShardCtx, n: u64) -> Self {
        ctx.ingest_waiting.set(ctx.ingest_waiting.get() + n);
        Self { ctx, n }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let w = &self.ctx.ingest_waiting;
        w.set(w.get().saturating_sub(self.n));
    }
}

/// Serve one ingest connection to its end; returns the close code.
pub(crate) async fn serve(
    ctx: &ShardCtx,
    shared: &ListenerShared,
    stream: &Stream,
    rest: BytesMut,
    route: &Route,
    meta: Option<Box<str>>,
    // The protocol core (with permessage-deflate if negotiated: compressed messages are
    // inflated before validation).
    mut conn: Conn,
) -> u16 {
    let cfg = &shared.cfg;
    // Invariant: `Target::Ingest` is only chosen for routes with ingest settings.
    let ing = route.ingest.as_ref().expect("ingest route");
    // Dead-letter lines carry the metadata as a value (parsed once per connection).
    let meta_value: Option<serde_json::Value> = meta
        .as_deref()
        .map(|m| serde_json::from_str(m).unwrap_or_default());
    let mut rbuf = Some(rest);
    let mut pending_input = rbuf.as_ref().is_some_and(|b| !b.is_empty());
    let mut out = Vec::new();
    let mut code: Option<u16> = None;
    let registration = match cfg.idle_timeout {
        Some(idle) => {
            let ping_after = ticks(idle, ctx.tick);
            ctx.conns.register(
                ping_after,
                ping_after.saturating_add(ticks(cfg.pong_timeout, ctx.tick)),
            )
        }
        None => ctx.conns.register(0, 0),
    };
    let signal = &*registration.signal;
    let mut read_fut = pin!(Fuse::terminated());
    let mut timer: Fuse<LocalBoxFuture<'_, ()>> = Fuse::terminated();
    let mut eof = false;
    // Set when we close for an invalid message (`on_error = "close"`) or a rate limit.
    let mut refused = false;
    // The route's inbound rates (boxed: most routes have none).
    let mut limiter = MessageLimiter::new(
        route.max_messages_per_second,
        route.max_bytes_per_second,
        Instant::now(),
    )
    .map(Box::new);

    loop {
        if pending_input {
            pending_input = false;
            // Invariant: pending_input is only set while we own the read buffer.
            let buf = rbuf.as_mut().expect("read buffer present");
            let failed = conn.handle_input(buf).err();
            if let Some(e) = &failed {
                code.get_or_insert(e.close_code().0);
            }
            super::driver::note_deflate(ctx, &mut conn, failed.as_ref());
            let mut good: Vec<Bytes> = Vec::new();
            let mut dead: Vec<Bytes> = Vec::new();
            let now = limiter.is_some().then(Instant::now);
            while let Some(ev) = conn.poll_event() {
                match ev {
                    Event::Message { kind, data } => {
                        ctx.metrics.on_message_in(data.len());
                        // After our close for an invalid message nothing more is taken
                        // (counted); after a drain close (1001) messages that crossed it
                        // still are.
                        if refused {
                            ctx.metrics.on_ingest_refused(1);
                            continue;
                        }
                        if let (Some(l), Some(now)) = (limiter.as_deref_mut(), now) {
                            if let Err(why) = l.admit(data.len(), now) {
                                // Over the route's rate: this message and the rest are not
                                // taken (counted as refused); an open client is closed with
                                // 1008 (one already closing keeps its own close code).
                                ctx.metrics.on_ingest_refused(1);
                                refused = true;
                                if conn.state() == State::Open {
                                    ctx.metrics.on_rate_limit_close(why);
                                    code.get_or_insert(CloseCode::POLICY.0);
                                    let _ = conn.close(CloseCode::POLICY, "rate limit exceeded");
                                }
                                continue;
                            }
                        }
                        match invalid(ing, kind, &data) {
                            None => good.push(match meta.as_deref() {
                                Some(m) => wrap(m, ing.json, &data),
                                None => data,
                            }),
                            Some(reason) => {
                                ctx.metrics.on_ingest_invalid();
                                if ing.dead_letter.is_some() {
                                    let mut line = serde_json::json!({
                                        "reason": reason,
                                        "route": route.path,
                                        "message": String::from_utf8_lossy(&data),
                                    });
                                    if let Some(m) = &meta_value {
                                        line["meta"] = m.clone();
                                    }
                                    dead.push(Bytes::from(line.to_string()));
                                }
                                if ing.close_on_error {
                                    refused = true;
                                    code.get_or_insert(CloseCode::INVALID_PAYLOAD.0);
                                    let _ = conn.close(CloseCode::INVALID_PAYLOAD, &reason);
                                }
                            }
                        }
                    }
                    Event::Close { code: c, .. } => {
                        code.get_or_insert(c.map_or(CloseCode::NO_STATUS.0, |c| c.0));
                    }
                    Event::Ping(_) | Event::Pong(_) => {}
                }
            }
            let n = good.len() as u64;
            if n > 0 {
                if hand_over(
                    ctx,
                    ing.sink,
                    Chunk {
                        json: ing.json || meta.is_some(),
                        msgs: good,
                    },
                )
                .await
                {
                    ctx.metrics.on_ingest_accepted(n);
                } else {
                    // The sink has shut down: these can no longer be delivered.
                    ctx.metrics.on_ingest_refused(n);
                    if conn.state() == State::Open {
                        code.get_or_insert(CloseCode::GOING_AWAY.0);
                        let _ = conn.close(CloseCode::GOING_AWAY, "server shutting down");
                    }
                }
            }
            if let (Some(dl), false) = (ing.dead_letter, dead.is_empty()) {
                let _ = hand_over(
                    ctx,
                    dl,
                    Chunk {
                        json: true,
                        msgs: dead,
                    },
                )
                .await;
            }
        }
        if conn.pending_transmit() > 0 {
            conn.poll_transmit(&mut out);
            // Only pongs and the close go this way. A client that stops reading them (and
            // keeps pinging) would stall this loop, and with it the idle and drain signals:
            // a write that takes longer than the pong timeout ends the connection.
            let write = stream.write_all(std::mem::take(&mut out));
            let Ok(BufResult(r, o)) = compio::time::timeout(cfg.pong_timeout, write).await else {
                debug!("ingest write stalled past pong_timeout; dropping the connection");
                break;
            };
            out = o;
            out.clear();
            if let Err(e) = r {
                debug!(error = %e, "ingest write failed");
                break;
            }
        }
        if matches!(conn.state(), State::Closed | State::Failed) || eof {
            // Cancel a read in flight; the buffer is lost with it, a fresh one serves below.
            read_fut.set(Fuse::terminated());
            let _ = Box::pin(stream.shutdown()).await;
            // Let the peer read our close before the socket goes (bounded).
            if !eof {
                let _ = compio::time::timeout(std::time::Duration::from_secs(1), async {
                    loop {
                        let b = rbuf.take().unwrap_or_default();
                        let BufResult(res, b) = read_op(stream, b).await;
                        rbuf = Some(b);
                        if !matches!(res, Ok(n) if n > 0) {
                            break;
                        }
                        if let Some(b) = rbuf.as_mut() {
                            b.clear();
                        }
                    }
                })
                .await;
            }
            break;
        }
        // Closing (our close for an invalid message, an idle close, a drain): the client
        // gets `close_timeout` to answer, then the connection goes whatever it does.
        if conn.state() != State::Open && timer.is_terminated() {
            timer = compio::time::sleep(cfg.close_timeout).boxed_local().fuse();
        }
        if read_fut.is_terminated() {
            // Invariant: the buffer is ours whenever no read is in flight.
            let mut buf = rbuf.take().expect("read buffer present");
            let want = conn.bytes_needed().max(4096);
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
            read_fut.set(read_op(stream, buf).fuse());
        }
        select_biased! {
            BufResult(res, buf) = read_fut => {
                match res {
                    Ok(0) => eof = true,
                    Ok(_) => {
                        signal.touch();
                        pending_input = true;
                    }
                    Err(_) => eof = true,
                }
                rbuf = Some(buf);
            }
            flags = signal.wait() => {
                if flags & signal::PING != 0 {
                    let _ = conn.send_ping(b"wsedge");
                }
                if flags & (signal::IDLE_CLOSE | signal::DRAIN) != 0 && conn.state() == State::Open {
                    let reason = if flags & signal::DRAIN != 0 {
                        "server shutting down"
                    } else {
                        ctx.metrics.on_idle_close();
                        "idle timeout"
                    };
                    code.get_or_insert(CloseCode::GOING_AWAY.0);
                    let _ = conn.close(CloseCode::GOING_AWAY, reason);
                }
            }
            () = timer => break,
            complete => break,
        }
    }
    code.unwrap_or(CloseCode::ABNORMAL.0)
}
