//! Client connections: TCP connect (optionally from a chosen source address), TLS for
//! `wss://` URLs, and the WebSocket upgrade, using the client role of wsedge's sans-IO
//! protocol core and wsedge's own stream type (so TLS is the server's record layer too).

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use compio::BufResult;
use compio::net::TcpStream;
use wsedge::proto::handshake::{generate_key, parse_response, write_client_request};
use wsedge::proto::{Conn, HandshakeError, HandshakeLimits, Limits, Role};
use wsedge::shard::stream::{Stream, connect_tls};
use wsedge::tls::ClientTls;
use wsedge::upstream::{TlsOptions, WsUrl};

/// A parsed `ws://` or `wss://host:port/path` URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request path (with query).
    pub path: String,
    /// `wss://`: the TLS client settings.
    pub tls: Option<Box<ClientTls>>,
    /// Deadline for the TCP connect, the TLS handshake and the upgrade together.
    pub connect_timeout: Duration,
}

/// Default of `--connect-timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Target {
    /// Parse a `ws://` URL, or a `wss://` one with default TLS settings (system roots).
    #[cfg(test)]
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        Self::parse_with(url, &TlsOptions::default())
    }

    /// Parse a `ws://` or `wss://` URL with an IP or resolvable host name.
    pub fn parse_with(url: &str, tls: &TlsOptions) -> anyhow::Result<Self> {
        let u = WsUrl::parse_with(url, tls).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            addr: u.addr,
            host: u.host,
            path: u.path,
            tls: u.tls,
            connect_timeout: CONNECT_TIMEOUT,
        })
    }
}

/// Why a connection attempt failed; the label is the error kind in reports.
#[derive(Debug)]
pub enum ConnectError {
    /// TCP connect failed (refused, unreachable, out of ports or descriptors).
    Connect(std::io::Error),
    /// The server answered the upgrade with another status.
    Status(u16),
    /// The upgrade response was malformed or did not match.
    Handshake(HandshakeError),
    /// The connection broke during the handshake.
    Io(std::io::Error),
    /// The TLS handshake failed (certificate refused, alert, ...).
    Tls(std::io::Error),
    /// Connect, TLS and upgrade did not finish within the target's `connect_timeout` (a
    /// server that does not accept, or accepts and never answers the upgrade).
    Timeout,
}

impl ConnectError {
    /// Short stable label for error tables.
    pub fn label(&self) -> String {
        match self {
            Self::Connect(e) => format!("connect: {}", io_kind(e)),
            Self::Status(s) => format!("handshake status {s}"),
            Self::Handshake(e) => format!("handshake invalid: {e}"),
            Self::Io(e) => format!("handshake io: {}", io_kind(e)),
            Self::Tls(e) => format!("tls: {e}"),
            Self::Timeout => "connect: timeout".into(),
        }
    }
}

/// A compact name for an I/O error.
pub fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(111) => "refused".into(),
        Some(99) => "no free local port (EADDRNOTAVAIL)".into(),
        Some(24) => "out of file descriptors (EMFILE)".into(),
        Some(104) => "reset".into(),
        _ => format!("{:?}", e.kind()).to_lowercase(),
    }
}

/// An upgraded connection.
pub struct WsClient {
    /// The socket (plain or TLS), shared by a connection's concurrent read and write.
    pub stream: Rc<Stream>,
    /// Protocol state (client role).
    pub conn: Conn,
    /// Bytes read but not yet consumed by `conn`.
    pub rbuf: BytesMut,
}

/// Connect to `target` (from `source` if given) and upgrade, within the target's
/// `connect_timeout`.
pub async fn connect(
    target: &Target,
    source: Option<IpAddr>,
    seed: u64,
) -> Result<WsClient, ConnectError> {
    compio::time::timeout(target.connect_timeout, connect_now(target, source, seed))
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

async fn connect_now(
    target: &Target,
    source: Option<IpAddr>,
    seed: u64,
) -> Result<WsClient, ConnectError> {
    let tcp = match source {
        None => TcpStream::connect(target.addr)
            .await
            .map_err(ConnectError::Connect)?,
        Some(ip) => connect_from(ip, target.addr).await?,
    };
    let _ = tcp.set_nodelay(true);
    let stream = Stream::plain(tcp);
    if let Some(t) = &target.tls {
        let tls = connect_tls(stream.tcp(), t)
            .await
            .map_err(ConnectError::Tls)?;
        stream.set_tls(tls);
    }
    let key = generate_key(nonce(seed));
    let mut req = Vec::with_capacity(256);
    write_client_request(&target.host, &target.path, &key, &[], &[], &mut req);
    if let BufResult(Err(e), _) = stream.write_all(req).await {
        return Err(ConnectError::Io(e));
    }
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        let BufResult(res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) => {
                return Err(match status_of(&buf) {
                    Some(st) => ConnectError::Status(st),
                    None => ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                });
            }
            Err(e) => return Err(ConnectError::Io(e)),
            Ok(_) => {}
        }
        match parse_response(&buf, &key, &[], &HandshakeLimits::default()) {
            Ok(None) => {}
            Ok(Some((_, n))) => {
                let _ = buf.split_to(n);
                let mut conn = Conn::new(Role::Client, Limits::default());
                conn.set_mask_seed(seed);
                return Ok(WsClient {
                    stream: Rc::new(stream),
                    conn,
                    rbuf: buf,
                });
            }
            Err(HandshakeError::UnexpectedStatus(st)) => return Err(ConnectError::Status(st)),
            Err(e) => return Err(ConnectError::Handshake(e)),
        }
    }
}

fn status_of(buf: &[u8]) -> Option<u16> {
    std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
}

/// Bind to `ip` with IP_BIND_ADDRESS_NO_PORT (the port is chosen at connect time, per
/// destination, so each source address offers the whole ephemeral range), then connect.
async fn connect_from(ip: IpAddr, to: SocketAddr) -> Result<TcpStream, ConnectError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Connect)?;
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
        .map_err(|e| ConnectError::Connect(e.into()))?;
    sock.set_nonblocking(true).map_err(ConnectError::Connect)?;
    let sock = compio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock))
        .map_err(ConnectError::Connect)?;
    sock.bind(SocketAddr::new(ip, 0))
        .await
        .map_err(ConnectError::Connect)?;
    sock.connect(to).await.map_err(ConnectError::Connect)
}

/// Connect connections `range`, 64 at a time so that a large run does not overflow the
/// server's accept backlog: connection `i` goes to `target(i)`, from source address
/// `i % sources.len()` if any, with its key and masks seeded by `splitmix(i ^ salt)`.
/// Returns every result with its index, in order.
pub async fn connect_batched<'t>(
    range: std::ops::Range<usize>,
    sources: &[IpAddr],
    salt: u64,
    target: impl Fn(usize) -> &'t Target,
) -> Vec<(usize, Result<WsClient, ConnectError>)> {
    let mut out = Vec::with_capacity(range.len());
    for chunk in range.collect::<Vec<_>>().chunks(64) {
        let futs = chunk.iter().map(|&i| {
            let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let t = target(i);
            async move { (i, connect(t, src, splitmix(i as u64 ^ salt)).await) }
        });
        out.extend(futures_util::future::join_all(futs).await);
    }
    out
}

/// 16 bytes of nonce from a seed (splitmix64); keys need only be unpredictable to caches.
fn nonce(seed: u64) -> [u8; 16] {
    let mut s = seed;
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        s = splitmix(s);
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// splitmix64 step.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
