//! Byte-level entry points for the fuzz targets under `tests/fuzz`.
//!
//! This module owns the fuzzing harnesses: each function takes arbitrary bytes, drives part of
//! the protocol core with them and asserts the invariants that must hold for any input
//! (no panic, bounded buffers, consistent state, well-formed output). The fuzz targets are
//! thin wrappers, and the unit tests below run the same functions over random inputs so the
//! harnesses themselves stay correct.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::proto::close::CloseCode;
use crate::proto::conn::{Conn, Event, Limits, MessageKind, Role, State};
use crate::proto::deflate::{Compressor, DeflateParams};
use crate::proto::error::ProtoError;
use crate::proto::frame::{OpCode, encode_frame};
use crate::proto::handshake::{HandshakeLimits, parse_request, parse_response, write_response_101};
use crate::proto::mask::{apply_mask, apply_mask_scalar};

/// Feed `data` to a server-role [`Conn`] in chunks whose sizes are derived from the data, and
/// check: no panic; after an `Err` the state is `Failed` and a close frame is pending (the
/// first time; later input is ignored); outbound frames decode with a client `Conn` without
/// error (pongs answer pings in order, a failure's close carries its close code); every text
/// message is valid UTF-8; no message exceeds the limits; leftover input stays bounded.
pub fn fuzz_frame_decoder(data: &[u8]) {
    let limits = Limits {
        max_frame_bytes: 64 << 10,
        max_message_bytes: 128 << 10,
    };
    let mut server = Conn::new(Role::Server, limits.clone());
    let mut peer = Conn::new(Role::Client, Limits::default());
    let mut rng = seed_from(data);
    let mut buf = BytesMut::new();
    let mut rest = data;
    let mut failure: Option<CloseCode> = None;
    let mut unanswered_pings = VecDeque::new();
    let mut peer_saw_close = false;
    let mut wire = Vec::new();

    while !rest.is_empty() {
        let n = chunk_len(&mut rng, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);

        let before = server.state();
        match server.handle_input(&mut buf) {
            Ok(()) => {}
            Err(err) => {
                assert!(failure.is_none(), "a failed connection must ignore input");
                assert_eq!(server.state(), State::Failed);
                assert!(buf.is_empty());
                if before == State::Open {
                    assert!(server.pending_transmit() > 0, "no close frame queued");
                }
                failure = Some(err.close_code());
            }
        }
        // Leftover input is a partial header or a partial payload of an accepted frame.
        assert!(buf.len() <= limits.max_frame_bytes.max(13));
        if matches!(server.state(), State::Closed | State::Failed) {
            assert!(buf.is_empty());
        }

        while let Some(event) = server.poll_event() {
            match event {
                Event::Message { kind, data } => {
                    assert!(data.len() <= limits.max_message_bytes);
                    if kind == MessageKind::Text {
                        assert!(std::str::from_utf8(&data).is_ok());
                    }
                }
                Event::Ping(p) => {
                    assert!(p.len() <= 125);
                    unanswered_pings.push_back(p);
                }
                Event::Pong(p) => assert!(p.len() <= 125),
                Event::Close { code, reason } => {
                    assert!(code.is_none_or(|c| c.is_allowed_on_wire()));
                    assert!(std::str::from_utf8(&reason).is_ok());
                    assert_eq!(server.state(), State::Closed);
                }
            }
        }

        // Everything the server sends must be valid for a client.
        wire.clear();
        server.poll_transmit(&mut wire);
        let mut out = BytesMut::from(&wire[..]);
        if let Err(e) = peer.handle_input(&mut out) {
            panic!("server sent invalid frames: {e}");
        }
        while let Some(event) = peer.poll_event() {
            match event {
                Event::Pong(p) => {
                    assert_eq!(unanswered_pings.pop_front(), Some(p), "pong without ping");
                }
                Event::Close { code, .. } => {
                    peer_saw_close = true;
                    if let Some(expected) = failure {
                        assert_eq!(code, Some(expected));
                    }
                }
                other => panic!("unexpected frame from the server: {other:?}"),
            }
        }
    }
    if failure.is_some() || server.state() == State::Closed {
        assert!(peer_saw_close, "no close frame reached the peer");
    }
}

/// [`parse_request`] on `data` with small limits, and [`parse_response`] on the same bytes.
/// Checks: a parsed request's `consumed` is within `data` and the limit, and our 101 answer to
/// it is accepted by the client-side parser; an error's `write_response` is a parseable HTTP
/// response whose status is `err.status()`.
pub fn fuzz_handshake(data: &[u8]) {
    let limits = HandshakeLimits {
        max_request_bytes: 1024,
        max_headers: 16,
    };
    match parse_request(data, &limits) {
        Ok(Some((req, consumed))) => {
            assert!(consumed <= data.len() && consumed <= limits.max_request_bytes);
            let offered: Vec<&str> = req.protocols.iter().map(String::as_str).collect();
            let selected = offered.first().copied();
            let mut out = Vec::new();
            write_response_101(&req.key, selected, &[], &mut out);
            let parsed = parse_response(&out, &req.key, &offered, &HandshakeLimits::default());
            match parsed {
                Ok(Some((resp, n))) => {
                    assert_eq!(n, out.len());
                    assert_eq!(resp.protocol.as_deref(), selected);
                }
                other => panic!("our own 101 was rejected: {other:?}"),
            }
        }
        Ok(None) => assert!(data.len() < limits.max_request_bytes),
        Err(err) => {
            let mut out = Vec::new();
            err.write_response(&mut out);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&out) {
                Ok(httparse::Status::Complete(n)) => {
                    assert_eq!(resp.code, Some(err.status()));
                    assert_eq!(out.len() - n, err.reason().len() + 1);
                }
                other => panic!("unparseable error response: {other:?}"),
            }
        }
    }
    // The client-side parser must cope with the same garbage.
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    if let Ok(Some((_, consumed))) = parse_response(data, key, &["chat"], &limits) {
        assert!(consumed <= data.len());
    }
}

/// permessage-deflate, differential: the first input byte picks a message size limit, the
/// message kind and a split into frames; the rest is the compressed payload of one message.
/// A server [`Conn`] that negotiated the extension is fed those frames in data-derived
/// chunks, and must agree with a one-shot inflate of the payload into a buffer of
/// `limit + 1` bytes: the same message, [`ProtoError::InflatedTooLarge`] when that buffer
/// fills, [`ProtoError::InvalidCompressedData`] when the stream is invalid. Text messages must
/// be valid UTF-8 or fail with 1007. Then the payload itself is compressed with
/// [`Compressor`] (windows 9 and 15) and must inflate back to itself.
pub fn fuzz_inflate(data: &[u8]) {
    let [flags, payload @ ..] = data else {
        return;
    };
    let limit = [1usize, 100, 4096, 1 << 17][usize::from(flags & 3)];
    let text = flags & 4 != 0;
    let pieces = 1 + usize::from((flags >> 3) & 7);
    let params = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: flags & 0x40 == 0,
        ..DeflateParams::default()
    };
    let limits = Limits {
        max_frame_bytes: 1 << 20,
        max_message_bytes: limit,
    };
    let mut server = Conn::new(Role::Server, limits);
    server.set_deflate(&params, 0);
    let op = if text { OpCode::Text } else { OpCode::Binary };
    let step = payload.len() / pieces + 1;
    let mut wire = Vec::new();
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[]]
    } else {
        payload.chunks(step).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        let start = wire.len();
        let opcode = if i == 0 { op } else { OpCode::Continuation };
        encode_frame(
            i + 1 == chunks.len(),
            opcode,
            c,
            Some([1, 2, 3, 4]),
            &mut wire,
        );
        if i == 0 {
            wire[start] |= 0x40;
        }
    }
    let mut rng = seed_from(data);
    let mut buf = BytesMut::new();
    let mut rest = &wire[..];
    let mut ours = Ok(());
    while !rest.is_empty() && ours.is_ok() {
        let n = chunk_len(&mut rng, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        ours = server.handle_input(&mut buf);
    }
    let delivered: Vec<Event> = std::iter::from_fn(|| server.poll_event()).collect();
    let reference = reference_inflate(payload, limit);
    match (&ours, &reference) {
        (Ok(()), Ok(expected)) => match &delivered[..] {
            [Event::Message { kind, data }] => {
                assert_eq!(&data[..], &expected[..]);
                assert_eq!(*kind == MessageKind::Text, text);
                if text {
                    assert!(std::str::from_utf8(data).is_ok());
                }
            }
            other => panic!("expected one message, got {other:?}"),
        },
        (Err(ProtoError::InvalidUtf8), Ok(expected)) => {
            assert!(text && std::str::from_utf8(expected).is_err());
        }
        (Err(e), Err(r)) if text && *e == ProtoError::InvalidUtf8 => {
            // Invalid text seen before the stream's own end.
            assert!(matches!(
                r,
                ProtoError::InflatedTooLarge | ProtoError::InvalidCompressedData
            ));
        }
        (Err(e), Err(r)) => assert_eq!(e, r),
        (o, r) => panic!("ours {o:?}, reference {r:?}"),
    }
    if let Err(e) = &ours {
        assert_eq!(server.state(), State::Failed);
        assert!(matches!(e.close_code().0, 1007 | 1009), "{e:?}");
        assert!(!server.holds_inflate_state());
    }

    // Our compressor on arbitrary data: what it produces inflates back.
    let mut z = Compressor::default();
    for bits in [9, 15] {
        if let Some(c) = z.compress(payload, bits) {
            assert!(c.len() < payload.len());
            assert_eq!(
                reference_inflate(c, payload.len()).as_deref(),
                Ok(payload),
                "window {bits}"
            );
        }
    }
}

/// Inflate `payload` + the sync-flush tail in one go into a buffer of `limit + 1` bytes.
fn reference_inflate(payload: &[u8], limit: usize) -> Result<Vec<u8>, ProtoError> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = vec![0u8; limit + 1];
    let mut written = 0;
    let mut inp = &input[..];
    loop {
        let (bi, bo) = (d.total_in(), d.total_out());
        let result = d.decompress(inp, &mut out[written..], flate2::FlushDecompress::Sync);
        let consumed = (d.total_in() - bi) as usize;
        let produced = (d.total_out() - bo) as usize;
        let Ok(status) = result else {
            // Output that fills the buffer comes before the invalid data in stream order:
            // an inflater fed the stream in pieces meets the size limit first.
            return Err(if written + produced > limit {
                ProtoError::InflatedTooLarge
            } else {
                ProtoError::InvalidCompressedData
            });
        };
        inp = &inp[consumed..];
        written += produced;
        if written > limit {
            return Err(ProtoError::InflatedTooLarge);
        }
        if status == flate2::Status::StreamEnd || inp.is_empty() || (consumed == 0 && produced == 0)
        {
            break;
        }
    }
    out.truncate(written);
    Ok(out)
}

/// Differential test: [`apply_mask`] vs [`apply_mask_scalar`], with key, offset and sub-slice
/// start taken from the data.
pub fn fuzz_mask(data: &[u8]) {
    let [k0, k1, k2, k3, o0, o1, start, payload @ ..] = data else {
        return;
    };
    let key = [*k0, *k1, *k2, *k3];
    let offset = usize::from(u16::from_le_bytes([*o0, *o1]));
    let start = usize::from(*start % 8).min(payload.len());
    let mut fast = payload.to_vec();
    let mut slow = payload.to_vec();
    apply_mask(&mut fast[start..], key, offset);
    apply_mask_scalar(&mut slow[start..], key, offset);
    assert_eq!(fast, slow);
}

/// A non-zero PRNG seed from the input (FNV-1a over the first 8 bytes and the length).
fn seed_from(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ data.len() as u64;
    for &b in data.iter().take(8) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The next chunk size in `1..=remaining`: mostly small (to split headers and code points),
/// sometimes large (to exercise whole-frame fast paths).
fn chunk_len(rng: &mut u64, remaining: usize) -> usize {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let r = *rng as usize;
    let max = match r % 4 {
        0 => 1,
        1 => 16,
        2 => 256,
        _ => remaining,
    };
    1 + (r >> 8) % max.min(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_header;
    use proptest::prelude::*;

    /// Inputs that look like frame streams, so the decoder harness goes deep.
    fn frame_stream() -> impl Strategy<Value = Vec<u8>> {
        let frame = (
            any::<bool>(),
            prop_oneof![
                Just(0u8),
                Just(1),
                Just(2),
                Just(8),
                Just(9),
                Just(10),
                0u8..16
            ],
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<[u8; 4]>(),
            any::<u8>(),
        )
            .prop_map(|(fin, op, payload, key, flags)| {
                let mut out = Vec::new();
                encode_frame(fin, OpCode::Binary, &payload, Some(key), &mut out);
                out[0] = (u8::from(fin) << 7) | op;
                if flags == 0 {
                    out[0] |= 0x40; // RSV1
                } else if flags == 1 {
                    out[1] &= 0x7F; // unmasked
                }
                out
            });
        prop_oneof![
            proptest::collection::vec(frame, 0..10).prop_map(|f| f.concat()),
            proptest::collection::vec(any::<u8>(), 0..200),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn frame_decoder_harness(data in frame_stream()) {
            fuzz_frame_decoder(&data);
        }

        #[test]
        fn handshake_harness(data in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "GET /[a-z]{0,5} HTTP/1\\.[01]\r\n(Host: h\r\n)?(Upgrade: [wW]ebsocket\r\n)?(Connection: [uU]pgrade\r\n)?(Sec-WebSocket-Version: 1[23]\r\n)?(Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n)?(Sec-WebSocket-Protocol: [a-c, ]{0,6}\r\n)?\r\n".prop_map(String::into_bytes),
        ]) {
            fuzz_handshake(&data);
        }

        #[test]
        fn mask_harness(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            fuzz_mask(&data);
        }

        #[test]
        fn inflate_harness(flags in any::<u8>(), body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            // Real deflate streams (then damaged, sometimes), so the harness goes deep.
            ("[a-e ]{0,3000}", any::<u16>(), any::<u8>()).prop_map(|(t, at, b)| {
                let mut z = Compressor::default();
                let mut c = z.compress(t.as_bytes(), 15).map(<[u8]>::to_vec).unwrap_or_default();
                if !c.is_empty() && b % 3 == 0 {
                    let i = usize::from(at) % c.len();
                    c[i] ^= b | 1;
                }
                c
            }),
        ]) {
            let mut data = vec![flags];
            data.extend_from_slice(&body);
            fuzz_inflate(&data);
        }
    }

    #[test]
    fn inflate_found_by_fuzzing() {
        // Too large (limit 1) and invalid further on: fed in pieces, the limit is met first,
        // which the one-shot reference must agree with (it once said "invalid").
        fuzz_inflate(&[164, 10, 10, 32, 255, 255, 126]);
        // The other way round: one step fills the buffer and meets invalid data.
        fuzz_inflate(&[212, 59, 38, 6, 255, 35]);
    }

    #[test]
    fn decoder_harness_covers_big_and_failing_inputs() {
        // A valid ping, a text message, then a 20 MiB header.
        let mut data = Vec::new();
        encode_frame(true, OpCode::Ping, b"p", Some([1, 2, 3, 4]), &mut data);
        encode_frame(
            true,
            OpCode::Text,
            "héllo".as_bytes(),
            Some([5, 6, 7, 8]),
            &mut data,
        );
        encode_header(true, OpCode::Binary, 20 << 20, Some([0; 4]), &mut data);
        fuzz_frame_decoder(&data);
        // A close frame with a valid code.
        let mut data = Vec::new();
        encode_frame(
            true,
            OpCode::Close,
            &3000u16.to_be_bytes(),
            Some([9; 4]),
            &mut data,
        );
        fuzz_frame_decoder(&data);
        // A full valid handshake.
        fuzz_handshake(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: x, y\r\n\r\n");
    }
}
