//! `wsedge-load`: a WebSocket load generator built on wsedge's sans-IO protocol core and the
//! same completion-based runtime (one worker thread per `--threads`, each with its own
//! runtime).
//!
//! Scenarios: `echo` (closed or open loop), `connect` (ramp, hold, handshake latency),
//! `broadcast` (publishers and subscribers of one topic: end-to-end latency, loss, duplicates,
//! reordering) and `ingest` (JSON messages into an ingest route: throughput and the server's
//! backpressure as the client sees it, with the server's counters beside the client's).
//!
//! Every scenario prints a summary and can write its results as JSON (`--json`) and as a
//! self-contained HTML report with charts (`--html`, see [`html`]).

mod broadcast;
mod client;
mod connect;
mod echo;
mod end;
mod html;
mod ingest;
mod scrape;
mod stats;

use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::echo::{EchoParams, Timing};
use crate::html::{fmt_us, group};
use crate::stats::{Latency, Live, Percentile, Second, WorkerStats, percentiles, process_cpu};

/// WebSocket load generator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Round trips against an echo endpoint (closed loop, or open loop with --rate).
    Echo(EchoArgs),
    /// Open many connections at a fixed rate, hold them, measure handshake latency.
    Connect(ConnectArgs),
    /// Publishers send to a topic on a schedule, subscribers measure end-to-end latency,
    /// loss, duplicates and reordering.
    Broadcast(BroadcastArgs),
    /// Send JSON messages to an ingest route (closed loop, or open loop with --rate) and
    /// measure the server's backpressure: blocked writes and schedule lag.
    Ingest(IngestArgs),
}

/// Options every scenario takes.
#[derive(Args)]
struct CommonArgs {
    /// Worker threads, each with its own runtime.
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
    /// Local source addresses, e.g. 127.0.0.1-127.0.0.16 or a comma list.
    #[arg(long)]
    source: Option<String>,
    /// Write the results as JSON to this file (schema in docs/loadtest.md).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (summary, latency percentile plot, throughput and
    /// p99 per second, errors) to this file.
    #[arg(long)]
    html: Option<PathBuf>,
    /// wss:// only: PEM file of the CA(s) to trust instead of the system roots.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// wss:// only: name for SNI and certificate verification, if not the URL's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// wss:// only: accept any server certificate (testing; the connection is encrypted
    /// but not authenticated).
    #[arg(long)]
    tls_insecure: bool,
    /// wss:// only: no TLS session resumption (every connection a full handshake).
    #[arg(long)]
    tls_no_resume: bool,
    /// Seconds a connection may take to connect, finish TLS and be upgraded; one that takes
    /// longer counts as a `connect: timeout` error.
    #[arg(long, default_value_t = client::CONNECT_TIMEOUT.as_secs_f64())]
    connect_timeout: f64,
}

impl CommonArgs {
    /// Parse a target URL with these options (TLS, resumption, connect timeout).
    fn target(&self, url: &str) -> anyhow::Result<client::Target> {
        let mut target = client::Target::parse_with(url, &self.tls())?;
        if self.tls_no_resume {
            target.tls = target.tls.map(|t| Box::new(t.without_resumption()));
        }
        target.connect_timeout = seconds("--connect-timeout", self.connect_timeout)?;
        if target.connect_timeout.is_zero() {
            bail!("--connect-timeout must be > 0");
        }
        Ok(target)
    }

    /// TLS settings for wss:// targets.
    fn tls(&self) -> wsedge::upstream::TlsOptions {
        wsedge::upstream::TlsOptions {
            ca: self.tls_ca.clone(),
            client_cert: None,
            server_name: self.tls_server_name.clone(),
            insecure_skip_verify: self.tls_insecure,
        }
    }
}

#[derive(Args)]
struct ConnectArgs {
    /// Target URL.
    #[arg(default_value = "ws://127.0.0.1:8080/echo")]
    url: String,
    /// Connections to open.
    #[arg(short, long, default_value_t = 1000)]
    conns: usize,
    /// Connections opened per second (the ramp).
    #[arg(short, long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds every connection stays open after the ramp.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// During the hold, close and re-open this many connections per second (all together).
    #[arg(long)]
    churn: Option<f64>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct EchoArgs {
    /// Target URL.
    #[arg(default_value = "ws://127.0.0.1:8080/echo")]
    url: String,
    /// Connections.
    #[arg(short, long, default_value_t = 100)]
    conns: usize,
    /// Payload size in bytes.
    #[arg(short, long, default_value_t = 20)]
    size: usize,
    /// Closed loop: messages in flight per connection.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Open loop: total messages per second over all connections (latency is measured from
    /// the scheduled send time: coordinated omission corrected).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, excluded from the results.
    #[arg(short, long, default_value_t = 2.0)]
    warmup: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct BroadcastArgs {
    /// Publish endpoint: every message sent there goes to the topic.
    #[arg(long, default_value = "ws://127.0.0.1:8080/pub/bench")]
    pub_url: String,
    /// Subscribe endpoint: receives every message of the topic.
    #[arg(long, default_value = "ws://127.0.0.1:8080/sub/bench")]
    sub_url: String,
    /// Subscriber connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    subs: usize,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Payload size in bytes (at least 20: the header).
    #[arg(short, long, default_value_t = 64)]
    size: usize,
    /// Total messages per second over all publishers (each sends rate / publishers on a
    /// fixed schedule; latency counts from the scheduled time).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Measured seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, excluded from the latency.
    #[arg(short, long, default_value_t = 2.0)]
    warmup: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct IngestArgs {
    /// Target URL (an ingest route).
    #[arg(default_value = "ws://127.0.0.1:8080/ingest")]
    url: String,
    /// Connections.
    #[arg(short, long, default_value_t = 10)]
    conns: usize,
    /// Message size in bytes: each JSON object is padded to this many (it is longer only
    /// when its connection and sequence fields alone are).
    #[arg(short, long, default_value_t = 256)]
    size: usize,
    /// Open loop: total messages per second over all connections, each on a fixed, staggered
    /// schedule. Without it, closed loop: each connection writes its next message when the
    /// previous write has completed.
    #[arg(long)]
    rate: Option<f64>,
    /// Make every K-th message of each connection invalid JSON (counted separately).
    #[arg(long, value_name = "K")]
    invalid_every: Option<u64>,
    /// Send telemetry-like readings with varied values (~200 bytes; -s is ignored) instead of
    /// padded objects, so that a sink's compression ratio is realistic.
    #[arg(long)]
    telemetry: bool,
    /// Read the server's ingest counters from this Prometheus endpoint before and after the
    /// run, e.g. http://127.0.0.1:9090/metrics, and report their change.
    #[arg(long, value_name = "URL")]
    metrics: Option<String>,
    /// Measured seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, excluded from rates and latencies (not from the totals).
    #[arg(short, long, default_value_t = 2.0)]
    warmup: f64,
    #[command(flatten)]
    common: CommonArgs,
}

/// A run that completed and reported, but whose results show something went wrong (errors,
/// lost or unanswered messages): exit status 3, so that scripts and CI notice. A run that
/// could not be made at all (bad options, nothing connected) exits with 1; clap's usage
/// errors exit with 2.
#[derive(Debug)]
struct Problems(Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Problems {}

/// `Ok` if the run had no errors and none of `problems`, else [`Problems`].
fn verdict(
    errors: &std::collections::BTreeMap<String, u64>,
    mut problems: Vec<String>,
) -> anyhow::Result<()> {
    let n: u64 = errors.values().sum();
    if n > 0 {
        problems.insert(0, format!("{n} errors"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems(problems).into())
    }
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().scenario {
        Scenario::Echo(a) => run_echo(a),
        Scenario::Connect(a) => run_connect(a),
        Scenario::Broadcast(a) => run_broadcast(a),
        Scenario::Ingest(a) => run_ingest(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Problems>() {
            Some(p) => {
                eprintln!("wsedge-load: the run completed with problems: {p}");
                std::process::ExitCode::from(3)
            }
            None => {
                eprintln!("Error: {e:?}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn parse_sources(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
                (a.trim().parse()?, b.trim().parse()?);
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_535 {
                bail!("bad source range `{part}`");
            }
            out.extend((a..=b).map(|x| IpAddr::from(std::net::Ipv4Addr::from(x))));
        } else {
            out.push(
                part.trim()
                    .parse()
                    .with_context(|| format!("bad source `{part}`"))?,
            );
        }
    }
    Ok(out)
}

/// A seconds option as a `Duration`: finite, ≥ 0 and representable, else an error naming it
/// (`Duration::from_secs_f64` would panic on NaN, negative or huge values).
fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{name} must be a finite number of seconds ≥ 0, not {v}"))
}

/// A measured window and warm-up: `--duration` > 0, `--warmup` ≥ 0.
fn window(duration: f64, warmup: f64) -> anyhow::Result<(Duration, Duration)> {
    let d = seconds("--duration", duration)?;
    if d.is_zero() {
        bail!("--duration must be > 0");
    }
    Ok((d, seconds("--warmup", warmup)?))
}

/// A rate option (per second over `units` connections or publishers): finite, > 0, and
/// slow enough that each one's interval is at least 1 µs (a schedule whose step rounds to
/// nothing would never advance).
fn rate(name: &str, v: f64, units: usize) -> anyhow::Result<f64> {
    let max = units as f64 * 1e6;
    if !(v > 0.0 && v.is_finite()) {
        bail!("{name} must be a number > 0, not {v}");
    }
    if v > max {
        bail!("{name} {v} is above {max} (1 per µs for each of the {units} connections)");
    }
    Ok(v)
}

/// Raise RLIMIT_NOFILE to its hard limit and check the connection count fits.
fn check_limits(conns: usize, sources: usize) -> anyhow::Result<()> {
    let (soft, hard) = rlimit_nofile();
    let needed = conns as u64 + 64;
    if soft < needed && hard > soft {
        raise_nofile(hard);
    }
    let (soft, _) = rlimit_nofile();
    if soft < needed {
        bail!(
            "{conns} connections need about {needed} file descriptors, but RLIMIT_NOFILE is \
             {soft} (hard limit {hard}); raise the hard limit (ulimit -Hn / limits.conf) or \
             use fewer connections"
        );
    }
    let ports = ephemeral_ports();
    let per_source = ports.saturating_mul(sources.max(1) as u64);
    if conns as u64 > per_source {
        bail!(
            "{conns} connections to one server address need {conns} distinct (source address, \
             port) pairs; the ephemeral range has {ports} ports per source address and {} \
             source address(es) give {per_source}: add --source 127.0.0.1-127.0.0.N with N ≥ {}",
            sources.max(1),
            (conns as u64).div_ceil(ports.max(1))
        );
    }
    // Linux's connect() picks ports from the even half of the range first; once that half
    // is taken by one source address, every further connect() scans it (measured here: the
    // connect rate fell from 3,000/s to ~450/s for seconds past ~14,000 connections, with
    // handshakes timed in seconds). Spreading over source addresses avoids the scan.
    let per_addr = (conns as u64).div_ceil(sources.max(1) as u64);
    if per_addr > ports / 2 {
        eprintln!(
            "warning: {per_addr} connections per source address exceed half the ephemeral \
             range ({} of {ports} ports): Linux's connect() then scans for a free port on every \
             connection and handshakes stall; add --source 127.0.0.1-127.0.0.{}",
            ports / 2,
            (conns as u64).div_ceil((ports / 2).max(1)).max(2)
        );
    }
    Ok(())
}

/// Parse the target and the source addresses and check that `conns` connections fit.
fn prepare(
    url: &str,
    common: &CommonArgs,
    conns: usize,
) -> anyhow::Result<(client::Target, Vec<IpAddr>)> {
    let target = common.target(url)?;
    let sources = common
        .source
        .as_deref()
        .map(parse_sources)
        .transpose()?
        .unwrap_or_default();
    check_limits(conns, sources.len())?;
    Ok((target, sources))
}

/// Start `threads` pinned workers, worker `w` getting the contiguous block `first..first + n` of the
/// `conns` connections; `work(first, n)` runs on the worker thread.
fn spawn_workers<T, F>(conns: usize, threads: usize, work: F) -> Vec<std::thread::JoinHandle<T>>
where
    T: Send + 'static,
    F: Fn(usize, usize) -> T + Clone + Send + 'static,
{
    // One worker per core, pinned round-robin over the cores this process may run on (so
    // `taskset -c 1 wsedge-load ...` keeps every worker on core 1).
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut first = 0;
    (0..threads)
        .map(|w| {
            let n = conns / threads + usize::from(w < conns % threads);
            let (work, f) = (work.clone(), first);
            first += n;
            let core = (!cores.is_empty()).then(|| cores[w % cores.len()]);
            std::thread::spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                work(f, n)
            })
        })
        .collect()
}

/// Merge what the workers measured.
fn join_workers(handles: Vec<std::thread::JoinHandle<WorkerStats>>) -> anyhow::Result<WorkerStats> {
    let mut total = WorkerStats::new();
    for h in handles {
        total.merge(h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?);
    }
    Ok(total)
}

/// One progress line: rewritten in place on a terminal, one line per update otherwise.
fn progress(tty: bool, line: &str) {
    if tty {
        eprint!("\r{line}   ");
    } else {
        eprintln!("{line}");
    }
}

/// The latency and error lines of a summary.
fn print_latency_and_errors(
    what: &str,
    l: &Latency,
    errors: &std::collections::BTreeMap<String, u64>,
) {
    println!(
        "  {what} p50 {:.1} µs  p90 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
    if errors.is_empty() {
        println!("  errors    none");
    }
    for (k, v) in errors {
        println!("  error     {v:>8}  {k}");
    }
}

/// The per-second timeline of the measured window (`secs` long).
fn timeline(total: &WorkerStats, secs: f64) -> Vec<Second> {
    total
        .timeline
        .iter()
        .enumerate()
        .take(secs.ceil() as usize)
        .map(|(t, (n, h))| Second {
            t,
            messages: *n,
            p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
        .collect()
}

/// Write a report as pretty JSON.
fn write_json(path: &std::path::Path, report: &impl Serialize) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    serde_json::to_writer_pretty(&mut f, report)?;
    writeln!(f)?;
    Ok(())
}

fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        .unwrap_or(28_232)
}

fn rlimit_nofile() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024))
}

fn raise_nofile(to: u64) {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_NOFILE, to, to);
}

/// The `--json` report (documented in docs/loadtest.md).
#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    conns_requested: usize,
    conns_established: u64,
    size: usize,
    mode: String,
    threads: usize,
    duration_s: f64,
    warmup_s: f64,
    messages: u64,
    rate_msgs_per_s: f64,
    latency: Latency,
    latency_percentiles: Vec<Percentile>,
    timeline: Vec<Second>,
    errors: std::collections::BTreeMap<String, u64>,
    client_cpu_pct: f64,
    late_sends: u64,
    skipped_sends: u64,
    /// Messages unanswered when the run ended (their age is in the latencies as a lower
    /// bound) and the age of the oldest, in ms.
    unanswered: u64,
    oldest_unanswered_ms: f64,
    warnings: Vec<String>,
}

fn run_echo(a: EchoArgs) -> anyhow::Result<()> {
    if a.conns == 0 || a.common.threads == 0 || a.inflight == 0 {
        bail!("--conns, --threads and --inflight must be at least 1");
    }
    if a.rate.is_some() && a.inflight != 1 {
        bail!("--inflight is for the closed loop; with --rate the schedule sets what is in flight");
    }
    let msg_rate = a.rate.map(|r| rate("--rate", r, a.conns)).transpose()?;
    let (duration, warmup) = window(a.duration, a.warmup)?;
    let (target, sources) = prepare(&a.url, &a.common, a.conns)?;
    let params = Arc::new(EchoParams {
        target,
        conns: a.conns,
        size: a.size,
        inflight: a.inflight,
        rate: msg_rate,
        duration,
        warmup,
        sources,
    });
    let live = Arc::new(Live::default());
    let timing = Arc::new(OnceLock::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let threads = a.common.threads.min(a.conns);
    let handles = {
        let (p, l, t, tx) = (params.clone(), live.clone(), timing.clone(), tx.clone());
        spawn_workers(a.conns, threads, move |f, n| {
            echo::worker(p.clone(), f, n, l.clone(), tx.clone(), t.clone())
        })
    };
    drop(tx);
    for _ in 0..threads {
        rx.recv().context("a worker died while connecting")?;
    }
    let start = Instant::now();
    let measure_start = start + params.warmup;
    let end = measure_start + params.duration;
    let _ = timing.set(Timing {
        start,
        measure_start,
        end,
    });
    let open = live.connections.load(Ordering::Relaxed);
    if open == 0 {
        eprintln!("no connection could be established");
    }

    // Progress: one line per second (rewritten in place on a terminal).
    let tty = std::io::stderr().is_terminal();
    let mut last = 0u64;
    let mut cpu_at_measure = None;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1).min(end - Instant::now()));
        if cpu_at_measure.is_none() && Instant::now() >= measure_start {
            cpu_at_measure = Some((process_cpu(), Instant::now()));
        }
        let m = live.messages.load(Ordering::Relaxed);
        let p99 = live.p99_us.swap(0, Ordering::Relaxed);
        let line = format!(
            "t={:>4.0}s  {:>10} msg/s  p99 {:>8}  conns {:>6}  errors {:>5}{}",
            start.elapsed().as_secs_f64(),
            m - last,
            if p99 == 0 {
                "-".to_string()
            } else {
                format!("{p99} µs")
            },
            live.connections.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
            if Instant::now() < measure_start {
                "  (warm-up)"
            } else {
                ""
            }
        );
        last = m;
        progress(tty, &line);
    }
    let cpu_end = (process_cpu(), Instant::now());
    if tty {
        eprintln!();
    }
    let total = join_workers(handles)?;
    let (cpu0, t0) = cpu_at_measure.unwrap_or((Duration::ZERO, start));
    let client_cpu_pct =
        100.0 * (cpu_end.0 - cpu0).as_secs_f64() / (cpu_end.1 - t0).as_secs_f64() / threads as f64;
    let mut warnings = Vec::new();
    warnings.extend(total.capped_warning());
    if let (Some(r), true) = (a.rate, (total.connected as usize) < a.conns) {
        warnings.push(short_rate(r, total.connected, a.conns));
    }
    if client_cpu_pct > 90.0 {
        warnings.push(format!(
            "the load generator used {client_cpu_pct:.0}% of its {threads} thread(s): it may be \
             the bottleneck (add --threads, or pin it to its own core)"
        ));
    }
    if total.skipped_sends > 0 {
        warnings.push(format!(
            "{} scheduled sends were skipped: connections had {} messages unanswered (the \
             server fell far behind the requested rate)",
            total.skipped_sends,
            stats::MAX_OUTSTANDING
        ));
    }
    if total.late_sends > total.messages / 100 {
        warnings.push(format!(
            "{} sends left more than 1 ms behind schedule: the client could not keep the rate",
            total.late_sends
        ));
    }
    if total.oldest_unanswered > Duration::from_secs(1) {
        warnings.push(format!(
            "{} messages were unanswered at the end, the oldest for {:.1} s: the server stalled \
             or lost them (their age is in the latencies as a lower bound)",
            total.unanswered,
            total.oldest_unanswered.as_secs_f64()
        ));
    }
    let secs = params.duration.as_secs_f64();
    let report = Report {
        scenario: "echo",
        url: a.url.clone(),
        conns_requested: a.conns,
        conns_established: total.connected,
        size: a.size,
        mode: match a.rate {
            Some(r) => format!("open-loop {r} msg/s"),
            None => format!("closed-loop inflight={}", a.inflight),
        },
        threads,
        duration_s: secs,
        warmup_s: params.warmup.as_secs_f64(),
        messages: total.messages,
        rate_msgs_per_s: total.messages as f64 / secs,
        latency: Latency::of(&total.hist),
        latency_percentiles: percentiles(&total.hist),
        timeline: timeline(&total, secs),
        errors: total.errors,
        client_cpu_pct,
        late_sends: total.late_sends,
        skipped_sends: total.skipped_sends,
        unanswered: total.unanswered,
        oldest_unanswered_ms: total.oldest_unanswered.as_secs_f64() * 1e3,
        warnings,
    };
    print_summary(&report);
    if let Some(path) = &a.common.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.common.html {
        html::write(path, &echo_page(&report, a.common.source.as_deref()))?;
    }
    if report.messages == 0 {
        bail!("no message completed");
    }
    let mut problems = Vec::new();
    if report.skipped_sends > 0 {
        problems.push(format!("{} scheduled sends skipped", report.skipped_sends));
    }
    if total.oldest_unanswered > Duration::from_secs(1) {
        problems.push(format!("{} messages unanswered", report.unanswered));
    }
    verdict(&report.errors, problems)
}

/// The warning for an open-loop run in which only `up` of `conns` connections (or
/// publishers) were established: each sends its share of `rate`, so less was offered.
fn short_rate(rate: f64, up: u64, conns: usize) -> String {
    format!(
        "only {up} of {conns} connections were established: each sends its share of --rate, \
         so about {:.0} msg/s were offered, not {rate}",
        rate * up as f64 / conns as f64
    )
}

/// A latency for a summary card; "-" when there were no samples.
fn latency_or_dash(samples: u64, us: f64) -> String {
    if samples == 0 {
        "-".to_string()
    } else {
        fmt_us(us)
    }
}

/// The `--html` report of an `echo` run.
fn echo_page<'a>(r: &'a Report, source: Option<&'a str>) -> html::Page<'a> {
    let mut params = vec![
        ("connections", group(r.conns_requested as u64)),
        ("payload", format!("{} B", r.size)),
        ("mode", r.mode.clone()),
        ("threads", r.threads.to_string()),
        (
            "measured",
            format!("{} s (warm-up {} s excluded)", r.duration_s, r.warmup_s),
        ),
    ];
    params.extend(source.map(|s| ("source addresses", s.to_string())));
    html::Page {
        scenario: "echo",
        targets: vec![("URL", &r.url)],
        params,
        summary: vec![
            ("msg/s", group(r.rate_msgs_per_s.round() as u64)),
            ("messages", group(r.messages)),
            (
                "connections",
                format!("{}/{}", r.conns_established, r.conns_requested),
            ),
            ("p50", latency_or_dash(r.messages, r.latency.p50_us)),
            ("p99", latency_or_dash(r.messages, r.latency.p99_us)),
            ("max", latency_or_dash(r.messages, r.latency.max_us)),
            ("client CPU per thread", format!("{:.0}%", r.client_cpu_pct)),
        ],
        warnings: &r.warnings,
        latency_what: "Round-trip latency",
        latency: &r.latency,
        percentiles: &r.latency_percentiles,
        samples: r.messages,
        timeline: &r.timeline,
        rate_what: "messages/s",
        time_what: "second of the measured window",
        errors: &r.errors,
        date: SystemTime::now(),
    }
}

fn print_summary(r: &Report) {
    println!(
        "echo {}  conns {}/{}  size {} B  {}  threads {}",
        r.url, r.conns_established, r.conns_requested, r.size, r.mode, r.threads
    );
    println!(
        "  measured {:.1} s (warm-up {:.1} s excluded)",
        r.duration_s, r.warmup_s
    );
    println!(
        "  messages  {:>12}   rate {:>12.0} msg/s",
        r.messages, r.rate_msgs_per_s
    );
    print_latency_and_errors("latency  ", &r.latency, &r.errors);
    println!("  client cpu {:.0}% per thread", r.client_cpu_pct);
    for w in &r.warnings {
        println!("  WARNING: {w}");
    }
}

/// The `connect` `--json` report.
#[derive(Serialize)]
struct ConnectReport {
    scenario: &'static str,
    url: String,
    conns_requested: usize,
    conns_established: u64,
    peak_open: u64,
    rate_per_s: f64,
    hold_s: f64,
    churn_per_s: Option<f64>,
    reconnects: u64,
    handshake_latency: Latency,
    handshake_latency_percentiles: Vec<Percentile>,
    timeline: Vec<Second>,
    errors: std::collections::BTreeMap<String, u64>,
}

/// The `--html` report of a `connect` run.
fn connect_page<'a>(
    r: &'a ConnectReport,
    threads: usize,
    source: Option<&'a str>,
) -> html::Page<'a> {
    let mut params = vec![
        ("connections", group(r.conns_requested as u64)),
        ("ramp", format!("{} connections/s", r.rate_per_s)),
        ("hold", format!("{} s after the ramp", r.hold_s)),
        ("threads", threads.to_string()),
    ];
    params.extend(source.map(|s| ("source addresses", s.to_string())));
    let l = &r.handshake_latency;
    let us = |v| latency_or_dash(r.conns_established, v);
    html::Page {
        scenario: "connect",
        targets: vec![("URL", &r.url)],
        params,
        summary: vec![
            (
                "established",
                format!("{}/{}", r.conns_established, r.conns_requested),
            ),
            ("peak open", group(r.peak_open)),
            ("handshake p50", us(l.p50_us)),
            ("handshake p99", us(l.p99_us)),
            ("handshake max", us(l.max_us)),
        ],
        warnings: &[],
        latency_what: "Handshake latency",
        latency: l,
        percentiles: &r.handshake_latency_percentiles,
        samples: r.conns_established,
        timeline: &r.timeline,
        rate_what: "connections established/s",
        time_what: "second since the start of the ramp",
        errors: &r.errors,
        date: SystemTime::now(),
    }
}

fn run_connect(a: ConnectArgs) -> anyhow::Result<()> {
    if a.conns == 0 || a.common.threads == 0 {
        bail!("--conns and --threads must be at least 1");
    }
    let open_rate = rate("--rate", a.rate, a.conns)?;
    let hold = seconds("--hold", a.hold)?;
    if let Some(c) = a.churn {
        rate("--churn", c, a.conns)?;
    }
    let (target, sources) = prepare(&a.url, &a.common, a.conns)?;
    let params = Arc::new(connect::ConnectParams {
        target,
        conns: a.conns,
        rate: open_rate,
        hold,
        churn: a.churn,
        sources,
    });
    let live = Arc::new(Live::default());
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + params.ramp() + params.hold;
    let threads = a.common.threads.min(a.conns);
    // Each connection opens at its global scheduled time, whichever worker holds it.
    let handles = {
        let (p, l) = (params.clone(), live.clone());
        spawn_workers(a.conns, threads, move |f, n| {
            connect::worker(p.clone(), f, n, l.clone(), start)
        })
    };
    let tty = std::io::stderr().is_terminal();
    let mut peak = 0;
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())),
        );
        let open = live.connections.load(Ordering::Relaxed);
        peak = peak.max(open);
        let line = format!(
            "t={:>4.0}s  open {:>7}  established {:>7}  errors {:>6}  handshake p99 {}",
            start.elapsed().as_secs_f64(),
            open,
            live.messages.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
            match live.p99_us.swap(0, Ordering::Relaxed) {
                0 => "-".to_string(),
                v => format!("{v} µs"),
            }
        );
        progress(tty, &line);
    }
    if tty {
        eprintln!();
    }
    let total = join_workers(handles)?;
    let report = ConnectReport {
        scenario: "connect",
        url: a.url.clone(),
        conns_requested: a.conns,
        conns_established: total.connected - total.churned,
        peak_open: peak,
        rate_per_s: a.rate,
        hold_s: a.hold,
        churn_per_s: a.churn,
        reconnects: total.churned,
        handshake_latency: Latency::of(&total.hist),
        handshake_latency_percentiles: percentiles(&total.hist),
        // Every recorded second: a slow handshake may complete after the hold.
        timeline: timeline(&total, total.timeline.len() as f64),
        errors: total.errors,
    };
    let l = &report.handshake_latency;
    println!(
        "connect {}  established {}/{}  peak open {}  ramp {:.0}/s  hold {:.1} s",
        report.url,
        report.conns_established,
        report.conns_requested,
        report.peak_open,
        report.rate_per_s,
        report.hold_s
    );
    if let Some(c) = report.churn_per_s {
        println!(
            "  churn {c}/s: {} re-connections during the hold",
            report.reconnects
        );
    }
    print_latency_and_errors("handshake", l, &report.errors);
    if let Some(path) = &a.common.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.common.html {
        html::write(
            path,
            &connect_page(&report, threads, a.common.source.as_deref()),
        )?;
    }
    if report.conns_established == 0 {
        bail!("no connection could be established");
    }
    verdict(&report.errors, Vec::new())
}

/// The `broadcast` `--json` report (documented in docs/loadtest.md).
#[derive(Serialize)]
struct BroadcastReport {
    scenario: &'static str,
    pub_url: String,
    sub_url: String,
    subs_requested: usize,
    subs_connected: u64,
    subs_complete: u64,
    publishers_requested: usize,
    publishers_connected: u64,
    size: usize,
    rate_msgs_per_s: f64,
    threads: usize,
    duration_s: f64,
    warmup_s: f64,
    grace_s: f64,
    published: u64,
    expected_deliveries: u64,
    delivered: u64,
    delivered_to_disconnected: u64,
    measured_deliveries: u64,
    delivered_per_s: f64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    stale: u64,
    unwritten: u64,
    latency: Latency,
    latency_percentiles: Vec<Percentile>,
    timeline: Vec<Second>,
    errors: std::collections::BTreeMap<String, u64>,
    client_cpu_pct: f64,
    late_sends: u64,
    skipped_sends: u64,
    warnings: Vec<String>,
}

fn run_broadcast(a: BroadcastArgs) -> anyhow::Result<()> {
    if a.subs == 0 || a.publishers == 0 || a.common.threads == 0 {
        bail!("--subs, --publishers and --threads must be at least 1");
    }
    if u32::try_from(a.publishers).is_err() {
        bail!("--publishers must fit in 32 bits");
    }
    if a.size < broadcast::HEADER_LEN {
        bail!(
            "--size must be at least {} (the header: publisher id, sequence, timestamp)",
            broadcast::HEADER_LEN
        );
    }
    rate("--rate", a.rate, a.publishers)?;
    let (duration, warmup) = window(a.duration, a.warmup)?;
    let total_conns = a.subs + a.publishers;
    let (sub_target, sources) = prepare(&a.sub_url, &a.common, total_conns)?;
    let pub_target = a.common.target(&a.pub_url)?;
    let params = Arc::new(broadcast::BroadcastParams {
        pub_target,
        sub_target,
        subs: a.subs,
        publishers: a.publishers,
        size: a.size,
        rate: a.rate,
        duration,
        warmup,
        sources,
        epoch: Instant::now(),
    });
    let shared = Arc::new(broadcast::Shared::new(a.publishers));
    let live = Arc::new(Live::default());
    let timing = Arc::new(OnceLock::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let threads = a.common.threads.min(total_conns);
    let handles = {
        let (p, s, l, t, tx) = (
            params.clone(),
            shared.clone(),
            live.clone(),
            timing.clone(),
            tx.clone(),
        );
        spawn_workers(total_conns, threads, move |f, n| {
            broadcast::worker(p.clone(), s.clone(), f, n, l.clone(), tx.clone(), t.clone())
        })
    };
    drop(tx);
    for _ in 0..threads {
        rx.recv().context("a worker died while connecting")?;
    }
    // Every subscriber has its 101; give the server a moment to register the last ones.
    let start = Instant::now() + broadcast::SETTLE;
    let measure_start = start + params.warmup;
    let end = measure_start + params.duration;
    let _ = timing.set(Timing {
        start,
        measure_start,
        end,
    });
    if live.connections.load(Ordering::Relaxed) == 0 {
        eprintln!("no connection could be established");
    }

    // Progress: one line per second (rewritten in place on a terminal).
    let tty = std::io::stderr().is_terminal();
    let (mut last_pub, mut last_del, mut last_tick) = (0u64, 0u64, Instant::now());
    let mut cpu_at_measure = None;
    let mut cpu_end = None;
    let stop = end + broadcast::GRACE;
    while Instant::now() < stop {
        // Wake each second, and exactly at the start and end of the measured window (the
        // CPU samples) and at the end of the grace period.
        let now = Instant::now();
        let boundary = [measure_start, end, stop]
            .into_iter()
            .find(|&b| b > now)
            .unwrap_or(stop);
        std::thread::sleep(Duration::from_secs(1).min(boundary.saturating_duration_since(now)));
        let now = Instant::now();
        if cpu_at_measure.is_none() && now >= measure_start {
            cpu_at_measure = Some((process_cpu(), now));
        }
        if cpu_end.is_none() && now >= end {
            cpu_end = Some((process_cpu(), now));
        }
        let (p, d) = (
            shared.published_total(),
            live.messages.load(Ordering::Relaxed),
        );
        let per_s = |n: u64| n as f64 / (now - last_tick).as_secs_f64().max(1e-3);
        let line = format!(
            "t={:>4.1}s  published {:>8.0} msg/s  delivered {:>10.0} msg/s  p99 {:>10}  \
             conns {:>6}  errors {:>5}{}",
            start.elapsed().as_secs_f64(),
            per_s(p - last_pub),
            per_s(d - last_del),
            match live.p99_us.swap(0, Ordering::Relaxed) {
                0 => "-".to_string(),
                v => format!("{v} µs"),
            },
            live.connections.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
            // Ticks fall on the phase boundaries: label the interval that just ended.
            if last_tick < measure_start {
                "  (warm-up)"
            } else if last_tick >= end {
                "  (grace: in-flight messages)"
            } else {
                ""
            }
        );
        (last_pub, last_del, last_tick) = (p, d, now);
        progress(tty, &line);
    }
    if tty {
        eprintln!();
    }
    let mut total = WorkerStats::new();
    let mut tally = broadcast::Tally::default();
    for h in handles {
        let w = h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
        total.merge(w.stats);
        tally.merge(&w.tally);
    }
    let (cpu0, t0) = cpu_at_measure.unwrap_or((Duration::ZERO, start));
    let (cpu1, t1) = cpu_end.unwrap_or_else(|| (process_cpu(), Instant::now()));
    let wall = t1.saturating_duration_since(t0).as_secs_f64();
    let client_cpu_pct = if wall > 0.0 {
        100.0 * cpu1.saturating_sub(cpu0).as_secs_f64() / wall / threads as f64
    } else {
        0.0
    };
    let published = shared.published_total();
    let mut warnings = Vec::new();
    warnings.extend(total.capped_warning());
    if (tally.pubs_connected as usize) < a.publishers {
        warnings.push(short_rate(a.rate, tally.pubs_connected, a.publishers));
    }
    if client_cpu_pct > 90.0 {
        warnings.push(format!(
            "the load generator used {client_cpu_pct:.0}% of its {threads} thread(s): it may be \
             the bottleneck (add --threads, or pin it to its own core)"
        ));
    }
    if total.late_sends > published / 100 {
        warnings.push(format!(
            "{} sends left more than 1 ms behind schedule: the publishers could not keep the \
             rate",
            total.late_sends
        ));
    }
    if total.skipped_sends > 0 {
        warnings.push(format!(
            "{} scheduled sends were skipped: a publisher had {} messages not yet written (the \
             server stopped reading from it)",
            total.skipped_sends,
            stats::MAX_OUTSTANDING
        ));
    }
    if tally.subs_complete < tally.subs_connected {
        warnings.push(format!(
            "{} of {} subscribers disconnected before the end (see errors); expected \
             deliveries, lost, duplicated and reordered count only the {} that stayed",
            tally.subs_connected - tally.subs_complete,
            tally.subs_connected,
            tally.subs_complete
        ));
    }
    if tally.unwritten > 0 {
        warnings.push(format!(
            "{} published messages were not confirmed written to the server by the end (it \
             stopped reading from a publisher, or the connection failed); subscribers count \
             them as lost",
            tally.unwritten
        ));
    }
    if tally.stale > 0 {
        warnings.push(format!(
            "{} messages arrived more than {} sequence numbers late: they could not be told \
             apart from duplicates (counted as stale, and still as lost)",
            tally.stale,
            broadcast::WINDOW
        ));
    }
    let secs = params.duration.as_secs_f64();
    let report = BroadcastReport {
        scenario: "broadcast",
        pub_url: a.pub_url.clone(),
        sub_url: a.sub_url.clone(),
        subs_requested: a.subs,
        subs_connected: tally.subs_connected,
        subs_complete: tally.subs_complete,
        publishers_requested: a.publishers,
        publishers_connected: tally.pubs_connected,
        size: a.size,
        rate_msgs_per_s: a.rate,
        threads,
        duration_s: secs,
        warmup_s: params.warmup.as_secs_f64(),
        grace_s: broadcast::GRACE.as_secs_f64(),
        published,
        expected_deliveries: published * tally.subs_complete,
        delivered: tally.delivered,
        delivered_to_disconnected: tally.delivered_to_disconnected,
        measured_deliveries: total.messages,
        delivered_per_s: total.messages as f64 / secs,
        lost: tally.lost,
        duplicated: tally.duplicated,
        reordered: tally.reordered,
        stale: tally.stale,
        unwritten: tally.unwritten,
        latency: Latency::of(&total.hist),
        latency_percentiles: percentiles(&total.hist),
        timeline: timeline(&total, secs),
        errors: total.errors,
        client_cpu_pct,
        late_sends: total.late_sends,
        skipped_sends: total.skipped_sends,
        warnings,
    };
    print_broadcast_summary(&report);
    if let Some(path) = &a.common.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.common.html {
        html::write(path, &broadcast_page(&report, a.common.source.as_deref()))?;
    }
    if report.publishers_connected == 0 || report.subs_connected == 0 {
        bail!("no publisher or no subscriber could connect");
    }
    if report.published == 0 {
        bail!("no message was published");
    }
    let problems = [
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("scheduled sends skipped", report.skipped_sends),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{n} {what}"))
    .collect();
    verdict(&report.errors, problems)
}

/// The `--html` report of a `broadcast` run.
fn broadcast_page<'a>(r: &'a BroadcastReport, source: Option<&'a str>) -> html::Page<'a> {
    let mut params = vec![
        ("subscribers", group(r.subs_requested as u64)),
        ("publishers", group(r.publishers_requested as u64)),
        ("payload", format!("{} B", r.size)),
        (
            "rate",
            format!("{} msg/s over all publishers", r.rate_msgs_per_s),
        ),
        ("threads", r.threads.to_string()),
        (
            "measured",
            format!(
                "{} s (warm-up {} s excluded from latency, {} s grace)",
                r.duration_s, r.warmup_s, r.grace_s
            ),
        ),
    ];
    params.extend(source.map(|s| ("source addresses", s.to_string())));
    html::Page {
        scenario: "broadcast",
        targets: vec![("publish", &r.pub_url), ("subscribe", &r.sub_url)],
        params,
        summary: vec![
            ("deliveries/s", group(r.delivered_per_s.round() as u64)),
            ("published", group(r.published)),
            (
                "delivered / expected",
                format!("{} / {}", group(r.delivered), group(r.expected_deliveries)),
            ),
            ("lost", group(r.lost)),
            (
                "duplicated / reordered / stale",
                format!("{} / {} / {}", r.duplicated, r.reordered, r.stale),
            ),
            (
                "subscribers complete",
                format!("{}/{}", r.subs_complete, r.subs_requested),
            ),
            (
                "publishers",
                format!("{}/{}", r.publishers_connected, r.publishers_requested),
            ),
            (
                "p99",
                latency_or_dash(r.measured_deliveries, r.latency.p99_us),
            ),
            ("client CPU per thread", format!("{:.0}%", r.client_cpu_pct)),
        ],
        warnings: &r.warnings,
        latency_what: "End-to-end latency",
        latency: &r.latency,
        percentiles: &r.latency_percentiles,
        samples: r.measured_deliveries,
        timeline: &r.timeline,
        rate_what: "deliveries/s",
        time_what: "second of the measured window (by scheduled send time)",
        errors: &r.errors,
        date: SystemTime::now(),
    }
}

fn print_broadcast_summary(r: &BroadcastReport) {
    println!(
        "broadcast {} -> {}  subs {}/{}  publishers {}/{}  size {} B  {} msg/s  threads {}",
        r.pub_url,
        r.sub_url,
        r.subs_connected,
        r.subs_requested,
        r.publishers_connected,
        r.publishers_requested,
        r.size,
        r.rate_msgs_per_s,
        r.threads
    );
    println!(
        "  measured {:.1} s (warm-up {:.1} s excluded from latency; {:.1} s grace for in-flight \
         messages)",
        r.duration_s, r.warmup_s, r.grace_s
    );
    println!(
        "  published {:>12}   expected deliveries {:>12} ({} subscribers connected throughout)",
        r.published, r.expected_deliveries, r.subs_complete
    );
    println!(
        "  delivered {:>12}   measured {:>12}   rate {:>12.0} deliveries/s",
        r.delivered, r.measured_deliveries, r.delivered_per_s
    );
    println!(
        "  lost {}  duplicated {}  reordered {}  stale {}  unwritten {}",
        r.lost, r.duplicated, r.reordered, r.stale, r.unwritten
    );
    print_latency_and_errors("latency  ", &r.latency, &r.errors);
    println!("  client cpu {:.0}% per thread", r.client_cpu_pct);
    for w in &r.warnings {
        println!("  WARNING: {w}");
    }
}

/// The wsedge counters `--metrics` reads: messages accepted, invalid, backpressure waits.
const INGEST_COUNTERS: [&str; 3] = [
    "wsedge_ingest_accepted_total",
    "wsedge_ingest_invalid_total",
    "wsedge_ingest_backpressure_waits_total",
];

/// What the server counted during an `ingest` run (`--metrics`): each counter's change.
#[derive(Serialize)]
struct ServerCounts {
    metrics_url: String,
    accepted: u64,
    invalid: u64,
    backpressure_waits: u64,
}

/// One second of the `ingest` timeline.
#[derive(Serialize)]
struct IngestSecond {
    t: usize,
    messages: u64,
    bytes: u64,
    write_p99_us: f64,
}

/// The `ingest` `--json` report (documented in docs/loadtest.md).
#[derive(Serialize)]
struct IngestReport {
    scenario: &'static str,
    url: String,
    conns_requested: usize,
    conns_established: u64,
    size: usize,
    mode: String,
    invalid_every: Option<u64>,
    threads: usize,
    duration_s: f64,
    warmup_s: f64,
    sent: u64,
    sent_bytes: u64,
    invalid_sent: u64,
    unsent: u64,
    measured_messages: u64,
    measured_bytes: u64,
    rate_msgs_per_s: f64,
    rate_bytes_per_s: f64,
    writes: u64,
    blocked_writes: u64,
    blocked_s: f64,
    write_latency: Latency,
    write_latency_percentiles: Vec<Percentile>,
    lag: Option<Latency>,
    lag_percentiles: Vec<Percentile>,
    late_sends: u64,
    skipped_sends: u64,
    timeline: Vec<IngestSecond>,
    close_codes: std::collections::BTreeMap<String, u64>,
    closes_completed: u64,
    errors: std::collections::BTreeMap<String, u64>,
    server: Option<ServerCounts>,
    client_cpu_pct: f64,
    warnings: Vec<String>,
}

fn run_ingest(a: IngestArgs) -> anyhow::Result<()> {
    if a.conns == 0 || a.common.threads == 0 {
        bail!("--conns and --threads must be at least 1");
    }
    if let Some(r) = a.rate {
        rate("--rate", r, a.conns)?;
    }
    if a.invalid_every == Some(0) {
        bail!("--invalid-every must be at least 1");
    }
    let (duration, warmup) = window(a.duration, a.warmup)?;
    let (target, sources) = prepare(&a.url, &a.common, a.conns)?;
    let metrics = a
        .metrics
        .as_deref()
        .map(scrape::MetricsUrl::parse)
        .transpose()?;
    // Before any connection: a wrong URL fails the run at once.
    let before = metrics
        .as_ref()
        .map(|m| m.counters(&INGEST_COUNTERS))
        .transpose()?;
    let params = Arc::new(ingest::IngestParams {
        target,
        conns: a.conns,
        size: a.size,
        rate: a.rate,
        invalid_every: a.invalid_every,
        telemetry: a.telemetry,
        duration,
        warmup,
        sources,
    });
    let live = Arc::new(Live::default());
    let il = Arc::new(ingest::IngestLive::default());
    let timing = Arc::new(OnceLock::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let threads = a.common.threads.min(a.conns);
    let handles = {
        let (p, l, il, t, tx) = (
            params.clone(),
            live.clone(),
            il.clone(),
            timing.clone(),
            tx.clone(),
        );
        spawn_workers(a.conns, threads, move |f, n| {
            ingest::worker(
                p.clone(),
                f,
                n,
                l.clone(),
                il.clone(),
                tx.clone(),
                t.clone(),
            )
        })
    };
    drop(tx);
    for _ in 0..threads {
        rx.recv().context("a worker died while connecting")?;
    }
    let start = Instant::now();
    let measure_start = start + params.warmup;
    let end = measure_start + params.duration;
    let _ = timing.set(Timing {
        start,
        measure_start,
        end,
    });
    if live.connections.load(Ordering::Relaxed) == 0 {
        eprintln!("no connection could be established");
    }

    // Progress: one line per second (rewritten in place on a terminal).
    let tty = std::io::stderr().is_terminal();
    let (mut last_msgs, mut last_bytes, mut last_tick) = (0u64, 0u64, Instant::now());
    // Without a warm-up the measured window starts now.
    let mut cpu_at_measure = (params.warmup.is_zero()).then(|| (process_cpu(), Instant::now()));
    while Instant::now() < end {
        // Wake each second, and exactly at the start and end of the measured window (the
        // CPU samples).
        let now = Instant::now();
        let boundary = [measure_start, end]
            .into_iter()
            .find(|&b| b > now)
            .unwrap_or(end);
        std::thread::sleep(Duration::from_secs(1).min(boundary.saturating_duration_since(now)));
        let now = Instant::now();
        if cpu_at_measure.is_none() && now >= measure_start {
            cpu_at_measure = Some((process_cpu(), now));
        }
        let (m, b) = (
            live.messages.load(Ordering::Relaxed),
            il.bytes.load(Ordering::Relaxed),
        );
        let per_s = |n: u64| n as f64 / (now - last_tick).as_secs_f64().max(1e-3);
        let line = format!(
            "t={:>4.1}s  {:>9.0} msg/s  {:>8.2} MB/s  write p99 {:>9}  blocked {:>6}{}  \
             conns {:>6}  errors {:>5}{}",
            start.elapsed().as_secs_f64(),
            per_s(m - last_msgs),
            per_s(b - last_bytes) / 1e6,
            match live.p99_us.swap(0, Ordering::Relaxed) {
                0 => "-".to_string(),
                v => format!("{v} µs"),
            },
            il.blocked.load(Ordering::Relaxed),
            if params.rate.is_some() {
                format!("  late {:>6}", il.late.load(Ordering::Relaxed))
            } else {
                String::new()
            },
            live.connections.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
            // Ticks fall on the phase boundaries: label the interval that just ended.
            if last_tick < measure_start {
                "  (warm-up)"
            } else {
                ""
            }
        );
        (last_msgs, last_bytes, last_tick) = (m, b, now);
        progress(tty, &line);
    }
    let cpu_end = (process_cpu(), Instant::now());
    progress(
        tty,
        &format!(
            "closing: sending what is queued, then waiting up to {} s for the server's close",
            ingest::CLOSE_WAIT.as_secs()
        ),
    );
    let mut total = ingest::IngestStats::new();
    for h in handles {
        total.merge(h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?);
    }
    if tty {
        eprintln!();
    }
    let mut warnings = Vec::new();
    warnings.extend(total.stats.capped_warning());
    if let (Some(r), true) = (a.rate, (total.stats.connected as usize) < a.conns) {
        warnings.push(short_rate(r, total.stats.connected, a.conns));
    }
    // After every connection has ended: what the server read is counted by now.
    let server = match (&metrics, before) {
        (Some(m), Some(b)) => match m.counters(&INGEST_COUNTERS) {
            Ok(after) => Some(ServerCounts {
                metrics_url: m.url.clone(),
                accepted: after[0].saturating_sub(b[0]),
                invalid: after[1].saturating_sub(b[1]),
                backpressure_waits: after[2].saturating_sub(b[2]),
            }),
            Err(e) => {
                warnings.push(format!("the server's counters could not be read: {e:#}"));
                None
            }
        },
        _ => None,
    };
    let (cpu0, t0) = cpu_at_measure.unwrap_or((Duration::ZERO, start));
    let wall = cpu_end.1.saturating_duration_since(t0).as_secs_f64();
    let client_cpu_pct = if wall > 0.0 {
        100.0 * cpu_end.0.saturating_sub(cpu0).as_secs_f64() / wall / threads as f64
    } else {
        0.0
    };
    let tally = &total.tally;
    let stats = &total.stats;
    if client_cpu_pct > 90.0 {
        warnings.push(format!(
            "the load generator used {client_cpu_pct:.0}% of its {threads} thread(s): it may be \
             the bottleneck (add --threads, or pin it to its own core)"
        ));
    }
    if stats.skipped_sends > 0 {
        warnings.push(format!(
            "{} scheduled sends were skipped: connections had {} messages not yet written (the \
             server stopped reading)",
            stats.skipped_sends,
            stats::MAX_OUTSTANDING
        ));
    }
    if stats.late_sends > total.lag.len() / 100 {
        warnings.push(format!(
            "{} messages were sent more than 1 ms behind schedule: the server pushed back (see \
             blocked writes) or the client could not keep the rate (see its CPU)",
            stats.late_sends
        ));
    }
    if tally.unsent > 0 {
        warnings.push(format!(
            "{} queued messages were not sent by the end (the server stopped reading, or the \
             connection failed); the server may have read part of them",
            tally.unsent
        ));
    }
    let unclosed = stats.connected.saturating_sub(tally.closes_completed);
    if unclosed > 0 {
        warnings.push(format!(
            "{unclosed} connections did not end with the close handshake (see errors): the \
             server may not have read everything they sent, and its counters may still change"
        ));
    }
    let valid_sent = tally.sent - tally.invalid_sent;
    if let Some(s) = &server {
        if s.accepted < valid_sent {
            warnings.push(format!(
                "the server accepted {} messages but the client sent {valid_sent} valid ones: \
                 messages were lost, refused after a close for an invalid one (on_error = \
                 \"close\"), or not read before the connection ended",
                s.accepted
            ));
        } else if s.accepted > valid_sent {
            warnings.push(format!(
                "the server accepted {} messages but the client sent {valid_sent} valid ones: \
                 other clients were sending to the server, or it read part of a write that did \
                 not complete",
                s.accepted
            ));
        }
        if s.invalid != tally.invalid_sent {
            warnings.push(format!(
                "the server counted {} invalid messages, the client sent {} (other clients, a \
                 close on error, or a route that is not format = \"json\")",
                s.invalid, tally.invalid_sent
            ));
        }
    }
    let secs = params.duration.as_secs_f64();
    let timeline = stats
        .timeline
        .iter()
        .enumerate()
        .take(secs.ceil() as usize)
        .map(|(t, (n, h))| IngestSecond {
            t,
            messages: *n,
            bytes: tally.bytes_timeline.get(t).copied().unwrap_or(0),
            write_p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
        .collect();
    let report = IngestReport {
        scenario: "ingest",
        url: a.url.clone(),
        conns_requested: a.conns,
        conns_established: stats.connected,
        size: a.size,
        mode: match a.rate {
            Some(r) => format!("open-loop {r} msg/s"),
            None => "closed-loop".to_string(),
        },
        invalid_every: a.invalid_every,
        threads,
        duration_s: secs,
        warmup_s: params.warmup.as_secs_f64(),
        sent: tally.sent,
        sent_bytes: tally.sent_bytes,
        invalid_sent: tally.invalid_sent,
        unsent: tally.unsent,
        measured_messages: stats.messages,
        measured_bytes: tally.measured_bytes,
        rate_msgs_per_s: stats.messages as f64 / secs,
        rate_bytes_per_s: tally.measured_bytes as f64 / secs,
        writes: tally.writes,
        blocked_writes: tally.blocked_writes,
        blocked_s: tally.blocked_ns as f64 / 1e9,
        write_latency: Latency::of(&stats.hist),
        write_latency_percentiles: percentiles(&stats.hist),
        lag: a.rate.map(|_| Latency::of(&total.lag)),
        lag_percentiles: percentiles(&total.lag),
        late_sends: stats.late_sends,
        skipped_sends: stats.skipped_sends,
        timeline,
        close_codes: tally.close_codes.clone(),
        closes_completed: tally.closes_completed,
        errors: stats.errors.clone(),
        server,
        client_cpu_pct,
        warnings,
    };
    print_ingest_summary(&report, total.lag.len());
    if let Some(path) = &a.common.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.common.html {
        let seconds: Vec<Second> = report
            .timeline
            .iter()
            .map(|s| Second {
                t: s.t,
                messages: s.messages,
                p99_us: s.write_p99_us,
            })
            .collect();
        html::write(
            path,
            &ingest_page(&report, &seconds, a.common.source.as_deref()),
        )?;
    }
    if report.conns_established == 0 {
        bail!("no connection could be established");
    }
    if report.sent == 0 {
        bail!("no message was sent");
    }
    verdict(&report.errors, Vec::new())
}

/// Bytes per second as MB/s.
fn mb_per_s(bytes_per_s: f64) -> String {
    format!("{:.2} MB/s", bytes_per_s / 1e6)
}

/// The `--html` report of an `ingest` run.
fn ingest_page<'a>(
    r: &'a IngestReport,
    seconds: &'a [Second],
    source: Option<&'a str>,
) -> html::Page<'a> {
    let mut params = vec![
        ("connections", group(r.conns_requested as u64)),
        ("message size", format!("{} B", r.size)),
        ("mode", r.mode.clone()),
        ("threads", r.threads.to_string()),
        (
            "measured",
            format!("{} s (warm-up {} s excluded)", r.duration_s, r.warmup_s),
        ),
    ];
    params.extend(
        r.invalid_every
            .map(|k| ("invalid", format!("1 in {k} messages of each connection"))),
    );
    params.extend(source.map(|s| ("source addresses", s.to_string())));
    let mut summary = vec![
        ("msg/s", group(r.rate_msgs_per_s.round() as u64)),
        ("throughput", mb_per_s(r.rate_bytes_per_s)),
        ("sent", group(r.sent)),
        ("invalid sent", group(r.invalid_sent)),
        ("unsent", group(r.unsent)),
        (
            "connections",
            format!("{}/{}", r.conns_established, r.conns_requested),
        ),
        (
            "blocked writes",
            format!("{} ({:.2} s)", group(r.blocked_writes), r.blocked_s),
        ),
        (
            "write p99",
            latency_or_dash(r.writes, r.write_latency.p99_us),
        ),
        (
            "write max",
            latency_or_dash(r.writes, r.write_latency.max_us),
        ),
    ];
    if let Some(l) = &r.lag {
        let n = r.lag_percentiles.len() as u64;
        summary.push(("lag p99", latency_or_dash(n, l.p99_us)));
        summary.push(("lag max", latency_or_dash(n, l.max_us)));
        summary.push(("late sends", group(r.late_sends)));
    }
    if let Some(s) = &r.server {
        summary.push(("server accepted", group(s.accepted)));
        summary.push(("server invalid", group(s.invalid)));
        summary.push(("server backpressure waits", group(s.backpressure_waits)));
    }
    summary.push(("client CPU per thread", format!("{:.0}%", r.client_cpu_pct)));
    html::Page {
        scenario: "ingest",
        targets: vec![("URL", &r.url)],
        params,
        summary,
        warnings: &r.warnings,
        latency_what: "Write completion latency",
        latency: &r.write_latency,
        percentiles: &r.write_latency_percentiles,
        samples: r.writes,
        timeline: seconds,
        rate_what: "messages sent/s",
        time_what: "second of the measured window (p99: write completion latency)",
        errors: &r.errors,
        date: SystemTime::now(),
    }
}

fn print_ingest_summary(r: &IngestReport, lag_samples: u64) {
    println!(
        "ingest {}  conns {}/{}  size {} B  {}{}  threads {}",
        r.url,
        r.conns_established,
        r.conns_requested,
        r.size,
        r.mode,
        r.invalid_every
            .map_or(String::new(), |k| format!("  invalid every {k}")),
        r.threads
    );
    println!(
        "  measured {:.1} s (warm-up {:.1} s excluded from rates and latencies)",
        r.duration_s, r.warmup_s
    );
    println!(
        "  sent      {:>12} msgs {:>14} B   invalid {}   unsent {}   (whole run)",
        r.sent, r.sent_bytes, r.invalid_sent, r.unsent
    );
    println!(
        "  rate      {:>12.0} msg/s {:>12}",
        r.rate_msgs_per_s,
        mb_per_s(r.rate_bytes_per_s)
    );
    println!(
        "  writes    {:>12}   blocked (> 1 ms) {}   blocked time {:.3} s",
        r.writes, r.blocked_writes, r.blocked_s
    );
    if let Some(l) = &r.lag {
        if lag_samples == 0 {
            println!("  lag       no samples");
        } else {
            println!(
                "  lag       p50 {:.1} µs  p90 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} \
                 µs  late (> 1 ms) {}  skipped {}",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, r.late_sends, r.skipped_sends
            );
        }
    }
    let codes: Vec<String> = r
        .close_codes
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!(
        "  closes    received {}   handshakes completed {}/{}",
        if codes.is_empty() {
            "none".to_string()
        } else {
            codes.join(", ")
        },
        r.closes_completed,
        r.conns_established
    );
    if let Some(s) = &r.server {
        println!(
            "  server    accepted {} (client sent {} valid)   invalid {} (client sent {})   \
             backpressure waits {}   [{}]",
            s.accepted,
            r.sent - r.invalid_sent,
            s.invalid,
            r.invalid_sent,
            s.backpressure_waits,
            s.metrics_url
        );
    }
    print_latency_and_errors("write    ", &r.write_latency, &r.errors);
    println!("  client cpu {:.0}% per thread", r.client_cpu_pct);
    for w in &r.warnings {
        println!("  WARNING: {w}");
    }
}
