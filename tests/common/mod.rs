//! Shared test harness: an in-process server on 127.0.0.1:0 and a small blocking WebSocket
//! client built on wsedge's own protocol core (client role).
#![allow(dead_code)]

pub mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use wsedge::config::{Config, IoMode};
use wsedge::metrics::{Snapshot, merge};
use wsedge::proto::handshake::{generate_key, parse_response, write_client_request};
use wsedge::proto::{
    CloseCode, Conn, DeflateConfig, Event, HandshakeLimits, Limits, MessageKind, Role,
};
use wsedge::shard::Server;

/// Generous bound for a blocking read in tests; a correct server answers in microseconds.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Generate one `#[test]` per I/O backend for a body `fn(IoMode)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name(wsedge::config::IoMode::Uring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name(wsedge::config::IoMode::Epoll) } )*
        }
    };
}

/// An in-process wsedge.
pub struct TestServer {
    server: Option<Server>,
    /// The WebSocket listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// Listener keys for [`start`]; appended to a minimal config with an `/echo` route.
pub fn start(io: IoMode, shards: usize, listener_extra: &str) -> TestServer {
    start_with(io, shards, listener_extra, "")
}

/// Like [`start`], with extra `[runtime]` keys.
pub fn start_with(
    io: IoMode,
    shards: usize,
    listener_extra: &str,
    runtime_extra: &str,
) -> TestServer {
    let text = format!(
        "[runtime]\nshards = {shards}\npin_threads = false\n{runtime_extra}\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[listener.route]]\npath = \"/echo\"\nkind = \"echo\"\n\
         subprotocols = [\"v2.wsedge\", \"v1.wsedge\"]\n\
         [admin]\nbind = \"127.0.0.1:0\"\n"
    );
    let mut cfg = Config::parse(&text).expect("test config");
    cfg.runtime.io = io;
    let server = Server::start(&cfg).expect("server starts");
    TestServer {
        addr: server.listen_addrs()[0].1,
        admin: server.admin_addr().expect("admin enabled"),
        server: Some(server),
    }
}

impl TestServer {
    /// Counters of each shard.
    pub fn per_shard(&self) -> Vec<Snapshot> {
        self.server.as_ref().unwrap().shards().snapshots()
    }

    /// Merged counters of all shards.
    pub fn totals(&self) -> Snapshot {
        merge(&self.server.as_ref().unwrap().shards().snapshots())
    }

    /// Reload the TLS certificates (what SIGHUP does).
    pub fn reload_tls(&mut self) -> Result<usize, String> {
        self.server.as_mut().unwrap().reload_tls()
    }

    /// Drain and stop (blocks until the shards and sinks exit); returns the sinks' final
    /// counters.
    pub fn shutdown(mut self) -> Vec<wsedge::metrics::SinkSnapshot> {
        self.server.take().map(|s| s.shutdown()).unwrap_or_default()
    }

    /// Poll the counters until `pred` holds (bounded by [`READ_TIMEOUT`]); panics otherwise.
    /// Counters are updated by the shard after it has answered the client, so a test that
    /// saw the answer may still need a moment before the counter moves.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = std::time::Instant::now() + READ_TIMEOUT;
        loop {
            let t = self.totals();
            if pred(&t) {
                return t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {t:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// One HTTP GET to the admin listener; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        b"",
    )
}

/// One HTTP POST to the admin listener; returns (status, body).
pub fn http_post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    http(addr, &head, body)
}

fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// Raise the open-file soft limit to the hard limit (tests with many connections).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Send raw bytes as a request and read the whole response until the server closes.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).into_owned()
}

/// A valid upgrade request for `path`.
pub fn upgrade_request(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    write_client_request(
        "127.0.0.1",
        path,
        &generate_key([7; 16]),
        &[],
        &[],
        &mut out,
    );
    out
}

/// A blocking WebSocket client (client role of wsedge's protocol core), over plain TCP or
/// (with `S` = [`pki::TlsStream`]) TLS.
pub struct Client<S: Read + Write = TcpStream> {
    pub stream: S,
    pub conn: Conn,
    rbuf: BytesMut,
}

/// How a handshake attempt ended.
#[derive(Debug)]
pub enum Refused {
    /// The server answered with a non-101 status; the response text.
    Status(u16, String),
    /// The connection closed or failed.
    Io(String),
}

impl Client<pki::TlsStream> {
    /// Connect over TLS (trusting `ca`, as `server_name`) and upgrade.
    pub fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        ca: &std::path::Path,
        client_cert: Option<&pki::Leaf>,
        path: &str,
    ) -> Result<Self, Refused> {
        let s = pki::tls_connect(addr, server_name, ca, client_cert).map_err(Refused::Io)?;
        Self::upgrade(s, path, &[]).map(|(c, _)| c)
    }
}

impl Client {
    /// [`Client::next_event`] waiting at most `d`: `Err(())` if nothing came.
    pub fn next_event_within(&mut self, d: Duration) -> Result<Option<Event>, ()> {
        self.stream.set_read_timeout(Some(d)).unwrap();
        let r = loop {
            if let Some(ev) = self.conn.poll_event() {
                break Ok(Some(ev));
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => break Ok(None),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&chunk[..n]);
                    self.conn
                        .handle_input(&mut self.rbuf)
                        .expect("server sent valid frames");
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        r
    }

    /// Connect and upgrade; panics on failure.
    pub fn connect(addr: SocketAddr, path: &str) -> Self {
        Self::try_connect(addr, path).expect("upgrade succeeds")
    }

    /// Connect and upgrade.
    pub fn try_connect(addr: SocketAddr, path: &str) -> Result<Self, Refused> {
        Self::try_connect_with(addr, path, &[]).map(|(c, _)| c)
    }

    /// Connect offering subprotocols; returns the client and the protocol the server chose.
    pub fn try_connect_with(
        addr: SocketAddr,
        path: &str,
        protocols: &[&str],
    ) -> Result<(Self, Option<String>), Refused> {
        let stream = TcpStream::connect(addr).map_err(|e| Refused::Io(e.to_string()))?;
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Self::upgrade(stream, path, protocols)
    }

    /// Connect and upgrade with extra request headers; panics on failure.
    pub fn connect_with_headers(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Self::upgrade_with(stream, path, &[], headers)
            .expect("upgrade succeeds")
            .0
    }

    /// Connect offering permessage-deflate (sending compressed above `threshold` bytes);
    /// panics on failure. `conn.deflate_enabled()` tells whether the server accepted.
    pub fn connect_deflate(addr: SocketAddr, path: &str, threshold: usize) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let cfg = DeflateConfig {
            threshold_bytes: threshold,
            ..DeflateConfig::default()
        };
        Self::upgrade_full(stream, path, &[], &[], Some(&cfg))
            .expect("upgrade succeeds")
            .0
    }

    /// After the close handshake: true if the server then closed the TCP connection.
    pub fn server_closed_tcp(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

impl<S: Read + Write> Client<S> {
    /// Upgrade an already connected stream (read timeout set by the caller).
    pub fn upgrade(
        stream: S,
        path: &str,
        protocols: &[&str],
    ) -> Result<(Self, Option<String>), Refused> {
        Self::upgrade_with(stream, path, protocols, &[])
    }

    /// [`Client::upgrade`] with extra request headers.
    pub fn upgrade_with(
        stream: S,
        path: &str,
        protocols: &[&str],
        headers: &[(&str, &str)],
    ) -> Result<(Self, Option<String>), Refused> {
        Self::upgrade_full(stream, path, protocols, headers, None)
    }

    /// [`Client::upgrade_with`], offering permessage-deflate with `deflate` (the protocol
    /// core then compresses and inflates as negotiated). Any extension in the answer that
    /// was not offered fails the upgrade.
    pub fn upgrade_full(
        mut stream: S,
        path: &str,
        protocols: &[&str],
        headers: &[(&str, &str)],
        deflate: Option<&DeflateConfig>,
    ) -> Result<(Self, Option<String>), Refused> {
        let key = generate_key(rand_bytes());
        let mut req = Vec::new();
        let offer = deflate.map(wsedge::proto::deflate::client_offer);
        let mut headers = headers.to_vec();
        if let Some(o) = &offer {
            headers.push(("Sec-WebSocket-Extensions", o));
        }
        write_client_request("127.0.0.1", path, &key, protocols, &headers, &mut req);
        stream
            .write_all(&req)
            .map_err(|e| Refused::Io(e.to_string()))?;
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut chunk)
                .map_err(|e| Refused::Io(e.to_string()))?;
            if n == 0 {
                let text = String::from_utf8_lossy(&buf).into_owned();
                return match text.get(9..12).and_then(|s| s.parse().ok()) {
                    Some(status) => Err(Refused::Status(status, text)),
                    None => Err(Refused::Io(format!("closed before a response: {text:?}"))),
                };
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_response(&buf, &key, protocols, &HandshakeLimits::default()) {
                Ok(None) => {}
                Ok(Some((resp, consumed))) => {
                    let _ = buf.split_to(consumed);
                    let mut conn = Conn::new(Role::Client, Limits::default());
                    conn.set_mask_seed(u64::from_le_bytes(rand_bytes()[..8].try_into().unwrap()));
                    let accepted =
                        wsedge::proto::deflate::accept_response(&resp.headers, deflate.is_some())
                            .map_err(|e| Refused::Io(format!("bad extension answer: {e}")))?;
                    if let (Some(p), Some(d)) = (accepted, deflate) {
                        conn.set_deflate(&p, d.threshold_bytes);
                    }
                    let mut client = Self {
                        stream,
                        conn,
                        rbuf: buf,
                    };
                    // Frames that arrived together with the 101.
                    if !client.rbuf.is_empty() {
                        client
                            .conn
                            .handle_input(&mut client.rbuf)
                            .expect("server sent valid frames");
                    }
                    return Ok((client, resp.protocol));
                }
                Err(_) => {
                    // Read the rest of the error response.
                    let _ = stream.read_to_end(&mut buf.to_vec());
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return Err(Refused::Status(status, text));
                }
            }
        }
    }

    /// Write everything the protocol core has queued.
    pub fn flush(&mut self) {
        let mut out = Vec::new();
        self.conn.poll_transmit(&mut out);
        self.stream.write_all(&out).unwrap();
    }

    /// Send one text message.
    pub fn send_text(&mut self, s: &str) {
        self.conn.send(MessageKind::Text, s.as_bytes()).unwrap();
        self.flush();
    }

    /// Send one message compressed with permessage-deflate (if negotiated, above the
    /// threshold and if it shrinks; plain otherwise). Returns whether it was compressed.
    pub fn send_compressed(&mut self, kind: MessageKind, b: &[u8]) -> bool {
        let mut z = wsedge::proto::Compressor::default();
        let c = self.conn.send_compressed(kind, b, &mut z).unwrap();
        self.flush();
        c
    }

    /// Send one binary message.
    pub fn send_binary(&mut self, b: &[u8]) {
        self.conn.send(MessageKind::Binary, b).unwrap();
        self.flush();
    }

    /// Write raw bytes to the socket (hostile input).
    pub fn send_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).unwrap();
    }

    /// Next event, or None when the server closed the TCP connection.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.conn.poll_event() {
                return Some(ev);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("read failed (timeout?): {e}"),
            };
            if n == 0 {
                return None;
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
            self.conn
                .handle_input(&mut self.rbuf)
                .expect("server sent valid frames");
        }
    }

    /// Next message (skipping pings/pongs); panics on close.
    pub fn recv(&mut self) -> (MessageKind, Vec<u8>) {
        loop {
            match self.next_event() {
                Some(Event::Message { kind, data }) => return (kind, data.to_vec()),
                Some(Event::Ping(_)) | Some(Event::Pong(_)) => {}
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// Read until the server's close frame; returns its code (answering it), or None if the
    /// connection ended without one.
    pub fn expect_close(&mut self) -> Option<CloseCode> {
        loop {
            match self.next_event() {
                Some(Event::Close { code, .. }) => {
                    let mut out = Vec::new();
                    self.conn.poll_transmit(&mut out);
                    let _ = self.stream.write_all(&out);
                    return code;
                }
                Some(_) => {}
                None => return None,
            }
        }
    }
}

/// Bytes from the OS RNG-free source good enough for tests: a hash of time and a counter.
pub fn rand_bytes() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// A masked client frame built by hand (for hostile-input tests).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let key = [1u8, 2, 3, 4];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// The server end of one WebSocket accepted by a test (a scripted upstream), on wsedge's
/// protocol core in the server role. Pings are answered as they are read.
pub struct Peer {
    pub stream: TcpStream,
    pub conn: Conn,
    buf: BytesMut,
    /// The upgrade request the peer received.
    pub request: wsedge::proto::UpgradeRequest,
}

impl Peer {
    /// Accept one connection on `l` and complete its handshake (101, no subprotocol).
    pub fn accept(l: &std::net::TcpListener) -> Self {
        use wsedge::proto::handshake::{parse_request, write_response_101};
        let (mut stream, _) = l.accept().unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        let request = loop {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some((req, used)) = parse_request(&buf, &HandshakeLimits::default()).unwrap() {
                let _ = buf.split_to(used);
                break req;
            }
        };
        let mut out = Vec::new();
        write_response_101(&request.key, None, &[], &mut out);
        stream.write_all(&out).unwrap();
        let mut peer = Self {
            stream,
            conn: Conn::new(Role::Server, Limits::default()),
            buf,
            request,
        };
        if !peer.buf.is_empty() {
            peer.conn.handle_input(&mut peer.buf).unwrap();
        }
        peer
    }

    /// Write what the protocol core has queued.
    pub fn flush(&mut self) {
        let mut out = Vec::new();
        self.conn.poll_transmit(&mut out);
        let _ = self.stream.write_all(&out);
    }

    /// Send a text message.
    pub fn send_text(&mut self, s: &str) {
        self.conn.send(MessageKind::Text, s.as_bytes()).unwrap();
        self.flush();
    }

    /// Next event (pings answered on the way), or None when the connection ended.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.conn.poll_event() {
                self.flush();
                return Some(ev);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.conn.handle_input(&mut self.buf).is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// One read's worth of events, pings answered only in the protocol core's queue: the
    /// caller decides when (or whether) the pongs go out with [`Peer::flush`]. None when
    /// the connection ended.
    pub fn read_events(&mut self) -> Option<Vec<Event>> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.conn.handle_input(&mut self.buf).ok()?;
                Some(std::iter::from_fn(|| self.conn.poll_event()).collect())
            }
        }
    }

    /// The next text message, skipping control frames; None if the connection ended.
    pub fn recv_text(&mut self) -> Option<String> {
        loop {
            match self.next_event()? {
                Event::Message { data, .. } => return Some(String::from_utf8_lossy(&data).into()),
                Event::Close { .. } => return None,
                _ => {}
            }
        }
    }
}
