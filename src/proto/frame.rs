//! Frame headers: opcodes, decoding and encoding (RFC 6455 section 5.2).
//!
//! This module owns the wire layout of a frame header (FIN, RSV1-3, opcode, MASK, 7/16/64-bit
//! payload length, masking key) and nothing else: it does not judge whether a header is
//! acceptable for a connection (reserved bits, opcodes, masking direction, limits). That policy
//! lives in [`super::conn`], which needs the raw fields to pick the right close code.
//!
//! Decoding is a cheap bounds check that returns `Ok(None)` while the header is incomplete;
//! encoding appends to a caller-provided `Vec` so the outbound buffer is reused.

use super::error::ProtoError;
use super::mask::apply_mask;

/// A frame opcode defined by RFC 6455. Reserved opcodes have no variant; see
/// [`OpCode::from_u8`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continuation of a fragmented message.
    Continuation,
    /// 0x1: first (or only) frame of a text message.
    Text,
    /// 0x2: first (or only) frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Is this a control opcode (close, ping, pong)?
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }

    /// The opcode for a raw 4-bit value, `None` for reserved values (3-7, 0xB-0xF) and
    /// anything above 0xF.
    pub fn from_u8(raw: u8) -> Option<Self> {
        match raw {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// The raw 4-bit value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }
}

/// A decoded frame header, with raw fields (nothing validated beyond the wire structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the final fragment of a message.
    pub fin: bool,
    /// RSV1..RSV3 as a 3-bit value (RSV1 = 0b100).
    pub rsv: u8,
    /// The raw 4-bit opcode (may be a reserved value).
    pub opcode: u8,
    /// The masking key, if the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes (at most 2^63 - 1).
    pub payload_len: u64,
}

/// The longest possible header: 2 + 8 (64-bit length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// Parse a header. `Ok(None)` = need more bytes. Returns header and header length in bytes.
///
/// Errors only for structurally impossible headers (64-bit length with MSB set ->
/// [`ProtoError::InvalidLength`]); non-minimal length encodings are allowed.
#[inline]
pub fn decode_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtoError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let (payload_len, rest) = match b1 & 0x7F {
        126 => {
            let [hi, lo, rest @ ..] = rest else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([*hi, *lo])), rest)
        }
        127 => {
            let Some((len, rest)) = rest.split_first_chunk::<8>() else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(*len);
            if len >> 63 != 0 {
                return Err(ProtoError::InvalidLength);
            }
            (len, rest)
        }
        short => (u64::from(short), rest),
    };
    let mask = if b1 & 0x80 != 0 {
        let Some((key, _)) = rest.split_first_chunk::<4>() else {
            return Ok(None);
        };
        Some(*key)
    } else {
        None
    };
    let header_len = buf.len() - rest.len() + if mask.is_some() { 4 } else { 0 };
    let header = FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
    };
    Ok(Some((header, header_len)))
}

/// Length of the header [`encode_header`] writes for this payload length and masking.
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    if masked { base + 4 } else { base }
}

/// Append an encoded header (2..=14 bytes) to `out`, using the minimal length encoding.
pub fn encode_header(
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    let b0 = (u8::from(fin) << 7) | opcode.as_u8();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut header = [0u8; MAX_HEADER_LEN];
    header[0] = b0;
    let mut n = match payload_len {
        // The match arm bounds make these casts lossless.
        0..=125 => {
            header[1] = mask_bit | payload_len as u8;
            2
        }
        126..=0xFFFF => {
            header[1] = mask_bit | 126;
            header[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            header[1] = mask_bit | 127;
            header[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        header[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    out.extend_from_slice(&header[..n]);
}

/// Append a whole frame (header + payload, masking the payload copy if `mask` is `Some`).
pub fn encode_frame(
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    out.reserve(header_len(payload.len(), mask.is_some()) + payload.len());
    encode_header(fin, opcode, payload.len(), mask, out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// RSV1 in the first header byte: the message is compressed (RFC 7692 6).
pub const RSV1: u8 = 0x40;

/// Append a whole frame with RSV1 set: the first (here: only) frame of a message compressed
/// with permessage-deflate.
pub fn encode_compressed_frame(
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    encode_frame(true, opcode, payload, mask, out);
    out[start] |= RSV1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn opcodes_round_trip() {
        for raw in 0u8..=0xFF {
            match OpCode::from_u8(raw) {
                Some(op) => {
                    assert_eq!(op.as_u8(), raw);
                    assert_eq!(op.is_control(), raw & 0x8 != 0);
                }
                None => assert!(matches!(raw, 3..=7 | 0xB..)),
            }
        }
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 5.7: single-frame unmasked text "Hello".
        let mut out = Vec::new();
        encode_frame(true, OpCode::Text, b"Hello", None, &mut out);
        assert_eq!(out, b"\x81\x05Hello");
        // Masked "Hello".
        out.clear();
        encode_frame(
            true,
            OpCode::Text,
            b"Hello",
            Some([0x37, 0xfa, 0x21, 0x3d]),
            &mut out,
        );
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        let (h, n) = decode_header(&out).unwrap().unwrap();
        assert_eq!(n, 6);
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(h.payload_len, 5);
        assert!(h.fin);
        assert_eq!(h.opcode, 1);
    }

    #[test]
    fn length_boundaries() {
        for (len, hlen) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            encode_header(true, OpCode::Binary, len, None, &mut out);
            assert_eq!(out.len(), hlen);
            assert_eq!(header_len(len, false), hlen);
            let (h, n) = decode_header(&out).unwrap().unwrap();
            assert_eq!((h.payload_len, n), (len as u64, hlen));
            // Every strict prefix is "incomplete".
            for cut in 0..hlen {
                assert_eq!(decode_header(&out[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn msb_length_is_invalid_and_non_minimal_is_allowed() {
        let mut buf = vec![0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_header(&buf), Err(ProtoError::InvalidLength));
        // Incomplete 64-bit length: no error yet.
        assert_eq!(decode_header(&buf[..9]), Ok(None));
        buf[2] = 0;
        buf[9] = 5; // length 5 in the 64-bit form
        assert_eq!(decode_header(&buf).unwrap().unwrap().0.payload_len, 5);
        assert_eq!(
            decode_header(&[0x82, 0x7E, 0, 5])
                .unwrap()
                .unwrap()
                .0
                .payload_len,
            5
        );
    }

    #[test]
    fn raw_fields() {
        let (h, _) = decode_header(&[0x7B, 0x00]).unwrap().unwrap();
        assert!(!h.fin);
        assert_eq!(h.rsv, 0b111);
        assert_eq!(h.opcode, 0xB);
        assert_eq!(h.mask, None);
    }

    proptest! {
        #[test]
        fn decode_encode_identity(
            fin in any::<bool>(),
            op in prop::sample::select(vec![OpCode::Continuation, OpCode::Text, OpCode::Binary, OpCode::Close, OpCode::Ping, OpCode::Pong]),
            len in prop_oneof![0usize..300, 65500usize..65600, Just(1usize << 40)],
            mask in any::<Option<[u8; 4]>>(),
            trailing in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut out = Vec::new();
            encode_header(fin, op, len, mask, &mut out);
            let hlen = out.len();
            out.extend_from_slice(&trailing);
            let (h, n) = decode_header(&out).unwrap().unwrap();
            prop_assert_eq!(n, hlen);
            prop_assert_eq!(h, FrameHeader { fin, rsv: 0, opcode: op.as_u8(), mask, payload_len: len as u64 });
        }

        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(Some((h, n))) = decode_header(&buf) {
                prop_assert!(n <= buf.len() && (2..=MAX_HEADER_LEN).contains(&n));
                prop_assert!(h.payload_len >> 63 == 0);
            }
        }

        #[test]
        fn frame_payload_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..200), key in any::<[u8; 4]>()) {
            let mut out = Vec::new();
            encode_frame(true, OpCode::Binary, &payload, Some(key), &mut out);
            let (h, n) = decode_header(&out).unwrap().unwrap();
            prop_assert_eq!(h.payload_len as usize, payload.len());
            let mut body = out[n..].to_vec();
            apply_mask(&mut body, key, 0);
            prop_assert_eq!(body, payload);
        }
    }
}
