//! The sans-IO WebSocket protocol core (RFC 6455, RFC 7692).
//!
//! This module owns everything that is "just bytes" about WebSocket: the HTTP/1.1 upgrade
//! handshake in both roles ([`handshake`]), frame headers ([`frame`]), payload masking
//! ([`mask`]), incremental UTF-8 validation of text messages ([`utf8`]), close codes
//! ([`close`]), the permessage-deflate extension ([`deflate`], RFC 7692) and the
//! per-connection state machine ([`conn`]) that ties them together, enforces the RFC's rules
//! and the configured size limits, answers pings and runs the close handshake.
//!
//! Nothing here touches a socket, a clock or a random number generator: callers feed received
//! bytes in, take events and bytes to transmit out, and supply entropy (handshake nonces, the
//! client mask seed) themselves. That keeps the core deterministic and fuzzable.
//!
//! Typical server-side use:
//!
//! 1. accumulate bytes until [`handshake::parse_request`] returns a request, answer with
//!    [`handshake::write_response_101`] (or [`HandshakeError::write_response`]);
//! 2. create a [`Conn`] with [`Role::Server`], hand it the bytes left after the request;
//! 3. loop: [`Conn::handle_input`], drain [`Conn::poll_event`], write out what
//!    [`Conn::poll_transmit`] returns; close the socket once [`Conn::state`] is
//!    [`State::Closed`] or [`State::Failed`] and everything has been flushed.

pub mod close;
pub mod conn;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use close::CloseCode;
pub use conn::Limits;
pub use conn::{Conn, Event, MessageKind, Role, State};
pub use deflate::{Compressor, DeflateConfig, DeflateParams, DeflateStats};
pub use error::{HandshakeError, ProtoError, SendError};
pub use frame::{FrameHeader, OpCode};
pub use handshake::{HandshakeLimits, UpgradeRequest, UpgradeResponse};
