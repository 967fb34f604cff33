//! Sinks: where ingest routes deliver. One thread per sink, fed by a bounded channel of
//! chunks (one chunk per ingest read, per shard); the thread batches them (messages, bytes,
//! age), frames the batch, compresses it and appends it to its file, rotating by size.
//!
//! Backpressure is the channel bound: when the sink falls behind, the channel fills, ingest
//! connections wait on `send` and stop reading their sockets. A write that fails (disk full,
//! permissions) is retried every second with the batch kept (at-least-once: a partly written
//! batch is written again whole), so the channel fills and the
//! clients wait rather than data being lost; errors are counted and logged. On shutdown the
//! shards drop their senders; the thread writes what is pending and exits (a last batch
//! that still cannot be written after 5 tries 100 ms apart is counted as dropped).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, warn};

use crate::config::{Compression, Framing, SinkConfig};
use crate::metrics::SinkSnapshot;

/// Messages from one ingest read.
pub(crate) struct Chunk {
    /// The messages are JSON values (else text, quoted for `json_array`).
    pub(crate) json: bool,
    pub(crate) msgs: Vec<Bytes>,
}

/// Counters of one sink, shared with the admin listener.
#[derive(Default)]
pub(crate) struct SinkStats {
    name: String,
    batches: AtomicU64,
    messages: AtomicU64,
    bytes_written: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
    dropped: AtomicU64,
}

impl SinkStats {
    pub(crate) fn snapshot(&self) -> SinkSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SinkSnapshot {
            name: self.name.clone(),
            batches: g(&self.batches),
            messages: g(&self.messages),
            bytes_written: g(&self.bytes_written),
            rotations: g(&self.rotations),
            write_errors: g(&self.write_errors),
            dropped: g(&self.dropped),
        }
    }
}

/// A running sink.
pub(crate) struct Sink {
    pub(crate) tx: async_channel::Sender<Chunk>,
    pub(crate) stats: Arc<SinkStats>,
    pub(crate) thread: JoinHandle<()>,
}

/// Start the sink's thread.
pub(crate) fn start(cfg: SinkConfig) -> std::io::Result<Sink> {
    let (tx, rx) = async_channel::bounded(cfg.buffer_chunks);
    let stats = Arc::new(SinkStats {
        name: cfg.name.clone(),
        ..SinkStats::default()
    });
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name(format!("wsedge-sink-{}", cfg.name))
        .spawn(move || run(cfg, rx, &st))?;
    Ok(Sink { tx, stats, thread })
}

struct Batch {
    lines: Vec<u8>,
    messages: u64,
    payload: usize,
    first: Option<Instant>,
}

fn run(cfg: SinkConfig, rx: async_channel::Receiver<Chunk>, stats: &SinkStats) {
    // A thread-local runtime only for the receive timeout; file I/O is blocking on purpose,
    // this thread does nothing else.
    let rt = match compio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(sink = %cfg.name, error = %e, "sink cannot start its runtime");
            return;
        }
    };
    let mut writer = Writer {
        cfg: &cfg,
        file: None,
        size: 0,
        next_rotation: 1,
    };
    let mut batch = Batch {
        lines: Vec::new(),
        messages: 0,
        payload: 0,
        first: None,
    };
    rt.block_on(async {
        loop {
            let wait = batch.first.map_or(Duration::from_secs(3600), |t| {
                (t + cfg.max_batch_delay).saturating_duration_since(Instant::now())
            });
            match compio::time::timeout(wait, rx.recv()).await {
                Ok(Ok(chunk)) => {
                    for m in &chunk.msgs {
                        add(&cfg, &mut batch, chunk.json, m);
                        if batch.messages as usize >= cfg.max_batch_messages
                            || batch.payload >= cfg.max_batch_bytes
                        {
                            flush(&mut writer, &mut batch, stats, &rx).await;
                        }
                    }
                }
                // All senders gone: the server is shutting down.
                Ok(Err(_closed)) => {
                    flush(&mut writer, &mut batch, stats, &rx).await;
                    return;
                }
                Err(_timeout) => flush(&mut writer, &mut batch, stats, &rx).await,
            }
        }
    });
}

/// Append one message to the batch, framed.
fn add(cfg: &SinkConfig, b: &mut Batch, json: bool, m: &[u8]) {
    b.first.get_or_insert_with(Instant::now);
    match cfg.framing {
        Framing::Ndjson => {
            if json {
                // One JSON value per line: a pretty-printed value is put on one line.
                if m.contains(&b'\n') {
                    let v: serde_json::Value = serde_json::from_slice(m).unwrap_or_default();
                    let _ = serde_json::to_writer(&mut b.lines, &v);
                } else {
                    b.lines.extend_from_slice(m);
                }
            } else {
                // Text lines: a newline inside a message would split it; escape as JSON.
                let s = String::from_utf8_lossy(m);
                if s.contains('\n') {
                    let _ = serde_json::to_writer(&mut b.lines, &s);
                } else {
                    b.lines.extend_from_slice(m);
                }
            }
            b.lines.push(b'\n');
        }
        Framing::JsonArray => {
            b.lines.push(if b.messages == 0 { b'[' } else { b',' });
            if json {
                b.lines.extend_from_slice(m);
            } else {
                let _ = serde_json::to_writer(&mut b.lines, &String::from_utf8_lossy(m));
            }
        }
    }
    b.messages += 1;
    b.payload += m.len();
}

/// Write the batch, retrying while the server runs; once every sender is gone (shutdown),
/// give up after a few quick tries (counted as dropped).
async fn flush(
    w: &mut Writer<'_>,
    b: &mut Batch,
    stats: &SinkStats,
    rx: &async_channel::Receiver<Chunk>,
) {
    if b.messages == 0 {
        b.first = None;
        return;
    }
    if w.cfg.framing == Framing::JsonArray {
        b.lines.extend_from_slice(b"]\n");
    }
    let data = match compress(w.cfg.compression, &b.lines) {
        Ok(d) => d,
        Err(e) => {
            error!(sink = %w.cfg.name, error = %e, "compression failed; batch dropped");
            stats.dropped.fetch_add(b.messages, Ordering::Relaxed);
            *b = empty();
            return;
        }
    };
    let mut attempts = 0;
    loop {
        match w.write(&data, stats) {
            Ok(()) => break,
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                attempts += 1;
                let last = rx.is_closed();
                // At shutdown, give up after a few tries (counted); otherwise keep the
                // batch and retry, which backs the clients up through the channel.
                if last && attempts >= 5 {
                    error!(sink = %w.cfg.name, error = %e, messages = b.messages,
                           "cannot write the last batch; dropped");
                    stats.dropped.fetch_add(b.messages, Ordering::Relaxed);
                    *b = empty();
                    return;
                }
                let pause = if last {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(1)
                };
                warn!(sink = %w.cfg.name, error = %e, ?pause, "sink write failed; retrying");
                w.file = None;
                compio::time::sleep(pause).await;
            }
        }
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.messages.fetch_add(b.messages, Ordering::Relaxed);
    *b = empty();
}

fn empty() -> Batch {
    Batch {
        lines: Vec::new(),
        messages: 0,
        payload: 0,
        first: None,
    }
}

fn compress(c: Compression, data: &[u8]) -> std::io::Result<Vec<u8>> {
    match c {
        Compression::None => Ok(data.to_vec()),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data)?;
            e.finish()
        }
        Compression::Zstd => zstd::encode_all(data, 3),
    }
}

struct Writer<'a> {
    cfg: &'a SinkConfig,
    file: Option<File>,
    size: u64,
    next_rotation: u64,
}

impl Writer<'_> {
    fn write(&mut self, data: &[u8], stats: &SinkStats) -> std::io::Result<()> {
        let path = &self.cfg.path;
        if self.file.is_none() {
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if let Some(max) = self.cfg.rotate_bytes {
            if self.size > 0 && self.size + data.len() as u64 > max {
                let mut rotated = path.clone().into_os_string();
                // Skip numbers already taken (a previous run's files).
                loop {
                    let mut candidate = rotated.clone();
                    candidate.push(format!(".{}", self.next_rotation));
                    self.next_rotation += 1;
                    if !std::path::Path::new(&candidate).exists() {
                        rotated = candidate;
                        break;
                    }
                }
                self.file = None;
                std::fs::rename(path, &rotated)?;
                stats.rotations.fetch_add(1, Ordering::Relaxed);
                self.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
                self.size = 0;
            }
        }
        // Invariant: opened above.
        let f = self.file.as_mut().expect("file open");
        f.write_all(data)?;
        self.size += data.len() as u64;
        stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
