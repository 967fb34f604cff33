//! The admin listener: a small blocking HTTP/1.1 server on its own thread.
//!
//! `GET /healthz` (200 `ok`, 503 `draining` during shutdown), `GET /metrics` (Prometheus
//! text) and `GET /stats` (JSON per shard). Admin traffic is rare and tiny, so it lives off
//! the shards: it asks each shard for a counter snapshot over the control channel and never
//! touches shard state directly. One request per connection, bounded in size and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info};

use crate::metrics::{render_prometheus, render_stats_json};
use crate::shard::ShardSet;

/// Largest admin request accepted, bytes.
const MAX_REQUEST: usize = 8192;

/// A running admin listener.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Bind `bind` and serve on a new thread.
    ///
    /// # Errors
    /// The bind error.
    pub fn start(bind: SocketAddr, shards: ShardSet) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        info!(%addr, "admin listening");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wsedge-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(c) = conn {
                        if let Err(e) = handle(c, &shards) {
                            debug!(error = %e, "admin request failed");
                        }
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop serving and join the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(mut c: TcpStream, shards: &ShardSet) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {}
            _ => return respond(&mut c, 400, "text/plain", "bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or_default();
    match (method.as_str(), path) {
        ("GET", "/healthz") => {
            if shards.info().draining {
                respond(&mut c, 503, "text/plain", "draining\n")
            } else {
                respond(&mut c, 200, "text/plain", "ok\n")
            }
        }
        ("GET", "/metrics") => {
            let body = render_prometheus(&shards.info(), &shards.snapshots());
            respond(&mut c, 200, "text/plain; version=0.0.4", &body)
        }
        ("GET", "/stats") => {
            let body = render_stats_json(&shards.info(), &shards.snapshots());
            respond(&mut c, 200, "application/json", &body)
        }
        (_, "/healthz" | "/metrics" | "/stats") => {
            respond(&mut c, 405, "text/plain", "method not allowed\n")
        }
        _ => respond(&mut c, 404, "text/plain", "not found\n"),
    }
}

fn respond(c: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    c.flush()
}
