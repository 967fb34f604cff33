//! Sinks: where ingest routes deliver. One thread per sink, with its own compio runtime on
//! the shards' backend, fed by a bounded channel of chunks (one chunk per ingest read, per
//! shard); the thread batches them (messages, bytes, age), frames the batch (NDJSON or a
//! JSON array), compresses it (gzip, zstd) and delivers it:
//!
//! - [`file`]: appended to a file, rotated by size;
//! - [`websocket`]: sent as one WebSocket message to an upstream, confirmed by a ping/pong
//!   round trip, re-sent after a reconnect until confirmed (at-least-once).
//!
//! Backpressure is the channel bound: when the sink falls behind (a disk that fails, an
//! upstream that is away with its pending bound reached), it stops taking chunks, the
//! channel fills, ingest connections wait on `send` and stop reading their sockets. Nothing
//! is dropped while the server runs, except by a WebSocket sink that gave up after
//! `reconnect_max_attempts` (counted). On shutdown the shards drop their senders; the thread
//! delivers what is pending within its kind's bound and counts the rest as dropped.

mod file;
mod websocket;

use std::io::Write;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tracing::error;

use super::Backend;
use crate::config::{Compression, Framing, SinkConfig, SinkKind};
use crate::metrics::SinkSnapshot;

/// Messages from one ingest read.
pub(crate) struct Chunk {
    /// The messages are JSON values (else text, quoted for `json_array`).
    pub(crate) json: bool,
    pub(crate) msgs: Vec<Bytes>,
}

/// Where a sink is in its life (`/stats` `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// File sink: writing.
    Running,
    /// WebSocket sink: connecting to the upstream.
    Connecting,
    /// WebSocket sink: connected.
    Connected,
    /// WebSocket sink: waiting before the next attempt.
    Backoff,
    /// WebSocket sink: gave up after `reconnect_max_attempts`; drops (and counts) everything.
    Failed,
    /// The thread has ended (shutdown).
    Stopped,
    /// No route uses the sink; it was not started.
    Unused,
}

impl Phase {
    const ALL: [Self; 7] = [
        Self::Running,
        Self::Connecting,
        Self::Connected,
        Self::Backoff,
        Self::Failed,
        Self::Stopped,
        Self::Unused,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Backoff => "backoff",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Unused => "unused",
        }
    }
}

/// Counters of one sink, shared with the admin listener (relaxed atomics: each is written by
/// the sink thread only, read for snapshots).
pub(crate) struct SinkStats {
    name: String,
    kind: &'static str,
    phase: AtomicU8,
    batches: AtomicU64,
    messages: AtomicU64,
    bytes_written: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
    dropped: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    connect_failures: AtomicU64,
    redeliveries: AtomicU64,
    redelivered_messages: AtomicU64,
    pending_batches: AtomicU64,
    pending_bytes: AtomicU64,
    /// Why the last connection or attempt ended (WebSocket sinks). A lock, taken once per
    /// connection attempt and per snapshot, never per batch.
    last_error: Mutex<String>,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl SinkStats {
    fn new(cfg: &SinkConfig) -> Self {
        let z = || AtomicU64::new(0);
        Self {
            name: cfg.name.clone(),
            kind: match cfg.kind {
                SinkKind::File { .. } => "file",
                SinkKind::WebSocket(_) => "websocket",
            },
            phase: AtomicU8::new(Phase::Running as u8),
            batches: z(),
            messages: z(),
            bytes_written: z(),
            rotations: z(),
            write_errors: z(),
            dropped: z(),
            connects: z(),
            disconnects: z(),
            connect_failures: z(),
            redeliveries: z(),
            redelivered_messages: z(),
            pending_batches: z(),
            pending_bytes: z(),
            last_error: Mutex::new(String::new()),
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    fn set_last_error(&self, e: String) {
        // A poisoned lock only means a panic elsewhere; the string is still usable.
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub(crate) fn snapshot(&self) -> SinkSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let phase = self.phase.load(Ordering::Relaxed);
        SinkSnapshot {
            name: self.name.clone(),
            kind: self.kind,
            state: Phase::ALL
                .iter()
                .find(|p| **p as u8 == phase)
                .map_or("unknown", |p| p.label()),
            batches: g(&self.batches),
            messages: g(&self.messages),
            bytes_written: g(&self.bytes_written),
            rotations: g(&self.rotations),
            write_errors: g(&self.write_errors),
            dropped: g(&self.dropped),
            connects: g(&self.connects),
            disconnects: g(&self.disconnects),
            connect_failures: g(&self.connect_failures),
            redeliveries: g(&self.redeliveries),
            redelivered_messages: g(&self.redelivered_messages),
            pending_batches: g(&self.pending_batches),
            pending_bytes: g(&self.pending_bytes),
            last_error: self
                .last_error
                .lock()
                .map_or_else(|p| p.into_inner().clone(), |s| s.clone()),
        }
    }
}

/// A sink as the server holds it.
pub(crate) struct Sink {
    pub(crate) tx: async_channel::Sender<Chunk>,
    pub(crate) stats: Arc<SinkStats>,
    /// `None` for a sink no route uses (not started).
    pub(crate) thread: Option<JoinHandle<()>>,
}

/// Start the sink's thread, its runtime on `backend` (the shards' backend).
pub(crate) fn start(cfg: SinkConfig, backend: Backend) -> std::io::Result<Sink> {
    let (tx, rx) = async_channel::bounded(cfg.buffer_chunks);
    let stats = Arc::new(SinkStats::new(&cfg));
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name(format!("wsedge-sink-{}", cfg.name))
        .spawn(move || run(cfg, backend, rx, &st))?;
    Ok(Sink {
        tx,
        stats,
        thread: Some(thread),
    })
}

/// A sink no route delivers to: no thread, a closed channel, state `unused`.
pub(crate) fn unused(cfg: &SinkConfig) -> Sink {
    let (tx, _) = async_channel::bounded(1);
    let stats = SinkStats::new(cfg);
    stats.set_phase(Phase::Unused);
    Sink {
        tx,
        stats: Arc::new(stats),
        thread: None,
    }
}

fn run(cfg: SinkConfig, backend: Backend, rx: async_channel::Receiver<Chunk>, stats: &SinkStats) {
    let rt = match compio::runtime::RuntimeBuilder::new()
        .with_proactor(backend.proactor())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(sink = %cfg.name, error = %e, "sink cannot start its runtime");
            stats.set_phase(Phase::Stopped);
            return;
        }
    };
    match &cfg.kind {
        SinkKind::File { .. } => rt.block_on(file::run(&cfg, &rx, stats)),
        SinkKind::WebSocket(ws) => rt.block_on(websocket::run(&cfg, ws, &rx, stats)),
    }
    stats.set_phase(Phase::Stopped);
}

/// A batch being built: framed messages, not yet closed or compressed.
struct Batch {
    lines: Vec<u8>,
    messages: u64,
    payload: usize,
    first: Option<Instant>,
}

impl Batch {
    fn new() -> Self {
        Self {
            lines: Vec::new(),
            messages: 0,
            payload: 0,
            first: None,
        }
    }

    /// Append one message, framed.
    fn push(&mut self, cfg: &SinkConfig, json: bool, m: &[u8]) {
        self.first.get_or_insert_with(Instant::now);
        let b = &mut self.lines;
        match cfg.framing {
            Framing::Ndjson => {
                if json {
                    // One JSON value per line. In valid JSON a line break can only be
                    // whitespace between tokens (inside a string it must be escaped), so a
                    // pretty-printed value goes on one line by turning its line breaks into
                    // spaces: the same value, every other byte as it came.
                    let start = b.len();
                    b.extend_from_slice(m);
                    for c in &mut b[start..] {
                        if matches!(*c, b'\n' | b'\r') {
                            *c = b' ';
                        }
                    }
                } else {
                    // Text lines: a newline inside a message would split it; escape as JSON.
                    let s = String::from_utf8_lossy(m);
                    if s.contains('\n') {
                        let _ = serde_json::to_writer(&mut *b, &s);
                    } else {
                        b.extend_from_slice(m);
                    }
                }
                b.push(b'\n');
            }
            Framing::JsonArray => {
                b.push(if self.messages == 0 { b'[' } else { b',' });
                if json {
                    b.extend_from_slice(m);
                } else {
                    let _ = serde_json::to_writer(&mut *b, &String::from_utf8_lossy(m));
                }
            }
        }
        self.messages += 1;
        self.payload += m.len();
    }

    /// At a count or size cap: seal it now.
    fn full(&self, cfg: &SinkConfig) -> bool {
        self.messages as usize >= cfg.max_batch_messages || self.payload >= cfg.max_batch_bytes
    }

    /// When its age cap is reached, if it holds anything.
    fn due(&self, cfg: &SinkConfig) -> Option<Instant> {
        self.first.map(|t| t + cfg.max_batch_delay)
    }

    /// Close the framing, compress, and reset. `Ok(None)` if empty; on a compression error
    /// the batch is gone and the error carries its message count.
    fn seal(&mut self, cfg: &SinkConfig) -> Result<Option<Sealed>, SealError> {
        let b = std::mem::replace(self, Self::new());
        if b.messages == 0 {
            return Ok(None);
        }
        let mut lines = b.lines;
        if cfg.framing == Framing::JsonArray {
            lines.extend_from_slice(b"]\n");
        }
        match compress(cfg.compression, lines) {
            Ok(data) => Ok(Some(Sealed {
                data,
                messages: b.messages,
            })),
            Err(error) => Err(SealError {
                error,
                messages: b.messages,
            }),
        }
    }
}

/// A batch ready to deliver: framed and compressed.
struct Sealed {
    data: Vec<u8>,
    messages: u64,
}

/// A batch that could not be compressed (it is lost; its messages are counted as dropped).
struct SealError {
    error: std::io::Error,
    messages: u64,
}

fn compress(c: Compression, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    match c {
        Compression::None => Ok(data),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&data)?;
            e.finish()
        }
        Compression::Zstd => zstd::encode_all(&data[..], 3),
    }
}
