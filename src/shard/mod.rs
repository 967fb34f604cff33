//! The shard runtime: one pinned thread per core, each with its own completion-based runtime
//! (io_uring, or epoll when io_uring is unavailable), its own SO_REUSEPORT listener sockets,
//! connection drivers, timers and counters. Shards share nothing on the data path; the only
//! cross-thread traffic is the control channel (metrics snapshots, shutdown) and, per listener,
//! one atomic connection count checked once per handshake.
//!
//! This is the only module that names the runtime (compio) or touches sockets.
//!
//! Life of a connection: `accept` accepts it on the shard whose socket the kernel picked,
//! `driver` reads the HTTP upgrade under a deadline, answers 101 (or an error status), then
//! runs the WebSocket loop: bytes in → [`crate::proto::Conn`] → route logic → bytes out, with
//! keepalive, backpressure and the close handshake, until the connection ends.

mod accept;
mod client;
mod driver;
mod ingest;
mod proxy;
mod signal;
mod sink;
mod source;
pub mod stream;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use compio::driver::{DriverType, ProactorBuilder};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use bytes::Bytes;

use crate::config::{Config, IoMode, ListenerConfig, SourceConfig};
use crate::fanout::{self, Hub, mesh};
use crate::metrics::{Info, ShardMetrics, Snapshot};
use crate::proto::MessageKind;

/// The I/O backend the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring (completion based).
    IoUring,
    /// epoll (readiness based; the fallback driver).
    Epoll,
}

impl Backend {
    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }

    /// The proactor configuration of a shard. On io_uring: one thread submits and reaps
    /// (SINGLE_ISSUER), completions' task work runs when the shard enters the kernel instead
    /// of interrupting it with an inter-processor interrupt (COOP_TASKRUN, DEFER_TASKRUN).
    /// Measured here: reschedule IPIs were a quarter of the shard's CPU on echo without them.
    fn proactor(self) -> ProactorBuilder {
        let mut b = ProactorBuilder::new();
        match self {
            Self::IoUring => {
                b.driver_type(DriverType::IoUring)
                    .single_issuer(true)
                    .coop_taskrun(true)
                    .taskrun_flag(true)
                    .defer_taskrun(true);
            }
            Self::Epoll => {
                b.driver_type(DriverType::Poll);
            }
        }
        b
    }
}

/// A compio runtime for the calling thread, configured as a shard's: io_uring with
/// SINGLE_ISSUER, COOP_TASKRUN and DEFER_TASKRUN (see [`Backend`]), or epoll where io_uring
/// cannot be set up. For tools that drive connections on the same runtime as the shards
/// (`wsedge-load`); without these flags every completion interrupts the thread with a
/// reschedule IPI (measured: a quarter of a saturated client's CPU). Build it on the thread
/// that uses it: a SINGLE_ISSUER ring may only be entered by the thread that created it.
///
/// # Errors
/// Neither backend could be built.
pub fn thread_runtime() -> std::io::Result<(compio::runtime::Runtime, Backend)> {
    let build = |b: Backend| {
        compio::runtime::RuntimeBuilder::new()
            .with_proactor(b.proactor())
            .build()
            .map(|rt| (rt, b))
    };
    build(Backend::IoUring).or_else(|_| build(Backend::Epoll))
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `--io uring` was asked for and io_uring cannot be set up here.
    #[error("io_uring is unavailable ({0}); use --io auto or --io epoll")]
    UringUnavailable(std::io::Error),
    /// A listener socket could not be created or bound.
    #[error("listener `{name}`: cannot listen on {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address asked for.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A shard thread failed to start its runtime.
    #[error("shard {shard}: {message}")]
    Shard {
        /// Shard index.
        shard: usize,
        /// What failed.
        message: String,
    },
    /// The admin listener could not be bound.
    #[error("admin listener: cannot listen on {addr}: {source}")]
    Admin {
        /// Address asked for.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
}

/// `tls_insecure_skip_verify` is for tests: say so loudly, once, at startup.
fn warn_insecure(t: &crate::tls::ClientTls, what: &str) {
    if t.insecure_skip_verify {
        tracing::warn!(
            upstream = what,
            "tls_insecure_skip_verify is set: the upstream's \
                       certificate is NOT verified (anyone on the path can impersonate it)"
        );
    }
}

/// Commands sent to a shard over its control channel.
pub(crate) enum Control {
    /// Reply with a copy of the shard's counters.
    Snapshot(mpsc::Sender<Snapshot>),
    /// Stop accepting, close every connection (1001, spread over the drain window), exit.
    Drain,
    /// Deliver an encoded frame to the shard's local subscribers of `topic` and reply with
    /// how many there were. `origin` counts it as published (set for one shard only).
    Publish {
        topic: Arc<str>,
        frame: Bytes,
        origin: bool,
        reply: mpsc::Sender<usize>,
    },
    /// New TLS handshakes on listener `listener` use `config` (certificate hot reload);
    /// reply once applied.
    TlsReload {
        listener: usize,
        config: Arc<rustls::ServerConfig>,
        reply: mpsc::Sender<()>,
    },
}

/// A cloneable handle to ask every shard for its counters (used by the admin listener).
#[derive(Clone)]
pub struct ShardSet {
    controls: Arc<Vec<async_channel::Sender<Control>>>,
    sinks: Arc<Vec<Arc<sink::SinkStats>>>,
    backend: Backend,
    draining: Arc<AtomicBool>,
}

impl ShardSet {
    /// Counters of every shard that answers within one second, in shard order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.ask(|_, reply| Control::Snapshot(reply))
    }

    /// Send every shard the request `make(shard, reply)` builds; collect the answers that
    /// arrive within one second, in shard order.
    fn ask<T>(&self, make: impl Fn(usize, mpsc::Sender<T>) -> Control) -> Vec<T> {
        let mut waiting = Vec::with_capacity(self.controls.len());
        for (i, c) in self.controls.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            if c.try_send(make(i, tx)).is_ok() {
                waiting.push(rx);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        waiting
            .into_iter()
            .filter_map(|rx| {
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok()
            })
            .collect()
    }

    /// Publish one message to `topic` on every shard (the admin API). Returns the number of
    /// subscribers it was queued for, over the shards that answered within one second.
    pub fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize {
        let frame = fanout::encode(kind, payload);
        let topic: Arc<str> = Arc::from(topic);
        self.ask(|i, reply| Control::Publish {
            topic: topic.clone(),
            frame: frame.clone(),
            origin: i == 0,
            reply,
        })
        .into_iter()
        .sum()
    }

    /// Process facts for the exporters.
    pub fn info(&self) -> Info {
        Info {
            io_backend: self.backend.as_str(),
            shards: self.controls.len(),
            draining: self.draining.load(Ordering::Relaxed),
            sinks: self.sinks.iter().map(|s| s.snapshot()).collect(),
        }
    }
}

/// A running server: shard threads plus the optional admin listener.
pub struct Server {
    set: ShardSet,
    threads: Vec<JoinHandle<()>>,
    listen_addrs: Vec<(String, SocketAddr)>,
    admin: Option<crate::admin::AdminServer>,
    drain_timeout: Duration,
    /// Sink threads, joined after the shards (which hold the senders) have exited.
    sink_threads: Vec<JoinHandle<()>>,
    /// TLS listeners by index: their files, and the configuration in use (for reload).
    tls: Vec<(usize, crate::tls::ServerTls)>,
}

/// Per-listener state shared by all shards.
pub(crate) struct ListenerShared {
    pub(crate) cfg: ListenerConfig,
    /// Open WebSocket connections across shards (checked against `max_connections`).
    pub(crate) open: AtomicUsize,
    /// Open connections per client IP, when `max_connections_per_ip` is set. A lock, but
    /// one taken once per handshake and once per close, never per message.
    pub(crate) per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// Everything a shard's tasks share. Lives on the shard thread only (`Rc`).
pub(crate) struct ShardCtx {
    pub(crate) id: usize,
    pub(crate) listeners: Vec<Arc<ListenerShared>>,
    pub(crate) metrics: ShardMetrics,
    /// Open WebSocket connections: drain and keepalive signals.
    pub(crate) conns: signal::Registry,
    /// Period of the keepalive sweeper (see [`keepalive_tick`]).
    pub(crate) tick: Duration,
    pub(crate) drain_window: Duration,
    /// Connection tasks alive (handshaking or open), for the drain.
    pub(crate) live: std::cell::Cell<usize>,
    /// Ingest messages validated and waiting for room in a full sink channel: if the drain
    /// deadline passes first they are lost with their tasks, and the drain says how many.
    pub(crate) ingest_waiting: std::cell::Cell<u64>,
    /// Sequence number of accepted connections; spreads drain closes.
    pub(crate) seq: std::cell::Cell<u64>,
    /// Broadcast topics and their local subscribers.
    pub(crate) hub: Hub,
    /// This shard's ends of the rings to and from the other shards.
    pub(crate) link: mesh::Link,
    /// Per listener, per route: the route path as a metric label.
    pub(crate) route_labels: Vec<Vec<Rc<str>>>,
    /// The sources running on this shard.
    pub(crate) sources: Vec<Rc<source::SourceStats>>,
    /// Senders to the ingest sinks, by sink index.
    pub(crate) sinks: Vec<async_channel::Sender<sink::Chunk>>,
    /// Per listener: this shard's share of the listener's `accept_rate`.
    pub(crate) accept_buckets: Vec<std::cell::RefCell<Option<crate::ratelimit::TokenBucket>>>,
    /// Per listener: the TLS configuration new handshakes use (replaced on reload).
    pub(crate) tls: Vec<std::cell::RefCell<Option<Arc<rustls::ServerConfig>>>>,
    /// Compresses the messages this shard's connections send with permessage-deflate (no
    /// context takeover, so one serves them all; broadcasts use the hub's own).
    pub(crate) deflater: std::cell::RefCell<crate::proto::Compressor>,
}

impl ShardCtx {
    /// Publish a message to `topic`: frame it once, queue it for this shard's subscribers,
    /// stage it for the other shards (sent at the caller's next `link.flush()`).
    pub(crate) fn publish(&self, topic: &Arc<str>, kind: MessageKind, payload: &[u8]) {
        let frame = fanout::encode(kind, payload);
        self.hub.note_published();
        self.hub.publish(topic, &frame);
        self.link.stage(topic, &frame);
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = self.metrics.snapshot(self.id);
        s.fanout = self.hub.snapshot();
        s.sources = self.sources.iter().map(|x| x.snapshot()).collect();
        (
            s.fanout.ring_batches_out,
            s.fanout.ring_batches_in,
            s.fanout.ring_full_drops,
        ) = self.link.counters();
        s
    }
}

impl Server {
    /// Bind every listener on every shard, start the shard threads and the admin listener.
    /// Returns once every shard is serving.
    ///
    /// # Errors
    /// See [`StartError`]: io_uring forced but unavailable, a bind failure, a shard that
    /// could not build its runtime, the admin bind.
    pub fn start(cfg: &Config) -> Result<Self, StartError> {
        let shards = cfg
            .runtime
            .shards
            .or_else(|| std::thread::available_parallelism().ok())
            .unwrap_or(NonZeroUsize::MIN)
            .get();
        let backend = select_backend(cfg.runtime.io)?;

        // Bind in the calling thread so that errors surface synchronously. Port 0 is resolved
        // by the first shard's socket; the others join the same port through SO_REUSEPORT.
        let mut per_shard: Vec<Vec<StdListener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut listen_addrs = Vec::new();
        let mut shared = Vec::new();
        for l in &cfg.listeners {
            let mut addr = l.bind;
            for sockets in per_shard.iter_mut() {
                let sock = bind_reuseport(addr, l.backlog).map_err(|source| StartError::Bind {
                    name: l.name.clone(),
                    addr,
                    source,
                })?;
                // Invariant: a bound socket has a local address.
                addr = sock.local_addr().expect("bound socket has an address");
                sockets.push(sock);
            }
            info!(listener = %l.name, %addr, shards, io = %backend.as_str(), tls = l.tls.is_some(),
                  "listening");
            for r in &l.routes {
                if let Some(t) = r.proxy.as_ref().and_then(|p| p.url.tls.as_ref()) {
                    warn_insecure(t, &format!("route {}", r.path));
                }
            }
            listen_addrs.push((l.name.clone(), addr));
            shared.push(Arc::new(ListenerShared {
                cfg: l.clone(),
                open: AtomicUsize::new(0),
                per_ip: Default::default(),
            }));
        }

        let mut sink_txs = Vec::new();
        let mut sink_stats = Vec::new();
        let mut sink_threads = Vec::new();
        for s in &cfg.sources {
            if let Some(t) = &s.url.tls {
                warn_insecure(t, &format!("source {}", s.name));
            }
        }
        for s in &cfg.sinks {
            let started = if s.used {
                if let crate::config::SinkKind::WebSocket(ws) = &s.kind {
                    if let Some(t) = &ws.url.tls {
                        warn_insecure(t, &format!("sink {}", s.name));
                    }
                }
                sink::start(s.clone(), backend).map_err(|e| StartError::Shard {
                    shard: usize::MAX,
                    message: format!("sink `{}`: cannot start its thread: {e}", s.name),
                })?
            } else {
                info!(sink = %s.name, "no route delivers to this sink; not started");
                sink::unused(s)
            };
            sink_txs.push(started.tx);
            sink_stats.push(started.stats);
            sink_threads.extend(started.thread);
        }
        let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, (usize, String)>>();
        let mut links = mesh::build(shards).into_iter();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut controls = Vec::with_capacity(shards);
        let mut threads = Vec::with_capacity(shards);
        for (id, sockets) in per_shard.into_iter().enumerate() {
            let (ctl_tx, ctl_rx) = async_channel::unbounded();
            controls.push(ctl_tx);
            let core = if cfg.runtime.pin_threads && !cores.is_empty() {
                Some(cores[id % cores.len()])
            } else {
                None
            };
            let ctx_parts = (
                id,
                shared.clone(),
                cfg.runtime.drain_window,
                cfg.runtime.drain_timeout,
                // Invariant: `build(shards)` made one link per shard.
                links.next().expect("one link per shard"),
                // Source i runs on shard i mod shards.
                cfg.sources
                    .iter()
                    .skip(id)
                    .step_by(shards)
                    .cloned()
                    .collect(),
                sink_txs.clone(),
            );
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("wsedge-shard-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    run_shard(backend, ctx_parts, sockets, ctl_rx, ready);
                })
                .map_err(|e| StartError::Shard {
                    shard: id,
                    message: format!("cannot spawn thread: {e}"),
                })?;
            threads.push(t);
        }
        drop(ready_tx);
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err((shard, message))) => return Err(StartError::Shard { shard, message }),
                Err(_) => {
                    return Err(StartError::Shard {
                        shard: usize::MAX,
                        message: "a shard thread exited during startup".into(),
                    });
                }
            }
        }

        // Only the shards hold senders now: the sinks end when the shards do.
        drop(sink_txs);
        let set = ShardSet {
            controls: Arc::new(controls),
            sinks: Arc::new(sink_stats),
            backend,
            draining: Arc::new(AtomicBool::new(false)),
        };
        let admin = match &cfg.admin {
            Some(a) => Some(
                crate::admin::AdminServer::start(a.bind, set.clone()).map_err(|source| {
                    StartError::Admin {
                        addr: a.bind,
                        source,
                    }
                })?,
            ),
            None => None,
        };
        Ok(Self {
            set,
            threads,
            listen_addrs,
            admin,
            drain_timeout: cfg.runtime.drain_timeout,
            sink_threads,
            tls: cfg
                .listeners
                .iter()
                .enumerate()
                .filter_map(|(i, l)| Some((i, l.tls.clone()?)))
                .collect(),
        })
    }

    /// Re-read every TLS listener's certificate and key files (SIGHUP). New handshakes use
    /// the new certificates; open connections keep theirs; session tickets stay valid unless
    /// the client CA changed (then every client makes a full handshake again). A
    /// listener whose files do not load keeps its current certificates.
    ///
    /// # Errors
    /// The first listener that failed, with the reason (all others were still reloaded).
    pub fn reload_tls(&mut self) -> Result<usize, String> {
        let mut first_error = None;
        let mut reloaded = 0;
        for (idx, spec) in &mut self.tls {
            let name = &self.listen_addrs[*idx].0;
            match spec.reload() {
                Ok(config) => {
                    // Returns once every shard has it: the next handshake uses it.
                    self.set.ask(|_, reply| Control::TlsReload {
                        listener: *idx,
                        config: config.clone(),
                        reply,
                    });
                    reloaded += 1;
                    info!(listener = %name, "TLS certificates reloaded");
                }
                Err(e) => {
                    tracing::error!(listener = %name, error = %e,
                        "TLS reload failed; the current certificates stay in use");
                    first_error.get_or_insert(format!("listener `{name}`: {e}"));
                }
            }
        }
        first_error.map_or(Ok(reloaded), Err)
    }

    /// Bound address of each listener, by name, in config order (port 0 resolved).
    pub fn listen_addrs(&self) -> &[(String, SocketAddr)] {
        &self.listen_addrs
    }

    /// Bound address of the admin listener, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    /// The backend the shards run on.
    pub fn backend(&self) -> Backend {
        self.set.backend
    }

    /// Handle for querying the shards.
    pub fn shards(&self) -> &ShardSet {
        &self.set
    }

    /// Drain and stop: stop accepting, close every connection with 1001 (spread over the
    /// drain window), wait for the shards up to the drain deadline, then for the sinks to
    /// deliver what they hold (each within its own bound), stop the admin listener. Returns
    /// the sinks' final counters (what was delivered, and dropped at shutdown).
    pub fn shutdown(mut self) -> Vec<crate::metrics::SinkSnapshot> {
        self.set.draining.store(true, Ordering::Relaxed);
        for c in self.set.controls.iter() {
            let _ = c.try_send(Control::Drain);
        }
        for t in self.threads.drain(..) {
            // A shard that panicked has already logged; there is nothing left to drain.
            let _ = t.join();
        }
        // The shards are gone, so are the senders: each sink writes what it holds and ends.
        for t in self.sink_threads.drain(..) {
            let _ = t.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        info!(
            deadline_ms = self.drain_timeout.as_millis() as u64,
            "shut down"
        );
        self.set.sinks.iter().map(|s| s.snapshot()).collect()
    }
}

/// Decide the backend once for all shards, logging the reason for a fallback.
fn select_backend(mode: IoMode) -> Result<Backend, StartError> {
    // Probe on a throwaway thread: tearing down a ring queues task work on the thread that
    // created it, which would interrupt that thread's next blocking syscall with EINTR.
    let probe = || {
        std::thread::spawn(|| Backend::IoUring.proactor().build().map(drop))
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("io_uring probe panicked")))
    };
    match mode {
        IoMode::Epoll => Ok(Backend::Epoll),
        IoMode::Uring => probe()
            .map(|_| Backend::IoUring)
            .map_err(StartError::UringUnavailable),
        IoMode::Auto => match probe() {
            Ok(()) => Ok(Backend::IoUring),
            Err(e) => {
                warn!(error = %e, "io_uring is unavailable; falling back to epoll");
                Ok(Backend::Epoll)
            }
        },
    }
}

fn bind_reuseport(addr: SocketAddr, backlog: u32) -> std::io::Result<StdListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog as i32)?;
    Ok(sock.into())
}

/// The keepalive sweeper period: a quarter of the shortest idle or pong timeout, within
/// 5 ms..=1 s, so pings and idle closes happen within 25% (or 1 s) of their configured time.
/// `None` when no listener has keepalive enabled.
fn keepalive_tick(listeners: &[Arc<ListenerShared>]) -> Option<Duration> {
    listeners
        .iter()
        .filter_map(|l| Some(l.cfg.idle_timeout?.min(l.cfg.pong_timeout)))
        .min()
        .map(|d| (d / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)))
}

type CtxParts = (
    usize,
    Vec<Arc<ListenerShared>>,
    Duration,
    Duration,
    mesh::Link,
    Vec<SourceConfig>,
    Vec<async_channel::Sender<sink::Chunk>>,
);

fn run_shard(
    backend: Backend,
    (id, listeners, drain_window, drain_timeout, link, sources, sinks): CtxParts,
    sockets: Vec<StdListener>,
    control: async_channel::Receiver<Control>,
    ready: mpsc::Sender<Result<usize, (usize, String)>>,
) {
    let rt = match compio::runtime::RuntimeBuilder::new()
        .with_proactor(backend.proactor())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err((
                id,
                format!("cannot build {} runtime: {e}", backend.as_str()),
            )));
            return;
        }
    };
    let tick = keepalive_tick(&listeners);
    let accept_buckets = listeners
        .iter()
        .map(|l| {
            std::cell::RefCell::new(l.cfg.accept_rate.map(|r| {
                crate::ratelimit::TokenBucket::new(
                    f64::from(r) / link.shards() as f64,
                    Instant::now(),
                )
            }))
        })
        .collect();
    let route_labels = listeners
        .iter()
        .map(|l| {
            l.cfg
                .routes
                .iter()
                .map(|r| Rc::from(r.path.as_str()))
                .collect()
        })
        .collect();
    let listeners_tls = listeners
        .iter()
        .map(|l| std::cell::RefCell::new(l.cfg.tls.as_ref().map(|t| t.config.clone())))
        .collect();
    let ctx = Rc::new(ShardCtx {
        id,
        listeners,
        metrics: ShardMetrics::default(),
        conns: signal::Registry::default(),
        tick: tick.unwrap_or(Duration::MAX),
        drain_window,
        live: std::cell::Cell::new(0),
        ingest_waiting: std::cell::Cell::new(0),
        seq: std::cell::Cell::new(0),
        hub: Hub::default(),
        link,
        route_labels,
        sources: sources
            .iter()
            .map(|s| Rc::new(source::SourceStats::new(s)))
            .collect(),
        accept_buckets,
        sinks,
        tls: listeners_tls,
        deflater: Default::default(),
    });
    rt.block_on(async move {
        let mut accepts = Vec::with_capacity(sockets.len());
        for (idx, s) in sockets.into_iter().enumerate() {
            match compio::net::TcpListener::from_std(s) {
                Ok(l) => accepts.push(compio::runtime::spawn(accept::accept_loop(
                    ctx.clone(),
                    idx,
                    l,
                ))),
                Err(e) => {
                    let _ = ready.send(Err((id, format!("cannot register listener: {e}"))));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(id));
        drop(ready);
        // One sweeper per shard drives every connection's keepalive.
        let sweeper = tick.map(|period| {
            let ctx = ctx.clone();
            compio::runtime::spawn(async move {
                loop {
                    compio::time::sleep(period).await;
                    ctx.conns.tick();
                }
            })
        });

        // Broadcasts from other shards: drain the rings whenever a peer rings the doorbell.
        // Each frame is copied once into shard-local memory, so the subscribers' reference
        // counting never touches a cache line another core is using.
        let inbox = ctx.link.has_peers().then(|| {
            let ctx = ctx.clone();
            compio::runtime::spawn(async move {
                loop {
                    ctx.link.wait().await;
                    ctx.link.drain(|topic, frame| {
                        ctx.hub.publish(topic, &Bytes::copy_from_slice(frame));
                    });
                }
            })
        });

        let source_tasks: Vec<_> = sources
            .into_iter()
            .zip(ctx.sources.clone())
            .map(|(cfg, stats)| compio::runtime::spawn(source::run(ctx.clone(), cfg, stats)))
            .collect();

        // Serve control requests until told to drain (or the server handle is gone).
        while let Ok(cmd) = control.recv().await {
            match cmd {
                Control::Drain => break,
                other => serve_control(&ctx, other),
            }
        }

        // Drain: stop accepting (dropping the accept tasks closes the sockets), tell every
        // connection, then wait for them up to the deadline while still answering snapshots.
        // The rings are still taken: subscribers waiting for their turn in the drain window
        // keep getting what other shards' publishers send until then.
        drop(accepts);
        drop(sweeper);
        ctx.conns.drain();
        let deadline = Instant::now() + drain_timeout;
        while ctx.live.get() > 0 && Instant::now() < deadline {
            match compio::time::timeout(Duration::from_millis(10), control.recv()).await {
                Ok(Ok(cmd)) => serve_control(&ctx, cmd),
                // The server handle is gone: nothing to answer, but still wait (not spin).
                Ok(Err(_)) => compio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => {}
            }
        }
        drop(inbox);
        // Sources closed their upstreams with 1001 when the drain was raised; give them the
        // rest of the deadline, then cancel whatever is left.
        for (t, stats) in source_tasks.into_iter().zip(&ctx.sources) {
            // A source waiting to reconnect has nothing to close: cancel it at once.
            if stats.connected() {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = compio::time::timeout(left, t).await;
            }
        }
        if ctx.live.get() > 0 {
            warn!(
                shard = ctx.id,
                remaining = ctx.live.get(),
                "drain deadline reached; dropping connections"
            );
        }
        let waiting = ctx.ingest_waiting.get();
        if waiting > 0 {
            // Their sink's channel stayed full through the drain (its upstream away): they
            // were never handed over, so no sink counts them.
            ctx.metrics.on_ingest_refused(waiting);
            tracing::error!(
                shard = ctx.id,
                messages = waiting,
                "drain deadline reached with ingest messages still waiting for a full sink: \
                 they are lost (counted in wsedge_ingest_refused_total)"
            );
        }
    });
}

/// Answer a control request (drain is handled by the caller).
fn serve_control(ctx: &ShardCtx, cmd: Control) {
    match cmd {
        Control::Snapshot(reply) => {
            let _ = reply.send(ctx.snapshot());
        }
        Control::Publish {
            topic,
            frame,
            origin,
            reply,
        } => {
            if origin {
                ctx.hub.note_published();
            }
            let _ = reply.send(ctx.hub.publish(&topic, &frame));
        }
        Control::TlsReload {
            listener,
            config,
            reply,
        } => {
            if let Some(slot) = ctx.tls.get(listener) {
                *slot.borrow_mut() = Some(config);
            }
            let _ = reply.send(());
        }
        Control::Drain => {}
    }
}
