//! Metrics: plain per-shard counters, snapshots, merging and the exporters.
//!
//! Each shard owns one [`ShardMetrics`] (`Cell`s: no atomics, no locks on the hot path; the
//! shard is single-threaded). The admin listener asks every shard for a [`Snapshot`] over the
//! shard control channel, then [`render_prometheus`] merges them into Prometheus text and
//! [`render_stats_json`] lists them per shard.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;

use serde::Serialize;

use crate::fanout::FanoutSnapshot;
use crate::proto::DeflateStats;

/// Why a handshake did not end in `101 Switching Protocols`. Metric label `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// 400: not a valid WebSocket upgrade request.
    Malformed,
    /// 405: method other than GET.
    MethodNotAllowed,
    /// 426: Sec-WebSocket-Version other than 13.
    UnsupportedVersion,
    /// 431: request or headers too large.
    TooLarge,
    /// 404: no route for the path.
    NoRoute,
    /// 503: the listener is at `max_connections`.
    OverCapacity,
    /// The request did not arrive within `handshake_timeout_ms`.
    Timeout,
    /// The socket failed or closed before the request was complete.
    Io,
    /// 502: a proxy route's upstream refused, timed out or did not answer 101.
    BadGateway,
    /// 403: the `Origin` is not in the route's `allowed_origins`.
    OriginForbidden,
    /// 429: the client IP has `max_connections_per_ip` connections open.
    PerIpLimit,
    /// 503: over the listener's `accept_rate`.
    AcceptRate,
    /// 401: the route wants a bearer token and none was presented.
    AuthMissing,
    /// 401: the presented token is not one of the route's, or not a valid JWT (signature,
    /// format, algorithm).
    AuthInvalid,
    /// 401: the JWT has expired (`exp`).
    JwtExpired,
    /// 401: the JWT is not valid yet (`nbf`).
    JwtNotYetValid,
    /// 401: the JWT's `aud` or `iss` is not the required one.
    JwtClaims,
    /// 403: the JWT's topics claim does not list the route's topic.
    TopicForbidden,
    /// The TLS handshake failed (bad client hello, certificate refused, no shared cipher).
    Tls,
    /// 403: the route wants a client certificate and none was presented.
    ClientCertMissing,
    /// 403: the client certificate names none of the route's `client_cert_names`.
    ClientCertForbidden,
}

impl HandshakeFailure {
    /// All variants, in label order.
    pub const ALL: [Self; 21] = [
        Self::Malformed,
        Self::MethodNotAllowed,
        Self::UnsupportedVersion,
        Self::TooLarge,
        Self::NoRoute,
        Self::OverCapacity,
        Self::Timeout,
        Self::Io,
        Self::BadGateway,
        Self::OriginForbidden,
        Self::PerIpLimit,
        Self::AcceptRate,
        Self::AuthMissing,
        Self::AuthInvalid,
        Self::JwtExpired,
        Self::JwtNotYetValid,
        Self::JwtClaims,
        Self::TopicForbidden,
        Self::Tls,
        Self::ClientCertMissing,
        Self::ClientCertForbidden,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::NoRoute => "no_route",
            Self::OverCapacity => "over_capacity",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::BadGateway => "bad_gateway",
            Self::OriginForbidden => "origin_forbidden",
            Self::PerIpLimit => "per_ip_limit",
            Self::AcceptRate => "accept_rate",
            Self::AuthMissing => "auth_missing",
            Self::AuthInvalid => "auth_invalid",
            Self::JwtExpired => "jwt_expired",
            Self::JwtNotYetValid => "jwt_not_yet_valid",
            Self::JwtClaims => "jwt_claims",
            Self::TopicForbidden => "topic_forbidden",
            Self::Tls => "tls",
            Self::ClientCertMissing => "client_cert_missing",
            Self::ClientCertForbidden => "client_cert_forbidden",
        }
    }

    /// Classify an HTTP error status sent in answer to a bad upgrade request.
    pub fn from_status(status: u16) -> Self {
        match status {
            405 => Self::MethodNotAllowed,
            426 => Self::UnsupportedVersion,
            431 => Self::TooLarge,
            404 => Self::NoRoute,
            503 => Self::OverCapacity,
            502 => Self::BadGateway,
            403 => Self::OriginForbidden,
            429 => Self::PerIpLimit,
            _ => Self::Malformed,
        }
    }
}

/// Live counters of one shard. Only the shard thread touches them.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    connections_open: Cell<u64>,
    connections_total: Cell<u64>,
    messages_in: Cell<u64>,
    bytes_in: Cell<u64>,
    messages_out: Cell<u64>,
    bytes_out: Cell<u64>,
    pings_sent: Cell<u64>,
    idle_closes: Cell<u64>,
    ingest_accepted: Cell<u64>,
    ingest_invalid: Cell<u64>,
    ingest_waits: Cell<u64>,
    ingest_refused: Cell<u64>,
    proxy_to_upstream: Cell<u64>,
    proxy_to_upstream_bytes: Cell<u64>,
    proxy_from_upstream: Cell<u64>,
    proxy_from_upstream_bytes: Cell<u64>,
    deflate: DeflateCells,
    handshake_failures: [Cell<u64>; HandshakeFailure::ALL.len()],
    rate_limit_closes: [Cell<u64>; 2],
    closes: RefCell<Vec<(u16, u64)>>,
}

/// permessage-deflate counters of one shard (see [`DeflateSnapshot`]).
#[derive(Debug, Default)]
struct DeflateCells {
    connections: Cell<u64>,
    stats: Cell<DeflateStats>,
    bomb_closes: Cell<u64>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

impl ShardMetrics {
    /// A WebSocket connection was established (after the 101 was written).
    pub fn on_open(&self) {
        bump(&self.connections_open, 1);
        bump(&self.connections_total, 1);
    }

    /// A WebSocket connection ended; `code` is the close code that ended it (1006 when the
    /// TCP connection ended without a close frame).
    pub fn on_close(&self, code: u16) {
        self.connections_open
            .set(self.connections_open.get().saturating_sub(1));
        let mut closes = self.closes.borrow_mut();
        match closes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => closes.push((code, 1)),
        }
    }

    /// A complete message arrived.
    pub fn on_message_in(&self, bytes: usize) {
        bump(&self.messages_in, 1);
        bump(&self.bytes_in, bytes as u64);
    }

    /// A message was queued for a client.
    pub fn on_message_out(&self, bytes: usize) {
        bump(&self.messages_out, 1);
        bump(&self.bytes_out, bytes as u64);
    }

    /// A keepalive ping was sent.
    pub fn on_ping_sent(&self) {
        bump(&self.pings_sent, 1);
    }

    /// A connection was closed for silence after a ping.
    pub fn on_idle_close(&self) {
        bump(&self.idle_closes, 1);
    }

    /// A proxy route passed a client's message of `bytes` to its upstream.
    pub fn on_proxy_to_upstream(&self, bytes: usize) {
        bump(&self.proxy_to_upstream, 1);
        bump(&self.proxy_to_upstream_bytes, bytes as u64);
    }

    /// A proxy route received a message of `bytes` from an upstream (queued for the client,
    /// it is also counted in `messages_out`).
    pub fn on_proxy_from_upstream(&self, bytes: usize) {
        bump(&self.proxy_from_upstream, 1);
        bump(&self.proxy_from_upstream_bytes, bytes as u64);
    }

    /// Valid ingest messages handed to a sink.
    pub fn on_ingest_accepted(&self, n: u64) {
        bump(&self.ingest_accepted, n);
    }

    /// An ingest message failed validation.
    pub fn on_ingest_invalid(&self) {
        bump(&self.ingest_invalid, 1);
    }

    /// Ingest messages that arrived but were not taken: after the connection was closed for
    /// an invalid message, or when the sink had already shut down.
    pub fn on_ingest_refused(&self, n: u64) {
        bump(&self.ingest_refused, n);
    }

    /// An ingest connection had to wait for its sink (backpressure).
    pub fn on_ingest_wait(&self) {
        bump(&self.ingest_waits, 1);
    }

    /// A connection negotiated permessage-deflate.
    pub fn on_deflate_negotiated(&self) {
        bump(&self.deflate.connections, 1);
    }

    /// A connection's compression counters since they were last taken
    /// ([`crate::proto::Conn::take_deflate_stats`]).
    pub fn on_deflate(&self, s: &DeflateStats) {
        let mut t = self.deflate.stats.get();
        t.add(s);
        self.deflate.stats.set(t);
    }

    /// A connection was failed (1009) because a compressed message inflated past
    /// `max_message_bytes`.
    pub fn on_inflate_bomb(&self) {
        bump(&self.deflate.bomb_closes, 1);
    }

    /// A connection was closed for exceeding a per-connection rate limit.
    pub fn on_rate_limit_close(&self, why: crate::ratelimit::RateExceeded) {
        bump(&self.rate_limit_closes[why as usize], 1);
    }

    /// A handshake failed.
    pub fn on_handshake_failure(&self, why: HandshakeFailure) {
        bump(&self.handshake_failures[why as usize], 1);
    }

    /// Open connections on this shard.
    pub fn connections_open(&self) -> u64 {
        self.connections_open.get()
    }

    /// Copy the counters out.
    pub fn snapshot(&self, shard: usize) -> Snapshot {
        let mut closes = self.closes.borrow().clone();
        closes.sort_unstable();
        Snapshot {
            shard,
            connections_open: self.connections_open.get(),
            connections_total: self.connections_total.get(),
            messages_in: self.messages_in.get(),
            bytes_in: self.bytes_in.get(),
            messages_out: self.messages_out.get(),
            bytes_out: self.bytes_out.get(),
            pings_sent: self.pings_sent.get(),
            idle_closes: self.idle_closes.get(),
            ingest_accepted: self.ingest_accepted.get(),
            ingest_invalid: self.ingest_invalid.get(),
            ingest_waits: self.ingest_waits.get(),
            ingest_refused: self.ingest_refused.get(),
            proxy: ProxySnapshot {
                to_upstream_messages: self.proxy_to_upstream.get(),
                to_upstream_bytes: self.proxy_to_upstream_bytes.get(),
                from_upstream_messages: self.proxy_from_upstream.get(),
                from_upstream_bytes: self.proxy_from_upstream_bytes.get(),
            },
            deflate: DeflateSnapshot {
                connections: self.deflate.connections.get(),
                stats: self.deflate.stats.get(),
                bomb_closes: self.deflate.bomb_closes.get(),
            },
            handshake_failures: HandshakeFailure::ALL
                .iter()
                .map(|f| (f.label(), self.handshake_failures[*f as usize].get()))
                .collect(),
            closes,
            rate_limit_closes: [
                crate::ratelimit::RateExceeded::Messages,
                crate::ratelimit::RateExceeded::Bytes,
            ]
            .iter()
            .map(|r| (r.label(), self.rate_limit_closes[*r as usize].get()))
            .collect(),
            fanout: FanoutSnapshot::default(),
            sources: Vec::new(),
        }
    }
}

/// A copy of one shard's counters at one moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Shard index.
    pub shard: usize,
    /// Open WebSocket connections.
    pub connections_open: u64,
    /// WebSocket connections ever established.
    pub connections_total: u64,
    /// Complete messages received.
    pub messages_in: u64,
    /// Payload bytes of messages received.
    pub bytes_in: u64,
    /// Messages queued for clients.
    pub messages_out: u64,
    /// Payload bytes of messages queued for clients.
    pub bytes_out: u64,
    /// Keepalive pings sent.
    pub pings_sent: u64,
    /// Connections closed after a ping went unanswered.
    pub idle_closes: u64,
    /// Valid ingest messages handed to sinks.
    pub ingest_accepted: u64,
    /// Ingest messages that failed validation.
    pub ingest_invalid: u64,
    /// Times an ingest connection waited for a full sink queue (and stopped reading).
    pub ingest_waits: u64,
    /// Ingest messages received but not taken (after a close for an invalid message, or
    /// with the sink shut down).
    pub ingest_refused: u64,
    /// Messages relayed by proxy routes.
    pub proxy: ProxySnapshot,
    /// permessage-deflate on connections (broadcast compression is in `fanout`).
    pub deflate: DeflateSnapshot,
    /// Handshake failures by reason label.
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// Connections ended, by close code.
    pub closes: Vec<(u16, u64)>,
    /// Connections closed for exceeding a per-connection rate limit, by limit.
    pub rate_limit_closes: Vec<(&'static str, u64)>,
    /// Broadcast fan-out counters.
    pub fanout: FanoutSnapshot,
    /// Sources running on this shard.
    pub sources: Vec<SourceSnapshot>,
}

/// What proxy routes relayed on one shard. The client-facing halves are also in
/// `messages_in` (from clients) and `messages_out` (queued for clients).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ProxySnapshot {
    /// Client messages passed to upstreams.
    pub to_upstream_messages: u64,
    /// Payload bytes of those messages.
    pub to_upstream_bytes: u64,
    /// Messages received from upstreams.
    pub from_upstream_messages: u64,
    /// Payload bytes of those messages.
    pub from_upstream_bytes: u64,
}

impl ProxySnapshot {
    fn merge(&mut self, o: &Self) {
        self.to_upstream_messages += o.to_upstream_messages;
        self.to_upstream_bytes += o.to_upstream_bytes;
        self.from_upstream_messages += o.from_upstream_messages;
        self.from_upstream_bytes += o.from_upstream_bytes;
    }
}

/// permessage-deflate counters of one shard's connections.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeflateSnapshot {
    /// Connections (client-facing and upstream) that negotiated permessage-deflate.
    pub connections: u64,
    /// Messages sent compressed (echo replies, proxied messages; not broadcasts) and
    /// compressed messages inflated, with their bytes (flattened into this object in JSON).
    #[serde(flatten)]
    pub stats: DeflateStats,
    /// Connections closed with 1009 because a compressed message inflated past
    /// `max_message_bytes` (decompression bombs among them).
    pub bomb_closes: u64,
}

impl DeflateSnapshot {
    fn merge(&mut self, o: &Self) {
        self.connections += o.connections;
        self.stats.add(&o.stats);
        self.bomb_closes += o.bomb_closes;
    }
}

/// State and counters of one source.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SourceSnapshot {
    /// Source name.
    pub name: String,
    /// Topic it publishes to.
    pub topic: String,
    /// `connecting`, `connected`, `backoff`, `failed` or `stopped`.
    pub state: &'static str,
    /// Successful connections (handshake completed).
    pub connects: u64,
    /// Connections that ended (each is followed by a reconnect unless failed or stopped).
    pub disconnects: u64,
    /// Valid messages received and published.
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Messages dropped for not matching the source's format.
    pub invalid: u64,
    /// Why the last connection or attempt ended ("" if none has).
    pub last_error: String,
}

impl Snapshot {
    /// Add `other` into `self` (shard index is kept).
    pub fn merge(&mut self, other: &Snapshot) {
        self.connections_open += other.connections_open;
        self.connections_total += other.connections_total;
        self.messages_in += other.messages_in;
        self.bytes_in += other.bytes_in;
        self.messages_out += other.messages_out;
        self.bytes_out += other.bytes_out;
        self.pings_sent += other.pings_sent;
        self.idle_closes += other.idle_closes;
        self.ingest_accepted += other.ingest_accepted;
        self.ingest_invalid += other.ingest_invalid;
        self.ingest_waits += other.ingest_waits;
        self.ingest_refused += other.ingest_refused;
        self.proxy.merge(&other.proxy);
        self.deflate.merge(&other.deflate);
        for (label, n) in &other.handshake_failures {
            match self.handshake_failures.iter_mut().find(|(l, _)| l == label) {
                Some((_, m)) => *m += n,
                None => self.handshake_failures.push((label, *n)),
            }
        }
        for (code, n) in &other.closes {
            match self.closes.iter_mut().find(|(c, _)| c == code) {
                Some((_, m)) => *m += n,
                None => self.closes.push((*code, *n)),
            }
        }
        self.closes.sort_unstable();
        self.fanout.merge(&other.fanout);
        for (label, n) in &other.rate_limit_closes {
            match self.rate_limit_closes.iter_mut().find(|(l, _)| l == label) {
                Some((_, m)) => *m += n,
                None => self.rate_limit_closes.push((label, *n)),
            }
        }
        self.sources.extend(other.sources.iter().cloned());
        self.sources.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// Handshake failures with this reason.
    pub fn handshake_failures(&self, why: HandshakeFailure) -> u64 {
        self.handshake_failures
            .iter()
            .find(|(l, _)| *l == why.label())
            .map_or(0, |(_, n)| *n)
    }

    /// Connections that ended with this close code.
    pub fn closes(&self, code: u16) -> u64 {
        self.closes
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}

/// Merge per-shard snapshots into one total.
pub fn merge(snaps: &[Snapshot]) -> Snapshot {
    let mut total = Snapshot::default();
    for s in snaps {
        total.merge(s);
    }
    total
}

/// Process-wide facts shown next to the counters.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// `io_uring` or `epoll`.
    pub io_backend: &'static str,
    /// Number of shards.
    pub shards: usize,
    /// True while draining for shutdown.
    pub draining: bool,
    /// Ingest sinks (process-wide, not per shard).
    pub sinks: Vec<SinkSnapshot>,
}

/// State and counters of one ingest sink.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SinkSnapshot {
    /// Sink name.
    pub name: String,
    /// `file` or `websocket`.
    pub kind: &'static str,
    /// `running` (file), `connecting`, `connected`, `backoff`, `failed` (websocket),
    /// `stopped` (after shutdown) or `unused` (no route delivers to it; not started).
    pub state: &'static str,
    /// Batches delivered: written to the file, or confirmed by the upstream (websocket).
    pub batches: u64,
    /// Messages in those batches.
    pub messages: u64,
    /// Bytes of those batches (after compression).
    pub bytes_written: u64,
    /// File rotations.
    pub rotations: u64,
    /// Failed file writes (each retried).
    pub write_errors: u64,
    /// Messages given up on: at shutdown (file: after repeated write failures; websocket:
    /// not confirmed within `flush_timeout_ms`), or by a websocket sink that gave up.
    pub dropped: u64,
    /// WebSocket: connections established (handshake completed).
    pub connects: u64,
    /// WebSocket: connections that ended (each followed by a reconnect unless stopping).
    pub disconnects: u64,
    /// WebSocket: connection attempts that failed (refused, timed out, not 101).
    pub connect_failures: u64,
    /// WebSocket: batches sent again after a reconnect because they were not confirmed.
    pub redeliveries: u64,
    /// WebSocket: messages in those batches (an upper bound on duplicates upstream).
    pub redelivered_messages: u64,
    /// WebSocket: batches held unconfirmed (sent or not).
    pub pending_batches: u64,
    /// WebSocket: bytes of those batches.
    pub pending_bytes: u64,
    /// WebSocket: why the last connection or attempt ended ("" if none has).
    pub last_error: String,
}

/// Prometheus text exposition (version 0.0.4) of the merged counters.
pub fn render_prometheus(info: &Info, snaps: &[Snapshot]) -> String {
    let t = merge(snaps);
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, series: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in series {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "wsedge_info",
        "gauge",
        "Build and runtime facts (value is always 1).",
        &[(
            format!(
                "{{version=\"{}\",io_backend=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                info.io_backend
            ),
            1,
        )],
    );
    // Single-value series: (name, type, help, value).
    let plain: [(&str, &str, &str, u64); 10] = [
        (
            "wsedge_shards",
            "gauge",
            "Number of shards.",
            info.shards as u64,
        ),
        (
            "wsedge_draining",
            "gauge",
            "1 while the server drains for shutdown.",
            info.draining as u64,
        ),
        (
            "wsedge_connections_open",
            "gauge",
            "Open WebSocket connections.",
            t.connections_open,
        ),
        (
            "wsedge_connections_total",
            "counter",
            "WebSocket connections established.",
            t.connections_total,
        ),
        (
            "wsedge_messages_in_total",
            "counter",
            "Complete messages received from clients.",
            t.messages_in,
        ),
        (
            "wsedge_bytes_in_total",
            "counter",
            "Payload bytes of messages received from clients.",
            t.bytes_in,
        ),
        (
            "wsedge_messages_out_total",
            "counter",
            "Echo replies and proxied messages queued for clients (broadcast: wsedge_fanout_deliveries_total).",
            t.messages_out,
        ),
        (
            "wsedge_bytes_out_total",
            "counter",
            "Payload bytes of messages queued for clients.",
            t.bytes_out,
        ),
        (
            "wsedge_pings_sent_total",
            "counter",
            "Keepalive pings sent to idle clients.",
            t.pings_sent,
        ),
        (
            "wsedge_idle_closes_total",
            "counter",
            "Connections closed because a keepalive ping went unanswered.",
            t.idle_closes,
        ),
    ];
    for (name, kind, help, v) in plain {
        metric(name, kind, help, &[(String::new(), v)]);
    }
    let hs: Vec<_> = t
        .handshake_failures
        .iter()
        .map(|(l, n)| (format!("{{reason=\"{l}\"}}"), *n))
        .collect();
    metric(
        "wsedge_handshake_failures_total",
        "counter",
        "Upgrade requests not answered with 101, by reason.",
        &hs,
    );
    let p = &t.proxy;
    let per_direction = |to: u64, from: u64| {
        [
            ("{direction=\"to_upstream\"}".to_string(), to),
            ("{direction=\"from_upstream\"}".to_string(), from),
        ]
    };
    metric(
        "wsedge_proxy_messages_total",
        "counter",
        "Messages relayed by proxy routes: client messages passed to upstreams, and messages received from upstreams.",
        &per_direction(p.to_upstream_messages, p.from_upstream_messages),
    );
    metric(
        "wsedge_proxy_bytes_total",
        "counter",
        "Payload bytes of the messages in wsedge_proxy_messages_total.",
        &per_direction(p.to_upstream_bytes, p.from_upstream_bytes),
    );
    let f = &t.fanout;
    let fanout: [(&str, &str, &str, u64); 10] = [
        (
            "wsedge_fanout_topics",
            "gauge",
            "Broadcast topics with subscribers, summed over shards (a topic with subscribers on two shards counts twice).",
            f.topics,
        ),
        (
            "wsedge_fanout_subscribers",
            "gauge",
            "Open subscriptions (subscribe and pubsub connections).",
            f.subscribers,
        ),
        (
            "wsedge_fanout_published_total",
            "counter",
            "Messages published (by clients and POST /publish).",
            f.published,
        ),
        (
            "wsedge_fanout_deliveries_total",
            "counter",
            "Frames queued for subscribers.",
            f.deliveries,
        ),
        (
            "wsedge_fanout_delivered_bytes_total",
            "counter",
            "Bytes of frames queued for subscribers.",
            f.delivered_bytes,
        ),
        (
            "wsedge_fanout_queued_bytes",
            "gauge",
            "Frame bytes waiting in subscriber queues.",
            f.queued_bytes,
        ),
        (
            "wsedge_fanout_queued_messages",
            "gauge",
            "Frames waiting in subscriber queues.",
            f.queued_messages,
        ),
        (
            "wsedge_fanout_ring_batches_out_total",
            "counter",
            "Batches sent to other shards.",
            f.ring_batches_out,
        ),
        (
            "wsedge_fanout_ring_batches_in_total",
            "counter",
            "Batches received from other shards.",
            f.ring_batches_in,
        ),
        (
            "wsedge_fanout_ring_full_drops_total",
            "counter",
            "Messages not delivered to another shard because the ring to it was full.",
            f.ring_full_drops,
        ),
    ];
    for (name, kind, help, v) in fanout {
        metric(name, kind, help, &[(String::new(), v)]);
    }
    let d = &t.deflate;
    let deflate: [(&str, &str, u64); 12] = [
        (
            "wsedge_deflate_connections_total",
            "Connections that negotiated permessage-deflate (client-facing and upstream).",
            d.connections,
        ),
        (
            "wsedge_deflate_messages_compressed_total",
            "Messages sent compressed on a connection (echo replies, proxied messages).",
            d.stats.compressed,
        ),
        (
            "wsedge_deflate_compressed_bytes_in_total",
            "Payload bytes of those messages before compression.",
            d.stats.compressed_in,
        ),
        (
            "wsedge_deflate_compressed_bytes_out_total",
            "Payload bytes of those messages after compression.",
            d.stats.compressed_out,
        ),
        (
            "wsedge_deflate_messages_inflated_total",
            "Compressed messages received and inflated.",
            d.stats.inflated,
        ),
        (
            "wsedge_deflate_inflated_bytes_in_total",
            "Payload bytes of those messages as received (compressed).",
            d.stats.inflated_in,
        ),
        (
            "wsedge_deflate_inflated_bytes_out_total",
            "Payload bytes of those messages after inflating.",
            d.stats.inflated_out,
        ),
        (
            "wsedge_deflate_bomb_closes_total",
            "Connections closed with 1009 because a compressed message inflated past max_message_bytes.",
            d.bomb_closes,
        ),
        (
            "wsedge_fanout_deflated_total",
            "Broadcasts compressed for permessage-deflate subscribers (once per shard and window size).",
            f.deflated,
        ),
        (
            "wsedge_fanout_deflated_bytes_in_total",
            "Payload bytes of those broadcasts before compression.",
            f.deflated_in,
        ),
        (
            "wsedge_fanout_deflated_bytes_out_total",
            "Payload bytes of those broadcasts after compression.",
            f.deflated_out,
        ),
        (
            "wsedge_fanout_deflated_deliveries_total",
            "Compressed frames queued for subscribers (part of wsedge_fanout_deliveries_total).",
            f.deflated_deliveries,
        ),
    ];
    for (name, help, v) in deflate {
        metric(name, "counter", help, &[(String::new(), v)]);
    }
    let drops: Vec<_> = f
        .drops
        .iter()
        .map(|(r, w, n)| {
            (
                format!("{{route=\"{}\",reason=\"{w}\"}}", escape_label(r)),
                *n,
            )
        })
        .collect();
    metric(
        "wsedge_fanout_drops_total",
        "counter",
        "Messages not delivered to a subscriber, by route and lag policy (slow_consumer_close counts closes).",
        &drops,
    );
    type SourceField = fn(&SourceSnapshot) -> u64;
    let per_source: [(&str, &str, &str, SourceField); 7] = [
        (
            "wsedge_source_up",
            "gauge",
            "1 while the source is connected.",
            |s| u64::from(s.state == "connected"),
        ),
        (
            "wsedge_source_failed",
            "gauge",
            "1 once the source gave up (reconnect_max_attempts).",
            |s| u64::from(s.state == "failed"),
        ),
        (
            "wsedge_source_connects_total",
            "counter",
            "Upstream connections established.",
            |s| s.connects,
        ),
        (
            "wsedge_source_disconnects_total",
            "counter",
            "Upstream connections that ended.",
            |s| s.disconnects,
        ),
        (
            "wsedge_source_messages_total",
            "counter",
            "Messages received and published.",
            |s| s.messages,
        ),
        (
            "wsedge_source_bytes_total",
            "counter",
            "Payload bytes received and published.",
            |s| s.bytes,
        ),
        (
            "wsedge_source_invalid_total",
            "counter",
            "Messages dropped for not matching the format.",
            |s| s.invalid,
        ),
    ];
    if !t.sources.is_empty() {
        for (name, kind, help, get) in per_source {
            let series: Vec<_> = t
                .sources
                .iter()
                .map(|s| (format!("{{source=\"{}\"}}", escape_label(&s.name)), get(s)))
                .collect();
            metric(name, kind, help, &series);
        }
    }
    let ingest: [(&str, &str, u64); 4] = [
        (
            "wsedge_ingest_accepted_total",
            "Valid ingest messages handed to sinks.",
            t.ingest_accepted,
        ),
        (
            "wsedge_ingest_invalid_total",
            "Ingest messages that failed validation (sent to the dead-letter sink if any).",
            t.ingest_invalid,
        ),
        (
            "wsedge_ingest_backpressure_waits_total",
            "Times an ingest connection stopped reading because its sink queue was full.",
            t.ingest_waits,
        ),
        (
            "wsedge_ingest_refused_total",
            "Ingest messages received but not taken: after the connection was closed for an \
             invalid message (on_error = close), or with the sink shut down.",
            t.ingest_refused,
        ),
    ];
    for (name, help, v) in ingest {
        metric(name, "counter", help, &[(String::new(), v)]);
    }
    type SinkField = fn(&SinkSnapshot) -> u64;
    // (name, type, help, value, websocket sinks only)
    let per_sink: [(&str, &str, &str, SinkField, bool); 15] = [
        (
            "wsedge_sink_batches_total",
            "counter",
            "Batches delivered (file: written; websocket: confirmed by the upstream).",
            |s| s.batches,
            false,
        ),
        (
            "wsedge_sink_messages_total",
            "counter",
            "Messages delivered (file: written; websocket: confirmed by the upstream).",
            |s| s.messages,
            false,
        ),
        (
            "wsedge_sink_bytes_written_total",
            "counter",
            "Bytes of delivered batches (after compression).",
            |s| s.bytes_written,
            false,
        ),
        (
            "wsedge_sink_rotations_total",
            "counter",
            "File rotations.",
            |s| s.rotations,
            false,
        ),
        (
            "wsedge_sink_write_errors_total",
            "counter",
            "Failed file writes (retried).",
            |s| s.write_errors,
            false,
        ),
        (
            "wsedge_sink_dropped_total",
            "counter",
            "Messages given up on (at shutdown, or by a websocket sink that gave up).",
            |s| s.dropped,
            false,
        ),
        (
            "wsedge_sink_connected",
            "gauge",
            "1 while the websocket sink is connected to its upstream.",
            |s| u64::from(s.state == "connected"),
            true,
        ),
        (
            "wsedge_sink_failed",
            "gauge",
            "1 once the websocket sink gave up (reconnect_max_attempts).",
            |s| u64::from(s.state == "failed"),
            true,
        ),
        (
            "wsedge_sink_connects_total",
            "counter",
            "Upstream connections established.",
            |s| s.connects,
            true,
        ),
        (
            "wsedge_sink_disconnects_total",
            "counter",
            "Upstream connections that ended.",
            |s| s.disconnects,
            true,
        ),
        (
            "wsedge_sink_connect_failures_total",
            "counter",
            "Upstream connection attempts that failed.",
            |s| s.connect_failures,
            true,
        ),
        (
            "wsedge_sink_redeliveries_total",
            "counter",
            "Batches re-sent after a reconnect because they were not confirmed.",
            |s| s.redeliveries,
            true,
        ),
        (
            "wsedge_sink_redelivered_messages_total",
            "counter",
            "Messages in re-sent batches (an upper bound on the duplicates the upstream saw).",
            |s| s.redelivered_messages,
            true,
        ),
        (
            "wsedge_sink_pending_batches",
            "gauge",
            "Batches held unconfirmed (bounded by max_pending_batches).",
            |s| s.pending_batches,
            true,
        ),
        (
            "wsedge_sink_pending_bytes",
            "gauge",
            "Bytes of batches held unconfirmed (bounded by max_pending_bytes).",
            |s| s.pending_bytes,
            true,
        ),
    ];
    for (name, kind, help, get, ws_only) in per_sink {
        let series: Vec<_> = info
            .sinks
            .iter()
            .filter(|s| !ws_only || s.kind == "websocket")
            .map(|s| (format!("{{sink=\"{}\"}}", escape_label(&s.name)), get(s)))
            .collect();
        if !series.is_empty() {
            metric(name, kind, help, &series);
        }
    }
    let rl: Vec<_> = t
        .rate_limit_closes
        .iter()
        .map(|(l, n)| (format!("{{reason=\"{l}\"}}"), *n))
        .collect();
    metric(
        "wsedge_rate_limit_closes_total",
        "counter",
        "Connections closed with 1008 for exceeding a per-connection rate limit.",
        &rl,
    );
    let closes: Vec<_> = t
        .closes
        .iter()
        .map(|(c, n)| (format!("{{code=\"{c}\"}}"), *n))
        .collect();
    metric(
        "wsedge_closes_total",
        "counter",
        "WebSocket connections ended, by close code (1006: no close frame).",
        &closes,
    );
    out
}

/// Escape a Prometheus label value (backslash, quote, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/stats` JSON: facts, merged totals and per-shard snapshots.
pub fn render_stats_json(info: &Info, snaps: &[Snapshot]) -> String {
    #[derive(Serialize)]
    struct Stats<'a> {
        info: &'a Info,
        total: Snapshot,
        shards: &'a [Snapshot],
    }
    let mut total = merge(snaps);
    total.shard = usize::MAX;
    // Invariant: these types serialize infallibly (no maps with non-string keys).
    serde_json::to_string_pretty(&Stats {
        info,
        total,
        shards: snaps,
    })
    .expect("stats serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deflate part of `/stats` is one flat object: the per-connection counters of the
    /// protocol core (`DeflateStats`) sit beside the shard's own, and merging adds them.
    #[test]
    fn deflate_counters_are_one_flat_object_and_merge() {
        let m = ShardMetrics::default();
        m.on_deflate_negotiated();
        let s = DeflateStats {
            compressed: 2,
            compressed_in: 300,
            compressed_out: 40,
            inflated: 1,
            inflated_in: 10,
            inflated_out: 500,
        };
        m.on_deflate(&s);
        m.on_deflate(&s);
        m.on_inflate_bomb();
        let mut d = m.snapshot(0).deflate;
        assert_eq!(d.stats.compressed, 4);
        assert_eq!(d.stats.inflated_out, 1000);
        let json = serde_json::to_value(&d).unwrap();
        // (serde_json's map is sorted by key)
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "bomb_closes",
                "compressed",
                "compressed_in",
                "compressed_out",
                "connections",
                "inflated",
                "inflated_in",
                "inflated_out",
            ]
        );
        assert_eq!(json["inflated_in"], 20);
        let other = d.clone();
        d.merge(&other);
        assert_eq!(
            (d.connections, d.stats.compressed_in, d.bomb_closes),
            (2, 1200, 2)
        );
    }

    #[test]
    fn counters_snapshot_merge_and_render() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.on_open();
        a.on_open();
        a.on_message_in(10);
        a.on_close(1000);
        b.on_open();
        b.on_close(1006);
        b.on_close(1000);
        b.on_handshake_failure(HandshakeFailure::OverCapacity);
        a.on_deflate_negotiated();
        b.on_deflate(&crate::proto::DeflateStats {
            inflated: 2,
            inflated_in: 30,
            inflated_out: 200,
            ..Default::default()
        });
        b.on_inflate_bomb();
        a.on_proxy_to_upstream(7);
        b.on_proxy_to_upstream(5);
        b.on_proxy_from_upstream(3);
        let snaps = [a.snapshot(0), b.snapshot(1)];
        let t = merge(&snaps);
        assert_eq!(t.connections_total, 3);
        assert_eq!(t.closes(1000), 2);
        assert_eq!(t.closes(1006), 1);
        assert_eq!(t.handshake_failures(HandshakeFailure::OverCapacity), 1);
        let info = Info {
            io_backend: "epoll",
            shards: 2,
            draining: false,
            sinks: vec![],
        };
        let text = render_prometheus(&info, &snaps);
        assert!(text.contains("wsedge_connections_total 3\n"));
        assert!(text.contains("wsedge_closes_total{code=\"1000\"} 2\n"));
        assert!(text.contains("wsedge_handshake_failures_total{reason=\"over_capacity\"} 1\n"));
        assert!(text.contains("io_backend=\"epoll\""));
        assert!(text.contains("wsedge_deflate_connections_total 1\n"));
        assert!(text.contains("wsedge_deflate_messages_inflated_total 2\n"));
        assert!(text.contains("wsedge_deflate_inflated_bytes_out_total 200\n"));
        assert!(text.contains("wsedge_deflate_bomb_closes_total 1\n"));
        assert!(text.contains("wsedge_fanout_deflated_total 0\n"));
        assert!(text.contains("wsedge_proxy_messages_total{direction=\"to_upstream\"} 2\n"));
        assert!(text.contains("wsedge_proxy_messages_total{direction=\"from_upstream\"} 1\n"));
        assert!(text.contains("wsedge_proxy_bytes_total{direction=\"to_upstream\"} 12\n"));
        assert!(text.contains("wsedge_proxy_bytes_total{direction=\"from_upstream\"} 3\n"));
        let json: serde_json::Value =
            serde_json::from_str(&render_stats_json(&info, &snaps)).unwrap();
        assert_eq!(json["total"]["connections_total"], 3);
        assert_eq!(json["total"]["proxy"]["to_upstream_bytes"], 12);
        assert_eq!(json["shards"][1]["proxy"]["from_upstream_messages"], 1);
        assert_eq!(json["shards"][1]["shard"], 1);
    }
}
