//! wsedge: a shard-per-core WebSocket edge proxy.
//!
//! # Layout
//!
//! Dependencies point one way, from the runtime-free layers to the code that touches sockets:
//!
//! - [`proto`]: the sans-IO WebSocket protocol core (HTTP upgrade, RFC 6455 frames, masking,
//!   UTF-8 validation, close handshake, limits). No sockets, no clock. Shared by the server,
//!   the upstream client role and `wsedge-load`.
//! - [`fanout`]: broadcast topics, bounded per-subscriber queues with a lag policy, and the
//!   lock-free rings that carry batches between shards. Runtime-free.
//! - [`config`]: TOML configuration, parsed into validated types that cannot hold invalid values.
//! - [`metrics`]: plain per-shard counters, merged into Prometheus text and JSON on demand.
//! - [`shard`]: the shard runtime: one pinned thread with its own io_uring (or epoll) runtime,
//!   SO_REUSEPORT listener, connection drivers and timers per core. The only module that names
//!   the runtime or sockets.
//! - [`upstream`]: upstream `ws://` URLs and the upgrade request wsedge sends as a client
//!   (proxy routes). Runtime-free.
//! - [`ratelimit`]: token buckets for the accept rate and per-connection message limits.
//!   Runtime-free.
//! - [`schema`]: declared column schemas that ingest messages must match. Runtime-free.
//! - [`admin`]: the admin HTTP listener (`/healthz`, `/metrics`, `/stats`).
//! - [`fuzzing`]: byte-level entry points for the fuzz targets under `tests/fuzz`.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod proto;
pub mod ratelimit;
pub mod schema;
pub mod shard;
pub mod tls;
pub mod upstream;
