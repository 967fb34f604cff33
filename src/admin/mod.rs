//! The admin listener: a small blocking HTTP/1.1 server on its own thread.
//!
//! `GET /healthz` (200 `ok`, 503 `draining` during shutdown), `GET /metrics` (Prometheus
//! text), `GET /stats` (JSON per shard) and `POST /publish/{topic}` (the body is broadcast to
//! the topic's subscribers on every shard; text unless `Content-Type:
//! application/octet-stream`, answered with the number of subscribers reached). Admin traffic
//! is rare and small, so it lives off the shards: it talks to each shard over the control
//! channel and never touches shard state directly. One request per connection, bounded in
//! size and in time: the whole request (head and body) must arrive within
//! [`REQUEST_DEADLINE`], however it trickles in. Requests are served on their own threads, at
//! most [`MAX_CONCURRENT`] at once (more get a 503 at once), so a few slow or stuck clients
//! cannot keep `/healthz` from answering.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::metrics::{render_prometheus, render_stats_json};
use crate::proto::MessageKind;
use crate::shard::ShardSet;

/// Largest admin request head accepted, bytes.
const MAX_REQUEST: usize = 8192;
/// Largest `POST /publish` body, bytes.
pub const MAX_PUBLISH_BYTES: usize = 1 << 20;
/// Time for a whole request to arrive, from the accept.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Requests served at once; beyond, 503.
pub const MAX_CONCURRENT: usize = 8;

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
                let busy = Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut c = match conn {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors, say: do not spin on it.
                            debug!(error = %e, "admin accept failed");
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    if busy.load(Ordering::Relaxed) >= MAX_CONCURRENT {
                        let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
                        let _ = respond(&mut c, 503, "text/plain", "admin busy\n");
                        continue;
                    }
                    busy.fetch_add(1, Ordering::Relaxed);
                    let (shards, busy2) = (shards.clone(), busy.clone());
                    let spawned = std::thread::Builder::new()
                        .name("wsedge-admin-req".into())
                        .spawn(move || {
                            if let Err(e) = handle(c, &shards) {
                                debug!(error = %e, "admin request failed");
                            }
                            busy2.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        busy.fetch_sub(1, Ordering::Relaxed);
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

/// Read into `chunk` unless `deadline` has passed (then `TimedOut`).
fn read_by(c: &mut TcpStream, chunk: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    c.set_read_timeout(Some(left))?;
    c.read(chunk)
}

fn handle(mut c: TcpStream, shards: &ShardSet) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path, head_len, body_len, binary) = loop {
        let n = read_by(&mut c, &mut chunk, deadline)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::trim)
                };
                let body_len = match header("content-length").map(str::parse::<usize>) {
                    None => 0,
                    Some(Ok(n)) if n <= MAX_PUBLISH_BYTES => n,
                    Some(Ok(_)) => {
                        return respond(&mut c, 413, "text/plain", "body too large\n");
                    }
                    Some(Err(_)) => {
                        return respond(&mut c, 400, "text/plain", "bad content-length\n");
                    }
                };
                let binary = header("content-type")
                    .is_some_and(|t| t.starts_with("application/octet-stream"));
                break (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                    head_len,
                    body_len,
                    binary,
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
        ("POST", p) if p.starts_with("/publish/") => {
            let topic = &p["/publish/".len()..];
            if topic.is_empty() || topic.len() > crate::config::MAX_TOPIC_BYTES {
                return respond(&mut c, 400, "text/plain", "bad topic\n");
            }
            let mut body = buf.split_off(head_len);
            while body.len() < body_len {
                let n = read_by(&mut c, &mut chunk, deadline)?;
                if n == 0 {
                    return Ok(());
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(body_len);
            let kind = if binary {
                MessageKind::Binary
            } else if simdutf8::basic::from_utf8(&body).is_ok() {
                MessageKind::Text
            } else {
                return respond(
                    &mut c,
                    400,
                    "text/plain",
                    "text body is not UTF-8 (use Content-Type: application/octet-stream)\n",
                );
            };
            let n = shards.publish(topic, kind, &body);
            respond(
                &mut c,
                200,
                "application/json",
                &format!("{{\"subscribers\":{n}}}\n"),
            )
        }
        (_, "/healthz" | "/metrics" | "/stats") => {
            respond(&mut c, 405, "text/plain", "method not allowed\n")
        }
        (_, p) if p.starts_with("/publish/") => {
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
        413 => "Content Too Large",
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
