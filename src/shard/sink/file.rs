//! File sinks: each batch appended to a file, rotated by size.
//!
//! A write that fails (disk full, permissions) is retried every second with the batch kept
//! (at-least-once: a partly written batch is written again whole), so the channel fills and
//! the clients wait rather than data being lost; errors are counted and logged. At shutdown
//! a last batch that still cannot be written after 5 tries 100 ms apart is counted as dropped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::{Batch, Chunk, SealError, Sealed, SinkStats, bump};
use crate::config::{SinkConfig, SinkKind};

pub(super) async fn run(cfg: &SinkConfig, rx: &async_channel::Receiver<Chunk>, stats: &SinkStats) {
    let SinkKind::File { path, rotate_bytes } = &cfg.kind else {
        return;
    };
    // The runtime serves the receive timeout; file I/O is blocking on purpose, this thread
    // does nothing else.
    let mut writer = Writer {
        path,
        rotate_bytes: *rotate_bytes,
        file: None,
        size: 0,
        next_rotation: 1,
    };
    let mut batch = Batch::new();
    loop {
        let wait = batch.due(cfg).map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        match compio::time::timeout(wait, rx.recv()).await {
            Ok(Ok(chunk)) => {
                for m in &chunk.msgs {
                    batch.push(cfg, chunk.json, m);
                    if batch.full(cfg) {
                        flush(cfg, &mut writer, &mut batch, stats, rx).await;
                    }
                }
            }
            // All senders gone: the server is shutting down.
            Ok(Err(_closed)) => {
                flush(cfg, &mut writer, &mut batch, stats, rx).await;
                return;
            }
            Err(_timeout) => flush(cfg, &mut writer, &mut batch, stats, rx).await,
        }
    }
}

/// Write the batch, retrying while the server runs; once every sender is gone (shutdown),
/// give up after a few quick tries (counted as dropped).
async fn flush(
    cfg: &SinkConfig,
    w: &mut Writer<'_>,
    b: &mut Batch,
    stats: &SinkStats,
    rx: &async_channel::Receiver<Chunk>,
) {
    let Sealed { data, messages } = match b.seal(cfg) {
        Ok(Some(sealed)) => sealed,
        Ok(None) => return,
        Err(SealError { error, messages }) => {
            error!(sink = %cfg.name, %error, "compression failed; batch dropped");
            bump(&stats.dropped, messages);
            return;
        }
    };
    let mut attempts = 0;
    loop {
        match w.write(&data, stats) {
            Ok(()) => break,
            Err(e) => {
                bump(&stats.write_errors, 1);
                attempts += 1;
                let last = rx.is_closed();
                // At shutdown, give up after a few tries (counted); otherwise keep the
                // batch and retry, which backs the clients up through the channel.
                if last && attempts >= 5 {
                    error!(sink = %cfg.name, error = %e, messages,
                           "cannot write the last batch; dropped");
                    bump(&stats.dropped, messages);
                    return;
                }
                let pause = if last {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(1)
                };
                warn!(sink = %cfg.name, error = %e, ?pause, "sink write failed; retrying");
                w.file = None;
                compio::time::sleep(pause).await;
            }
        }
    }
    bump(&stats.batches, 1);
    bump(&stats.messages, messages);
}

struct Writer<'a> {
    path: &'a PathBuf,
    rotate_bytes: Option<u64>,
    file: Option<File>,
    size: u64,
    next_rotation: u64,
}

impl Writer<'_> {
    fn write(&mut self, data: &[u8], stats: &SinkStats) -> std::io::Result<()> {
        let path = self.path;
        if self.file.is_none() {
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if let Some(max) = self.rotate_bytes {
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
                bump(&stats.rotations, 1);
                self.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
                self.size = 0;
            }
        }
        // Invariant: opened above.
        let f = self.file.as_mut().expect("file open");
        if let Err(e) = f.write_all(data) {
            // A write that failed part way (a full disk) would leave a torn line or a
            // truncated compressed member in front of the retry, and a file that no longer
            // decompresses. Cut it back to the last whole batch; the batch is retried whole.
            if let Err(t) = f.set_len(self.size) {
                warn!(sink = %path.display(), error = %t, "cannot cut a partial write back");
            }
            return Err(e);
        }
        self.size += data.len() as u64;
        bump(&stats.bytes_written, data.len() as u64);
        Ok(())
    }
}
