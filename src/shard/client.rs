//! The client side of WebSocket connections wsedge makes to upstreams (proxy routes,
//! sources): TCP connect and upgrade under a deadline, and [`Side`], one WebSocket hop with
//! its own protocol core, read and write buffers and in-flight operations, which the proxy
//! relay and the source loop drive.

use std::time::Duration;

use bytes::BytesMut;
use compio::BufResult;
use compio::net::TcpStream;
use futures_util::future::{Fuse, FusedFuture, FutureExt, LocalBoxFuture};
use tracing::debug;

use super::driver::ReadSize;
use super::stream::{Stream, connect_tls};
use crate::proto::handshake::{HandshakeLimits, generate_key, parse_response};
use crate::proto::{Conn, DeflateConfig, DeflateParams, State, deflate};
use crate::upstream::{Forwarding, WsUrl, write_request};

/// An upstream connection whose handshake succeeded.
pub(crate) struct Upstream {
    pub(crate) stream: Stream,
    /// Bytes the upstream sent after its 101.
    pub(crate) rest: BytesMut,
    /// The subprotocol the upstream selected (answered to the client).
    pub(crate) protocol: Option<String>,
    /// permessage-deflate as the upstream accepted it, and our send threshold.
    pub(crate) deflate: Option<(DeflateParams, usize)>,
}

impl Upstream {
    /// The client-role protocol core for this connection (masks seeded at random,
    /// permessage-deflate if negotiated), counted in `metrics`.
    pub(crate) fn conn(
        &self,
        limits: crate::proto::Limits,
        metrics: &crate::metrics::ShardMetrics,
    ) -> Conn {
        let mut conn = Conn::new(crate::proto::Role::Client, limits);
        conn.set_mask_seed(u64::from_le_bytes(
            random_16()[..8].try_into().unwrap_or([7; 8]),
        ));
        if let Some((p, threshold)) = &self.deflate {
            conn.set_deflate(p, *threshold);
            metrics.on_deflate_negotiated();
        }
        conn
    }
}

/// Why an upstream could not be reached (proxy routes answer 502; sources retry).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("closed during the handshake")]
    Closed,
    #[error("answered status {0}")]
    Status(u16),
    #[error("invalid handshake: {0}")]
    Invalid(crate::proto::HandshakeError),
}

/// Connect to `url` and complete the WebSocket handshake within `timeout`: `headers`, then
/// the proxy headers of `fwd` if any, offering `protocols` and, with `deflate`,
/// permessage-deflate. An answer with an extension we did not offer (or an invalid
/// permessage-deflate answer) fails the connection.
pub(crate) async fn connect(
    url: &WsUrl,
    headers: &[(String, String)],
    fwd: Option<&Forwarding<'_>>,
    protocols: &[String],
    deflate: Option<&DeflateConfig>,
    timeout: Duration,
) -> Result<Upstream, UpstreamError> {
    let attempt = async {
        let tcp = TcpStream::connect(url.addr)
            .await
            .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let stream = Stream::plain(tcp);
        if let Some(t) = &url.tls {
            let tls = connect_tls(stream.tcp(), t)
                .await
                .map_err(UpstreamError::Tls)?;
            stream.set_tls(tls);
        }
        let key = generate_key(random_16());
        let mut out = Vec::with_capacity(512);
        let offer = deflate.map(deflate::client_offer);
        write_request(
            url,
            &key,
            headers,
            fwd,
            protocols,
            offer.as_deref(),
            &mut out,
        );
        stream
            .write_all(out)
            .await
            .0
            .map_err(UpstreamError::Connect)?;
        let offered: Vec<&str> = protocols.iter().map(String::as_str).collect();
        let limits = HandshakeLimits::default();
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if buf.capacity() == buf.len() {
                buf.reserve(1024);
            }
            let BufResult(res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) => return Err(UpstreamError::Closed),
                Err(e) => return Err(UpstreamError::Connect(e)),
                Ok(_) => {}
            }
            match parse_response(&buf, &key, &offered, &limits) {
                Ok(None) => {}
                Ok(Some((resp, consumed))) => {
                    let accepted = deflate::accept_response(&resp.headers, deflate.is_some())
                        .map_err(UpstreamError::Invalid)?;
                    let _ = buf.split_to(consumed);
                    return Ok(Upstream {
                        stream,
                        rest: buf,
                        protocol: resp.protocol,
                        deflate: accepted.zip(deflate.map(|d| d.threshold_bytes)),
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
    compio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(UpstreamError::Timeout(timeout)))
}

/// A mask seed / key source without a dependency: std's randomly keyed hasher.
pub(crate) fn random_16() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// A small xorshift generator for reconnect jitter (sources, WebSocket sinks); not for
/// anything secret.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Self {
        let b = random_16();
        Self(u64::from_le_bytes(b[..8].try_into().unwrap_or([1; 8])) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub(crate) type ReadFut<'a> = Fuse<LocalBoxFuture<'a, BufResult<usize, BytesMut>>>;
pub(crate) type WriteFut<'a> = Fuse<LocalBoxFuture<'a, BufResult<(), Vec<u8>>>>;

/// One WebSocket hop: a socket, its protocol core, and at most one read and one write.
pub(crate) struct Side<'a> {
    pub(crate) stream: &'a Stream,
    pub(crate) conn: Conn,
    /// Read buffer, absent while a read is in flight.
    pub(crate) rbuf: Option<BytesMut>,
    /// Output buffer, absent while a write is in flight.
    pub(crate) out: Option<Vec<u8>>,
    pub(crate) pending_input: bool,
    pub(crate) eof: bool,
    pub(crate) failed: bool,
    pub(crate) read: ReadFut<'a>,
    pub(crate) write: WriteFut<'a>,
    /// Adaptive read size: a 16 KiB message is one receive, not a 4 KiB one and the rest;
    /// an idle hop holds only the smallest read buffer.
    read_size: ReadSize,
}

impl<'a> Side<'a> {
    pub(crate) fn new(stream: &'a Stream, conn: Conn, rest: BytesMut) -> Self {
        let pending_input = !rest.is_empty();
        // The handshake's read buffer (1 KiB) is kept only if frames came behind the
        // handshake; a quiet hop starts with the small idle buffer, as server connections do.
        let read_size = ReadSize::default();
        let mut rest = rest;
        read_size.trim(&mut rest);
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
            read_size,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.failed || matches!(self.conn.state(), State::Closed | State::Failed) || self.eof
    }

    /// Start a write if output is queued and none is in flight.
    pub(crate) fn start_write(&mut self) {
        if self.write.is_terminated() && self.conn.has_shared() && !self.failed {
            // Payloads queued by reference: one vectored write. The output buffer stays
            // "in flight" with it, so the invariant below holds for both kinds of write.
            let mut frames = Vec::new();
            self.conn.poll_transmit_frames(&mut frames);
            // Invariant: `out` is only absent while a write is in flight.
            let o = self.out.take().expect("out buffer present");
            let s = self.stream;
            self.write = async move {
                let BufResult(r, _) = s.write_vectored_all(frames).await;
                BufResult(r, o)
            }
            .boxed_local()
            .fuse();
            return;
        }
        if self.write.is_terminated() && self.conn.pending_transmit() > 0 && !self.failed {
            // Invariant: `out` is only absent while a write is in flight.
            let mut o = self.out.take().expect("out buffer present");
            self.conn.poll_transmit(&mut o);
            let s = self.stream;
            self.write = async move { s.write_all(o).await }.boxed_local().fuse();
        }
    }

    /// Start a read unless one is in flight, the side is finished, or `blocked`.
    pub(crate) fn start_read(&mut self, blocked: bool) {
        if self.read.is_terminated() && !blocked && !self.eof && !self.failed {
            // Invariant: the buffer is ours whenever no read is in flight.
            let mut buf = self.rbuf.take().expect("read buffer present");
            let want = self.read_size.want(self.conn.bytes_needed());
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
            let s = self.stream;
            self.read = async move { s.read(buf).await }.boxed_local().fuse();
        }
    }

    /// Release a drained read buffer much larger than the current read size, so a hop that
    /// goes quiet after a burst of large messages does not keep the burst's buffer.
    pub(crate) fn trim_read_buffer(&mut self) {
        if let Some(b) = self.rbuf.as_mut() {
            self.read_size.trim(b);
        }
    }

    pub(crate) fn on_read(&mut self, res: std::io::Result<usize>, buf: BytesMut) {
        match res {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.read_size.observe(n);
                self.pending_input = true;
            }
            Err(e) => {
                debug!(error = %e, "proxy read failed");
                self.failed = true;
            }
        }
        self.rbuf = Some(buf);
    }

    pub(crate) fn on_write(&mut self, res: std::io::Result<()>, mut o: Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::Rng;
    use crate::config::Backoff;
    use std::time::Duration;

    /// Full jitter as the sources and WebSocket sinks draw it: every delay within
    /// `0..=cap(n)`, the cap growing by the multiplier up to `max`, and the draws spread over
    /// the whole range (not stuck at 0 or at the cap).
    #[test]
    fn jittered_backoff_stays_within_its_bounds() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(2_000),
            multiplier: 2.0,
            max_attempts: None,
        };
        let mut rng = Rng::new();
        for failures in 1..=12 {
            let cap = b.cap(failures);
            let expected = (100u64 << (failures - 1)).min(2_000);
            assert_eq!(cap, Duration::from_millis(expected), "cap {failures}");
            let draws: Vec<Duration> = (0..2_000)
                .map(|_| b.delay(failures, rng.next_u64()))
                .collect();
            assert!(draws.iter().all(|d| *d <= cap), "{failures}: above the cap");
            let (lo, hi) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
            assert!(
                *lo <= cap / 10,
                "{failures}: lowest draw {lo:?} of cap {cap:?}"
            );
            assert!(
                *hi >= cap * 9 / 10,
                "{failures}: highest draw {hi:?} of cap {cap:?}"
            );
        }
        // Extremes: a zero random value is no wait; u64::MAX stays within the cap.
        assert_eq!(b.delay(1, 0), Duration::ZERO);
        assert!(b.delay(40, u64::MAX) <= Duration::from_millis(2_000));
    }
}
