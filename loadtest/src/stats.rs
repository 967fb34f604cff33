//! Measurement: per-worker HdrHistograms and counters, merged at the end; the live progress
//! line; the summary table and the `--json` and `--html` reports.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Open loop: most messages one connection may have unanswered. Beyond it scheduled sends
/// are skipped and counted, so a server that stops answering cannot make the client's memory
/// grow without bound.
pub const MAX_OUTSTANDING: usize = 10_000;

/// Open loop: most bytes one connection may have queued and not yet written. Also beyond it
/// scheduled sends are skipped and counted: with large messages the message cap alone would
/// let a server that stops reading grow the client by gigabytes per connection.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// `d` in nanoseconds within the histogram's bounds (1 ns to 100 s), counting in `capped` a
/// value above them.
pub fn capped_ns(d: Duration, capped: &mut u64) -> u64 {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if ns > MAX_NS {
        *capped += 1;
    }
    ns.clamp(1, MAX_NS)
}

/// The histograms' upper bound: 100 s.
const MAX_NS: u64 = 100_000_000_000;

/// Latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // Invariant: constant, valid bounds.
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Counters workers update as they go, read by the progress line (single writer each).
#[derive(Default)]
pub struct Live {
    /// Messages completed (echo received) since start, warm-up included.
    pub messages: AtomicU64,
    /// Errors of any kind.
    pub errors: AtomicU64,
    /// Connections currently open.
    pub connections: AtomicU64,
    /// p99 (µs) of the last completed second, max over workers; the progress line takes it.
    pub p99_us: AtomicU64,
}

impl Live {
    /// Add to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What one worker measured.
pub struct WorkerStats {
    /// Latency of messages completed inside the measured window.
    pub hist: Histogram<u64>,
    /// Per-second slots from the start of the measured window.
    pub timeline: Vec<(u64, Histogram<u64>)>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Messages completed inside the measured window.
    pub messages: u64,
    /// Connections established.
    pub connected: u64,
    /// `connect --churn`: of those, re-connections made after a churn close.
    pub churned: u64,
    /// Open loop: sends that left more than 1 ms after their scheduled time.
    pub late_sends: u64,
    /// Open loop: scheduled sends skipped because the connection already had
    /// [`MAX_OUTSTANDING`] messages unanswered (the server is far behind the schedule).
    pub skipped_sends: u64,
    /// `echo`: messages still unanswered when the run ended (recorded in the histogram with
    /// their age at the end, a lower bound of their latency, but not counted as messages).
    pub unanswered: u64,
    /// `echo`: age at the end of the oldest of those.
    pub oldest_unanswered: Duration,
    /// Latencies above the histogram's 100 s, recorded as 100 s.
    pub capped: u64,
    /// Timeline slots whose p99 has been published to the progress line.
    published: usize,
}

impl WorkerStats {
    /// Empty stats.
    pub fn new() -> Self {
        Self {
            hist: new_hist(),
            timeline: Vec::new(),
            errors: BTreeMap::new(),
            messages: 0,
            connected: 0,
            churned: 0,
            late_sends: 0,
            skipped_sends: 0,
            unanswered: 0,
            oldest_unanswered: Duration::ZERO,
            capped: 0,
            published: 0,
        }
    }

    /// Count an error of kind `label`.
    pub fn error(&mut self, label: impl Into<String>) {
        *self.errors.entry(label.into()).or_default() += 1;
    }

    /// Record one completed message at `second` of the measured window. When a new second
    /// starts, the p99 of the finished ones is published to `live` for the progress line.
    pub fn record(&mut self, second: usize, latency: Duration, live: &Live) {
        self.record_n(second, 1, latency, live);
    }

    /// Record one latency sample at `second` of the measured window that completed
    /// `messages` messages (`ingest`: one write carrying several messages, or none).
    pub fn record_n(&mut self, second: usize, messages: u64, latency: Duration, live: &Live) {
        while self.published < second.min(self.timeline.len()) {
            let p99 = self.timeline[self.published].1.value_at_quantile(0.99) / 1000;
            live.p99_us.fetch_max(p99, Ordering::Relaxed);
            self.published += 1;
        }
        let ns = capped_ns(latency, &mut self.capped);
        // Invariant: ns is clamped into the histogram's bounds.
        self.hist.record(ns).expect("in bounds");
        self.messages += messages;
        if self.timeline.len() <= second {
            self.timeline.resize_with(second + 1, || (0, new_hist()));
        }
        let slot = &mut self.timeline[second];
        slot.0 += messages;
        slot.1.record(ns).expect("in bounds");
    }

    /// Fold `other` into `self`.
    pub fn merge(&mut self, other: WorkerStats) {
        // Invariant: all histograms share the same bounds, so add cannot fail.
        self.hist.add(&other.hist).expect("same bounds");
        if self.timeline.len() < other.timeline.len() {
            self.timeline
                .resize_with(other.timeline.len(), || (0, new_hist()));
        }
        for (i, (n, h)) in other.timeline.into_iter().enumerate() {
            self.timeline[i].0 += n;
            self.timeline[i].1.add(&h).expect("same bounds");
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.messages += other.messages;
        self.connected += other.connected;
        self.churned += other.churned;
        self.late_sends += other.late_sends;
        self.skipped_sends += other.skipped_sends;
        self.unanswered += other.unanswered;
        self.oldest_unanswered = self.oldest_unanswered.max(other.oldest_unanswered);
        self.capped += other.capped;
    }

    /// The report's warning if latencies were capped.
    pub fn capped_warning(&self) -> Option<String> {
        (self.capped > 0).then(|| {
            format!(
                "{} latencies were above 100 s and are recorded as 100 s (the maximum is a \
                 lower bound)",
                self.capped
            )
        })
    }
}

/// Percentiles in microseconds.
#[derive(Serialize, Debug, Clone)]
pub struct Latency {
    /// 50th percentile.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// From a histogram in ns.
    pub fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One point of the latency percentile curve.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Percentile {
    /// Percentile, 0 (the minimum) to 100 (the maximum).
    pub percentile: f64,
    /// Latency at that percentile, µs.
    pub latency_us: f64,
}

/// Nines the percentile curve reaches before its last point, the maximum (99.99).
pub const CURVE_NINES: u32 = 4;

/// The percentile curve of a histogram in ns: ten points per "nine" from the minimum
/// (percentile 0) to the 99.99th, the 50th, and the maximum (percentile 100). Empty when the
/// histogram is.
pub fn percentiles(h: &Histogram<u64>) -> Vec<Percentile> {
    if h.is_empty() {
        return Vec::new();
    }
    // Percentile with x nines (x = 1: 90, x = 2: 99), rounded so 90 prints as 90.
    let at_nines = |tenths: u32| {
        let p = 100.0 * (1.0 - 10f64.powf(-f64::from(tenths) / 10.0));
        (p * 1e6).round() / 1e6
    };
    let mut ps: Vec<f64> = (0..=CURVE_NINES * 10).map(at_nines).collect();
    ps.push(50.0);
    ps.sort_by(f64::total_cmp);
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut out: Vec<Percentile> = ps
        .into_iter()
        .map(|p| Percentile {
            percentile: p,
            latency_us: us(h.value_at_quantile(p / 100.0)),
        })
        .collect();
    out.push(Percentile {
        percentile: 100.0,
        latency_us: us(h.max()),
    });
    out
}

/// One second of the timeline.
#[derive(Serialize, Debug)]
pub struct Second {
    /// Seconds since the start of the measured window.
    pub t: usize,
    /// Messages completed in that second.
    pub messages: u64,
    /// p99 latency in that second, µs.
    pub p99_us: f64,
}

/// Process CPU time (user + system) so far, from /proc/self/stat.
pub fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Wait for a worker's connection tasks, then take the stats they shared.
pub async fn collect(
    tasks: Vec<compio::runtime::JoinHandle<()>>,
    stats: Rc<RefCell<WorkerStats>>,
) -> WorkerStats {
    for t in tasks {
        // A task that panicked has nothing more to record.
        let _ = t.await;
    }
    // Invariant: every clone of `stats` lived in a task that has now finished.
    Rc::try_unwrap(stats)
        .ok()
        .expect("all tasks finished")
        .into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_curve_runs_from_min_to_max() {
        assert!(percentiles(&new_hist()).is_empty());
        let mut h = new_hist();
        for us in 1..=10_000u64 {
            h.record(us * 1000).unwrap();
        }
        let c = percentiles(&h);
        assert_eq!(c.first().unwrap().percentile, 0.0);
        assert_eq!(c.last().unwrap().percentile, 100.0);
        assert_eq!(c.last().unwrap().latency_us, h.max() as f64 / 1000.0);
        // The named percentiles are on the curve, exactly.
        for p in [50.0, 90.0, 99.0, 99.9, 99.99] {
            let pt = c.iter().find(|x| x.percentile == p).unwrap();
            assert_eq!(
                pt.latency_us,
                h.value_at_quantile(p / 100.0) as f64 / 1000.0
            );
        }
        // Ten points per nine, plus the 50th and the maximum; increasing in both.
        assert_eq!(c.len(), CURVE_NINES as usize * 10 + 3);
        assert!(c.windows(2).all(|w| w[0].percentile < w[1].percentile));
        assert!(c.windows(2).all(|w| w[0].latency_us <= w[1].latency_us));
        let p50 = c.iter().find(|x| x.percentile == 50.0).unwrap().latency_us;
        assert!((4990.0..=5010.0).contains(&p50), "{p50}");
    }

    #[test]
    fn latencies_beyond_100_s_are_capped_and_counted() {
        let live = Live::default();
        let mut w = WorkerStats::new();
        w.record(0, Duration::from_millis(5), &live);
        assert_eq!(w.capped_warning(), None);
        w.record(0, Duration::from_secs(250), &live);
        w.record(0, Duration::MAX, &live);
        assert_eq!(w.capped, 2);
        assert_eq!(w.hist.max(), w.hist.highest_equivalent(MAX_NS));
        let mut total = WorkerStats::new();
        total.merge(w);
        assert!(total.capped_warning().unwrap().starts_with("2 latencies"));
    }
}
