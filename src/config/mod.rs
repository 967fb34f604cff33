//! Configuration: the TOML file, `${env:NAME}` references, and validated types.
//!
//! Parse, don't validate: [`raw`] mirrors the file (serde, unknown keys refused), then
//! [`Config::from_raw`] checks every value once and produces types that cannot hold an invalid
//! value (socket addresses, `Duration`s, non-zero counts). Every error carries the key path
//! (`listener[0].bind`) so `wsedge check` can point at the offending line of thought.
//!
//! The embedded default (`config/default.toml`, printed by `wsedge print-config`) is what
//! `wsedge` serves with no `--config`; a test checks that it parses and equals the defaults
//! of the raw types, so the commented file and the code cannot drift apart.

pub mod raw;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::fanout::{LagPolicy, QueueLimits};
use crate::proto::{DeflateConfig, Limits};
use crate::schema::{Column, ExtraFields, Schema};
use crate::tls::{CertFiles, ClientAuth, MinVersion, ServerTls, SniCert};
use crate::upstream::{TlsOptions, WsUrl};

/// The embedded default configuration file, with comments.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/default.toml");

/// A configuration error, with the path of the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted key path, e.g. `listener[0].bind`; `(file)` for errors about the whole file.
    pub path: String,
    /// What is wrong and, where useful, what is expected.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Which I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, else epoll (logged once at startup).
    Auto,
    /// io_uring or fail at startup.
    Uring,
    /// epoll readiness (the fallback driver), even where io_uring works.
    Epoll,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" => Ok(Self::Uring),
            "epoll" | "poll" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown io backend `{other}` (expected auto, uring or epoll)"
            )),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shards, backend and drain.
    pub runtime: RuntimeConfig,
    /// WebSocket listeners (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener, unless disabled.
    pub admin: Option<AdminConfig>,
    /// Upstream streams published into topics (enabled ones only).
    pub sources: Vec<SourceConfig>,
    /// Sinks of ingest routes, by index (routes refer to them by [`IngestRoute::sink`]).
    pub sinks: Vec<SinkConfig>,
}

/// How a sink frames a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One message per line.
    Ndjson,
    /// One JSON array per batch, one batch per line.
    JsonArray,
}

/// How a sink compresses a batch (each batch is one gzip member / zstd frame, so the file is
/// a valid concatenation that `zcat` / `zstd -d` read whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// One `[[sink]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Name.
    pub name: String,
    /// Where batches go.
    pub kind: SinkKind,
    /// Batch framing.
    pub framing: Framing,
    /// Batch compression.
    pub compression: Compression,
    /// Batch caps.
    pub max_batch_messages: usize,
    /// Batch byte cap (payload bytes).
    pub max_batch_bytes: usize,
    /// Batch age cap.
    pub max_batch_delay: Duration,
    /// Queue length between shards and sink.
    pub buffer_chunks: usize,
    /// Some ingest route delivers to it (as its sink or dead letter). A sink no route uses is
    /// not started (it could receive nothing), so an example block costs nothing.
    pub used: bool,
}

/// Where a sink's batches go.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// Appended to a file.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Rotate before the file would exceed this (`None` = never).
        rotate_bytes: Option<u64>,
    },
    /// Sent to an upstream WebSocket, one message per batch.
    WebSocket(Box<WsSinkConfig>),
}

/// A `kind = "websocket"` sink: the upstream, and how delivery is confirmed and retried.
#[derive(Clone, PartialEq)]
pub struct WsSinkConfig {
    /// Upstream URL, resolved when the configuration was loaded.
    pub url: WsUrl,
    /// Headers added to the upgrade request (values may be secrets: never logged).
    pub headers: Vec<(String, String)>,
    /// Subprotocol asked for.
    pub subprotocol: Option<String>,
    /// TCP connect + handshake deadline.
    pub connect_timeout: Duration,
    /// Written batches are confirmed by the pong to a ping sent after them; no pong within
    /// this and the connection is dropped (the batches are re-sent on the next one).
    pub ack_timeout: Duration,
    /// At shutdown, time allowed to deliver and confirm what is pending.
    pub flush_timeout: Duration,
    /// Unconfirmed batches held (sent or not) before the sink stops taking chunks.
    pub max_pending_batches: usize,
    /// Bytes of those batches (after compression) before the sink stops taking chunks.
    pub max_pending_bytes: usize,
    /// Reconnect backoff.
    pub backoff: Backoff,
}

impl fmt::Debug for WsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("WsSinkConfig")
            .field("url", &self.url)
            .field("headers", &names)
            .field("subprotocol", &self.subprotocol)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_pending_batches", &self.max_pending_batches)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// What an ingest route does with its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestRoute {
    /// Index into [`Config::sinks`].
    pub sink: usize,
    /// `true`: every message must parse as JSON; `false`: text messages (UTF-8).
    pub json: bool,
    /// Close the connection (1007) on an invalid message instead of continuing.
    pub close_on_error: bool,
    /// Sink for invalid messages (index into [`Config::sinks`]).
    pub dead_letter: Option<usize>,
    /// Declared columns every message must match (`json` routes only).
    pub schema: Option<Schema>,
    /// Connection facts wrapped around every accepted message (empty = messages as sent).
    pub metadata: Vec<MetaField>,
}

/// One connection fact an ingest route adds to its messages (`metadata = [...]`), Tremor's
/// `$ws_server` metadata. The output key is [`MetaField::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaField {
    /// `"peer": "IP:PORT"` of the client.
    Peer,
    /// `"tls": true|false`.
    Tls,
    /// `"path": "/in?x=1"`, the request target as sent.
    Path,
    /// `"client_cert": "name"` of a verified client certificate, or `null`.
    ClientCert,
    /// `"<name>": "value"` of a request header (lowercase name), or `null` if absent.
    Header(String),
}

impl MetaField {
    /// The key in the `meta` object.
    pub fn key(&self) -> &str {
        match self {
            Self::Peer => "peer",
            Self::Tls => "tls",
            Self::Path => "path",
            Self::ClientCert => "client_cert",
            Self::Header(h) => h,
        }
    }
}

/// What a source accepts from its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// Text messages (UTF-8, validated by the protocol core); binary ones are invalid.
    Text,
    /// Binary messages; text ones are invalid.
    Binary,
    /// Text or binary messages that parse as one JSON value.
    Json,
}

/// One `[[source]]`, validated.
#[derive(Clone, PartialEq)]
pub struct SourceConfig {
    /// Name in logs and metrics (unique).
    pub name: String,
    /// Upstream URL, resolved when the configuration was loaded.
    pub url: WsUrl,
    /// Topic the messages are published to.
    pub topic: String,
    /// Headers added to the upgrade request (values may be secrets: never logged).
    pub headers: Vec<(String, String)>,
    /// Subprotocol asked for.
    pub subprotocol: Option<String>,
    /// Sent after every (re)connect.
    pub subscribe: Vec<String>,
    /// What counts as a valid message.
    pub format: SourceFormat,
    /// TCP connect + handshake deadline.
    pub connect_timeout: Duration,
    /// Ping period; `None` = no pings.
    pub ping_interval: Option<Duration>,
    /// Inbound silence (or missing heartbeat replies) after which the connection is dropped
    /// and re-established; measured from the last ping or heartbeat sent.
    pub pong_timeout: Duration,
    /// Application heartbeat: (message, period, expected reply).
    pub heartbeat: Option<(String, Duration, Option<String>)>,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// permessage-deflate offered to the upstream, if enabled.
    pub deflate: Option<DeflateConfig>,
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("topic", &self.topic)
            .field("headers", &names)
            .field("format", &self.format)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff with full jitter: before attempt `n` (0-based count of consecutive
/// failures) wait a uniformly random time in `0..=min(max, initial * multiplier^n)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Cap of the first delay.
    pub initial: Duration,
    /// Largest cap.
    pub max: Duration,
    /// Growth of the cap per consecutive failure.
    pub multiplier: f64,
    /// Consecutive failures before giving up; `None` = never.
    pub max_attempts: Option<u32>,
}

impl Backoff {
    /// The delay cap before retry number `failures` (≥ 1).
    pub fn cap(&self, failures: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(failures.saturating_sub(1).min(64) as i32);
        let ms = (self.initial.as_millis() as f64 * exp).min(self.max.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }

    /// The delay before retry number `failures` (≥ 1) with full jitter: uniform in
    /// `0..=cap(failures)` at millisecond resolution, drawn from `random` (any `u64`; the
    /// caller owns the generator, so this stays deterministic and testable).
    pub fn delay(&self, failures: u32, random: u64) -> Duration {
        let cap = self.cap(failures).as_millis() as u64;
        Duration::from_millis(random % (cap + 1))
    }
}

/// `[runtime]`, validated.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Shard count; `None` = one per available core.
    pub shards: Option<NonZeroUsize>,
    /// I/O backend choice.
    pub io: IoMode,
    /// Pin shard N to core N mod cores.
    pub pin_threads: bool,
    /// Close frames at shutdown are spread uniformly over this window.
    pub drain_window: Duration,
    /// Hard deadline of the drain, after which remaining connections are dropped.
    pub drain_timeout: Duration,
}

/// One `[[listener]]`, validated.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name for logs and metric labels (unique).
    pub name: String,
    /// Address to bind (port 0 picks a free port, shared by all shards).
    pub bind: SocketAddr,
    /// Kernel accept backlog per shard socket.
    pub backlog: u32,
    /// Open connections across all shards before the handshake answers 503.
    pub max_connections: NonZeroUsize,
    /// Deadline for the complete upgrade request.
    pub handshake_timeout: Duration,
    /// Largest upgrade request, bytes.
    pub max_handshake_bytes: usize,
    /// Inbound silence before a server ping; `None` disables keepalive.
    pub idle_timeout: Option<Duration>,
    /// Silence after the ping before closing.
    pub pong_timeout: Duration,
    /// Wait for the peer's close frame after ours.
    pub close_timeout: Duration,
    /// Frame and message caps handed to the protocol core.
    pub limits: Limits,
    /// Outbound bytes queued per connection before reads pause (backpressure).
    pub max_pending_write_bytes: NonZeroUsize,
    /// Open connections per client IP across shards; beyond it the handshake gets 429.
    pub max_connections_per_ip: Option<NonZeroUsize>,
    /// permessage-deflate with clients that offer it; `None` = never negotiated.
    pub deflate: Option<DeflateConfig>,
    /// New connections per second across shards (each shard gets an equal share); beyond it
    /// the handshake gets 503 with `Retry-After: 1`.
    pub accept_rate: Option<u32>,
    /// TLS termination (wss), if configured.
    pub tls: Option<ServerTls>,
    /// Routes by exact path.
    pub routes: Vec<Route>,
}

/// One `[[listener.route]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Request path as configured. A path ending in `{topic}` matches every path with that
    /// prefix and a non-empty rest, which names the topic; any other path matches exactly.
    /// The query string is ignored when matching.
    pub path: String,
    /// What the route does.
    pub kind: RouteKind,
    /// Subprotocols this route speaks, in the server's order of preference. The first one the
    /// client also offered is selected; if the client offered some and none match, the
    /// connection proceeds without a subprotocol (RFC 6455 4.2.2 lets the client decide).
    pub subprotocols: Vec<String>,
    /// Subscriber queue caps and lag policy (used by subscribe and pubsub routes).
    pub queue: QueueLimits,
    /// Where a proxy route connects (proxy routes only).
    pub proxy: Option<ProxyTarget>,
    /// `Origin` values allowed to connect; empty = any. A request without `Origin`
    /// (not from a browser) is allowed.
    pub allowed_origins: Vec<String>,
    /// Inbound messages per second per connection; beyond it: close 1008.
    pub max_messages_per_second: Option<u32>,
    /// Inbound payload bytes per second per connection; beyond it: close 1008.
    pub max_bytes_per_second: Option<u64>,
    /// Tokens accepted in `Authorization: Bearer` or `?access_token=`; empty = open route.
    pub bearer_tokens: Vec<String>,
    /// JWT authentication (token presented the same way), if configured.
    pub jwt: Option<JwtAuth>,
    /// Client certificate names (CN, DNS or URI SAN) allowed; empty = not checked. Needs a
    /// TLS listener with client certificates; no or another certificate gets 403.
    pub client_cert_names: Vec<String>,
    /// Ingest routes: sink, format, error policy.
    pub ingest: Option<IngestRoute>,
}

/// A route's JWT verification: key, accepted algorithms, required claims.
#[derive(Clone)]
pub struct JwtAuth {
    /// Verification key (HMAC secret or public key).
    pub key: jsonwebtoken::DecodingKey,
    /// Algorithms accepted with that key (HS256; or RS256; or ES256).
    pub algorithm: jsonwebtoken::Algorithm,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Claim that lists the allowed topics (`"*"` allows all).
    pub topics_claim: Option<String>,
    /// Where the key came from, for `Debug` and equality (never the secret itself).
    source: String,
}

impl PartialEq for JwtAuth {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.source,
            self.algorithm,
            &self.audience,
            &self.issuer,
            &self.topics_claim,
        ) == (
            &o.source,
            o.algorithm,
            &o.audience,
            &o.issuer,
            &o.topics_claim,
        )
    }
}

impl Eq for JwtAuth {}

impl fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuth")
            .field("key", &self.source)
            .field("algorithm", &self.algorithm)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("topics_claim", &self.topics_claim)
            .finish()
    }
}

/// The upstream of a `proxy` route.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyTarget {
    /// Upstream URL, resolved when the configuration was loaded.
    pub url: WsUrl,
    /// Headers added to the upstream request (values may hold secrets: never logged).
    pub headers: Vec<(String, String)>,
    /// Deadline for the TCP connect and the upstream's 101.
    pub connect_timeout: Duration,
    /// permessage-deflate offered to the upstream, if enabled.
    pub deflate: Option<DeflateConfig>,
}

impl fmt::Debug for ProxyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values are often credentials: show names only.
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ProxyTarget")
            .field("url", &self.url)
            .field("headers", &names)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Longest topic name taken from a request path, bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

impl Route {
    /// If `path` (without query) matches this route: `Some(topic)`, where the topic is empty
    /// for routes without `{topic}`. A topic longer than [`MAX_TOPIC_BYTES`] does not match.
    pub fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        match self.path.strip_suffix("{topic}") {
            Some(prefix) => {
                let topic = path.strip_prefix(prefix)?;
                (!topic.is_empty() && topic.len() <= MAX_TOPIC_BYTES).then_some(topic)
            }
            None => (path == self.path).then_some(""),
        }
    }

    /// The subprotocol to answer for a client that offered `offered`.
    pub fn select_subprotocol<'a>(&'a self, offered: &[String]) -> Option<&'a str> {
        self.subprotocols
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
            .map(String::as_str)
    }
}

/// What a route does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteKind {
    /// Send every text/binary message back unchanged.
    Echo,
    /// Publish every text/binary message to the path's topic; send nothing back.
    Publish,
    /// Receive every message published to the path's topic; messages sent are ignored.
    Subscribe,
    /// Both: receive the topic and publish to it (a client receives its own messages too).
    PubSub,
    /// Relay the connection 1:1 to an upstream WebSocket server.
    Proxy,
    /// Validate every message and deliver it, batched and compressed, to a sink.
    Ingest,
}

impl RouteKind {
    /// Routes whose connections publish their messages.
    pub fn publishes(self) -> bool {
        matches!(self, Self::Publish | Self::PubSub)
    }

    /// Routes whose connections receive a topic.
    pub fn subscribes(self) -> bool {
        matches!(self, Self::Subscribe | Self::PubSub)
    }
}

/// `[admin]`, validated.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        // Invariant: the embedded file is checked by a unit test; it always parses.
        Self::parse(DEFAULT_CONFIG_TOML).expect("embedded default config is valid")
    }

    /// Read and validate a configuration file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown keys, wrong types, invalid values, missing
    /// environment variables: each as a [`ConfigError`] naming the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text)
    }

    /// Parse and validate configuration text.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new("(file)", e.to_string().trim_end().to_string())
        })?;
        for (k, v) in value.iter_mut() {
            expand_env(v, k)?;
        }
        let raw: raw::RawConfig = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| {
                let path = e.path().to_string();
                ConfigError::new(
                    if path == "." { "(file)".into() } else { path },
                    e.into_inner().to_string(),
                )
            })?;
        Self::from_raw(raw)
    }

    /// Validate raw values.
    ///
    /// # Errors
    /// The first invalid value, with its key path.
    pub fn from_raw(raw: raw::RawConfig) -> Result<Self, ConfigError> {
        let r = &raw.runtime;
        let runtime = RuntimeConfig {
            shards: NonZeroUsize::new(r.shards),
            io: r
                .io
                .parse()
                .map_err(|m| ConfigError::new("runtime.io", m))?,
            pin_threads: r.pin_threads,
            drain_window: capped_ms(r.drain_window_ms, "runtime.drain_window_ms")?,
            drain_timeout: positive_ms(r.drain_timeout_ms, "runtime.drain_timeout_ms")?,
        };
        if runtime.drain_window > runtime.drain_timeout {
            return Err(ConfigError::new(
                "runtime.drain_window_ms",
                "must not exceed runtime.drain_timeout_ms",
            ));
        }
        if r.shards > 1024 {
            return Err(ConfigError::new("runtime.shards", "at most 1024"));
        }
        if raw.listener.is_empty() {
            return Err(ConfigError::new(
                "listener",
                "at least one [[listener]] is required",
            ));
        }
        let mut sinks = Vec::with_capacity(raw.sink.len());
        for (i, r) in raw.sink.iter().enumerate() {
            let s = validate_sink(i, r)?;
            if sinks.iter().any(|x: &SinkConfig| x.name == s.name) {
                return Err(ConfigError::new(
                    format!("sink[{i}].name"),
                    format!("duplicate sink name `{}`", s.name),
                ));
            }
            sinks.push(s);
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.listener.len());
        for (i, l) in raw.listener.iter().enumerate() {
            let listener = validate_listener(i, l, &sinks)?;
            if !names.insert(listener.name.clone()) {
                return Err(ConfigError::new(
                    format!("listener[{i}].name"),
                    format!("duplicate listener name `{}`", listener.name),
                ));
            }
            if listener.bind.port() != 0 && !binds.insert(listener.bind) {
                return Err(ConfigError::new(
                    format!("listener[{i}].bind"),
                    format!("address {} is used by another listener", listener.bind),
                ));
            }
            listeners.push(listener);
        }
        for ing in listeners
            .iter()
            .flat_map(|l| &l.routes)
            .filter_map(|r| r.ingest.as_ref())
        {
            sinks[ing.sink].used = true;
            if let Some(dl) = ing.dead_letter {
                sinks[dl].used = true;
            }
        }
        let admin = if raw.admin.enabled {
            let bind = parse_addr(&raw.admin.bind, "admin.bind")?;
            if bind.port() != 0 && binds.contains(&bind) {
                return Err(ConfigError::new(
                    "admin.bind",
                    format!("address {bind} is used by a listener"),
                ));
            }
            Some(AdminConfig { bind })
        } else {
            None
        };
        let mut sources = Vec::new();
        let mut source_names = HashSet::new();
        for (i, r) in raw.source.iter().enumerate() {
            let s = validate_source(i, r)?;
            if !source_names.insert(s.name.clone()) {
                return Err(ConfigError::new(
                    format!("source[{i}].name"),
                    format!("duplicate source name `{}`", s.name),
                ));
            }
            if r.enabled {
                sources.push(s);
            }
        }
        Ok(Self {
            runtime,
            listeners,
            admin,
            sources,
            sinks,
        })
    }
}

fn validate_source(i: usize, r: &raw::RawSource) -> Result<SourceConfig, ConfigError> {
    let p = |key: &str| format!("source[{i}].{key}");
    let name = if r.name.is_empty() {
        format!("source{i}")
    } else {
        r.name.clone()
    };
    let tls = upstream_tls(
        [&r.tls_ca, &r.tls_cert, &r.tls_key, &r.tls_server_name],
        r.tls_insecure_skip_verify,
        &p,
    )?;
    let url = WsUrl::parse_with(&r.url, &tls).map_err(|e| ConfigError::new(p("url"), e))?;
    if r.topic.is_empty() || r.topic.len() > MAX_TOPIC_BYTES {
        return Err(ConfigError::new(
            p("topic"),
            format!("a topic of 1..={MAX_TOPIC_BYTES} bytes is required"),
        ));
    }
    let format = choose(
        &r.format,
        &[
            ("text", SourceFormat::Text),
            ("binary", SourceFormat::Binary),
            ("json", SourceFormat::Json),
        ],
        &p("format"),
        "format",
    )?;
    let subprotocol = subprotocol(&r.subprotocol, &p)?;
    let heartbeat = if r.heartbeat_message.is_empty() {
        if !r.heartbeat_expect.is_empty() {
            return Err(ConfigError::new(
                p("heartbeat_expect"),
                "needs heartbeat_message",
            ));
        }
        None
    } else {
        Some((
            r.heartbeat_message.clone(),
            positive_ms(r.heartbeat_interval_ms, &p("heartbeat_interval_ms"))?,
            (!r.heartbeat_expect.is_empty()).then(|| r.heartbeat_expect.clone()),
        ))
    };
    let backoff = backoff(
        r.reconnect_initial_ms,
        r.reconnect_max_ms,
        r.reconnect_multiplier,
        r.reconnect_max_attempts,
        &p,
    )?;
    Ok(SourceConfig {
        name,
        url,
        topic: r.topic.clone(),
        headers: validate_headers(&r.headers, &p("headers"))?,
        subprotocol,
        subscribe: r.subscribe.clone(),
        format,
        connect_timeout: positive_ms(r.connect_timeout_ms, &p("connect_timeout_ms"))?,
        ping_interval: optional_ms(r.ping_interval_ms, &p("ping_interval_ms"))?,
        pong_timeout: positive_ms(r.pong_timeout_ms, &p("pong_timeout_ms"))?,
        heartbeat,
        backoff,
        deflate: r.permessage_deflate.then(DeflateConfig::default),
    })
}

/// A `subprotocol` key: `""` = none, else an RFC 7230 token.
fn subprotocol(t: &str, p: &dyn Fn(&str) -> String) -> Result<Option<String>, ConfigError> {
    match t {
        "" => Ok(None),
        t if is_token(t) => Ok(Some(t.to_string())),
        t => Err(ConfigError::new(
            p("subprotocol"),
            format!("`{t}` is not a valid subprotocol token"),
        )),
    }
}

/// The `reconnect_*` keys (sources and WebSocket sinks).
fn backoff(
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
    max_attempts: i64,
    p: &dyn Fn(&str) -> String,
) -> Result<Backoff, ConfigError> {
    if !(1.0..=100.0).contains(&multiplier) {
        return Err(ConfigError::new(
            p("reconnect_multiplier"),
            "must be in 1.0..=100.0",
        ));
    }
    let max_attempts = match max_attempts {
        -1 => None,
        n if n >= 1 && n <= i64::from(u32::MAX) => Some(n as u32),
        _ => {
            return Err(ConfigError::new(
                p("reconnect_max_attempts"),
                "must be -1 (forever) or at least 1",
            ));
        }
    };
    let backoff = Backoff {
        initial: positive_ms(initial_ms, &p("reconnect_initial_ms"))?,
        max: positive_ms(max_ms, &p("reconnect_max_ms"))?,
        multiplier,
        max_attempts,
    };
    if backoff.initial > backoff.max {
        return Err(ConfigError::new(
            p("reconnect_initial_ms"),
            "must not exceed reconnect_max_ms",
        ));
    }
    Ok(backoff)
}

fn validate_listener(
    i: usize,
    l: &raw::RawListener,
    sinks: &[SinkConfig],
) -> Result<ListenerConfig, ConfigError> {
    let p = |key: &str| format!("listener[{i}].{key}");
    let name = if l.name.is_empty() {
        format!("listener{i}")
    } else {
        l.name.clone()
    };
    let limits = Limits {
        max_frame_bytes: bounded(l.max_frame_bytes, 1, 1 << 30, &p("max_frame_bytes"))?,
        max_message_bytes: bounded(l.max_message_bytes, 1, 1 << 30, &p("max_message_bytes"))?,
    };
    let mut paths = HashSet::new();
    let mut routes = Vec::with_capacity(l.route.len());
    for (j, r) in l.route.iter().enumerate() {
        let rp = |key: &str| format!("listener[{i}].route[{j}].{key}");
        if !r.path.starts_with('/') {
            return Err(ConfigError::new(rp("path"), "must start with `/`"));
        }
        if !paths.insert(r.path.clone()) {
            return Err(ConfigError::new(
                rp("path"),
                format!("duplicate route path `{}`", r.path),
            ));
        }
        if let Some(k) = r
            .bearer_tokens
            .iter()
            .position(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            // The token itself is not shown: it is a secret.
            return Err(ConfigError::new(
                rp(&format!("bearer_tokens[{k}]")),
                "a token must be non-empty printable ASCII without spaces",
            ));
        }
        let jwt = jwt_auth(r, &rp)?;
        if jwt.is_some() && !r.bearer_tokens.is_empty() {
            return Err(ConfigError::new(
                rp("bearer_tokens"),
                "a route authenticates with bearer_tokens or with a JWT key, not both",
            ));
        }
        let kind = match r.kind.as_str() {
            "echo" => RouteKind::Echo,
            "publish" => RouteKind::Publish,
            "subscribe" => RouteKind::Subscribe,
            "pubsub" => RouteKind::PubSub,
            "proxy" => RouteKind::Proxy,
            "ingest" => RouteKind::Ingest,
            other => {
                return Err(ConfigError::new(
                    rp("kind"),
                    format!(
                        "unknown route kind `{other}` (expected: echo, publish, subscribe, pubsub, proxy, ingest)"
                    ),
                ));
            }
        };
        let proxy = proxy_target(r, kind, &rp)?;
        let templated = r.path.ends_with("{topic}");
        if r.path.matches('{').count() > usize::from(templated) {
            return Err(ConfigError::new(
                rp("path"),
                "`{topic}` may only appear once, at the end of the path",
            ));
        }
        match (kind, templated) {
            (RouteKind::Echo | RouteKind::Proxy | RouteKind::Ingest, true) => {
                return Err(ConfigError::new(
                    rp("path"),
                    format!("a {} route has no topic; remove `{{topic}}`", r.kind),
                ));
            }
            (RouteKind::Publish | RouteKind::Subscribe | RouteKind::PubSub, false) => {
                return Err(ConfigError::new(
                    rp("path"),
                    format!(
                        "a {} route names its topic in the path: end it with `{{topic}}`, e.g. `/sub/{{topic}}`",
                        r.kind
                    ),
                ));
            }
            _ => {}
        }
        let mut queue = QueueLimits::default();
        let queue_keys = [
            ("max_queue_bytes", r.max_queue_bytes.is_some()),
            ("max_queue_messages", r.max_queue_messages.is_some()),
            ("lag_policy", r.lag_policy.is_some()),
        ];
        if !kind.subscribes() {
            if let Some((key, _)) = queue_keys.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    rp(key),
                    format!(
                        "only subscribe and pubsub routes have a queue, not {}",
                        r.kind
                    ),
                ));
            }
        }
        if let Some(b) = r.max_queue_bytes {
            queue.max_bytes = bounded(b, 1024, 1 << 30, &rp("max_queue_bytes"))?;
        }
        if let Some(m) = r.max_queue_messages {
            queue.max_messages = bounded(m, 1, 1 << 24, &rp("max_queue_messages"))?;
        }
        if let Some(p) = &r.lag_policy {
            queue.policy = p
                .parse::<LagPolicy>()
                .map_err(|e| ConfigError::new(rp("lag_policy"), e))?;
        }
        for (k, proto) in r.subprotocols.iter().enumerate() {
            if !is_token(proto) {
                return Err(ConfigError::new(
                    rp(&format!("subprotocols[{k}]")),
                    format!("`{proto}` is not a valid subprotocol token (RFC 7230 token)"),
                ));
            }
        }
        routes.push(Route {
            path: r.path.clone(),
            kind,
            subprotocols: r.subprotocols.clone(),
            queue,
            proxy,
            allowed_origins: r.allowed_origins.clone(),
            max_messages_per_second: (r.max_messages_per_second > 0)
                .then_some(r.max_messages_per_second),
            max_bytes_per_second: (r.max_bytes_per_second > 0).then_some(r.max_bytes_per_second),
            bearer_tokens: r.bearer_tokens.clone(),
            jwt,
            client_cert_names: r.client_cert_names.clone(),
            ingest: ingest_route(r, kind, sinks, &rp)?,
        });
        if !r.client_cert_names.is_empty()
            && !l
                .tls
                .as_ref()
                .is_some_and(|t| matches!(t.client_auth.as_str(), "optional" | "required"))
        {
            return Err(ConfigError::new(
                rp("client_cert_names"),
                "needs client certificates: set [listener.tls] client_auth = \"optional\" or \"required\"",
            ));
        }
    }
    if routes.is_empty() {
        return Err(ConfigError::new(
            p("route"),
            "a listener needs at least one [[listener.route]]",
        ));
    }
    Ok(ListenerConfig {
        name,
        bind: parse_addr(&l.bind, &p("bind"))?,
        backlog: bounded(l.backlog as usize, 1, 65_535, &p("backlog"))? as u32,
        max_connections: NonZeroUsize::new(l.max_connections)
            .ok_or_else(|| ConfigError::new(p("max_connections"), "must be at least 1"))?,
        handshake_timeout: positive_ms(l.handshake_timeout_ms, &p("handshake_timeout_ms"))?,
        max_handshake_bytes: bounded(
            l.max_handshake_bytes,
            256,
            1 << 20,
            &p("max_handshake_bytes"),
        )?,
        idle_timeout: optional_ms(l.idle_timeout_ms, &p("idle_timeout_ms"))?,
        pong_timeout: positive_ms(l.pong_timeout_ms, &p("pong_timeout_ms"))?,
        close_timeout: positive_ms(l.close_timeout_ms, &p("close_timeout_ms"))?,
        limits,
        max_pending_write_bytes: NonZeroUsize::new(bounded(
            l.max_pending_write_bytes,
            1024,
            1 << 30,
            &p("max_pending_write_bytes"),
        )?)
        .expect("bounded below by 1024"),
        max_connections_per_ip: NonZeroUsize::new(l.max_connections_per_ip),
        deflate: l.permessage_deflate.then_some(DeflateConfig {
            threshold_bytes: l.deflate_threshold_bytes,
            peer_context_takeover: l.deflate_client_context_takeover,
        }),
        accept_rate: (l.accept_rate > 0).then_some(l.accept_rate),
        tls: match &l.tls {
            Some(t) => Some(listener_tls(t, &|k| p(&format!("tls.{k}")))?),
            None => None,
        },
        routes,
    })
}

/// `[listener.tls]`: load the files now, so `wsedge check` reports a bad certificate.
fn listener_tls(t: &raw::RawTls, p: &dyn Fn(&str) -> String) -> Result<ServerTls, ConfigError> {
    let files = |cert: &str, key: &str, prefix: &str| {
        if cert.is_empty() {
            return Err(ConfigError::new(
                p(&format!("{prefix}cert")),
                "a PEM file is required",
            ));
        }
        if key.is_empty() {
            return Err(ConfigError::new(
                p(&format!("{prefix}key")),
                "a PEM file is required",
            ));
        }
        Ok(CertFiles {
            cert: cert.into(),
            key: key.into(),
        })
    };
    let default = files(&t.cert, &t.key, "")?;
    let mut sni = Vec::with_capacity(t.sni.len());
    for (k, e) in t.sni.iter().enumerate() {
        let prefix = format!("sni[{k}].");
        if e.names.is_empty() {
            return Err(ConfigError::new(
                p(&format!("{prefix}names")),
                "at least one name",
            ));
        }
        sni.push(SniCert {
            names: e.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            files: files(&e.cert, &e.key, &prefix)?,
        });
    }
    let client_auth = choose(
        if t.client_auth.is_empty() {
            "none"
        } else {
            &t.client_auth
        },
        &[
            ("none", ClientAuth::None),
            ("optional", ClientAuth::Optional),
            ("required", ClientAuth::Required),
        ],
        &p("client_auth"),
        "client_auth",
    )?;
    let client_ca = (!t.client_ca.is_empty()).then(|| std::path::PathBuf::from(&t.client_ca));
    if client_auth != ClientAuth::None && client_ca.is_none() {
        return Err(ConfigError::new(
            p("client_ca"),
            "client certificates need the CA file they are checked against",
        ));
    }
    let min_version = choose(
        if t.min_version.is_empty() {
            "1.2"
        } else {
            &t.min_version
        },
        &[("1.2", MinVersion::Tls12), ("1.3", MinVersion::Tls13)],
        &p("min_version"),
        "TLS version",
    )?;
    ServerTls::new(default, sni, client_auth, client_ca, min_version)
        .map_err(|e| ConfigError::new(p("cert"), e))
}

/// The `tls_*` keys of an upstream (proxy route or source): `[ca, cert, key, server_name]`.
fn upstream_tls(
    [ca, cert, key, server_name]: [&String; 4],
    insecure_skip_verify: bool,
    p: &dyn Fn(&str) -> String,
) -> Result<TlsOptions, ConfigError> {
    let client_cert = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, false) => Some(CertFiles {
            cert: cert.into(),
            key: key.into(),
        }),
        (false, true) => return Err(ConfigError::new(p("tls_key"), "tls_cert needs tls_key")),
        (true, false) => return Err(ConfigError::new(p("tls_cert"), "tls_key needs tls_cert")),
    };
    Ok(TlsOptions {
        ca: (!ca.is_empty()).then(|| std::path::PathBuf::from(ca)),
        client_cert,
        server_name: (!server_name.is_empty()).then(|| server_name.clone()),
        insecure_skip_verify,
    })
}

fn parse_addr(s: &str, path: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            path,
            format!("`{s}` is not a socket address (expected IP:PORT, e.g. 127.0.0.1:8080)"),
        )
    })
}

/// The longest duration any `*_ms` key takes: 30 days. Longer ones are certainly typos, and
/// deadlines far beyond it would overflow the clock arithmetic.
pub const MAX_MS: u64 = 30 * 24 * 3600 * 1000;

fn positive_ms(ms: u64, path: &str) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(ConfigError::new(path, "must be greater than 0"));
    }
    capped_ms(ms, path)
}

/// A duration in ms where 0 is allowed (as "off" or as none), at most [`MAX_MS`].
fn capped_ms(ms: u64, path: &str) -> Result<Duration, ConfigError> {
    if ms > MAX_MS {
        return Err(ConfigError::new(
            path,
            format!("{ms} ms is more than the 30 days ({MAX_MS} ms) any duration may be"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A duration in ms where 0 means off.
fn optional_ms(ms: u64, path: &str) -> Result<Option<Duration>, ConfigError> {
    Ok(Some(capped_ms(ms, path)?).filter(|d| !d.is_zero()))
}

/// An RFC 7230 token (header names, subprotocols).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// The ingest keys of a route: required on ingest routes, refused elsewhere.
fn ingest_route(
    r: &raw::RawRoute,
    kind: RouteKind,
    sinks: &[SinkConfig],
    rp: &dyn Fn(&str) -> String,
) -> Result<Option<IngestRoute>, ConfigError> {
    if kind != RouteKind::Ingest {
        let set = [
            ("sink", r.sink.is_some()),
            ("format", r.format.is_some()),
            ("on_error", r.on_error.is_some()),
            ("dead_letter", r.dead_letter.is_some()),
            ("schema", r.schema.is_some()),
            ("schema_extra_fields", r.schema_extra_fields.is_some()),
            ("metadata", r.metadata.is_some()),
        ];
        return match set.iter().find(|(_, s)| *s) {
            Some((key, _)) => Err(ConfigError::new(
                rp(key),
                format!("only ingest routes have a sink, not {}", r.kind),
            )),
            None => Ok(None),
        };
    }
    let find = |key: &str, name: &str| {
        sinks
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| ConfigError::new(rp(key), format!("no [[sink]] is named `{name}`")))
    };
    let Some(sink) = &r.sink else {
        return Err(ConfigError::new(
            rp("sink"),
            "an ingest route needs `sink = \"name\"`",
        ));
    };
    let sink = find("sink", sink)?;
    let json = choose(
        r.format.as_deref().unwrap_or("json"),
        &[("text", false), ("json", true)],
        &rp("format"),
        "format",
    )?;
    let close_on_error = choose(
        r.on_error.as_deref().unwrap_or("continue"),
        &[("continue", false), ("close", true)],
        &rp("on_error"),
        "policy",
    )?;
    let dead_letter = match r.dead_letter.as_deref().unwrap_or("") {
        "" => None,
        name => Some(find("dead_letter", name)?),
    };
    Ok(Some(IngestRoute {
        sink,
        json,
        close_on_error,
        dead_letter,
        schema: schema(r, json, rp)?,
        metadata: metadata(r.metadata.as_deref().unwrap_or_default(), rp)?,
    }))
}

/// An ingest route's `metadata` list.
fn metadata(items: &[String], rp: &dyn Fn(&str) -> String) -> Result<Vec<MetaField>, ConfigError> {
    let mut out: Vec<MetaField> = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let path = rp(&format!("metadata[{k}]"));
        let f = match item.as_str() {
            "peer" => MetaField::Peer,
            "tls" => MetaField::Tls,
            "path" => MetaField::Path,
            "client_cert" => MetaField::ClientCert,
            other => match other.strip_prefix("header:") {
                Some(h) if is_token(h) => MetaField::Header(h.to_ascii_lowercase()),
                Some(h) => {
                    return Err(ConfigError::new(
                        path,
                        format!("`{h}` is not a valid header name"),
                    ));
                }
                None => {
                    return Err(ConfigError::new(
                        path,
                        format!(
                            "unknown metadata `{other}` (expected peer, tls, path, client_cert \
                             or header:<name>)"
                        ),
                    ));
                }
            },
        };
        if out.iter().any(|x| x.key() == f.key()) {
            return Err(ConfigError::new(
                path,
                format!("the key `{}` is already in the metadata", f.key()),
            ));
        }
        out.push(f);
    }
    Ok(out)
}

/// An ingest route's `schema` and `schema_extra_fields`.
fn schema(
    r: &raw::RawRoute,
    json: bool,
    rp: &dyn Fn(&str) -> String,
) -> Result<Option<Schema>, ConfigError> {
    let Some(cols) = &r.schema else {
        return match r.schema_extra_fields {
            Some(_) => Err(ConfigError::new(
                rp("schema_extra_fields"),
                "needs a schema",
            )),
            None => Ok(None),
        };
    };
    if !json {
        return Err(ConfigError::new(
            rp("schema"),
            "a schema needs format = \"json\"",
        ));
    }
    if cols.is_empty() {
        return Err(ConfigError::new(rp("schema"), "at least one column"));
    }
    let mut columns: Vec<Column> = Vec::with_capacity(cols.len());
    for (k, c) in cols.iter().enumerate() {
        let cp = |key: &str| rp(&format!("schema[{k}].{key}"));
        if c.name.is_empty() {
            return Err(ConfigError::new(cp("name"), "a column needs a name"));
        }
        if columns.iter().any(|x| x.name == c.name) {
            return Err(ConfigError::new(
                cp("name"),
                format!("duplicate column `{}`", c.name),
            ));
        }
        columns.push(Column {
            name: c.name.clone(),
            ty: c.ty.parse().map_err(|e| ConfigError::new(cp("type"), e))?,
            nullable: c.nullable,
        });
    }
    let extra = choose(
        r.schema_extra_fields.as_deref().unwrap_or("allow"),
        &[
            ("allow", ExtraFields::Allow),
            ("refuse", ExtraFields::Refuse),
        ],
        &rp("schema_extra_fields"),
        "",
    )?;
    Ok(Some(Schema { columns, extra }))
}

fn validate_sink(i: usize, r: &raw::RawSink) -> Result<SinkConfig, ConfigError> {
    let p = |key: &str| format!("sink[{i}].{key}");
    if r.name.is_empty() {
        return Err(ConfigError::new(p("name"), "a sink needs a name"));
    }
    let d = raw::RawSink::default();
    // Keys of the other kind are refused unless left at their default.
    let file_keys = [
        ("path", r.path != d.path),
        ("rotate_bytes", r.rotate_bytes != d.rotate_bytes),
    ];
    let ws_keys = [
        ("url", r.url != d.url),
        ("headers", r.headers != d.headers),
        ("subprotocol", r.subprotocol != d.subprotocol),
        (
            "connect_timeout_ms",
            r.connect_timeout_ms != d.connect_timeout_ms,
        ),
        ("ack_timeout_ms", r.ack_timeout_ms != d.ack_timeout_ms),
        ("flush_timeout_ms", r.flush_timeout_ms != d.flush_timeout_ms),
        (
            "max_pending_batches",
            r.max_pending_batches != d.max_pending_batches,
        ),
        (
            "max_pending_bytes",
            r.max_pending_bytes != d.max_pending_bytes,
        ),
        (
            "reconnect_initial_ms",
            r.reconnect_initial_ms != d.reconnect_initial_ms,
        ),
        ("reconnect_max_ms", r.reconnect_max_ms != d.reconnect_max_ms),
        (
            "reconnect_multiplier",
            r.reconnect_multiplier != d.reconnect_multiplier,
        ),
        (
            "reconnect_max_attempts",
            r.reconnect_max_attempts != d.reconnect_max_attempts,
        ),
        ("tls_ca", r.tls_ca != d.tls_ca),
        ("tls_cert", r.tls_cert != d.tls_cert),
        ("tls_key", r.tls_key != d.tls_key),
        ("tls_server_name", r.tls_server_name != d.tls_server_name),
        (
            "tls_insecure_skip_verify",
            r.tls_insecure_skip_verify != d.tls_insecure_skip_verify,
        ),
    ];
    let refuse = |keys: &[(&str, bool)], only: &str| match keys.iter().find(|(_, set)| *set) {
        Some((key, _)) => Err(ConfigError::new(
            p(key),
            format!("only {only} sinks have `{key}`, not {} sinks", r.kind),
        )),
        None => Ok(()),
    };
    let kind = match r.kind.as_str() {
        "file" => {
            refuse(&ws_keys, "websocket")?;
            if r.path.is_empty() {
                return Err(ConfigError::new(p("path"), "a file sink needs a path"));
            }
            SinkKind::File {
                path: r.path.clone().into(),
                rotate_bytes: (r.rotate_bytes > 0).then_some(r.rotate_bytes),
            }
        }
        "websocket" => {
            refuse(&file_keys, "file")?;
            let tls = upstream_tls(
                [&r.tls_ca, &r.tls_cert, &r.tls_key, &r.tls_server_name],
                r.tls_insecure_skip_verify,
                &p,
            )?;
            let url = WsUrl::parse_with(&r.url, &tls).map_err(|e| ConfigError::new(p("url"), e))?;
            SinkKind::WebSocket(Box::new(WsSinkConfig {
                url,
                headers: validate_headers(&r.headers, &p("headers"))?,
                subprotocol: subprotocol(&r.subprotocol, &p)?,
                connect_timeout: positive_ms(r.connect_timeout_ms, &p("connect_timeout_ms"))?,
                ack_timeout: positive_ms(r.ack_timeout_ms, &p("ack_timeout_ms"))?,
                flush_timeout: positive_ms(r.flush_timeout_ms, &p("flush_timeout_ms"))?,
                max_pending_batches: bounded(
                    r.max_pending_batches,
                    1,
                    1 << 20,
                    &p("max_pending_batches"),
                )?,
                max_pending_bytes: bounded(
                    r.max_pending_bytes,
                    1,
                    1 << 36,
                    &p("max_pending_bytes"),
                )?,
                backoff: backoff(
                    r.reconnect_initial_ms,
                    r.reconnect_max_ms,
                    r.reconnect_multiplier,
                    r.reconnect_max_attempts,
                    &p,
                )?,
            }))
        }
        other => {
            return Err(ConfigError::new(
                p("kind"),
                format!("unknown sink kind `{other}` (expected file or websocket)"),
            ));
        }
    };
    let framing = choose(
        &r.framing,
        &[
            ("ndjson", Framing::Ndjson),
            ("json_array", Framing::JsonArray),
        ],
        &p("framing"),
        "framing",
    )?;
    let compression = choose(
        &r.compression,
        &[
            ("none", Compression::None),
            ("gzip", Compression::Gzip),
            ("zstd", Compression::Zstd),
        ],
        &p("compression"),
        "compression",
    )?;
    Ok(SinkConfig {
        name: r.name.clone(),
        kind,
        framing,
        compression,
        max_batch_messages: bounded(r.max_batch_messages, 1, 1 << 24, &p("max_batch_messages"))?,
        max_batch_bytes: bounded(r.max_batch_bytes, 1, 1 << 30, &p("max_batch_bytes"))?,
        max_batch_delay: positive_ms(r.max_batch_delay_ms, &p("max_batch_delay_ms"))?,
        buffer_chunks: bounded(r.buffer_chunks, 1, 1 << 20, &p("buffer_chunks"))?,
        used: false,
    })
}

/// The JWT keys of a route, validated and loaded.
fn jwt_auth(
    r: &raw::RawRoute,
    rp: &dyn Fn(&str) -> String,
) -> Result<Option<JwtAuth>, ConfigError> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    let (key, algorithm, source) = match (r.jwt_secret.as_str(), r.jwt_public_key_file.as_str()) {
        ("", "") => {
            let stray = [
                ("jwt_audience", &r.jwt_audience),
                ("jwt_issuer", &r.jwt_issuer),
                ("jwt_topics_claim", &r.jwt_topics_claim),
            ];
            return match stray.iter().find(|(_, v)| !v.is_empty()) {
                Some((k, _)) => Err(ConfigError::new(
                    rp(k),
                    "needs jwt_secret or jwt_public_key_file",
                )),
                None => Ok(None),
            };
        }
        (secret, "") => {
            if secret.len() < 32 {
                return Err(ConfigError::new(
                    rp("jwt_secret"),
                    "an HS256 secret must be at least 32 bytes",
                ));
            }
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
                "secret".to_string(),
            )
        }
        ("", file) => {
            let pem = std::fs::read(file).map_err(|e| {
                ConfigError::new(
                    rp("jwt_public_key_file"),
                    format!("cannot read {file}: {e}"),
                )
            })?;
            match DecodingKey::from_ec_pem(&pem) {
                Ok(k) => (k, Algorithm::ES256, file.to_string()),
                Err(_) => match DecodingKey::from_rsa_pem(&pem) {
                    Ok(k) => (k, Algorithm::RS256, file.to_string()),
                    Err(_) => {
                        return Err(ConfigError::new(
                            rp("jwt_public_key_file"),
                            format!("{file} holds no PEM EC (P-256) or RSA public key"),
                        ));
                    }
                },
            }
        }
        _ => {
            return Err(ConfigError::new(
                rp("jwt_secret"),
                "set jwt_secret or jwt_public_key_file, not both",
            ));
        }
    };
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(Some(JwtAuth {
        key,
        algorithm,
        audience: opt(&r.jwt_audience),
        issuer: opt(&r.jwt_issuer),
        topics_claim: opt(&r.jwt_topics_claim),
        source,
    }))
}

/// Extra request headers: valid names, not the handshake's own, values without line breaks.
fn validate_headers(
    map: &std::collections::BTreeMap<String, String>,
    path: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut headers = Vec::new();
    for (k, v) in map {
        if !is_token(k) {
            return Err(ConfigError::new(
                path,
                format!("`{k}` is not a valid header name"),
            ));
        }
        let reserved = [
            "host",
            "upgrade",
            "connection",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
        ];
        if reserved.contains(&k.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::new(
                path,
                format!("`{k}` is set by wsedge itself"),
            ));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            // The value is not shown: it may be a secret.
            return Err(ConfigError::new(
                path,
                format!("the value of `{k}` contains a line break or NUL"),
            ));
        }
        headers.push((k.clone(), v.clone()));
    }
    Ok(headers)
}

/// The proxy keys of a route: required on proxy routes, refused elsewhere.
fn proxy_target(
    r: &raw::RawRoute,
    kind: RouteKind,
    rp: &dyn Fn(&str) -> String,
) -> Result<Option<ProxyTarget>, ConfigError> {
    if kind != RouteKind::Proxy {
        let set = [
            ("upstream", r.upstream.is_some()),
            ("connect_timeout_ms", r.connect_timeout_ms.is_some()),
            ("headers", r.headers.is_some()),
            ("tls_ca", !r.tls_ca.is_empty()),
            ("tls_cert", !r.tls_cert.is_empty()),
            ("tls_key", !r.tls_key.is_empty()),
            ("tls_server_name", !r.tls_server_name.is_empty()),
            ("tls_insecure_skip_verify", r.tls_insecure_skip_verify),
            (
                "upstream_permessage_deflate",
                r.upstream_permessage_deflate.is_some(),
            ),
        ];
        return match set.iter().find(|(_, s)| *s) {
            Some((key, _)) => Err(ConfigError::new(
                rp(key),
                format!("only proxy routes have an upstream, not {}", r.kind),
            )),
            None => Ok(None),
        };
    }
    let Some(url) = &r.upstream else {
        return Err(ConfigError::new(
            rp("upstream"),
            "a proxy route needs `upstream = \"ws://host:port/path\"`",
        ));
    };
    let tls = upstream_tls(
        [&r.tls_ca, &r.tls_cert, &r.tls_key, &r.tls_server_name],
        r.tls_insecure_skip_verify,
        rp,
    )?;
    let url = WsUrl::parse_with(url, &tls).map_err(|e| ConfigError::new(rp("upstream"), e))?;
    let connect_timeout = positive_ms(
        r.connect_timeout_ms.unwrap_or(5_000),
        &rp("connect_timeout_ms"),
    )?;
    let headers = match &r.headers {
        Some(h) => validate_headers(h, &rp("headers"))?,
        None => Vec::new(),
    };
    Ok(Some(ProxyTarget {
        url,
        headers,
        connect_timeout,
        deflate: r
            .upstream_permessage_deflate
            .unwrap_or(false)
            .then(DeflateConfig::default),
    }))
}

/// `value` as one of `options` (name, value); otherwise an error at `path` that names the
/// unknown `what` and lists the names ("unknown format `x` (expected text, binary or json)").
fn choose<T: Copy>(
    value: &str,
    options: &[(&str, T)],
    path: &str,
    what: &str,
) -> Result<T, ConfigError> {
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == value) {
        return Ok(*v);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let list = match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    let what = if what.is_empty() {
        String::new()
    } else {
        format!("{what} ")
    };
    Err(ConfigError::new(
        path,
        format!("unknown {what}`{value}` (expected {list})"),
    ))
}

fn bounded(v: usize, min: usize, max: usize, path: &str) -> Result<usize, ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::new(
            path,
            format!("{v} is out of range ({min}..={max})"),
        ));
    }
    Ok(v)
}

/// Replace `${env:NAME}` in every string value, in place.
fn expand_env(v: &mut toml::Value, path: &str) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) if s.contains("${env:") => {
            *s = expand_env_str(s).map_err(|m| ConfigError::new(path, m))?;
        }
        toml::Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"))?;
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                expand_env(item, &format!("{path}.{k}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expand `${env:NAME}` references in one string. The error never contains the value.
fn expand_env_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${env:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${env:` reference".to_string())?;
        let name = &after[..end];
        if name.is_empty() {
            return Err("empty environment variable name in `${env:}`".into());
        }
        let val =
            std::env::var(name).map_err(|_| format!("environment variable `{name}` is not set"))?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_matches_raw_defaults() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 1);
        let l = &c.listeners[0];
        assert_eq!(l.bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(l.routes[0].kind, RouteKind::Echo);
        let sub = l.routes.iter().find(|r| r.kind == RouteKind::Subscribe);
        assert_eq!(sub.unwrap().queue, QueueLimits::default());
        assert_eq!(l.routes[2].matches("/sub/btc"), Some("btc"));
        assert_eq!(l.routes[2].matches("/sub/"), None);
        assert_eq!(l.routes[0].matches("/echo"), Some(""));
        assert_eq!(c.admin.unwrap().bind, "127.0.0.1:9090".parse().unwrap());
        // Every value written in the commented file equals the code default, so the file
        // documents the real defaults.
        let file: raw::RawConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        let d = raw::RawListener::default();
        let f = &file.listener[0];
        assert_eq!(
            format!(
                "{:?}",
                raw::RawListener {
                    route: vec![],
                    name: String::new(),
                    ..f.clone()
                }
            ),
            format!("{:?}", d)
        );
        assert_eq!(
            format!("{:?}", file.runtime),
            format!("{:?}", raw::RawRuntime::default())
        );
        assert_eq!(
            format!("{:?}", file.admin),
            format!("{:?}", raw::RawAdmin::default())
        );
        // The example source shows the defaults of every key but its identity.
        let src = &file.source[0];
        assert_eq!(
            format!(
                "{:?}",
                raw::RawSource {
                    name: String::new(),
                    enabled: true,
                    url: String::new(),
                    topic: String::new(),
                    subscribe: vec![],
                    ..src.clone()
                }
            ),
            format!("{:?}", raw::RawSource::default())
        );
        assert!(c.sources.is_empty(), "the example source is disabled");
        // The example WebSocket sink shows the defaults of every key but its identity, and
        // no route uses it, so it is not started.
        let ws = file.sink.iter().find(|s| s.kind == "websocket").unwrap();
        assert_eq!(
            format!(
                "{:?}",
                raw::RawSink {
                    name: String::new(),
                    kind: "file".into(),
                    url: String::new(),
                    ..ws.clone()
                }
            ),
            format!("{:?}", raw::RawSink::default())
        );
        let used: Vec<(&str, bool)> = c.sinks.iter().map(|s| (s.name.as_str(), s.used)).collect();
        assert_eq!(used, [("ingest", true), ("upstream-example", false)]);
    }

    /// Dotted key paths of a TOML document (array-of-tables flattened, indices dropped).
    fn keys(v: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, item) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match item {
                        // A user-defined map: its keys are not configuration keys.
                        toml::Value::Table(_) if k == "headers" => {
                            out.insert(p);
                        }
                        toml::Value::Table(_) => keys(item, &p, out),
                        toml::Value::Array(a)
                            if a.iter().all(|x| x.is_table()) && !a.is_empty() =>
                        {
                            for x in a {
                                keys(x, &p, out);
                            }
                        }
                        _ => {
                            out.insert(p);
                        }
                    }
                }
            }
            _ => unreachable!("keys() is called on tables"),
        }
    }

    #[test]
    fn reference_doc_default_file_and_types_list_the_same_keys() {
        let mut from_types = Default::default();
        let mut raw = raw::RawConfig::default();
        raw.listener.push(raw::RawListener {
            route: vec![raw::RawRoute {
                path: "/sub/{topic}".into(),
                kind: "subscribe".into(),
                subprotocols: vec![],
                max_queue_bytes: Some(1),
                max_queue_messages: Some(1),
                lag_policy: Some("close".into()),
                upstream: Some("ws://127.0.0.1:1/".into()),
                connect_timeout_ms: Some(1),
                headers: Some([("X".to_string(), "y".to_string())].into()),
                upstream_permessage_deflate: Some(false),
                allowed_origins: vec![],
                max_messages_per_second: 0,
                max_bytes_per_second: 0,
                bearer_tokens: vec![],
                jwt_secret: String::new(),
                jwt_public_key_file: String::new(),
                jwt_audience: String::new(),
                jwt_issuer: String::new(),
                jwt_topics_claim: String::new(),
                sink: Some("s".into()),
                format: Some("json".into()),
                on_error: Some("continue".into()),
                dead_letter: Some(String::new()),
                schema: Some(vec![raw::RawColumn::default()]),
                schema_extra_fields: Some("allow".into()),
                metadata: Some(vec![]),
                client_cert_names: vec![],
                tls_ca: String::new(),
                tls_cert: String::new(),
                tls_key: String::new(),
                tls_server_name: String::new(),
                tls_insecure_skip_verify: false,
            }],
            tls: Some(raw::RawTls {
                sni: vec![raw::RawSni::default()],
                ..Default::default()
            }),
            ..Default::default()
        });
        raw.source.push(raw::RawSource::default());
        raw.sink.push(raw::RawSink::default());
        keys(&toml::Value::try_from(&raw).unwrap(), "", &mut from_types);
        let mut from_default = Default::default();
        keys(
            &DEFAULT_CONFIG_TOML.parse::<toml::Table>().unwrap().into(),
            "",
            &mut from_default,
        );
        // TLS needs certificate files, so the default file shows `[listener.tls]` commented
        // out: every key of it on a `# key = ...` line.
        let (tls_keys, active): (std::collections::BTreeSet<_>, _) = from_types
            .iter()
            .cloned()
            .partition(|k: &String| k.starts_with("listener.tls."));
        assert_eq!(
            active, from_default,
            "config/default.toml must show every key"
        );
        for k in &tls_keys {
            let leaf = k.rsplit('.').next().unwrap();
            assert!(
                DEFAULT_CONFIG_TOML
                    .lines()
                    .any(|l| l.starts_with(&format!("# {leaf} = "))),
                "config/default.toml must show `{k}` (commented out)"
            );
        }
        let doc = include_str!("../../docs/configuration.md");
        let documented: std::collections::BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string))
            .collect();
        assert_eq!(
            from_types, documented,
            "docs/configuration.md must document every key"
        );
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = Config::parse("[[listener]]\nbind='127.0.0.1:1'\nmax_conections=3\n").unwrap_err();
        assert_eq!(e.path, "listener[0].max_conections");
        assert!(e.message.contains("max_conections"), "{e}");
    }

    #[test]
    fn bad_values_name_their_path() {
        let base = "[[listener]]\nbind='127.0.0.1:1'\n[[listener.route]]\npath='/e'\nkind='echo'\n";
        assert!(Config::parse(base).is_ok());
        let e = Config::parse(&base.replace("127.0.0.1:1", "nope")).unwrap_err();
        assert_eq!(e.path, "listener[0].bind");
        let e = Config::parse(&base.replace("'echo'", "'teleport'")).unwrap_err();
        assert_eq!(e.path, "listener[0].route[0].kind");
        let e = Config::parse(&base.replace("'/e'", "'e'")).unwrap_err();
        assert_eq!(e.path, "listener[0].route[0].path");
        let e = Config::parse(&format!("{base}[runtime]\nio='kqueue'\n")).unwrap_err();
        assert_eq!(e.path, "runtime.io");
        let e = Config::parse(&format!("{base}[runtime]\nshards='two'\n")).unwrap_err();
        assert_eq!(e.path, "runtime.shards");
        let e = Config::parse("[runtime]\nshards=1\n").unwrap_err();
        assert_eq!(e.path, "listener");
        let e = Config::parse("[[listener]\n").unwrap_err();
        assert_eq!(e.path, "(file)");
        let e = Config::parse(&base.replace("bind=", "max_frame_bytes=0\nbind=")).unwrap_err();
        assert_eq!(e.path, "listener[0].max_frame_bytes");
        // Durations: at most 30 days, whether 0 means "off" or is refused.
        for key in ["close_timeout_ms", "idle_timeout_ms"] {
            let huge = base.replace("bind=", &format!("{key}=9223372036854775807\nbind="));
            let e = Config::parse(&huge).unwrap_err();
            assert_eq!(e.path, format!("listener[0].{key}"));
            assert!(e.to_string().contains("30 days"), "{e}");
            let max = base.replace("bind=", &format!("{key}={MAX_MS}\nbind="));
            assert!(Config::parse(&max).is_ok(), "{key} = MAX_MS");
        }
        let e =
            Config::parse(&format!("{base}[runtime]\ndrain_window_ms=2592000001\n")).unwrap_err();
        assert_eq!(e.path, "runtime.drain_window_ms");
    }

    #[test]
    fn route_kinds_are_checked() {
        let route = |extra: &str| {
            Config::parse(&format!(
                "[[listener]]\nbind='127.0.0.1:1'\n[[listener.route]]\n{extra}\n"
            ))
        };
        let ok = route("path='/s/{topic}'\nkind='subscribe'\nlag_policy='drop_oldest'").unwrap();
        let r = &ok.listeners[0].routes[0];
        assert_eq!(r.queue.policy, LagPolicy::DropOldest);
        assert_eq!(r.matches("/s/a/b"), Some("a/b"));
        assert_eq!(r.matches(&format!("/s/{}", "x".repeat(257))), None);
        for (extra, path, words) in [
            ("path='/s'\nkind='subscribe'", "path", "{topic}"),
            ("path='/e/{topic}'\nkind='echo'", "path", "no topic"),
            ("path='/{topic}/x/{topic}'\nkind='publish'", "path", "once"),
            (
                "path='/e'\nkind='echo'\nmax_queue_bytes=4096",
                "max_queue_bytes",
                "only",
            ),
            (
                "path='/p/{topic}'\nkind='publish'\nlag_policy='close'",
                "lag_policy",
                "only",
            ),
            (
                "path='/s/{topic}'\nkind='pubsub'\nlag_policy='yolo'",
                "lag_policy",
                "drop_oldest",
            ),
            (
                "path='/s/{topic}'\nkind='pubsub'\nmax_queue_messages=0",
                "max_queue_messages",
                "range",
            ),
            ("path='/p'\nkind='proxy'", "upstream", "needs"),
            (
                "path='/e'\nkind='echo'\nbearer_tokens=['a b']",
                "bearer_tokens[0]",
                "printable",
            ),
            (
                "path='/e'\nkind='echo'\njwt_secret='short'",
                "jwt_secret",
                "32 bytes",
            ),
            (
                "path='/e'\nkind='echo'\njwt_audience='a'",
                "jwt_audience",
                "needs",
            ),
            (
                "path='/e'\nkind='echo'\njwt_public_key_file='/nonexistent.pem'",
                "jwt_public_key_file",
                "cannot read",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='wss://127.0.0.1:1/'\ntls_ca='/nonexistent-ca.pem'",
                "upstream",
                "nonexistent-ca.pem",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='ws://127.0.0.1:1/'\ntls_ca='/x.pem'",
                "upstream",
                "need a wss:// URL",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='wss://127.0.0.1:1/'\ntls_cert='/c.pem'",
                "tls_key",
                "needs tls_key",
            ),
            (
                "path='/e'\nkind='echo'\ntls_insecure_skip_verify=true",
                "tls_insecure_skip_verify",
                "only proxy",
            ),
            (
                "path='/e'\nkind='echo'\nclient_cert_names=['a']",
                "client_cert_names",
                "client_auth",
            ),
            (
                "path='/e'\nkind='echo'\nupstream='ws://127.0.0.1:1/'",
                "upstream",
                "only proxy",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='ws://127.0.0.1:1/'\nheaders={Host='x'}",
                "headers",
                "wsedge itself",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='ws://127.0.0.1:1/'\nheaders={'a b'='x'}",
                "headers",
                "not a valid",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='ws://127.0.0.1:1/'\nheaders={A=\"secret\\n\"}",
                "headers",
                "line break",
            ),
            (
                "path='/p'\nkind='proxy'\nupstream='ws://127.0.0.1:1/'\nconnect_timeout_ms=0",
                "connect_timeout_ms",
                "greater than 0",
            ),
        ] {
            let e = route(extra).unwrap_err();
            assert_eq!(e.path, format!("listener[0].route[0].{path}"), "{extra}");
            assert!(e.message.contains(words), "{extra}: {e}");
        }
    }

    #[test]
    fn ingest_schemas_are_checked() {
        let route = |extra: &str| {
            Config::parse(&format!(
                "[[sink]]\nname='s'\npath='/tmp/x'\n[[listener]]\nbind='127.0.0.1:1'\n\
                 [[listener.route]]\npath='/in'\nkind='ingest'\nsink='s'\n{extra}\n"
            ))
        };
        let ok = route(
            "schema=[{name='id',type='integer'},{name='at',type='timestamp',nullable=true}]\n\
             schema_extra_fields='refuse'",
        )
        .unwrap();
        let s = ok.listeners[0].routes[0]
            .ingest
            .as_ref()
            .unwrap()
            .schema
            .clone()
            .unwrap();
        assert_eq!(s.extra, ExtraFields::Refuse);
        assert_eq!(
            (s.columns[0].nullable, s.columns[1].nullable),
            (false, true),
            "required unless nullable"
        );
        for (extra, key, words) in [
            (
                "schema=[{name='id',type='integer'},{name='x',type='int'}]",
                "schema[1].type",
                "unknown column type `int`",
            ),
            (
                "schema=[{name='id',type='integer'},{name='id',type='string'}]",
                "schema[1].name",
                "duplicate",
            ),
            ("schema=[{name='',type='string'}]", "schema[0].name", "name"),
            ("schema=[]", "schema", "at least one"),
            (
                "format='text'\nschema=[{name='a',type='string'}]",
                "schema",
                "json",
            ),
            (
                "schema_extra_fields='refuse'",
                "schema_extra_fields",
                "needs",
            ),
            (
                "schema=[{name='a',type='string'}]\nschema_extra_fields='maybe'",
                "schema_extra_fields",
                "allow or refuse",
            ),
        ] {
            let e = route(extra).unwrap_err();
            assert_eq!(e.path, format!("listener[0].route[0].{key}"), "{extra}");
            assert!(e.message.contains(words), "{extra}: {e}");
        }
        let ok =
            route("metadata=['peer','tls','path','client_cert','header:X-Device-Id']").unwrap();
        let keys: Vec<&str> = ok.listeners[0].routes[0]
            .ingest
            .as_ref()
            .unwrap()
            .metadata
            .iter()
            .map(MetaField::key)
            .collect();
        assert_eq!(keys, ["peer", "tls", "path", "client_cert", "x-device-id"]);
        for (extra, key, words) in [
            ("metadata=['ip']", "metadata[0]", "unknown metadata `ip`"),
            ("metadata=['header:a b']", "metadata[0]", "header name"),
            ("metadata=['tls','header:TLS']", "metadata[1]", "already"),
        ] {
            let e = route(extra).unwrap_err();
            assert_eq!(e.path, format!("listener[0].route[0].{key}"), "{extra}");
            assert!(e.message.contains(words), "{extra}: {e}");
        }
        let e = route("schema=[{name='a',type='string',required=true}]").unwrap_err();
        assert!(e.path.starts_with("listener[0].route[0].schema"), "{e}");
    }

    #[test]
    fn sinks_are_checked() {
        let sinks = |extra: &str| {
            Config::parse(&format!(
                "[[listener]]\nbind='127.0.0.1:1'\n[[listener.route]]\npath='/in'\nkind='ingest'\n\
                 sink='a'\ndead_letter='b'\n[[sink]]\nname='b'\npath='/tmp/b'\n[[sink]]\nname='a'\n{extra}\n\
                 [[sink]]\nname='idle'\npath='/tmp/i'\n"
            ))
        };
        let ok = sinks(
            "kind='websocket'\nurl='ws://127.0.0.1:9/up'\nheaders={Authorization='Bearer t'}\n\
             subprotocol='v1'\nmax_pending_batches=3\nreconnect_max_attempts=4\ncompression='zstd'",
        )
        .unwrap();
        let used: Vec<bool> = ok.sinks.iter().map(|s| s.used).collect();
        assert_eq!(
            used,
            [true, true, false],
            "sink and dead letter used, idle not"
        );
        let SinkKind::WebSocket(ws) = &ok.sinks[1].kind else {
            panic!("{:?}", ok.sinks[1]);
        };
        assert_eq!(ws.url.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(ws.subprotocol.as_deref(), Some("v1"));
        assert_eq!(
            (ws.max_pending_batches, ws.backoff.max_attempts),
            (3, Some(4))
        );
        assert_eq!(ws.ack_timeout, Duration::from_secs(10));
        let debug = format!("{:?}", ok.sinks[1]);
        assert!(
            debug.contains("Authorization") && !debug.contains("Bearer t"),
            "header values are not shown: {debug}"
        );
        for (extra, key, words) in [
            ("kind='kafka'", "kind", "file or websocket"),
            ("kind='websocket'", "url", "not a ws:// or wss:// URL"),
            ("kind='websocket'\nurl='http://x/'", "url", "ws://"),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\npath='/tmp/x'",
                "path",
                "only file sinks",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nrotate_bytes=10",
                "rotate_bytes",
                "only file sinks",
            ),
            (
                "path='/tmp/a'\nurl='ws://127.0.0.1:9/'",
                "url",
                "only websocket",
            ),
            (
                "path='/tmp/a'\nmax_pending_batches=2",
                "max_pending_batches",
                "only websocket",
            ),
            ("", "path", "needs a path"),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nmax_pending_batches=0",
                "max_pending_batches",
                "range",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nack_timeout_ms=0",
                "ack_timeout_ms",
                "greater than 0",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nreconnect_multiplier=0.5",
                "reconnect_multiplier",
                "1.0",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\ntls_ca='/ca.pem'",
                "url",
                "need a wss:// URL",
            ),
            (
                "kind='websocket'\nurl='wss://127.0.0.1:9/'\ntls_key='/k.pem'",
                "tls_cert",
                "needs tls_cert",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nheaders={Upgrade='x'}",
                "headers",
                "itself",
            ),
            (
                "kind='websocket'\nurl='ws://127.0.0.1:9/'\nsubprotocol='a b'",
                "subprotocol",
                "token",
            ),
        ] {
            let e = sinks(extra).unwrap_err();
            assert_eq!(e.path, format!("sink[1].{key}"), "{extra}");
            assert!(e.message.contains(words), "{extra}: {e}");
        }
    }

    #[test]
    fn sources_are_checked() {
        let src = |extra: &str| {
            Config::parse(&format!(
                "[[listener]]\nbind='127.0.0.1:1'\n[[listener.route]]\npath='/e'\nkind='echo'\n\
                 [[source]]\n{extra}\n"
            ))
        };
        let ok = src("url='ws://127.0.0.1:9/x'\ntopic='t'\nreconnect_max_attempts=5").unwrap();
        let s = &ok.sources[0];
        assert_eq!(
            (s.name.as_str(), s.backoff.max_attempts),
            ("source0", Some(5))
        );
        assert_eq!(s.backoff.cap(1), Duration::from_millis(500));
        assert_eq!(s.backoff.cap(3), Duration::from_millis(2000));
        assert_eq!(s.backoff.cap(40), Duration::from_secs(30), "capped at max");
        let off = src("enabled=false\nurl='ws://127.0.0.1:9/'\ntopic='t'").unwrap();
        assert!(off.sources.is_empty());
        for (extra, key, words) in [
            ("topic='t'", "url", "not a ws:// or wss:// URL"),
            ("url='ws://127.0.0.1:9/'", "topic", "required"),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nformat='xml'",
                "format",
                "json",
            ),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nreconnect_multiplier=0.5",
                "reconnect_multiplier",
                "1.0",
            ),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nreconnect_max_attempts=0",
                "reconnect_max_attempts",
                "-1",
            ),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nheartbeat_expect='pong'",
                "heartbeat_expect",
                "heartbeat_message",
            ),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nreconnect_initial_ms=5000\nreconnect_max_ms=10",
                "reconnect_initial_ms",
                "exceed",
            ),
            (
                "url='ws://127.0.0.1:9/'\ntopic='t'\nheaders={Upgrade='x'}",
                "headers",
                "itself",
            ),
        ] {
            let e = src(extra).unwrap_err();
            assert_eq!(e.path, format!("source[0].{key}"), "{extra}");
            assert!(e.message.contains(words), "{extra}: {e}");
        }
    }

    #[test]
    fn env_references_expand_and_missing_ones_fail_without_leaking() {
        // SAFETY-free: set_var is safe on edition 2024 only in unsafe; use a variable the
        // test process surely has instead.
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(
            expand_env_str("a${env:PATH}b").unwrap(),
            format!("a{path}b")
        );
        let e = expand_env_str("x${env:WSEDGE_SURELY_UNSET_123}").unwrap_err();
        assert!(e.contains("WSEDGE_SURELY_UNSET_123"));
        assert!(expand_env_str("${env:NAME").is_err());
        let e = Config::parse(
            "[[listener]]\nname='${env:WSEDGE_SURELY_UNSET_123}'\nbind='127.0.0.1:1'\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "listener[0].name");
    }
}
