//! The configuration file as written: serde types that mirror the TOML one to one.
//!
//! Every struct denies unknown keys and takes its defaults from `Default`, so a missing key
//! means "the documented default" and a misspelled key is an error naming its path. These
//! types may hold invalid values; [`super::Config::from_raw`] turns them into validated ones.

use serde::{Deserialize, Serialize};

/// Root of the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[runtime]`: shards, I/O backend, drain.
    pub runtime: RawRuntime,
    /// `[[listener]]`: WebSocket listeners.
    pub listener: Vec<RawListener>,
    /// `[admin]`: the admin HTTP listener.
    pub admin: RawAdmin,
    /// `[[source]]`: upstream WebSocket streams published into topics.
    pub source: Vec<RawSource>,
    /// `[[sink]]`: where ingest routes deliver their batches.
    pub sink: Vec<RawSink>,
}

/// `[runtime]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// Shard count; 0 = one per available core.
    pub shards: usize,
    /// `auto`, `uring` or `epoll`.
    pub io: String,
    /// Pin shard threads to cores.
    pub pin_threads: bool,
    /// Window over which close frames are spread at shutdown.
    pub drain_window_ms: u64,
    /// Deadline for the whole drain.
    pub drain_timeout_ms: u64,
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self {
            shards: 0,
            io: "auto".into(),
            pin_threads: true,
            drain_window_ms: 2_000,
            drain_timeout_ms: 10_000,
        }
    }
}

/// `[[listener]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListener {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Socket address to bind.
    pub bind: String,
    /// Kernel accept backlog per shard socket.
    pub backlog: u32,
    /// Open connections across all shards.
    pub max_connections: usize,
    /// Upgrade request deadline.
    pub handshake_timeout_ms: u64,
    /// Upgrade request size cap.
    pub max_handshake_bytes: usize,
    /// Inbound silence before a ping.
    pub idle_timeout_ms: u64,
    /// Silence after the ping before the connection is closed.
    pub pong_timeout_ms: u64,
    /// Wait for the peer's close frame.
    pub close_timeout_ms: u64,
    /// Frame size cap.
    pub max_frame_bytes: usize,
    /// Message size cap.
    pub max_message_bytes: usize,
    /// Outbound queue cap before reads pause.
    pub max_pending_write_bytes: usize,
    /// Open connections per client IP across shards (0 = no cap).
    pub max_connections_per_ip: usize,
    /// Negotiate permessage-deflate (RFC 7692) with clients that offer it.
    pub permessage_deflate: bool,
    /// Messages shorter than this are sent uncompressed.
    pub deflate_threshold_bytes: usize,
    /// Let clients keep their compression context between messages.
    pub deflate_client_context_takeover: bool,
    /// New connections accepted per second (0 = no limit).
    pub accept_rate: u32,
    /// `[listener.tls]`: terminate TLS (wss) on this listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    /// `[[listener.route]]`.
    pub route: Vec<RawRoute>,
}

/// `[listener.tls]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// PEM certificate chain (leaf first).
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// `none`, `optional` or `required`.
    pub client_auth: String,
    /// PEM CA file for client certificates.
    pub client_ca: String,
    /// `1.2` or `1.3`.
    pub min_version: String,
    /// `[[listener.tls.sni]]`: more certificates, by server name.
    pub sni: Vec<RawSni>,
}

/// `[[listener.tls.sni]]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSni {
    /// Server names this certificate is for (`*.example.com` allowed).
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

impl Default for RawListener {
    fn default() -> Self {
        Self {
            name: String::new(),
            bind: "127.0.0.1:8080".into(),
            backlog: 1024,
            max_connections: 100_000,
            handshake_timeout_ms: 5_000,
            max_handshake_bytes: 8192,
            idle_timeout_ms: 60_000,
            pong_timeout_ms: 10_000,
            close_timeout_ms: 5_000,
            max_frame_bytes: 16 << 20,
            max_message_bytes: 16 << 20,
            max_pending_write_bytes: 1 << 20,
            max_connections_per_ip: 0,
            permessage_deflate: true,
            deflate_threshold_bytes: 512,
            deflate_client_context_takeover: false,
            accept_rate: 0,
            tls: None,
            route: Vec::new(),
        }
    }
}

/// `[[listener.route]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Request path, exact match.
    pub path: String,
    /// What the route does: `echo`, `publish`, `subscribe` or `pubsub`.
    pub kind: String,
    /// Subprotocols the route speaks, in preference order.
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// Origins allowed to connect (empty = any).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Inbound messages per second per connection (0 = no limit).
    #[serde(default)]
    pub max_messages_per_second: u32,
    /// Inbound payload bytes per second per connection (0 = no limit).
    #[serde(default)]
    pub max_bytes_per_second: u64,
    /// Bearer tokens accepted (empty = no authentication).
    #[serde(default)]
    pub bearer_tokens: Vec<String>,
    /// Client certificate names (CN or DNS/URI SAN) accepted (empty = not checked).
    #[serde(default)]
    pub client_cert_names: Vec<String>,
    /// Upstream TLS (proxy routes to wss://): CA file ("" = system roots).
    #[serde(default)]
    pub tls_ca: String,
    /// Upstream TLS: client certificate file ("" = none).
    #[serde(default)]
    pub tls_cert: String,
    /// Upstream TLS: client key file.
    #[serde(default)]
    pub tls_key: String,
    /// Upstream TLS: SNI / verified name ("" = the URL's host).
    #[serde(default)]
    pub tls_server_name: String,
    /// Upstream TLS: accept any certificate (testing only).
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// HMAC secret for HS256 JWTs ("" = none).
    #[serde(default)]
    pub jwt_secret: String,
    /// PEM public key (RSA or EC P-256) for RS256/ES256 JWTs ("" = none).
    #[serde(default)]
    pub jwt_public_key_file: String,
    /// Required `aud` ("" = not checked).
    #[serde(default)]
    pub jwt_audience: String,
    /// Required `iss` ("" = not checked).
    #[serde(default)]
    pub jwt_issuer: String,
    /// Claim listing the topics the token may use ("" = any topic).
    #[serde(default)]
    pub jwt_topics_claim: String,
    /// Sink that receives the messages (ingest routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// `text` or `json` (ingest routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// `continue` or `close` on an invalid message (ingest routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    /// Sink for invalid messages ("" = none; ingest routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Connection facts wrapped around every message: `peer`, `tls`, `path`, `client_cert`,
    /// `header:<name>` (ingest routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Vec<String>>,
    /// Declared columns every message must match (ingest routes with format json only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Vec<RawColumn>>,
    /// `allow` or `refuse` object keys that are not columns (ingest routes with a schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_extra_fields: Option<String>,
    /// Subscriber queue cap in bytes (subscribe and pubsub routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_bytes: Option<usize>,
    /// Subscriber queue cap in messages (subscribe and pubsub routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_messages: Option<usize>,
    /// `drop_oldest`, `drop_newest` or `close` (subscribe and pubsub routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_policy: Option<String>,
    /// `ws://` URL of the upstream (proxy routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Upstream TCP connect + handshake deadline (proxy routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Headers added to the upstream upgrade request (proxy routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// Offer permessage-deflate to the upstream (proxy routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_permessage_deflate: Option<bool>,
}

/// One `schema` entry of an ingest route: `{ name = "id", type = "integer", nullable = false }`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumn {
    /// The object key.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `object`, `array` or `timestamp`.
    #[serde(rename = "type")]
    pub ty: String,
    /// May the key be missing or null (default `false`: required).
    #[serde(default)]
    pub nullable: bool,
}

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Serve the admin listener at all.
    pub enabled: bool,
    /// Socket address to bind.
    pub bind: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "127.0.0.1:9090".into(),
        }
    }
}

/// `[[source]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// Name in logs and metric labels.
    pub name: String,
    /// Connect at startup.
    pub enabled: bool,
    /// `ws://` URL of the upstream.
    pub url: String,
    /// Topic every received message is published to.
    pub topic: String,
    /// Headers added to the upgrade request.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Subprotocol to ask for ("" = none).
    pub subprotocol: String,
    /// Messages sent after every (re)connect, in order.
    pub subscribe: Vec<String>,
    /// `text`, `binary` or `json`.
    pub format: String,
    /// TCP connect + handshake deadline.
    pub connect_timeout_ms: u64,
    /// WebSocket ping period (0 = no pings).
    pub ping_interval_ms: u64,
    /// Silence after which the connection is considered dead.
    pub pong_timeout_ms: u64,
    /// Application-level heartbeat message ("" = none).
    pub heartbeat_message: String,
    /// Heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Reply that proves the heartbeat was answered ("" = any traffic counts).
    pub heartbeat_expect: String,
    /// First reconnect delay cap.
    pub reconnect_initial_ms: u64,
    /// Largest reconnect delay cap.
    pub reconnect_max_ms: u64,
    /// Growth of the delay cap per failed attempt.
    pub reconnect_multiplier: f64,
    /// Consecutive failed attempts before giving up; -1 = forever.
    pub reconnect_max_attempts: i64,
    /// wss:// only: CA file ("" = system roots).
    pub tls_ca: String,
    /// wss:// only: client certificate file ("" = none).
    pub tls_cert: String,
    /// wss:// only: client key file.
    pub tls_key: String,
    /// wss:// only: SNI / verified name ("" = the URL's host).
    pub tls_server_name: String,
    /// wss:// only: accept any certificate (testing only).
    pub tls_insecure_skip_verify: bool,
    /// Offer permessage-deflate to the upstream.
    pub permessage_deflate: bool,
}

impl Default for RawSource {
    fn default() -> Self {
        Self {
            name: String::new(),
            enabled: true,
            url: String::new(),
            topic: String::new(),
            headers: Default::default(),
            subprotocol: String::new(),
            subscribe: Vec::new(),
            format: "text".into(),
            connect_timeout_ms: 5_000,
            ping_interval_ms: 20_000,
            pong_timeout_ms: 10_000,
            heartbeat_message: String::new(),
            heartbeat_interval_ms: 30_000,
            heartbeat_expect: String::new(),
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            reconnect_multiplier: 2.0,
            reconnect_max_attempts: -1,
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_server_name: String::new(),
            tls_insecure_skip_verify: false,
            permessage_deflate: false,
        }
    }
}

/// `[[sink]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSink {
    /// Name routes refer to.
    pub name: String,
    /// `file` or `websocket`.
    pub kind: String,
    /// File sinks: the path (created on the first batch).
    pub path: String,
    /// `ndjson` or `json_array`.
    pub framing: String,
    /// `none`, `gzip` or `zstd`.
    pub compression: String,
    /// File sinks: rotate when the file would exceed this many bytes (0 = never).
    pub rotate_bytes: u64,
    /// A batch is written at this many messages...
    pub max_batch_messages: usize,
    /// ...or bytes...
    pub max_batch_bytes: usize,
    /// ...or this long after its first message.
    pub max_batch_delay_ms: u64,
    /// Chunks queued between the shards and the sink before ingest clients stop being read.
    pub buffer_chunks: usize,
    /// WebSocket sinks: `ws://` or `wss://` URL of the upstream.
    pub url: String,
    /// WebSocket sinks: headers added to the upgrade request.
    pub headers: std::collections::BTreeMap<String, String>,
    /// WebSocket sinks: subprotocol to ask for ("" = none).
    pub subprotocol: String,
    /// WebSocket sinks: TCP connect + handshake deadline.
    pub connect_timeout_ms: u64,
    /// WebSocket sinks: the pong confirming written batches must arrive within this.
    pub ack_timeout_ms: u64,
    /// WebSocket sinks: at shutdown, time allowed to deliver and confirm pending batches.
    pub flush_timeout_ms: u64,
    /// WebSocket sinks: unconfirmed batches held before the sink stops taking chunks.
    pub max_pending_batches: usize,
    /// WebSocket sinks: ...or bytes of them.
    pub max_pending_bytes: usize,
    /// WebSocket sinks: first reconnect delay cap.
    pub reconnect_initial_ms: u64,
    /// WebSocket sinks: largest reconnect delay cap.
    pub reconnect_max_ms: u64,
    /// WebSocket sinks: growth of the delay cap per failed attempt.
    pub reconnect_multiplier: f64,
    /// WebSocket sinks: consecutive failed attempts before giving up; -1 = forever.
    pub reconnect_max_attempts: i64,
    /// wss:// only: CA file ("" = system roots).
    pub tls_ca: String,
    /// wss:// only: client certificate file ("" = none).
    pub tls_cert: String,
    /// wss:// only: client key file.
    pub tls_key: String,
    /// wss:// only: SNI / verified name ("" = the URL's host).
    pub tls_server_name: String,
    /// wss:// only: accept any certificate (testing only).
    pub tls_insecure_skip_verify: bool,
}

impl Default for RawSink {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: "file".into(),
            path: String::new(),
            framing: "ndjson".into(),
            compression: "none".into(),
            rotate_bytes: 0,
            max_batch_messages: 1000,
            max_batch_bytes: 1 << 20,
            max_batch_delay_ms: 100,
            buffer_chunks: 64,
            url: String::new(),
            headers: Default::default(),
            subprotocol: String::new(),
            connect_timeout_ms: 5_000,
            ack_timeout_ms: 10_000,
            flush_timeout_ms: 5_000,
            max_pending_batches: 64,
            max_pending_bytes: 64 << 20,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            reconnect_multiplier: 2.0,
            reconnect_max_attempts: -1,
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_server_name: String::new(),
            tls_insecure_skip_verify: false,
        }
    }
}
