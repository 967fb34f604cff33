//! Close status codes (RFC 6455 section 7.4) and close-frame payloads.
//!
//! This module owns the [`CloseCode`] type, the rule for which codes may appear on the wire,
//! and the parsing/encoding of close-frame payloads (a big-endian code followed by a UTF-8
//! reason). The connection state machine in [`super::conn`] uses these helpers for both the
//! close frames it receives and the ones it queues.

use std::fmt;

use super::error::ProtoError;

/// Largest reason (in bytes) that fits in a close frame: 125 bytes of control payload minus
/// the 2-byte status code.
pub const MAX_CLOSE_REASON: usize = 123;

/// A WebSocket close status code.
///
/// Any `u16` can be represented, so a received code can be reported faithfully before it is
/// judged with [`CloseCode::is_allowed_on_wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure, the purpose of the connection has been fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the endpoint is going away (server shutdown, browser navigating away).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer violated the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: the endpoint received a data type it cannot accept.
    pub const UNSUPPORTED: Self = Self(1003);
    /// 1005: reserved, means "no status code was present". Never sent on the wire.
    pub const NO_STATUS: Self = Self(1005);
    /// 1006: reserved, means "closed without a close frame". Never sent on the wire.
    pub const ABNORMAL: Self = Self(1006);
    /// 1007: a message contained data inconsistent with its type (e.g. invalid UTF-8 text).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: a message violated the endpoint's policy.
    pub const POLICY: Self = Self(1008);
    /// 1009: a frame or message was too big to process.
    pub const TOO_BIG: Self = Self(1009);
    /// 1010: (client) the server did not negotiate a mandatory extension.
    pub const MANDATORY_EXTENSION: Self = Self(1010);
    /// 1011: (server) an unexpected condition prevented fulfilling the request.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// 1013: try again later (temporary overload).
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    /// 1014: a gateway or proxy received an invalid response from the upstream server.
    pub const BAD_GATEWAY: Self = Self(1014);

    /// May a peer send this code in a close frame?
    ///
    /// 1000-1003, 1007-1014 and 3000-4999: yes; everything else (0-999, 1004, 1005, 1006,
    /// 1015, 1016-2999, >=5000): no.
    pub fn is_allowed_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The numeric value.
    pub fn as_u16(self) -> u16 {
        self.0
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        Self(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Validate a received close-frame payload and return its status code (`None` when empty).
///
/// The reason, if any, is `payload[2..]` and has been checked to be valid UTF-8.
///
/// # Errors
/// - [`ProtoError::InvalidClosePayload`] for a 1-byte payload,
/// - [`ProtoError::InvalidCloseCode`] for a code not [allowed on the wire](CloseCode::is_allowed_on_wire),
/// - [`ProtoError::InvalidCloseReason`] for a reason that is not valid UTF-8.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseCode>, ProtoError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtoError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_allowed_on_wire() {
                return Err(ProtoError::InvalidCloseCode(code.0));
            }
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(ProtoError::InvalidCloseReason);
            }
            Ok(Some(code))
        }
    }
}

/// Truncate `reason` to at most [`MAX_CLOSE_REASON`] bytes, cutting at a UTF-8 char boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    // Index 0 is always a boundary, so this terminates.
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Build a close payload (code + truncated reason) into a fixed buffer; returns the buffer and
/// the number of bytes used. No allocation.
pub fn encode_close_payload(code: CloseCode, reason: &str) -> ([u8; 125], usize) {
    let reason = truncate_reason(reason);
    let mut buf = [0u8; 125];
    buf[..2].copy_from_slice(&code.0.to_be_bytes());
    buf[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    (buf, 2 + reason.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autobahn_7_9_codes_are_rejected() {
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(code).is_allowed_on_wire(), "{code}");
        }
    }

    #[test]
    fn autobahn_7_7_codes_are_allowed() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(CloseCode(code).is_allowed_on_wire(), "{code}");
        }
    }

    #[test]
    fn parse_payloads() {
        assert_eq!(parse_close_payload(b""), Ok(None));
        assert_eq!(
            parse_close_payload(b"\x03"),
            Err(ProtoError::InvalidClosePayload)
        );
        assert_eq!(
            parse_close_payload(b"\x03\xe8bye"),
            Ok(Some(CloseCode::NORMAL))
        );
        assert_eq!(
            parse_close_payload(b"\x03\xed"),
            Err(ProtoError::InvalidCloseCode(1005))
        );
        assert_eq!(
            parse_close_payload(b"\x03\xe8\xff"),
            Err(ProtoError::InvalidCloseReason)
        );
    }

    #[test]
    fn reason_truncation_respects_char_boundaries() {
        let s = "é".repeat(100); // 200 bytes, 2 bytes per char
        let t = truncate_reason(&s);
        assert_eq!(t.len(), 122);
        let (buf, n) = encode_close_payload(CloseCode::GOING_AWAY, &s);
        assert_eq!(n, 124);
        assert_eq!(&buf[..2], &1001u16.to_be_bytes());
        assert_eq!(truncate_reason("short"), "short");
    }
}
