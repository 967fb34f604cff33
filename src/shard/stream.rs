//! One connection's byte stream, as the drivers see it: plain TCP, or TLS over TCP.
//! Public because `wsedge-load` drives its client connections through the same type.
//!
//! The drivers keep at most one read and one write in flight per stream (they run
//! concurrently in one select loop), and both take and return owned buffers, as compio does.
//! For TLS the record layer ([`crate::tls`], rustls' buffered API) sits between the socket
//! and those buffers: a read fills a ciphertext buffer owned by the stream and decrypts it
//! into the caller's buffer; a write encrypts the caller's bytes into a second ciphertext
//! buffer and writes that. The rustls state sits in a `RefCell` borrowed only between
//! awaits, never across one, so the concurrent read and write never contend.
//!
//! rustls may queue records of its own while reading (a key update answer, an alert); they
//! go out with the next write, which is what TLS 1.3 requires (before our next application
//! data). Plain connections pay one `Option` check per operation for all this.

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use compio::BufResult;
use compio::buf::{IntoInner, IoBufMut};
use compio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;

use crate::tls::{self, Inbound, PeerIdentity};

/// Ciphertext read size bounds: small for an idle connection's pending read, at most one
/// full record (and header) otherwise.
const MIN_CIPHER_READ: usize = 512;
const MAX_CIPHER_READ: usize = 16 * 1024 + 256;
/// A ciphertext write buffer larger than this is not kept after the write.
const KEEP_CIPHER_OUT: usize = 64 * 1024;

/// A connection's stream. TLS is set once, right after the TLS handshake.
pub struct Stream {
    tcp: TcpStream,
    tls: OnceCell<Box<Tls>>,
}

/// The TLS state of one connection (see [`accept_tls`], [`connect_tls`]).
pub struct Tls {
    conn: RefCell<rustls::Connection>,
    /// Ciphertext read buffer; absent while a read is in flight.
    cipher_in: Cell<Option<Vec<u8>>>,
    /// Ciphertext write buffer; absent while a write is in flight.
    cipher_out: Cell<Option<Vec<u8>>>,
    /// Plaintext that came with the end of the handshake, returned by the first read.
    early: Cell<Option<BytesMut>>,
    /// Set once the peer's close_notify was read (reads then end with 0).
    peer_closed: Cell<bool>,
    /// The verified client certificate's identity (server side, mTLS).
    pub peer_identity: Option<PeerIdentity>,
}

impl Stream {
    /// A plain TCP stream.
    pub fn plain(tcp: TcpStream) -> Self {
        Self {
            tcp,
            tls: OnceCell::new(),
        }
    }

    /// The socket (for options and addresses).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Use TLS from now on (after [`accept_tls`] or [`connect_tls`] succeeded).
    pub fn set_tls(&self, tls: Box<Tls>) {
        // Invariant: called once per stream, right after its handshake.
        let _ = self.tls.set(tls);
    }

    /// The TLS state, if the stream is TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.get().map(|b| &**b)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Read into `buf`'s spare capacity (appending): `Ok(0)` is the end of the stream.
    #[allow(clippy::manual_async_fn)] // a block, not `async fn`: see `driver::serve`
    pub fn read(&self, buf: BytesMut) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
        async move {
            match self.tls.get() {
                // `read` into the spare capacity: what `AsyncReadExt::append` does, one
                // future layer (and one copy of the buffer in the task state) less.
                None => {
                    let mut s = &self.tcp;
                    s.read(IoBufMut::uninit(buf))
                        .await
                        .map_buffer(IntoInner::into_inner)
                }
                // Boxed so that a plain connection's task does not carry the TLS future.
                Some(t) => Box::pin(t.read(&self.tcp, buf)).await,
            }
        }
    }

    /// Write all of `buf`.
    #[allow(clippy::manual_async_fn)] // a block, not `async fn`: see `driver::serve`
    pub fn write_all(&self, buf: Vec<u8>) -> impl Future<Output = BufResult<(), Vec<u8>>> + '_ {
        async move {
            match self.tls.get() {
                None => {
                    let mut s = &self.tcp;
                    s.write_all(buf).await
                }
                Some(t) => {
                    let r = Box::pin(t.write(&self.tcp, &[&buf[..]])).await;
                    BufResult(r, buf)
                }
            }
        }
    }

    /// Write all of `frames`, in order (one vectored write on plain TCP).
    #[allow(clippy::manual_async_fn)] // a block, not `async fn`: see `driver::serve`
    pub fn write_vectored_all(
        &self,
        frames: Vec<Bytes>,
    ) -> impl Future<Output = BufResult<(), Vec<Bytes>>> + '_ {
        async move {
            match self.tls.get() {
                None => {
                    let mut s = &self.tcp;
                    s.write_vectored_all(frames).await
                }
                Some(t) => {
                    let parts: Vec<&[u8]> = frames.iter().map(|b| &b[..]).collect();
                    let r = Box::pin(t.write(&self.tcp, &parts)).await;
                    drop(parts);
                    BufResult(r, frames)
                }
            }
        }
    }

    /// End our direction: TLS close_notify (best effort), then TCP FIN.
    pub async fn shutdown(&self) -> io::Result<()> {
        if let Some(t) = self.tls.get() {
            let mut out = Vec::new();
            {
                let mut c = t.conn.borrow_mut();
                c.send_close_notify();
                let _ = tls::take_output(&mut c, &mut out);
            }
            if !out.is_empty() {
                let mut s = &self.tcp;
                let _ = s.write_all(out).await;
            }
        }
        let mut s = &self.tcp;
        s.shutdown().await
    }
}

impl Tls {
    fn new(conn: rustls::Connection, early: BytesMut) -> Self {
        let peer_identity = match &conn {
            rustls::Connection::Server(s) => s
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerIdentity::from_der(c)),
            rustls::Connection::Client(_) => None,
        };
        Self {
            conn: RefCell::new(conn),
            cipher_in: Cell::new(None),
            cipher_out: Cell::new(None),
            early: Cell::new((!early.is_empty()).then_some(early)),
            peer_closed: Cell::new(false),
            peer_identity,
        }
    }

    /// The SNI name the client asked for (server side).
    pub fn server_name(&self) -> Option<String> {
        match &*self.conn.borrow() {
            rustls::Connection::Server(s) => s.server_name().map(str::to_string),
            rustls::Connection::Client(_) => None,
        }
    }

    async fn read(&self, tcp: &TcpStream, mut buf: BytesMut) -> BufResult<usize, BytesMut> {
        let before = buf.len();
        if let Some(early) = self.early.take() {
            buf.extend_from_slice(&early);
            return BufResult(Ok(early.len()), buf);
        }
        loop {
            if self.peer_closed.get() {
                return BufResult(Ok(0), buf);
            }
            // As much ciphertext as the caller asked plaintext for (records add ~30 bytes).
            let want = (buf.capacity() - buf.len()).clamp(MIN_CIPHER_READ, MAX_CIPHER_READ);
            let mut cipher = self.cipher_in.take().unwrap_or_default();
            cipher.clear();
            cipher.reserve(want);
            let mut s = tcp;
            let BufResult(res, mut cipher) = s.read(cipher).await;
            let result = match res {
                Ok(0) => Ok(Inbound::Closed),
                Ok(_) => tls::decrypt(&mut self.conn.borrow_mut(), &cipher, &mut buf),
                Err(e) => Err(e),
            };
            cipher.clear();
            if cipher.capacity() > MAX_CIPHER_READ {
                cipher = Vec::new();
            }
            self.cipher_in.set(Some(cipher));
            match result {
                Err(e) => return BufResult(Err(e), buf),
                Ok(state) => {
                    if state == Inbound::Closed {
                        self.peer_closed.set(true);
                    }
                    let n = buf.len() - before;
                    // No plaintext yet (a partial record, a ticket): read on.
                    if n > 0 || state == Inbound::Closed {
                        return BufResult(Ok(n), buf);
                    }
                }
            }
        }
    }

    async fn write(&self, tcp: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
        let mut out = self.cipher_out.take().unwrap_or_default();
        out.clear();
        let encrypted = tls::encrypt_vectored(&mut self.conn.borrow_mut(), parts, &mut out);
        let res = match encrypted {
            Ok(()) => {
                let mut s = tcp;
                let BufResult(r, o) = s.write_all(out).await;
                out = o;
                r
            }
            Err(e) => Err(e),
        };
        out.clear();
        if out.capacity() > KEEP_CIPHER_OUT {
            out = Vec::new();
        }
        self.cipher_out.set(Some(out));
        res
    }
}

/// Run the TLS handshake of an accepted connection (server side).
///
/// # Errors
/// The peer went away, or a TLS error (its alert was sent).
pub async fn accept_tls(
    tcp: &TcpStream,
    config: &Arc<rustls::ServerConfig>,
) -> io::Result<Box<Tls>> {
    handshake(tcp, tls::server_conn(config)?).await
}

/// Run the TLS handshake of an outgoing connection (client side, `wss://`).
///
/// # Errors
/// As [`accept_tls`]; a certificate the client does not accept is `InvalidData`.
pub async fn connect_tls(tcp: &TcpStream, t: &tls::ClientTls) -> io::Result<Box<Tls>> {
    handshake(tcp, tls::client_conn(t)?).await
}

async fn handshake(tcp: &TcpStream, mut conn: rustls::Connection) -> io::Result<Box<Tls>> {
    let mut early = BytesMut::new();
    let mut out = Vec::new();
    let mut cipher = Vec::with_capacity(MAX_CIPHER_READ);
    loop {
        out.clear();
        tls::take_output(&mut conn, &mut out)?;
        if !out.is_empty() {
            let mut s = tcp;
            let BufResult(r, o) = s.write_all(out).await;
            r?;
            out = o;
        }
        if !conn.is_handshaking() {
            return Ok(Box::new(Tls::new(conn, early)));
        }
        cipher.clear();
        let mut s = tcp;
        let BufResult(r, c) = s.read(cipher).await;
        cipher = c;
        if r? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Err(e) = tls::decrypt(&mut conn, &cipher, &mut early) {
            // Tell the peer why (the alert rustls queued), then fail.
            out.clear();
            let _ = tls::take_output(&mut conn, &mut out);
            if !out.is_empty() {
                let mut s = tcp;
                let _ = s.write_all(out).await;
            }
            return Err(e);
        }
    }
}
