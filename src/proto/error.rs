//! Error types of the protocol core.
//!
//! This module owns the three error enums and their mapping to what goes on the wire:
//! [`ProtoError`] (a received frame broke RFC 6455 or a limit; maps to a close code),
//! [`SendError`] (the local application asked for something impossible) and
//! [`HandshakeError`] (the HTTP upgrade failed; maps to an HTTP status). None of them
//! allocates, so they are cheap on the hot path.

use super::close::CloseCode;

/// A protocol violation or limit breach detected while decoding frames from the peer.
///
/// Each variant documents its cause and the close code sent to the peer
/// ([`ProtoError::close_code`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A frame had RSV1/RSV2/RSV3 set that no negotiated extension allows: any RSV bit
    /// without permessage-deflate; with it, RSV2/RSV3, or RSV1 on a control or continuation
    /// frame (RFC 7692 6.1). Close code 1002.
    #[error("reserved bits set in frame header")]
    ReservedBits,
    /// A frame used a reserved opcode (3-7, 0xB-0xF); the raw opcode is attached. Close code 1002.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// Server role: a client frame was not masked (RFC 6455 5.1). Close code 1002.
    #[error("client frame is not masked")]
    UnmaskedClientFrame,
    /// Client role: a server frame was masked (RFC 6455 5.1). Close code 1002.
    #[error("server frame is masked")]
    MaskedServerFrame,
    /// A control frame (close/ping/pong) had FIN clear. Close code 1002.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame carried more than 125 payload bytes. Close code 1002.
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    /// A 64-bit payload length had its most significant bit set. Close code 1002.
    #[error("invalid payload length")]
    InvalidLength,
    /// A continuation frame arrived with no fragmented message in progress. Close code 1002.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text/binary frame arrived while a fragmented message was in progress. Close code 1002.
    #[error("expected a continuation frame")]
    ExpectedContinuation,
    /// A frame announced a payload larger than `Limits::max_frame_bytes`. Close code 1009.
    #[error("frame too large")]
    FrameTooLarge,
    /// A message (single frame or reassembled fragments) would exceed
    /// `Limits::max_message_bytes`. Close code 1009.
    #[error("message too large")]
    MessageTooLarge,
    /// A text message was not valid UTF-8 (detected as early as possible). Close code 1007.
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A close frame carried a status code that may not be sent on the wire; the code is
    /// attached. Close code 1002.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close frame had a 1-byte payload (too short for a status code). Close code 1002.
    #[error("close frame payload of 1 byte")]
    InvalidClosePayload,
    /// A close frame's reason was not valid UTF-8. Close code 1007.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    /// permessage-deflate: a compressed message is not a valid DEFLATE stream. Close code
    /// 1007.
    #[error("invalid compressed data")]
    InvalidCompressedData,
    /// permessage-deflate: a compressed message inflates to more than
    /// `Limits::max_message_bytes` (a decompression bomb, or a message too large). Detected
    /// while inflating, before the buffer grows past the limit. Close code 1009.
    #[error("inflated message too large")]
    InflatedTooLarge,
}

impl ProtoError {
    /// The close code to send to the peer for this error: 1002 for protocol errors, 1007 for
    /// invalid payload data ([`ProtoError::InvalidUtf8`], [`ProtoError::InvalidCloseReason`],
    /// [`ProtoError::InvalidCompressedData`]), 1009 for size limits
    /// ([`ProtoError::FrameTooLarge`], [`ProtoError::MessageTooLarge`],
    /// [`ProtoError::InflatedTooLarge`]).
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidUtf8 | Self::InvalidCloseReason | Self::InvalidCompressedData => {
                CloseCode::INVALID_PAYLOAD
            }
            Self::FrameTooLarge | Self::MessageTooLarge | Self::InflatedTooLarge => {
                CloseCode::TOO_BIG
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short static reason for the close frame sent to the peer (no allocation, < 123 bytes).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReservedBits => "reserved bits set",
            Self::UnknownOpcode(_) => "unknown opcode",
            Self::UnmaskedClientFrame => "client frame not masked",
            Self::MaskedServerFrame => "server frame masked",
            Self::FragmentedControl => "fragmented control frame",
            Self::ControlTooLong => "control frame too long",
            Self::InvalidLength => "invalid payload length",
            Self::UnexpectedContinuation => "unexpected continuation frame",
            Self::ExpectedContinuation => "expected continuation frame",
            Self::FrameTooLarge => "frame too large",
            Self::MessageTooLarge => "message too large",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::InvalidCloseCode(_) => "invalid close code",
            Self::InvalidClosePayload => "invalid close payload",
            Self::InvalidCloseReason => "invalid close reason",
            Self::InvalidCompressedData => "invalid compressed data",
            Self::InflatedTooLarge => "message too large",
        }
    }
}

/// The local application asked [`super::Conn`] to send something it cannot send.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// A close frame was already queued (by `close`, by echoing the peer's close or after a
    /// protocol error) or the connection is closed: nothing more may be sent. Not sent on the
    /// wire; the connection is unchanged.
    #[error("connection is closing or closed")]
    Closed,
    /// A ping/pong payload longer than 125 bytes. Nothing was queued.
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    /// `close` was called with a code that may not be sent on the wire (e.g. 1005, 1006);
    /// the code is attached. Nothing was queued.
    #[error("close code {0} may not be sent on the wire")]
    InvalidCloseCode(u16),
}

/// The HTTP upgrade handshake failed.
///
/// Server-side variants map to the HTTP status that should be answered
/// ([`HandshakeError::status`], [`HandshakeError::write_response`]); client-side variants
/// (parsing the upstream's response) map to 502, the status a proxy answers its own client
/// with when the upstream misbehaves.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The request (or response) header block exceeded `max_request_bytes`, complete or not.
    /// Status 431.
    #[error("request header block too large")]
    RequestTooLarge,
    /// More header lines than `max_headers`. Status 431.
    #[error("too many headers")]
    TooManyHeaders,
    /// The bytes are not a well-formed HTTP/1.x request (httparse rejected them). Status 400.
    #[error("malformed HTTP request")]
    MalformedRequest,
    /// The method was not GET. Status 405 (answered with `Allow: GET`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request was HTTP/1.0; WebSocket needs HTTP/1.1. Status 400.
    #[error("HTTP/1.1 required")]
    UnsupportedHttpVersion,
    /// A header value was not valid UTF-8. Status 400.
    #[error("header value is not valid UTF-8")]
    InvalidHeaderValue,
    /// No (or an empty) `Host` header. Status 400.
    #[error("missing Host header")]
    MissingHost,
    /// `Host` or `Sec-WebSocket-Key` appeared more than once; the header name is attached.
    /// Status 400.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// No `Upgrade` header with the token `websocket`. Status 400.
    #[error("not a WebSocket upgrade")]
    NotUpgrade,
    /// No `Connection` header with the token `upgrade`. Status 400.
    #[error("missing Connection: Upgrade")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` missing or not exactly `13`. Status 426 (answered with
    /// `Sec-WebSocket-Version: 13`).
    #[error("unsupported WebSocket version")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing or not the base64 encoding of exactly 16 bytes. Status 400.
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
    /// The upgrade request announced a body (`Transfer-Encoding`, or a non-zero
    /// `Content-Length`), whose bytes would otherwise be mistaken for frames. Status 400.
    #[error("upgrade request with a body")]
    UnexpectedBody,
    /// `Sec-WebSocket-Extensions` is not a list of extensions (RFC 6455 9.1 grammar: a token,
    /// then `; name` or `; name=value` parameters). Status 400. (A well-formed offer we
    /// cannot accept is declined, not refused.)
    #[error("malformed Sec-WebSocket-Extensions")]
    InvalidExtensions,
    /// Client role: the upstream answered with a status other than 101; it is attached.
    /// Status 502.
    #[error("unexpected status {0} in upgrade response")]
    UnexpectedStatus(u16),
    /// Client role: the upstream's response is not well-formed HTTP/1.1. Status 502.
    #[error("malformed HTTP response")]
    MalformedResponse,
    /// Client role: the 101 response lacks `Upgrade: websocket` or `Connection: Upgrade`.
    /// Status 502.
    #[error("response is not a WebSocket upgrade")]
    ResponseNotUpgrade,
    /// Client role: `Sec-WebSocket-Accept` missing or not matching our key. Status 502.
    #[error("Sec-WebSocket-Accept mismatch")]
    AcceptMismatch,
    /// Client role: the upstream selected a subprotocol we did not offer (or several).
    /// Status 502.
    #[error("unexpected Sec-WebSocket-Protocol in response")]
    UnexpectedProtocol,
    /// Client role: the upstream answered an extension we did not offer, or
    /// permessage-deflate with parameters RFC 7692 does not allow in an answer. Status 502.
    #[error("unexpected Sec-WebSocket-Extensions in response")]
    UnexpectedExtension,
}

impl HandshakeError {
    /// The HTTP status to answer the client with.
    pub fn status(&self) -> u16 {
        match self {
            Self::RequestTooLarge | Self::TooManyHeaders => 431,
            Self::MethodNotAllowed => 405,
            Self::UnsupportedVersion => 426,
            Self::MalformedRequest
            | Self::UnsupportedHttpVersion
            | Self::InvalidHeaderValue
            | Self::MissingHost
            | Self::DuplicateHeader(_)
            | Self::NotUpgrade
            | Self::MissingConnectionUpgrade
            | Self::BadKey
            | Self::UnexpectedBody
            | Self::InvalidExtensions => 400,
            Self::UnexpectedStatus(_)
            | Self::MalformedResponse
            | Self::ResponseNotUpgrade
            | Self::AcceptMismatch
            | Self::UnexpectedProtocol
            | Self::UnexpectedExtension => 502,
        }
    }

    /// A short human-readable reason, used as the body of the error response.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RequestTooLarge => "request header block too large",
            Self::TooManyHeaders => "too many request headers",
            Self::MalformedRequest => "malformed HTTP request",
            Self::MethodNotAllowed => "method not allowed: WebSocket upgrades use GET",
            Self::UnsupportedHttpVersion => "HTTP/1.1 required",
            Self::InvalidHeaderValue => "header value is not valid UTF-8",
            Self::MissingHost => "missing Host header",
            Self::DuplicateHeader(name) => {
                if name.eq_ignore_ascii_case("host") {
                    "duplicate Host header"
                } else {
                    "duplicate Sec-WebSocket-Key header"
                }
            }
            Self::NotUpgrade => "expected a WebSocket upgrade (Upgrade: websocket)",
            Self::MissingConnectionUpgrade => "expected Connection: Upgrade",
            Self::UnsupportedVersion => "unsupported Sec-WebSocket-Version (expected 13)",
            Self::BadKey => "missing or invalid Sec-WebSocket-Key",
            Self::UnexpectedBody => "upgrade request must not have a body",
            Self::InvalidExtensions => "malformed Sec-WebSocket-Extensions header",
            Self::UnexpectedStatus(_) => "upstream refused the WebSocket upgrade",
            Self::MalformedResponse => "malformed upstream response",
            Self::ResponseNotUpgrade => "upstream response is not a WebSocket upgrade",
            Self::AcceptMismatch => "upstream Sec-WebSocket-Accept mismatch",
            Self::UnexpectedProtocol => "upstream selected a subprotocol that was not offered",
            Self::UnexpectedExtension => "upstream answered an extension that was not offered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes() {
        assert_eq!(ProtoError::ReservedBits.close_code(), CloseCode(1002));
        assert_eq!(ProtoError::UnknownOpcode(3).close_code(), CloseCode(1002));
        assert_eq!(
            ProtoError::InvalidCloseCode(5).close_code(),
            CloseCode(1002)
        );
        assert_eq!(
            ProtoError::InvalidClosePayload.close_code(),
            CloseCode(1002)
        );
        assert_eq!(ProtoError::InvalidUtf8.close_code(), CloseCode(1007));
        assert_eq!(ProtoError::InvalidCloseReason.close_code(), CloseCode(1007));
        assert_eq!(ProtoError::FrameTooLarge.close_code(), CloseCode(1009));
        assert_eq!(ProtoError::MessageTooLarge.close_code(), CloseCode(1009));
        assert_eq!(ProtoError::InflatedTooLarge.close_code(), CloseCode(1009));
        assert_eq!(
            ProtoError::InvalidCompressedData.close_code(),
            CloseCode(1007)
        );
    }

    #[test]
    fn reasons_fit_in_a_close_frame() {
        let all = [
            ProtoError::ReservedBits,
            ProtoError::UnknownOpcode(0xB),
            ProtoError::UnmaskedClientFrame,
            ProtoError::MaskedServerFrame,
            ProtoError::FragmentedControl,
            ProtoError::ControlTooLong,
            ProtoError::InvalidLength,
            ProtoError::UnexpectedContinuation,
            ProtoError::ExpectedContinuation,
            ProtoError::FrameTooLarge,
            ProtoError::MessageTooLarge,
            ProtoError::InvalidUtf8,
            ProtoError::InvalidCloseCode(0),
            ProtoError::InvalidClosePayload,
            ProtoError::InvalidCloseReason,
            ProtoError::InvalidCompressedData,
            ProtoError::InflatedTooLarge,
        ];
        for e in all {
            assert!(e.reason().len() <= 123);
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn handshake_statuses() {
        assert_eq!(HandshakeError::MethodNotAllowed.status(), 405);
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert_eq!(HandshakeError::RequestTooLarge.status(), 431);
        assert_eq!(HandshakeError::TooManyHeaders.status(), 431);
        assert_eq!(HandshakeError::MissingHost.status(), 400);
        assert_eq!(HandshakeError::MissingHost.reason(), "missing Host header");
        assert_eq!(
            HandshakeError::DuplicateHeader("Host").reason(),
            "duplicate Host header"
        );
        assert_eq!(HandshakeError::UnexpectedStatus(404).status(), 502);
    }
}
