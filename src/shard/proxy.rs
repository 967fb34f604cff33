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
//! Closing: a close frame from one side is passed to the other with the same code and reason
//! (1005 "no code" becomes 1000). A side that disappears without a close frame closes the
//! other with 1001 (client gone) or 1014 (upstream gone: "bad gateway"). Once either side is
//! closing, both get `close_timeout` to finish before the sockets are dropped.

use std::net::IpAddr;
use std::pin::pin;
use std::time::Duration;

use bytes::BytesMut;
use compio::BufResult;
use compio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;
use futures_util::future::{Fuse, FusedFuture, FutureExt, LocalBoxFuture};
use futures_util::select_biased;
use tracing::debug;

use super::{ListenerShared, ShardCtx};
use crate::config::ProxyTarget;
use crate::proto::handshake::{HandshakeLimits, generate_key, parse_response};
use crate::proto::{CloseCode, Conn, Event, Limits, Role, State};
use crate::upstream::{Forwarding, write_request};

/// An upstream connection whose handshake succeeded.
pub(crate) struct Upstream {
    stream: TcpStream,
    /// Bytes the upstream sent after its 101.
    rest: BytesMut,
    /// The subprotocol the upstream selected (answered to the client).
    pub(crate) protocol: Option<String>,
}

/// Why the upstream could not be reached; logged at debug and answered with 502.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("closed during the handshake")]
    Closed,
    #[error("answered status {0}")]
    Status(u16),
    #[error("invalid handshake: {0}")]
    Invalid(crate::proto::HandshakeError),
}

/// Connect to the upstream and complete its handshake within the route's connect timeout.
pub(crate) async fn connect(
    target: &ProxyTarget,
    peer: IpAddr,
    req: &crate::proto::UpgradeRequest,
) -> Result<Upstream, UpstreamError> {
    let attempt = async {
        let stream = TcpStream::connect(target.url.addr)
            .await
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let key = generate_key(random_16());
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut out = Vec::with_capacity(512);
        write_request(
            &target.url,
            &key,
            &target.headers,
            &Forwarding {
                peer,
                x_forwarded_for: header("x-forwarded-for"),
                origin: req.origin.as_deref(),
                protocols: &req.protocols,
            },
            &mut out,
        );
        let mut w = &stream;
        w.write_all(out).await.0.map_err(UpstreamError::Connect)?;
        let offered: Vec<&str> = req.protocols.iter().map(String::as_str).collect();
        let limits = HandshakeLimits::default();
        let mut buf = BytesMut::with_capacity(1024);
        let mut r = &stream;
        loop {
            if buf.capacity() == buf.len() {
                buf.reserve(1024);
            }
            let BufResult(res, b) = r.append(buf).await;
            buf = b;
            match res {
                Ok(0) => return Err(UpstreamError::Closed),
                Err(e) => return Err(UpstreamError::Connect(e)),
                Ok(_) => {}
            }
            match parse_response(&buf, &key, &offered, &limits) {
                Ok(None) => {}
                Ok(Some((resp, consumed))) => {
                    let _ = buf.split_to(consumed);
                    return Ok(Upstream {
                        stream,
                        rest: buf,
                        protocol: resp.protocol,
                    });
                }
                Err(e) => {
                    // A non-101 status is the common case: name it.
                    let status = std::str::from_utf8(&buf)
                        .ok()
                        .and_then(|t| t.get(9..12))
                        .and_then(|s| s.parse().ok());
                    return Err(match status {
                        Some(s) if s != 101 => UpstreamError::Status(s),
                        _ => UpstreamError::Invalid(e),
                    });
                }
            }
        }
    };
    compio::time::timeout(target.connect_timeout, attempt)
        .await
        .unwrap_or(Err(UpstreamError::Timeout(target.connect_timeout)))
}

/// A mask seed / key source without a dependency: std's randomly keyed hasher.
fn random_16() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

type ReadFut<'a> = Fuse<LocalBoxFuture<'a, BufResult<usize, BytesMut>>>;
type WriteFut<'a> = Fuse<LocalBoxFuture<'a, BufResult<(), Vec<u8>>>>;

/// One hop of the relay.
struct Side<'a> {
    stream: &'a TcpStream,
    conn: Conn,
    /// Read buffer, absent while a read is in flight.
    rbuf: Option<BytesMut>,
    /// Output buffer, absent while a write is in flight.
    out: Option<Vec<u8>>,
    pending_input: bool,
    eof: bool,
    failed: bool,
    read: ReadFut<'a>,
    write: WriteFut<'a>,
}

impl<'a> Side<'a> {
    fn new(stream: &'a TcpStream, conn: Conn, rest: BytesMut) -> Self {
        let pending_input = !rest.is_empty();
        Self {
            stream,
            conn,
            rbuf: Some(rest),
            out: Some(Vec::new()),
            pending_input,
            eof: false,
            failed: false,
            read: Fuse::terminated(),
            write: Fuse::terminated(),
        }
    }

    fn done(&self) -> bool {
        self.failed || matches!(self.conn.state(), State::Closed | State::Failed) || self.eof
    }

    /// Start a write if output is queued and none is in flight.
    fn start_write(&mut self) {
        if self.write.is_terminated() && self.conn.pending_transmit() > 0 && !self.failed {
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = self.out.take().expect("out buffer present");
            self.conn.poll_transmit(&mut o);
            let mut s = self.stream;
            self.write = async move { s.write_all(o).await }.boxed_local().fuse();
        }
    }

    /// Start a read unless one is in flight, the side is finished, or `blocked`.
    fn start_read(&mut self, blocked: bool) {
        if self.read.is_terminated() && !blocked && !self.eof && !self.failed {
            // Invariant: the buffer is ours whenever no read is in flight.
            let mut buf = self.rbuf.take().expect("read buffer present");
            let want = self.conn.bytes_needed().max(4096);
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
            let mut s = self.stream;
            self.read = async move {
                use compio::buf::{IntoInner, IoBufMut};
                s.read(IoBufMut::uninit(buf))
                    .await
                    .map_buffer(IntoInner::into_inner)
            }
            .boxed_local()
            .fuse();
        }
    }

    fn on_read(&mut self, res: std::io::Result<usize>, buf: BytesMut) {
        match res {
            Ok(0) => self.eof = true,
            Ok(_) => self.pending_input = true,
            Err(e) => {
                debug!(error = %e, "proxy read failed");
                self.failed = true;
            }
        }
        self.rbuf = Some(buf);
    }

    fn on_write(&mut self, res: std::io::Result<()>, mut o: Vec<u8>) {
        if let Err(e) = res {
            debug!(error = %e, "proxy write failed");
            self.failed = true;
        }
        o.clear();
        if o.capacity() > 64 * 1024 {
            o = Vec::new();
        }
        self.out = Some(o);
    }
}

/// Feed `from`'s input to its protocol core and pass messages and closes to `to`. Returns
/// the close code `from`'s peer sent, if it sent one.
fn pump(from: &mut Side<'_>, to: &mut Side<'_>) -> Option<u16> {
    if !from.pending_input {
        return None;
    }
    from.pending_input = false;
    let mut seen = None;
    // Invariant: pending_input is only set while we own the read buffer.
    let buf = from.rbuf.as_mut().expect("read buffer present");
    if let Err(e) = from.conn.handle_input(buf) {
        debug!(error = %e, "proxy: protocol error");
        let _ = to.conn.close(CloseCode::GOING_AWAY, "peer protocol error");
        seen = Some(e.close_code().0);
    }
    while let Some(ev) = from.conn.poll_event() {
        match ev {
            Event::Message { kind, data } => {
                if to.conn.state() == State::Open {
                    let _ = to.conn.send(kind, &data);
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
    if buf.is_empty() && buf.capacity() > 64 * 1024 {
        *buf = BytesMut::new();
    }
    seen
}

/// Relay between the client and the upstream until both are done. Returns the close code
/// that ended the client connection (for metrics).
pub(crate) async fn relay(
    ctx: &ShardCtx,
    shared: &ListenerShared,
    client: &TcpStream,
    client_rest: BytesMut,
    upstream: Upstream,
) -> u16 {
    let cfg = &shared.cfg;
    let limits: Limits = cfg.limits.clone();
    let max_pending = cfg.max_pending_write_bytes.get();
    let up_stream = upstream.stream;
    let mut c = Side::new(client, Conn::new(Role::Server, limits.clone()), client_rest);
    let mut up_conn = Conn::new(Role::Client, limits);
    up_conn.set_mask_seed(u64::from_le_bytes(
        random_16()[..8].try_into().unwrap_or([7; 8]),
    ));
    let mut u = Side::new(&up_stream, up_conn, upstream.rest);
    let registration = ctx.conns.register(0, 0);
    let signal = &*registration.signal;
    let mut code: Option<u16> = None;
    let mut closing = false;
    let mut timer = pin!(Fuse::terminated());

    loop {
        if let Some(cc) = pump(&mut c, &mut u) {
            code.get_or_insert(cc);
        }
        if let Some(uc) = pump(&mut u, &mut c) {
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
        c.start_write();
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
        // Backpressure: read a side only while the other can take more.
        let c_blocked = !u.write.is_terminated() && u.conn.pending_transmit() >= max_pending;
        let u_blocked = !c.write.is_terminated() && c.conn.pending_transmit() >= max_pending;
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
    let mut cw = client;
    let mut uw = &up_stream;
    let _ = Box::pin(async {
        let _ = cw.shutdown().await;
        let _ = uw.shutdown().await;
    })
    .await;
    debug!(shard = ctx.id, code, "proxy connection closed");
    code.unwrap_or(CloseCode::ABNORMAL.0)
}
