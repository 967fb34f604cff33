//! The sans-IO WebSocket connection state machine (RFC 6455 sections 5-7).
//!
//! This module owns [`Conn`]: everything that happens on an upgraded connection between
//! "bytes arrived" and "bytes to send". It decodes frames, enforces the RFC's rules (masking
//! direction, reserved bits and opcodes, control-frame rules, fragmentation order, UTF-8 of
//! text, close payloads) and the configured [`Limits`], reassembles fragmented messages,
//! answers pings, runs the close handshake and fails the connection with the right close code
//! on any violation. It never blocks and never touches a socket: the caller moves bytes in with
//! [`Conn::handle_input`] and out with [`Conn::poll_transmit`], and takes [`Event`]s with
//! [`Conn::poll_event`].
//!
//! # Hot path
//! A frame whose bytes are all in the input buffer costs one header decode, an in-place unmask,
//! one UTF-8 pass for text, and a `split_to().freeze()` of the input buffer: the payload of an
//! unfragmented message is handed out without copying. Only fragmented messages are copied
//! (into a reassembly buffer bounded by [`Limits::max_message_bytes`]).
//!
//! # Partial frames
//! A header is consumed as soon as it is complete and has passed every check, so oversized or
//! illegal frames fail before their payload arrives. The payload then stays in the caller's
//! buffer until the whole frame is there ([`Conn::bytes_needed`] says how much is missing);
//! text payload that has already arrived is unmasked and validated immediately, so invalid
//! UTF-8 fails fast even inside one large frame.
//!
//! # permessage-deflate
//! After [`Conn::set_deflate`] (the extension was negotiated), RSV1 on the first frame of a
//! data message marks it compressed (RSV1 on a control or continuation frame is still
//! 1002). A compressed frame's payload is not kept in the caller's buffer until it is
//! complete: each arriving piece is unmasked, inflated into the message buffer (never beyond
//! `max_message_bytes + 1` bytes, see [`super::deflate`]) and consumed, and text is validated
//! as it is inflated. [`Conn::send_compressed`] compresses outgoing messages above the
//! threshold with a caller-provided [`Compressor`] (one per thread, no context takeover).

use std::collections::VecDeque;

use bytes::{Buf as _, Bytes, BytesMut};

use super::close::{CloseCode, encode_close_payload, parse_close_payload, truncate_reason};
use super::deflate::{Compressor, ConnDeflate, DeflateParams, DeflateStats};
use super::error::{ProtoError, SendError};
use super::frame::{
    FrameHeader, OpCode, decode_header, encode_compressed_frame, encode_frame, encode_header,
};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;

/// Which side of the connection this endpoint is. Decides the masking direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted connection: incoming frames must be masked, outgoing frames are not.
    Server,
    /// Outgoing (upstream) connection: incoming frames must not be masked, outgoing are.
    Client,
}

/// The type of a data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// UTF-8 text (validated before delivery).
    Text,
    /// Arbitrary bytes.
    Binary,
}

/// Size limits for incoming data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame payload; a larger announced length fails with 1009 as soon as
    /// the header is parsed. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Largest accepted message (sum of its fragments' payloads); checked with each frame's
    /// announced length before it is buffered. Default 16 MiB.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_message_bytes: 16 << 20,
        }
    }
}

/// Something the peer did, returned by [`Conn::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete (reassembled) message; text has already been validated as UTF-8.
    Message {
        /// Text or binary.
        kind: MessageKind,
        /// The payload. For unfragmented messages this shares the input buffer's allocation.
        data: Bytes,
    },
    /// A ping. Already answered: a pong with the same payload was queued automatically
    /// (replacing the pong to the previous ping if that one was still waiting behind more
    /// than [`PONG_COALESCE_AFTER`] queued bytes: the peer is not reading).
    Ping(Bytes),
    /// A pong (solicited or not).
    Pong(Bytes),
    /// The peer's (valid) close frame. If we had not sent a close, an echo close was queued
    /// automatically (same code, or no payload if the peer sent none). The state is now
    /// [`State::Closed`].
    Close {
        /// The peer's status code; `None` if its close frame had no payload.
        code: Option<CloseCode>,
        /// The peer's reason (valid UTF-8, possibly empty).
        reason: Bytes,
    },
}

/// Where the connection is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Normal operation.
    Open,
    /// We queued a close frame ([`Conn::close`]) and wait for the peer's. Incoming data is
    /// still parsed, validated and delivered (the peer may have sent it before it saw our
    /// close; RFC 6455 only forbids *sending* data after a close), but nothing can be sent.
    CloseSent,
    /// Transient: the peer's close was received but not answered. Never observable, because
    /// the answer is queued immediately.
    CloseReceived,
    /// Both close frames exchanged: flush the transmit queue, then close the TCP connection.
    Closed,
    /// Protocol error: a close frame was queued (unless we had already sent one). Flush, then
    /// close the TCP connection. Further input is ignored.
    Failed,
}

/// A frame whose header has been consumed; its payload is at the front of the input buffer.
#[derive(Clone, Copy, Debug)]
struct FrameInProgress {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    /// Payload length (already checked against the limits, which fit in 32 bits).
    len: u32,
    /// Is the payload text (a text frame or a continuation of a text message)?
    text: bool,
    /// Is the payload compressed (part of a message whose first frame had RSV1)?
    compressed: bool,
    /// Uncompressed frames: payload bytes at the front of the buffer already unmasked and,
    /// for text, validated. Compressed frames: payload bytes already inflated and consumed.
    processed: u32,
}

impl FrameInProgress {
    fn len(&self) -> usize {
        self.len as usize
    }

    fn processed(&self) -> usize {
        self.processed as usize
    }
}

/// A close frame owed to the peer (see `Conn::deferred_close`): kept as what it answers, not
/// as its bytes, so that it costs a few bytes in every connection.
#[derive(Debug, Clone)]
enum DeferredClose {
    /// Answer the peer's close with its code (`None`: an empty close payload).
    Answer(Option<CloseCode>),
    /// Fail the connection after this protocol error: its close code and reason.
    Fail(ProtoError),
}

impl DeferredClose {
    fn parts(&self) -> (Option<CloseCode>, &'static str) {
        match self {
            Self::Answer(code) => (*code, ""),
            Self::Fail(e) => (Some(e.close_code()), e.reason()),
        }
    }
}

/// Non-zero default for the client mask generator (xorshift64* must not be seeded with 0).
const DEFAULT_MASK_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Most [`Conn::bytes_needed`] asks for in the middle of a compressed frame, whose pieces are
/// inflated and consumed as they arrive (a `u32` like the frame length).
const COMPRESSED_READ_HINT: u32 = 64 * 1024;

/// Queued output beyond which the automatic pong to a ping replaces a pong to an earlier
/// ping that is still waiting at the end of the queue. Below it every ping gets its own pong
/// (what peers and the Autobahn suite expect); above it the peer is evidently not reading,
/// and pongs for pings it sends meanwhile would only pile up.
pub const PONG_COALESCE_AFTER: usize = 4096;

/// A sans-IO WebSocket connection (after the HTTP upgrade).
#[derive(Debug)]
pub struct Conn {
    role: Role,
    /// `Limits::max_frame_bytes` and `max_message_bytes`, capped at `u32::MAX` (32 bits:
    /// this struct lives in every connection's task; the configuration caps both at 1 GiB).
    max_frame: u32,
    max_message: u32,
    state: State,
    /// RSV bits that negotiated extensions allow (RSV1 with permessage-deflate).
    allowed_rsv: u8,
    /// Events not yet taken by `poll_event`.
    events: VecDeque<Event>,
    /// Encoded frames not yet taken by `poll_transmit`.
    out: Vec<u8>,
    /// Where in `out` the automatic pong to the latest ping sits, `(start, end)`, while it is
    /// the last frame there and not yet taken (`end == 0`: none). Once more than
    /// [`PONG_COALESCE_AFTER`] bytes wait, a ping that finds that pong still queued replaces
    /// it (RFC 6455 §5.5.3 lets an endpoint answer only the most recent ping), so a peer that
    /// floods pings and never reads cannot grow the queue with pongs.
    auto_pong: (u32, u32),
    /// The frame whose header was consumed but whose payload is incomplete.
    current: Option<FrameInProgress>,
    /// Kind of the fragmented message in progress, if any.
    fragmented: Option<MessageKind>,
    /// Payload of the fragmented message in progress. A `Vec` so that growth can be capped
    /// at `max_message_bytes` exactly (see `append_fragment`).
    assembly: Vec<u8>,
    /// UTF-8 state of the text message in progress.
    utf8: Utf8Validator,
    /// Bytes still missing to complete `current` (0 if no header is pending).
    needed: u32,
    /// Close frame owed to the peer, after a protocol error or as the answer to the peer's
    /// close, encoded at the next `poll_transmit` so that replies to messages decoded before
    /// the error or the close go out first (`None` code: an empty close payload).
    deferred_close: Option<DeferredClose>,
    /// xorshift64* state for client masks.
    mask_state: u64,
    /// Payloads queued by reference ([`Conn::send_shared`]), each to go out after the first
    /// `at` bytes of `out`. Boxed: only connections that send large payloads have one, and
    /// every idle connection's task carries this field (8 bytes instead of a `Vec`'s 24).
    #[allow(clippy::box_collection)]
    shared: Option<Box<Vec<(usize, Bytes)>>>,
    /// permessage-deflate state, only on connections that negotiated it (boxed: 8 bytes in
    /// every other connection).
    deflate: Option<Box<ConnDeflate>>,
}

impl Conn {
    /// A connection in [`State::Open`], right after the upgrade.
    pub fn new(role: Role, limits: Limits) -> Self {
        Self {
            role,
            max_frame: u32::try_from(limits.max_frame_bytes).unwrap_or(u32::MAX),
            max_message: u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX),
            state: State::Open,
            allowed_rsv: 0,
            events: VecDeque::new(),
            out: Vec::new(),
            auto_pong: (0, 0),
            current: None,
            fragmented: None,
            assembly: Vec::new(),
            utf8: Utf8Validator::default(),
            needed: 0,
            deferred_close: None,
            mask_state: DEFAULT_MASK_SEED,
            shared: None,
            deflate: None,
        }
    }

    /// Turn on permessage-deflate with the parameters agreed in the handshake
    /// ([`super::deflate::negotiate`] or [`super::deflate::accept_response`]): RSV1 marks
    /// compressed messages from now on, and [`Conn::send_compressed`] compresses messages of
    /// at least `threshold_bytes`. Call it before the first `handle_input`.
    pub fn set_deflate(&mut self, params: &DeflateParams, threshold_bytes: usize) {
        self.allowed_rsv = 0b100;
        self.deflate = Some(Box::new(ConnDeflate::new(
            params,
            self.role == Role::Server,
            threshold_bytes,
        )));
    }

    /// Was permessage-deflate negotiated ([`Conn::set_deflate`])?
    pub fn deflate_enabled(&self) -> bool {
        self.deflate.is_some()
    }

    /// The compression counters since the last call (reset by taking them); `None` without
    /// permessage-deflate or when nothing was compressed or inflated since.
    pub fn take_deflate_stats(&mut self) -> Option<DeflateStats> {
        let d = self.deflate.as_deref_mut()?;
        (d.stats != DeflateStats::default()).then(|| std::mem::take(&mut d.stats))
    }

    /// Is an inflate state held right now (a compressed message is being received, or the
    /// peer keeps its compression context)? For memory accounting and tests.
    pub fn holds_inflate_state(&self) -> bool {
        self.deflate.as_ref().is_some_and(|d| d.holds_inflater())
    }

    /// Client role only: seed for the frame-mask generator (xorshift64*; the protocol core has
    /// no RNG). Seed it from a real RNG: RFC 6455 wants masks the peer cannot predict. A zero
    /// seed is replaced by a fixed non-zero one. The server role ignores it.
    pub fn set_mask_seed(&mut self, seed: u64) {
        self.mask_state = if seed == 0 { DEFAULT_MASK_SEED } else { seed };
    }

    /// Decode every complete frame at the front of `buf`, consuming it.
    ///
    /// Payloads are unmasked in place and handed out as `Bytes` via `split_to(..).freeze()`
    /// (no copy) for single-frame messages; fragmented messages are reassembled into an
    /// internal buffer bounded by `max_message_bytes` (checked before buffering a frame, using
    /// the header's length). A frame whose length exceeds `max_frame_bytes` fails as soon as
    /// its header is parsed.
    ///
    /// On return `buf` holds at most an incomplete header, or the already-arrived part of the
    /// payload of a frame whose header was consumed (see [`Conn::bytes_needed`]). The caller
    /// must append further input to the same buffer and must not modify what is left in it.
    ///
    /// In [`State::Failed`] or [`State::Closed`], input is discarded (`buf` cleared) and `Ok`
    /// returned. After we sent close, data frames are still parsed, validated and delivered;
    /// the peer's close frame completes the handshake.
    ///
    /// # Errors
    /// Any [`ProtoError`]: a close frame with [`ProtoError::close_code`] was queued (unless we
    /// had already sent one), the state is now [`State::Failed`] and `buf` was cleared.
    pub fn handle_input(&mut self, buf: &mut BytesMut) -> Result<(), ProtoError> {
        if matches!(self.state, State::Failed | State::Closed) {
            buf.clear();
            self.needed = 0;
            return Ok(());
        }
        match self.decode_frames(buf) {
            Ok(()) => {
                if self.state == State::Closed {
                    // Nothing after the peer's close frame is meaningful.
                    buf.clear();
                }
                Ok(())
            }
            Err(err) => {
                buf.clear();
                self.fail(&err);
                Err(err)
            }
        }
    }

    /// Take the next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Queue one unfragmented message (copied and framed into the outbound buffer; masked in
    /// the client role).
    ///
    /// # Errors
    /// [`SendError::Closed`] once a close frame was queued or the connection failed. (After a
    /// protocol error or the peer's close, sends succeed until the next `poll_transmit`
    /// hands out our close frame: they answer messages decoded before it, and go out first.)
    pub fn send(&mut self, kind: MessageKind, payload: &[u8]) -> Result<(), SendError> {
        self.ensure_open()?;
        let opcode = match kind {
            MessageKind::Text => OpCode::Text,
            MessageKind::Binary => OpCode::Binary,
        };
        let mask = self.next_mask();
        encode_frame(true, opcode, payload, mask, &mut self.out);
        Ok(())
    }

    /// Queue one unfragmented message, compressed with `z` if permessage-deflate was
    /// negotiated, the payload has at least the threshold's bytes, the peer allows a window
    /// `z` can compress with, and compression makes it smaller; otherwise as [`Conn::send`].
    /// Returns whether it went out compressed.
    ///
    /// # Errors
    /// As [`Conn::send`].
    pub fn send_compressed(
        &mut self,
        kind: MessageKind,
        payload: &[u8],
        z: &mut Compressor,
    ) -> Result<bool, SendError> {
        self.ensure_open()?;
        let window = self
            .deflate
            .as_deref()
            .filter(|d| payload.len() >= d.threshold as usize)
            .and_then(|d| d.out_window);
        let Some(compressed) = window.and_then(|w| z.compress(payload, w)) else {
            self.send(kind, payload)?;
            return Ok(false);
        };
        let opcode = match kind {
            MessageKind::Text => OpCode::Text,
            MessageKind::Binary => OpCode::Binary,
        };
        let mask = self.next_mask();
        encode_compressed_frame(opcode, compressed, mask, &mut self.out);
        // Invariant: `window` is only `Some` with a deflate state.
        if let Some(d) = self.deflate.as_deref_mut() {
            d.stats.compressed += 1;
            d.stats.compressed_in += payload.len() as u64;
            d.stats.compressed_out += compressed.len() as u64;
        }
        Ok(true)
    }

    /// Queue one unfragmented message whose payload goes out by reference, without a copy
    /// (a received message echoed or relayed as is): only the header is encoded. Take the
    /// output with [`Conn::poll_transmit_frames`] (a vectored write); `poll_transmit` still
    /// works but copies. In the client role frames are masked, which needs a copy anyway, so
    /// this is [`Conn::send`].
    ///
    /// # Errors
    /// As [`Conn::send`].
    pub fn send_shared(&mut self, kind: MessageKind, payload: Bytes) -> Result<(), SendError> {
        if self.role == Role::Client {
            return self.send(kind, &payload);
        }
        self.ensure_open()?;
        let opcode = match kind {
            MessageKind::Text => OpCode::Text,
            MessageKind::Binary => OpCode::Binary,
        };
        encode_header(true, opcode, payload.len(), None, &mut self.out);
        let at = self.out.len();
        self.shared
            .get_or_insert_with(Default::default)
            .push((at, payload));
        Ok(())
    }

    /// True if payloads queued by reference wait for [`Conn::poll_transmit_frames`].
    pub fn has_shared(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Move everything queued into `frames`, in wire order, without copying payloads queued
    /// by [`Conn::send_shared`]: the encoded bytes become shared slices of one buffer, the
    /// payloads are passed on as they are. Returns the number of bytes moved.
    pub fn poll_transmit_frames(&mut self, frames: &mut Vec<Bytes>) -> usize {
        self.auto_pong = (0, 0);
        if let Some(d) = self.deferred_close.take() {
            let (code, reason) = d.parts();
            self.queue_close(code, reason);
        }
        let own = Bytes::from(std::mem::take(&mut self.out));
        let mut n = own.len();
        let mut from = 0;
        for (at, payload) in self.shared.iter_mut().flat_map(|s| s.drain(..)) {
            if at > from {
                frames.push(own.slice(from..at));
            }
            n += payload.len();
            frames.push(payload);
            from = at;
        }
        if own.len() > from {
            frames.push(own.slice(from..));
        }
        n
    }

    /// Queue a ping.
    ///
    /// # Errors
    /// [`SendError::Closed`] once a close frame was queued; [`SendError::ControlTooLong`] if
    /// `payload` is longer than 125 bytes.
    pub fn send_ping(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Ping, payload)
    }

    /// Queue an unsolicited pong (pings are answered automatically).
    ///
    /// # Errors
    /// As [`Conn::send_ping`].
    pub fn send_pong(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Pong, payload)
    }

    /// Start the close handshake: queue a close frame with `code` and `reason` (truncated to
    /// 123 bytes at a UTF-8 char boundary). The state becomes [`State::CloseSent`].
    ///
    /// # Errors
    /// [`SendError::Closed`] if a close frame was already queued (or the connection failed);
    /// [`SendError::InvalidCloseCode`] if `code` may not be sent on the wire.
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if !code.is_allowed_on_wire() {
            return Err(SendError::InvalidCloseCode(code.0));
        }
        self.queue_close(Some(code), reason);
        self.state = State::CloseSent;
        Ok(())
    }

    /// Bytes queued for the wire.
    pub fn pending_transmit(&self) -> usize {
        // Count a deferred close frame (header, mask key in the client role, code, reason) so
        // callers know to flush it.
        let mask_len = if self.role == Role::Client { 4 } else { 0 };
        let shared: usize = self
            .shared
            .iter()
            .flat_map(|s| s.iter())
            .map(|(_, p)| p.len())
            .sum();
        self.out.len()
            + shared
            + self.deferred_close.as_ref().map_or(0, |d| {
                let (code, reason) = d.parts();
                2 + mask_len + code.map_or(0, |_| 2 + truncate_reason(reason).len())
            })
    }

    /// Move queued bytes into `out`: if `out` is empty, the internal `Vec` is swapped with it
    /// (no copy; the connection keeps `out`'s old allocation for future frames), otherwise
    /// the bytes are appended. Returns the number of bytes moved.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> usize {
        self.auto_pong = (0, 0);
        if let Some(d) = self.deferred_close.take() {
            let (code, reason) = d.parts();
            self.queue_close(code, reason);
        }
        if self.has_shared() {
            // The copying fallback: interleave the shared payloads into `out`.
            let mut frames = Vec::new();
            let n = self.poll_transmit_frames(&mut frames);
            out.reserve(n);
            for f in frames {
                out.extend_from_slice(&f);
            }
            return n;
        }
        let n = self.out.len();
        if out.is_empty() {
            std::mem::swap(out, &mut self.out);
        } else {
            out.extend_from_slice(&self.out);
            self.out.clear();
        }
        n
    }

    /// How many more input bytes are needed to complete the frame whose header has been
    /// parsed; 0 if no header is pending (unknown). A read-size hint: after `handle_input`
    /// returns, `buf.reserve(conn.bytes_needed())` lets the next read complete the frame.
    /// In a compressed frame (inflated piece by piece) it is at most 64 KiB.
    pub fn bytes_needed(&self) -> usize {
        self.needed as usize
    }

    /// The current lifecycle state.
    pub fn state(&self) -> State {
        self.state
    }

    /// This endpoint's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits this connection enforces (as given, capped at `u32::MAX` bytes).
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame as usize,
            max_message_bytes: self.max_message as usize,
        }
    }

    /// The decode loop; any error fails the connection (see `handle_input`).
    fn decode_frames(&mut self, buf: &mut BytesMut) -> Result<(), ProtoError> {
        self.needed = 0;
        loop {
            let mut frame = match self.current.take() {
                Some(frame) => frame,
                None => {
                    let Some((header, header_len)) = decode_header(buf)? else {
                        return Ok(());
                    };
                    let frame = self.check_header(&header)?;
                    buf.advance(header_len);
                    frame
                }
            };
            if frame.compressed {
                // Inflate whatever has arrived and consume it (bounded by max_message_bytes
                // however little of the frame is there).
                let take = buf.len().min(frame.len() - frame.processed());
                if take > 0 {
                    if let Some(key) = frame.mask {
                        apply_mask(&mut buf[..take], key, frame.processed());
                    }
                    self.inflate(&buf[..take], frame.text, false)?;
                    buf.advance(take);
                    // `processed + take <= len`, a u32.
                    frame.processed += take as u32;
                }
                if frame.processed < frame.len {
                    // The payload does not stay in `buf`, so the hint is one piece, not the
                    // rest of the frame: a peer announcing a huge compressed frame must not
                    // make the caller reserve room for all of it.
                    self.needed = (frame.len - frame.processed).min(COMPRESSED_READ_HINT);
                    self.current = Some(frame);
                    return Ok(());
                }
                self.on_compressed_frame(frame)?;
                continue;
            }
            if buf.len() < frame.len() {
                // Incomplete payload. Unmask and validate the new text bytes now, so that
                // invalid UTF-8 fails fast (Autobahn 6.4.3/6.4.4 send one frame in chops).
                if frame.text && buf.len() > frame.processed() {
                    let fresh = &mut buf[frame.processed()..];
                    if let Some(key) = frame.mask {
                        apply_mask(fresh, key, frame.processed());
                    }
                    self.utf8.feed(fresh).map_err(|_| ProtoError::InvalidUtf8)?;
                    // `buf.len() < frame.len`, a u32.
                    frame.processed = buf.len() as u32;
                }
                self.needed = frame.len - buf.len() as u32;
                self.current = Some(frame);
                return Ok(());
            }
            let mut payload = buf.split_to(frame.len());
            if let Some(key) = frame.mask {
                // `processed <= len` always holds: it only grows while `buf.len() < len`.
                apply_mask(&mut payload[frame.processed()..], key, frame.processed());
            }
            self.on_frame(frame, payload)?;
            if self.state == State::Closed {
                return Ok(());
            }
        }
    }

    /// Judge a freshly decoded header against the RFC and the limits, before its payload.
    fn check_header(&mut self, header: &FrameHeader) -> Result<FrameInProgress, ProtoError> {
        if header.rsv & !self.allowed_rsv != 0 {
            return Err(ProtoError::ReservedBits);
        }
        // Only possible with permessage-deflate (RSV1 is allowed then).
        let rsv1 = header.rsv != 0;
        let opcode =
            OpCode::from_u8(header.opcode).ok_or(ProtoError::UnknownOpcode(header.opcode))?;
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(ProtoError::UnmaskedClientFrame),
            (Role::Client, true) => return Err(ProtoError::MaskedServerFrame),
            _ => {}
        }
        let mut compressed = false;
        let text = if opcode.is_control() {
            if rsv1 {
                // RFC 7692 6.1: control frames are never compressed.
                return Err(ProtoError::ReservedBits);
            }
            if !header.fin {
                return Err(ProtoError::FragmentedControl);
            }
            if header.payload_len > 125 {
                return Err(ProtoError::ControlTooLong);
            }
            false
        } else {
            if header.payload_len > u64::from(self.max_frame) {
                return Err(ProtoError::FrameTooLarge);
            }
            // Bytes of this message already buffered by earlier fragments.
            let buffered = match (opcode, self.fragmented) {
                (OpCode::Continuation, None) => return Err(ProtoError::UnexpectedContinuation),
                (OpCode::Continuation, Some(_)) => self.assembly.len(),
                (_, Some(_)) => return Err(ProtoError::ExpectedContinuation),
                (_, None) => 0,
            };
            compressed = match (opcode, self.deflate.as_deref_mut()) {
                // RFC 7692 6.1: only the first frame of a message carries RSV1.
                (OpCode::Continuation, _) if rsv1 => return Err(ProtoError::ReservedBits),
                (OpCode::Continuation, d) => d.is_some_and(|d| d.receiving),
                (_, Some(d)) => {
                    d.receiving = rsv1;
                    rsv1
                }
                (_, None) => false,
            };
            // `payload_len <= max_frame_bytes` (a usize), so the cast is lossless. Compressed
            // frames are bounded by what they inflate to instead (checked while inflating).
            let room = (self.max_message as usize).saturating_sub(buffered);
            if !compressed && header.payload_len as usize > room {
                return Err(ProtoError::MessageTooLarge);
            }
            match opcode {
                OpCode::Text => {
                    self.utf8.reset();
                    true
                }
                OpCode::Continuation => self.fragmented == Some(MessageKind::Text),
                _ => false,
            }
        };
        Ok(FrameInProgress {
            fin: header.fin,
            opcode,
            mask: header.mask,
            // `payload_len <= max_frame`, a u32.
            len: header.payload_len as u32,
            text,
            compressed,
            processed: 0,
        })
    }

    /// Inflate the next piece of the compressed message in progress (`tail`: its end) into
    /// the reassembly buffer, validating text as it appears.
    fn inflate(&mut self, input: &[u8], text: bool, tail: bool) -> Result<(), ProtoError> {
        // Invariant: frames are only marked compressed with a deflate state.
        let Some(d) = self.deflate.as_deref_mut() else {
            return Err(ProtoError::ReservedBits);
        };
        let utf8 = text.then_some(&mut self.utf8);
        d.inflate(
            input,
            tail,
            &mut self.assembly,
            self.max_message as usize,
            utf8,
        )
    }

    /// A compressed frame whose payload has been inflated: remember the message's kind, or
    /// at its final frame finish inflating and deliver it.
    fn on_compressed_frame(&mut self, frame: FrameInProgress) -> Result<(), ProtoError> {
        let kind = match (frame.opcode, self.fragmented) {
            (OpCode::Text, _) => MessageKind::Text,
            (OpCode::Binary, _) => MessageKind::Binary,
            (_, Some(kind)) => kind,
            (_, None) => return Err(ProtoError::UnexpectedContinuation),
        };
        if !frame.fin {
            self.fragmented = Some(kind);
            return Ok(());
        }
        self.inflate(&[], frame.text, true)?;
        if frame.text && self.utf8.finish().is_err() {
            return Err(ProtoError::InvalidUtf8);
        }
        self.fragmented = None;
        if let Some(d) = self.deflate.as_deref_mut() {
            d.finish_message(&mut self.assembly);
        }
        let data = Bytes::from(std::mem::take(&mut self.assembly));
        if matches!(self.state, State::Open | State::CloseSent) {
            self.events.push_back(Event::Message { kind, data });
        }
        Ok(())
    }

    /// A complete, unmasked frame.
    fn on_frame(&mut self, frame: FrameInProgress, payload: BytesMut) -> Result<(), ProtoError> {
        match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => self.on_data(frame, payload),
            OpCode::Ping => {
                if self.state == State::Open {
                    let (start, end) = self.auto_pong;
                    if end != 0
                        && end as usize == self.out.len()
                        && self.out.len() > PONG_COALESCE_AFTER
                    {
                        // The previous pong was not taken yet: answer only this ping.
                        self.out.truncate(start as usize);
                    }
                    let start = self.out.len();
                    let mask = self.next_mask();
                    encode_frame(true, OpCode::Pong, &payload, mask, &mut self.out);
                    self.auto_pong = match (u32::try_from(start), u32::try_from(self.out.len())) {
                        (Ok(s), Ok(e)) => (s, e),
                        _ => (0, 0),
                    };
                    self.events.push_back(Event::Ping(payload.freeze()));
                }
                Ok(())
            }
            OpCode::Pong => {
                if self.state == State::Open {
                    self.events.push_back(Event::Pong(payload.freeze()));
                }
                Ok(())
            }
            OpCode::Close => self.on_close(payload),
        }
    }

    /// A complete data frame (first, middle or last fragment, or a whole message).
    fn on_data(&mut self, frame: FrameInProgress, payload: BytesMut) -> Result<(), ProtoError> {
        if frame.text {
            let rest = &payload[frame.processed()..];
            let single = frame.fin && frame.opcode == OpCode::Text && frame.processed == 0;
            let valid = if single {
                // A whole message in one piece: one fast pass, no validator state.
                simdutf8::basic::from_utf8(rest).is_ok()
            } else {
                self.utf8.feed(rest).is_ok() && (!frame.fin || self.utf8.finish().is_ok())
            };
            if !valid {
                return Err(ProtoError::InvalidUtf8);
            }
        }
        let kind = match (frame.opcode, self.fragmented) {
            (OpCode::Text, _) => MessageKind::Text,
            (OpCode::Binary, _) => MessageKind::Binary,
            // check_header rejected continuations without a message in progress.
            (_, Some(kind)) => kind,
            (_, None) => return Err(ProtoError::UnexpectedContinuation),
        };
        if !frame.fin {
            self.fragmented = Some(kind);
            self.append_fragment(&payload);
            return Ok(());
        }
        let data = if frame.opcode == OpCode::Continuation {
            self.append_fragment(&payload);
            self.fragmented = None;
            // `Bytes::from(Vec)` takes over the allocation without copying.
            Bytes::from(std::mem::take(&mut self.assembly))
        } else {
            payload.freeze()
        };
        // Data that arrives after our close frame is delivered too: the peer sent it before
        // it saw our close, and the application decides whether it still counts (a proxy
        // relays it; see `State::CloseSent`).
        if matches!(self.state, State::Open | State::CloseSent) {
            self.events.push_back(Event::Message { kind, data });
        }
        Ok(())
    }

    /// The peer's close frame: validate, echo if needed, finish the handshake.
    fn on_close(&mut self, payload: BytesMut) -> Result<(), ProtoError> {
        let code = parse_close_payload(&payload)?;
        // A close in the middle of a fragmented message abandons it (Autobahn 7.1.5).
        self.fragmented = None;
        self.assembly = Vec::new();
        self.utf8.reset();
        if let Some(d) = self.deflate.as_deref_mut() {
            d.abandon_message();
        }
        if self.state == State::Open {
            // Answer with the same code, after the replies to messages decoded before it.
            self.state = State::CloseReceived;
            self.deferred_close = Some(DeferredClose::Answer(code));
        }
        self.state = State::Closed;
        let reason = if payload.len() > 2 {
            payload.freeze().split_off(2)
        } else {
            Bytes::new()
        };
        self.events.push_back(Event::Close { code, reason });
        Ok(())
    }

    /// Fail the connection after a protocol error.
    fn fail(&mut self, err: &ProtoError) {
        if self.state == State::Open {
            self.deferred_close = Some(DeferredClose::Fail(err.clone()));
        }
        self.state = State::Failed;
        self.current = None;
        self.fragmented = None;
        self.assembly = Vec::new();
        self.utf8.reset();
        self.needed = 0;
        if let Some(d) = self.deflate.as_deref_mut() {
            d.abandon_message();
        }
    }

    /// Append a fragment to the reassembly buffer, growing it geometrically but never beyond
    /// `max_message_bytes` (which `check_header` guarantees the message fits in).
    fn append_fragment(&mut self, fragment: &[u8]) {
        let len = self.assembly.len();
        let needed = len + fragment.len();
        if needed > self.assembly.capacity() {
            let doubled = self
                .assembly
                .capacity()
                .saturating_mul(2)
                .min(self.max_message as usize);
            self.assembly.reserve_exact(needed.max(doubled) - len);
        }
        self.assembly.extend_from_slice(fragment);
    }

    /// Encode a close frame (no payload when `code` is `None`).
    fn queue_close(&mut self, code: Option<CloseCode>, reason: &str) {
        let mask = self.next_mask();
        match code {
            Some(code) => {
                let (payload, len) = encode_close_payload(code, reason);
                encode_frame(true, OpCode::Close, &payload[..len], mask, &mut self.out);
            }
            None => encode_frame(true, OpCode::Close, &[], mask, &mut self.out),
        }
    }

    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        self.ensure_open()?;
        if payload.len() > 125 {
            return Err(SendError::ControlTooLong);
        }
        let mask = self.next_mask();
        encode_frame(true, opcode, payload, mask, &mut self.out);
        Ok(())
    }

    fn ensure_open(&self) -> Result<(), SendError> {
        // After a protocol error or the peer's close, replies to messages decoded before it
        // may still be queued until our close frame is handed out by `poll_transmit`.
        if self.state == State::Open || self.deferred_close.is_some() {
            Ok(())
        } else {
            Err(SendError::Closed)
        }
    }

    /// The mask for the next outgoing frame: `None` for servers, xorshift64* for clients.
    fn next_mask(&mut self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                let mut x = self.mask_state;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.mask_state = x;
                // The high half of the multiplied state has the best statistical quality.
                let word = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32;
                Some(word.to_ne_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_header;
    use proptest::prelude::*;

    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    fn server() -> Conn {
        Conn::new(Role::Server, Limits::default())
    }

    fn client() -> Conn {
        let mut c = Conn::new(Role::Client, Limits::default());
        c.set_mask_seed(42);
        c
    }

    /// A raw frame with arbitrary opcode/rsv bits (for illegal frames).
    fn raw(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_header(fin, OpCode::Binary, payload.len(), mask, &mut out);
        out[0] = (u8::from(fin) << 7) | (rsv << 4) | opcode;
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(k) = mask {
            apply_mask(&mut out[start..], k, 0);
        }
        out
    }

    /// A masked client frame.
    fn cf(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        raw(fin, 0, op.as_u8(), payload, Some(KEY))
    }

    fn events(conn: &mut Conn) -> Vec<Event> {
        std::iter::from_fn(|| conn.poll_event()).collect()
    }

    /// Feed `bytes` to `conn` in chunks of `chunk` bytes; stop at the first error.
    fn feed(conn: &mut Conn, bytes: &[u8], chunk: usize) -> Result<(), ProtoError> {
        let mut buf = BytesMut::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            conn.handle_input(&mut buf)?;
        }
        if bytes.is_empty() {
            conn.handle_input(&mut buf)?;
        }
        Ok(())
    }

    /// Move everything `from` wants to send into `to`, in chunks; return `to`'s events.
    fn pump(from: &mut Conn, to: &mut Conn, chunk: usize) -> Result<Vec<Event>, ProtoError> {
        let mut wire = Vec::new();
        from.poll_transmit(&mut wire);
        feed(to, &wire, chunk)?;
        Ok(events(to))
    }

    /// Decode the close code the server put on the wire, using a client.
    fn close_code_on_wire(server: &mut Conn) -> Option<CloseCode> {
        let mut c = client();
        let evs = pump(server, &mut c, 7).expect("server output must be valid");
        match evs.last() {
            Some(Event::Close { code, .. }) => *code,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    fn msg(kind: MessageKind, data: &[u8]) -> Event {
        Event::Message {
            kind,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn echo_sizes_both_directions() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (mut s, mut c) = (server(), client());
            c.send(MessageKind::Binary, &data).unwrap();
            c.send(MessageKind::Text, "é".repeat(len / 2).as_bytes())
                .unwrap();
            let evs = pump(&mut c, &mut s, 4096).unwrap();
            assert_eq!(
                evs,
                [
                    msg(MessageKind::Binary, &data),
                    msg(MessageKind::Text, "é".repeat(len / 2).as_bytes())
                ]
            );
            s.send(MessageKind::Binary, &data).unwrap();
            assert_eq!(
                pump(&mut s, &mut c, 1000).unwrap(),
                [msg(MessageKind::Binary, &data)]
            );
        }
    }

    #[test]
    fn split_at_every_point() {
        let mut wire = Vec::new();
        wire.extend(cf(true, OpCode::Text, "hello κόσμε".as_bytes()));
        wire.extend(cf(false, OpCode::Binary, b"ab"));
        wire.extend(cf(true, OpCode::Ping, b"p"));
        wire.extend(cf(true, OpCode::Continuation, b"cd"));
        wire.extend(cf(true, OpCode::Text, b""));
        wire.extend(cf(true, OpCode::Binary, &[9u8; 300]));
        let expected = vec![
            msg(MessageKind::Text, "hello κόσμε".as_bytes()),
            Event::Ping(Bytes::from_static(b"p")),
            msg(MessageKind::Binary, b"abcd"),
            msg(MessageKind::Text, b""),
            msg(MessageKind::Binary, &[9u8; 300]),
        ];
        for cut in 0..=wire.len() {
            let mut s = server();
            let mut buf = BytesMut::from(&wire[..cut]);
            s.handle_input(&mut buf).unwrap();
            buf.extend_from_slice(&wire[cut..]);
            s.handle_input(&mut buf).unwrap();
            assert!(buf.is_empty());
            assert_eq!(events(&mut s), expected, "cut at {cut}");
        }
        for chunk in 1..20 {
            let mut s = server();
            feed(&mut s, &wire, chunk).unwrap();
            assert_eq!(events(&mut s), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn fragmented_with_interleaved_control_frames() {
        let mut s = server();
        let mut wire = Vec::new();
        wire.extend(cf(false, OpCode::Text, b"Hel"));
        wire.extend(cf(true, OpCode::Ping, b"ping!"));
        wire.extend(cf(false, OpCode::Continuation, b"lo "));
        wire.extend(cf(true, OpCode::Pong, b"pong"));
        wire.extend(cf(false, OpCode::Continuation, b""));
        wire.extend(cf(true, OpCode::Continuation, b"world"));
        feed(&mut s, &wire, 3).unwrap();
        assert_eq!(
            events(&mut s),
            [
                Event::Ping(Bytes::from_static(b"ping!")),
                Event::Pong(Bytes::from_static(b"pong")),
                msg(MessageKind::Text, b"Hello world"),
            ]
        );
        // The ping was answered with a pong carrying the same payload.
        let mut c = client();
        assert_eq!(
            pump(&mut s, &mut c, 1).unwrap(),
            [Event::Pong(Bytes::from_static(b"ping!"))]
        );
    }

    #[test]
    fn protocol_errors_close_with_expected_code() {
        let huge_len = {
            let mut v = vec![0x82, 0xFF];
            v.extend_from_slice(&(1u64 << 63).to_be_bytes());
            v.extend_from_slice(&KEY);
            v
        };
        let cases: Vec<(Vec<u8>, ProtoError, u16)> = vec![
            (
                raw(true, 0b100, 1, b"x", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            (
                raw(true, 0b001, 9, b"", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            (
                raw(true, 0, 3, b"", Some(KEY)),
                ProtoError::UnknownOpcode(3),
                1002,
            ),
            (
                raw(true, 0, 0xB, b"", Some(KEY)),
                ProtoError::UnknownOpcode(0xB),
                1002,
            ),
            (
                raw(true, 0, 1, b"hi", None),
                ProtoError::UnmaskedClientFrame,
                1002,
            ),
            (
                cf(false, OpCode::Ping, b""),
                ProtoError::FragmentedControl,
                1002,
            ),
            (
                cf(true, OpCode::Ping, &[0; 126]),
                ProtoError::ControlTooLong,
                1002,
            ),
            (
                cf(true, OpCode::Close, &[0; 126]),
                ProtoError::ControlTooLong,
                1002,
            ),
            (huge_len, ProtoError::InvalidLength, 1002),
            (
                cf(true, OpCode::Continuation, b"x"),
                ProtoError::UnexpectedContinuation,
                1002,
            ),
            (
                [cf(false, OpCode::Text, b"a"), cf(true, OpCode::Text, b"b")].concat(),
                ProtoError::ExpectedContinuation,
                1002,
            ),
            (
                [
                    cf(false, OpCode::Binary, b"a"),
                    cf(true, OpCode::Binary, b"b"),
                ]
                .concat(),
                ProtoError::ExpectedContinuation,
                1002,
            ),
            (
                cf(true, OpCode::Text, b"\xce\xba\xff"),
                ProtoError::InvalidUtf8,
                1007,
            ),
            (
                cf(true, OpCode::Text, b"ab\xe2\x82"),
                ProtoError::InvalidUtf8,
                1007,
            ),
            (
                [
                    cf(false, OpCode::Text, b"ab\xe2"),
                    cf(true, OpCode::Continuation, b"\x82"),
                ]
                .concat(),
                ProtoError::InvalidUtf8,
                1007,
            ),
            (
                cf(true, OpCode::Close, b"\x03"),
                ProtoError::InvalidClosePayload,
                1002,
            ),
            (
                cf(true, OpCode::Close, &1005u16.to_be_bytes()),
                ProtoError::InvalidCloseCode(1005),
                1002,
            ),
            (
                cf(true, OpCode::Close, &999u16.to_be_bytes()),
                ProtoError::InvalidCloseCode(999),
                1002,
            ),
            (
                cf(true, OpCode::Close, &2999u16.to_be_bytes()),
                ProtoError::InvalidCloseCode(2999),
                1002,
            ),
            (
                cf(true, OpCode::Close, b"\x03\xe8\xce\xba\xff"),
                ProtoError::InvalidCloseReason,
                1007,
            ),
        ];
        for (wire, err, code) in cases {
            for chunk in [1, 5, wire.len()] {
                let mut s = server();
                assert_eq!(feed(&mut s, &wire, chunk), Err(err.clone()), "{err:?}");
                assert_eq!(s.state(), State::Failed);
                assert!(s.pending_transmit() > 0);
                assert_eq!(close_code_on_wire(&mut s), Some(CloseCode(code)), "{err:?}");
                // Further input is ignored.
                let mut more = BytesMut::from(&cf(true, OpCode::Text, b"late")[..]);
                assert_eq!(s.handle_input(&mut more), Ok(()));
                assert!(more.is_empty());
                assert!(events(&mut s).is_empty());
                assert_eq!(s.pending_transmit(), 0);
                assert_eq!(s.send(MessageKind::Text, b"x"), Err(SendError::Closed));
            }
        }
    }

    #[test]
    fn client_rejects_masked_server_frames() {
        let mut c = client();
        let wire = raw(true, 0, 2, b"x", Some(KEY));
        assert_eq!(feed(&mut c, &wire, 100), Err(ProtoError::MaskedServerFrame));
        // The client's close frame is masked and decodes on a server with code 1002.
        let mut s = server();
        let evs = pump(&mut c, &mut s, 3).unwrap();
        assert_eq!(
            evs,
            [Event::Close {
                code: Some(CloseCode::PROTOCOL_ERROR),
                reason: Bytes::from_static(b"server frame masked")
            }]
        );
    }

    #[test]
    fn oversized_frame_fails_on_header_alone() {
        let mut s = server();
        // A masked binary header announcing 20 MiB, no payload.
        let mut header = Vec::new();
        encode_header(true, OpCode::Binary, 20 << 20, Some(KEY), &mut header);
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(s.handle_input(&mut buf), Err(ProtoError::FrameTooLarge));
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::TOO_BIG));
    }

    #[test]
    fn message_limit_checked_before_buffering() {
        let limits = Limits {
            max_frame_bytes: 100,
            max_message_bytes: 150,
        };
        let mut s = Conn::new(Role::Server, limits.clone());
        let mut wire = cf(false, OpCode::Binary, &[1; 100]);
        // Second fragment's header alone must trigger the error.
        encode_header(true, OpCode::Continuation, 51, Some(KEY), &mut wire);
        assert_eq!(feed(&mut s, &wire, 1000), Err(ProtoError::MessageTooLarge));
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::TOO_BIG));
        // Exactly at the limit is fine.
        let mut s = Conn::new(Role::Server, limits.clone());
        let wire = [
            cf(false, OpCode::Binary, &[1; 100]),
            cf(true, OpCode::Continuation, &[2; 50]),
        ]
        .concat();
        feed(&mut s, &wire, 1000).unwrap();
        assert_eq!(events(&mut s).len(), 1);
        // Single frame bigger than the message limit.
        let mut s = Conn::new(
            Role::Server,
            Limits {
                max_frame_bytes: 100,
                max_message_bytes: 10,
            },
        );
        assert_eq!(
            feed(&mut s, &cf(true, OpCode::Text, &[b'a'; 11]), 1000),
            Err(ProtoError::MessageTooLarge)
        );
    }

    #[test]
    fn reassembly_buffer_never_exceeds_the_message_limit() {
        let limits = Limits {
            max_frame_bytes: 1000,
            max_message_bytes: 1000,
        };
        let mut s = Conn::new(Role::Server, limits);
        let mut wire = cf(false, OpCode::Binary, &[0; 7]);
        for _ in 0..140 {
            wire.extend(cf(false, OpCode::Continuation, &[1; 7]));
        }
        feed(&mut s, &wire, 64).unwrap();
        assert_eq!(s.assembly.len(), 987);
        assert!(s.assembly.capacity() <= 1000);
        feed(&mut s, &cf(true, OpCode::Continuation, &[2; 13]), 64).unwrap();
        match &events(&mut s)[..] {
            [Event::Message { data, .. }] => assert_eq!(data.len(), 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn utf8_fails_fast_across_fragments() {
        let mut s = server();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&cf(false, OpCode::Text, "κόσμε".as_bytes()));
        s.handle_input(&mut buf).unwrap();
        // The second fragment is invalid (U+110000 encoding); the final one never arrives.
        buf.extend_from_slice(&cf(false, OpCode::Continuation, b"\xf4\x90\x80\x80"));
        assert_eq!(s.handle_input(&mut buf), Err(ProtoError::InvalidUtf8));
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::INVALID_PAYLOAD));
    }

    #[test]
    fn utf8_fails_fast_inside_one_frame() {
        // Autobahn 6.4.3: one text frame delivered in chops; the chop with the invalid byte
        // must fail before the rest of the frame arrives.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(b"\xf4\x90\x80\x80");
        payload.extend_from_slice(b"edited");
        let wire = cf(true, OpCode::Text, &payload);
        let header_len = 6;
        let mut s = server();
        let mut buf = BytesMut::from(&wire[..header_len + 5]);
        s.handle_input(&mut buf).unwrap();
        assert_eq!(s.bytes_needed(), payload.len() - 5);
        buf.extend_from_slice(&wire[header_len + 5..header_len + 12]);
        assert_eq!(s.handle_input(&mut buf), Err(ProtoError::InvalidUtf8));
        // A valid text frame arriving in chops is delivered intact.
        let text = "κόσμε 😀".repeat(10);
        let wire = cf(true, OpCode::Text, text.as_bytes());
        for chunk in [1, 3, 7] {
            let mut s = server();
            feed(&mut s, &wire, chunk).unwrap();
            assert_eq!(events(&mut s), [msg(MessageKind::Text, text.as_bytes())]);
        }
    }

    #[test]
    fn bytes_needed_and_partial_frames() {
        let mut s = server();
        let wire = cf(true, OpCode::Binary, &[5; 1000]);
        let mut buf = BytesMut::from(&wire[..3]);
        s.handle_input(&mut buf).unwrap();
        assert_eq!(s.bytes_needed(), 0); // header incomplete: unknown
        buf.extend_from_slice(&wire[3..18]);
        s.handle_input(&mut buf).unwrap();
        // 8-byte header consumed, 10 payload bytes buffered.
        assert_eq!(buf.len(), 10);
        assert_eq!(s.bytes_needed(), 990);
        buf.extend_from_slice(&wire[18..]);
        s.handle_input(&mut buf).unwrap();
        assert_eq!(s.bytes_needed(), 0);
        assert_eq!(events(&mut s), [msg(MessageKind::Binary, &[5; 1000])]);
    }

    #[test]
    fn reply_to_a_message_before_the_peers_close_goes_out_before_our_close() {
        let mut s = server();
        let wire = [
            cf(true, OpCode::Text, b"hi"),
            cf(true, OpCode::Close, &[0x03, 0xe8]),
        ]
        .concat();
        feed(&mut s, &wire, 1000).unwrap();
        assert_eq!(s.state(), State::Closed);
        let evs = events(&mut s);
        assert_eq!(evs[0], msg(MessageKind::Text, b"hi"));
        // The echo is still accepted, and leaves before the close reply.
        s.send(MessageKind::Text, b"hi").unwrap();
        assert_eq!(s.pending_transmit(), 4 + 4);
        let mut out = Vec::new();
        s.poll_transmit(&mut out);
        assert_eq!(out, [0x81, 0x02, b'h', b'i', 0x88, 0x02, 0x03, 0xe8]);
        // Once the close is out, nothing more.
        assert_eq!(s.send(MessageKind::Text, b"x"), Err(SendError::Closed));
    }

    #[test]
    fn shared_payloads_go_out_in_order_without_a_copy() {
        let mut s = server();
        let big = Bytes::from(vec![9u8; 300]);
        s.send(MessageKind::Text, b"a").unwrap();
        s.send_shared(MessageKind::Binary, big.clone()).unwrap();
        s.send_ping(b"p").unwrap();
        s.send_shared(MessageKind::Text, Bytes::from_static(b"tail"))
            .unwrap();
        s.close(CloseCode::NORMAL, "").unwrap();
        assert!(s.has_shared());
        let wire_len = s.pending_transmit();
        let mut frames = Vec::new();
        assert_eq!(s.poll_transmit_frames(&mut frames), wire_len);
        // The 300-byte payload is the caller's buffer itself.
        assert!(frames.iter().any(|f| f.as_ptr() == big.as_ptr()));
        let wire: Vec<u8> = frames.concat();
        let mut c = client();
        let mut buf = BytesMut::from(&wire[..]);
        c.handle_input(&mut buf).unwrap();
        let evs = events(&mut c);
        assert_eq!(evs.len(), 5, "{evs:?}");
        assert_eq!(evs[1], msg(MessageKind::Binary, &big));
        assert_eq!(evs[3], msg(MessageKind::Text, b"tail"));
        assert!(!s.has_shared());
        assert_eq!(s.pending_transmit(), 0);
        // The copying fallback produces the same bytes.
        let mut s2 = server();
        s2.send(MessageKind::Text, b"a").unwrap();
        s2.send_shared(MessageKind::Binary, big.clone()).unwrap();
        let mut out = Vec::new();
        s2.poll_transmit(&mut out);
        assert_eq!(out.len(), 3 + 4 + 300);
        assert_eq!(&out[7..], &big[..]);
    }

    #[test]
    fn close_initiated_by_server() {
        let (mut s, mut c) = (server(), client());
        s.close(CloseCode::GOING_AWAY, "bye").unwrap();
        assert_eq!(s.state(), State::CloseSent);
        assert_eq!(s.close(CloseCode::NORMAL, ""), Err(SendError::Closed));
        assert_eq!(s.send(MessageKind::Binary, b"x"), Err(SendError::Closed));
        assert_eq!(s.send_ping(b""), Err(SendError::Closed));
        let evs = pump(&mut s, &mut c, 2).unwrap();
        assert_eq!(
            evs,
            [Event::Close {
                code: Some(CloseCode::GOING_AWAY),
                reason: Bytes::from_static(b"bye")
            }]
        );
        assert_eq!(c.state(), State::Closed);
        // The client echoed the code; the server completes the handshake.
        let evs = pump(&mut c, &mut s, 2).unwrap();
        assert_eq!(
            evs,
            [Event::Close {
                code: Some(CloseCode::GOING_AWAY),
                reason: Bytes::new()
            }]
        );
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.pending_transmit(), 0);
    }

    #[test]
    fn close_initiated_by_client_without_code() {
        let (mut s, mut c) = (server(), client());
        let mut buf = BytesMut::from(&cf(true, OpCode::Close, b"")[..]);
        buf.extend_from_slice(&cf(true, OpCode::Text, b"after close"));
        s.handle_input(&mut buf).unwrap();
        assert!(buf.is_empty());
        assert_eq!(s.state(), State::Closed);
        assert_eq!(
            events(&mut s),
            [Event::Close {
                code: None,
                reason: Bytes::new()
            }]
        );
        let mut wire = Vec::new();
        s.poll_transmit(&mut wire);
        assert_eq!(wire, [0x88, 0x00]); // empty echo
        feed(&mut c, &wire, 1).unwrap();
        assert_eq!(
            events(&mut c),
            [Event::Close {
                code: None,
                reason: Bytes::new()
            }]
        );
    }

    #[test]
    fn allowed_close_codes_are_echoed() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            let mut s = server();
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice("reason κ".as_bytes());
            feed(&mut s, &cf(true, OpCode::Close, &payload), 4).unwrap();
            assert_eq!(
                events(&mut s),
                [Event::Close {
                    code: Some(CloseCode(code)),
                    reason: Bytes::from("reason κ".as_bytes())
                }]
            );
            assert_eq!(close_code_on_wire(&mut s), Some(CloseCode(code)));
        }
    }

    #[test]
    fn close_in_the_middle_of_a_fragmented_message() {
        // Autobahn 7.1.5: fragment 1, close, fragment 2.
        let mut s = server();
        let wire = [
            cf(false, OpCode::Text, b"frag1"),
            cf(true, OpCode::Close, &1000u16.to_be_bytes()),
            cf(true, OpCode::Continuation, b"frag2"),
        ]
        .concat();
        feed(&mut s, &wire, 1000).unwrap();
        assert_eq!(
            events(&mut s),
            [Event::Close {
                code: Some(CloseCode::NORMAL),
                reason: Bytes::new()
            }]
        );
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::NORMAL));
    }

    #[test]
    fn after_close_sent_data_is_delivered_pings_are_not_answered() {
        let mut s = server();
        s.close(CloseCode::NORMAL, "").unwrap();
        let wire = [
            cf(true, OpCode::Text, b"late"),
            cf(true, OpCode::Ping, b"p"),
        ]
        .concat();
        feed(&mut s, &wire, 1000).unwrap();
        assert_eq!(events(&mut s), [msg(MessageKind::Text, b"late")]);
        let mut out = Vec::new();
        s.poll_transmit(&mut out);
        assert_eq!(out, [0x88, 0x02, 0x03, 0xe8]); // only our close, no pong
        // Invalid data still fails, without a second close frame.
        assert_eq!(
            feed(&mut s, &cf(true, OpCode::Text, b"\xff"), 10),
            Err(ProtoError::InvalidUtf8)
        );
        assert_eq!(s.state(), State::Failed);
        assert_eq!(s.pending_transmit(), 0);
    }

    /// Pongs received by a client from everything `s` has queued, in order.
    fn pongs(s: &mut Conn) -> Vec<Vec<u8>> {
        let mut c = client();
        pump(s, &mut c, 4096)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Event::Pong(p) => Some(p.to_vec()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_ping_is_answered_until_the_peer_stops_reading() {
        // A short burst, as Autobahn 2.10 sends: one pong each, in order.
        let mut s = server();
        let wire: Vec<u8> = (0..10u8)
            .flat_map(|i| cf(true, OpCode::Ping, &[i; 9]))
            .collect();
        feed(&mut s, &wire, 4096).unwrap();
        assert_eq!(events(&mut s).len(), 10);
        let expected: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 9]).collect();
        assert_eq!(pongs(&mut s), expected);

        // A flood that is never taken: the queue stops growing past the threshold plus one
        // pong, every ping is still reported, and the last pong answers the latest ping.
        let n = 10_000u32;
        let wire: Vec<u8> = (0..n)
            .flat_map(|i| cf(true, OpCode::Ping, &i.to_be_bytes()))
            .collect();
        feed(&mut s, &wire, 1000).unwrap();
        assert_eq!(events(&mut s).len(), n as usize);
        assert!(s.pending_transmit() <= PONG_COALESCE_AFTER + 2 + 125);
        let got = pongs(&mut s);
        assert!(got.len() < PONG_COALESCE_AFTER);
        assert_eq!(got.last().unwrap(), &(n - 1).to_be_bytes());
        // Taken output starts afresh: the next pongs are answered one by one again.
        feed(
            &mut s,
            &[cf(true, OpCode::Ping, b"a"), cf(true, OpCode::Ping, b"b")].concat(),
            99,
        )
        .unwrap();
        assert_eq!(pongs(&mut s), [b"a".to_vec(), b"b".to_vec()]);

        // A pong that is not the last frame queued is never replaced (it has other frames
        // after it), and a data message is never lost to coalescing.
        let mut s = server();
        s.send(MessageKind::Binary, &[0; PONG_COALESCE_AFTER])
            .unwrap();
        feed(&mut s, &cf(true, OpCode::Ping, b"1"), 99).unwrap();
        s.send(MessageKind::Text, b"between").unwrap();
        feed(
            &mut s,
            &[cf(true, OpCode::Ping, b"2"), cf(true, OpCode::Ping, b"3")].concat(),
            99,
        )
        .unwrap();
        let mut c = client();
        let evs = pump(&mut s, &mut c, 4096).unwrap();
        assert_eq!(
            evs,
            [
                msg(MessageKind::Binary, &[0; PONG_COALESCE_AFTER]),
                Event::Pong(Bytes::from_static(b"1")),
                msg(MessageKind::Text, b"between"),
                Event::Pong(Bytes::from_static(b"3")),
            ]
        );
    }

    #[test]
    fn send_errors_and_reason_truncation() {
        let mut s = server();
        assert_eq!(s.send_ping(&[0; 126]), Err(SendError::ControlTooLong));
        assert_eq!(s.send_pong(&[0; 126]), Err(SendError::ControlTooLong));
        assert_eq!(
            s.close(CloseCode::NO_STATUS, ""),
            Err(SendError::InvalidCloseCode(1005))
        );
        assert_eq!(
            s.close(CloseCode::ABNORMAL, ""),
            Err(SendError::InvalidCloseCode(1006))
        );
        assert_eq!(s.state(), State::Open);
        assert_eq!(s.pending_transmit(), 0);
        s.send_ping(&[1; 125]).unwrap();
        s.send_pong(b"u").unwrap();
        let long = "é".repeat(100);
        s.close(CloseCode(4000), &long).unwrap();
        let mut c = client();
        let evs = pump(&mut s, &mut c, 9).unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0], Event::Ping(Bytes::from(vec![1; 125])));
        match &evs[2] {
            Event::Close { code, reason } => {
                assert_eq!(*code, Some(CloseCode(4000)));
                assert_eq!(reason.len(), 122);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_to_messages_before_an_error_precede_the_close_frame() {
        let mut s = server();
        let mut wire = cf(true, OpCode::Text, b"first");
        wire.extend(raw(true, 0b100, 0x1, b"bad rsv", Some(KEY)));
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(s.handle_input(&mut buf), Err(ProtoError::ReservedBits));
        assert_eq!(s.state(), State::Failed);
        assert!(s.pending_transmit() > 0, "the close frame is owed");
        let before = s.pending_transmit();
        assert_eq!(events(&mut s), [msg(MessageKind::Text, b"first")]);
        s.send(MessageKind::Text, b"first").unwrap();
        assert_eq!(s.pending_transmit(), before + 7);
        let mut c = client();
        let evs = pump(&mut s, &mut c, 3).unwrap();
        assert_eq!(evs[0], msg(MessageKind::Text, b"first"));
        assert!(matches!(
            evs[1],
            Event::Close {
                code: Some(CloseCode::PROTOCOL_ERROR),
                ..
            }
        ));
        // Once the close frame is out, nothing else may be queued.
        assert_eq!(s.send(MessageKind::Text, b"late"), Err(SendError::Closed));
        assert_eq!(s.close(CloseCode::NORMAL, ""), Err(SendError::Closed));
        assert_eq!(s.pending_transmit(), 0);
    }

    #[test]
    fn poll_transmit_swaps_or_appends() {
        let mut s = server();
        s.send(MessageKind::Binary, b"abc").unwrap();
        let mut out = Vec::with_capacity(1000);
        let n = s.poll_transmit(&mut out);
        assert_eq!(n, 5);
        assert_eq!(out, b"\x82\x03abc");
        // The connection kept `out`'s old allocation.
        assert_eq!(s.pending_transmit(), 0);
        s.send(MessageKind::Binary, b"d").unwrap();
        assert_eq!(s.poll_transmit(&mut out), 3);
        assert_eq!(out, b"\x82\x03abc\x82\x01d");
        assert_eq!(s.poll_transmit(&mut out), 0);
    }

    #[test]
    fn client_masks_vary() {
        let mut c = client();
        c.send(MessageKind::Binary, b"").unwrap();
        c.send(MessageKind::Binary, b"").unwrap();
        let mut out = Vec::new();
        c.poll_transmit(&mut out);
        assert_eq!(out.len(), 12);
        assert_ne!(out[2..6], out[8..12]);
        let mut c0 = Conn::new(Role::Client, Limits::default());
        c0.set_mask_seed(0);
        c0.send(MessageKind::Binary, b"x").unwrap();
        assert_eq!(c0.pending_transmit(), 7);
    }

    // ---- permessage-deflate ----

    use crate::proto::deflate::{Compressor, DeflateParams};

    fn nct() -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            ..DeflateParams::default()
        }
    }

    fn deflate_server(params: DeflateParams, limits: Limits) -> Conn {
        let mut s = Conn::new(Role::Server, limits);
        s.set_deflate(&params, 0);
        s
    }

    fn deflate_client(params: DeflateParams) -> Conn {
        let mut c = client();
        c.set_deflate(&params, 0);
        c
    }

    /// A raw-deflate compressor that keeps its context between messages when `takeover`
    /// (what a browser does without client_no_context_takeover).
    struct PeerDeflate {
        z: flate2::Compress,
        takeover: bool,
    }

    impl PeerDeflate {
        fn new(takeover: bool) -> Self {
            Self {
                z: flate2::Compress::new(flate2::Compression::new(6), false),
                takeover,
            }
        }

        fn compress(&mut self, data: &[u8]) -> Vec<u8> {
            if !self.takeover {
                self.z.reset();
            }
            let mut out = Vec::with_capacity(data.len() + 64);
            let mut input = data;
            loop {
                let before = self.z.total_in();
                self.z
                    .compress_vec(input, &mut out, flate2::FlushCompress::Sync)
                    .unwrap();
                input = &input[(self.z.total_in() - before) as usize..];
                if input.is_empty() && out.len() < out.capacity() {
                    break;
                }
                out.reserve(out.capacity());
            }
            if out.is_empty() {
                // Nothing new to flush (an empty message after another one, with context
                // takeover): RFC 7692 7.2.3.6, an empty stored block's first byte.
                return vec![0x00];
            }
            assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
            out.truncate(out.len() - 4);
            out
        }
    }

    /// Masked client frames of one compressed message: `compressed` split into `pieces`
    /// frames, RSV1 on the first only.
    fn compressed_frames(op: OpCode, compressed: &[u8], pieces: usize) -> Vec<u8> {
        let step = compressed.len() / pieces.max(1) + 1;
        let chunks: Vec<&[u8]> = if compressed.is_empty() {
            vec![&[]]
        } else {
            compressed.chunks(step).collect()
        };
        let mut wire = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let (rsv, opcode) = if i == 0 { (0b100, op.as_u8()) } else { (0, 0) };
            wire.extend(raw(i + 1 == chunks.len(), rsv, opcode, c, Some(KEY)));
        }
        wire
    }

    #[test]
    fn a_compressed_frame_asks_for_one_piece_at_a_time() {
        let limits = Limits {
            max_frame_bytes: 64 << 20,
            max_message_bytes: 64 << 20,
        };
        let mut s = deflate_server(nct(), limits.clone());
        // A header announcing 32 MiB of compressed payload, and its first bytes.
        let payload = PeerDeflate::new(false).compress(&vec![b'a'; 1 << 20]);
        let mut wire = Vec::new();
        encode_header(true, OpCode::Binary, 32 << 20, Some(KEY), &mut wire);
        wire[0] |= 0b0100_0000;
        let mut piece = payload[..100].to_vec();
        apply_mask(&mut piece, KEY, 0);
        wire.extend_from_slice(&piece);
        let mut buf = BytesMut::from(&wire[..]);
        s.handle_input(&mut buf).unwrap();
        assert!(buf.is_empty(), "the piece was inflated and consumed");
        assert_eq!(s.bytes_needed(), COMPRESSED_READ_HINT as usize);
        // An uncompressed frame still asks for all of its rest: it stays in the buffer.
        let mut s = Conn::new(Role::Server, limits);
        let mut wire = Vec::new();
        encode_header(true, OpCode::Binary, 32 << 20, Some(KEY), &mut wire);
        wire.extend_from_slice(&[0; 100]);
        s.handle_input(&mut BytesMut::from(&wire[..])).unwrap();
        assert_eq!(s.bytes_needed(), (32 << 20) - 100);
    }

    #[test]
    fn deflate_round_trips_with_and_without_context_takeover() {
        let texts: Vec<String> = (0..5)
            .map(|i| format!("{{\"seq\":{i},\"symbol\":\"BTC-USD\",\"price\":43125.5}}").repeat(30))
            .collect();
        for takeover in [false, true] {
            let params = DeflateParams {
                client_no_context_takeover: !takeover,
                ..nct()
            };
            let mut peer = PeerDeflate::new(takeover);
            let mut wire = Vec::new();
            let mut sizes = Vec::new();
            for t in &texts {
                let z = peer.compress(t.as_bytes());
                sizes.push(z.len());
                wire.extend(compressed_frames(OpCode::Text, &z, 1));
            }
            if takeover {
                // The later messages refer back to the first one.
                assert!(sizes[4] < sizes[0] / 2, "{sizes:?}");
            }
            for chunk in [1, 7, 100, wire.len()] {
                let mut s = deflate_server(params, Limits::default());
                feed(&mut s, &wire, chunk).unwrap();
                let expected: Vec<Event> = texts
                    .iter()
                    .map(|t| msg(MessageKind::Text, t.as_bytes()))
                    .collect();
                assert_eq!(
                    events(&mut s),
                    expected,
                    "takeover {takeover} chunk {chunk}"
                );
                // The inflate state outlives a message only with context takeover.
                assert_eq!(s.holds_inflate_state(), takeover);
                let st = s.take_deflate_stats().unwrap();
                assert_eq!(st.inflated, 5);
                assert_eq!(
                    st.inflated_out,
                    texts.iter().map(|t| t.len() as u64).sum::<u64>()
                );
                assert_eq!(s.take_deflate_stats(), None);
            }
        }
    }

    #[test]
    fn fragmented_compressed_messages_with_interleaved_control_frames() {
        let text = "κόσμε and some ascii, ".repeat(200);
        let z = PeerDeflate::new(false).compress(text.as_bytes());
        for pieces in [2, 3, 10, z.len()] {
            let frames = compressed_frames(OpCode::Text, &z, pieces);
            // A ping after the first fragment.
            let (h, hlen) = decode_header(&frames).unwrap().unwrap();
            let first = hlen + h.payload_len as usize;
            let mut wire = frames[..first].to_vec();
            wire.extend(cf(true, OpCode::Ping, b"p"));
            wire.extend_from_slice(&frames[first..]);
            // An uncompressed message right after.
            wire.extend(cf(true, OpCode::Binary, b"plain"));
            for chunk in [1, 5, 64, wire.len()] {
                let mut s = deflate_server(nct(), Limits::default());
                feed(&mut s, &wire, chunk).unwrap();
                assert_eq!(
                    events(&mut s),
                    [
                        Event::Ping(Bytes::from_static(b"p")),
                        msg(MessageKind::Text, text.as_bytes()),
                        msg(MessageKind::Binary, b"plain"),
                    ],
                    "pieces {pieces} chunk {chunk}"
                );
                assert!(!s.holds_inflate_state());
            }
        }
    }

    #[test]
    fn decompression_bomb_fails_with_1009_within_the_limit() {
        // 256 MiB of zeros in ~250 KB of deflate.
        let mut z = flate2::Compress::new(flate2::Compression::new(9), false);
        let zeros = vec![0u8; 1 << 20];
        let mut bomb = Vec::with_capacity(1 << 20);
        for i in 0..256 {
            let flush = if i == 255 {
                flate2::FlushCompress::Sync
            } else {
                flate2::FlushCompress::None
            };
            let mut input = &zeros[..];
            while !input.is_empty() || flush == flate2::FlushCompress::Sync {
                let before = z.total_in();
                bomb.reserve(4096);
                z.compress_vec(input, &mut bomb, flush).unwrap();
                input = &input[(z.total_in() - before) as usize..];
                if input.is_empty() && bomb.len() < bomb.capacity() {
                    break;
                }
            }
        }
        bomb.truncate(bomb.len() - 4);
        assert!(bomb.len() < 400_000, "{}", bomb.len());
        let limits = Limits {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
        };
        // One frame, fed in 8 KiB reads: the buffer stays within the limit until it fails.
        let wire = compressed_frames(OpCode::Binary, &bomb, 1);
        let mut s = deflate_server(nct(), limits.clone());
        let mut buf = BytesMut::new();
        let mut result = Ok(());
        for piece in wire.chunks(8192) {
            buf.extend_from_slice(piece);
            result = s.handle_input(&mut buf);
            if result.is_err() {
                break;
            }
            assert!(s.assembly.capacity() <= limits.max_message_bytes + 1);
        }
        assert_eq!(result, Err(ProtoError::InflatedTooLarge));
        assert!(s.assembly.capacity() == 0 && !s.holds_inflate_state());
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::TOO_BIG));
        // Fragmented the same way.
        let wire = compressed_frames(OpCode::Binary, &bomb, 40);
        let mut s = deflate_server(nct(), limits.clone());
        assert_eq!(
            feed(&mut s, &wire, 65536),
            Err(ProtoError::InflatedTooLarge)
        );
    }

    #[test]
    fn deflate_protocol_errors() {
        let z = PeerDeflate::new(false).compress(b"hello hello hello");
        let cases: Vec<(Vec<u8>, ProtoError, u16)> = vec![
            // Compressed control frames.
            (
                raw(true, 0b100, 0x9, b"", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            (
                raw(true, 0b100, 0x8, b"", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            // RSV1 on a continuation frame.
            (
                [
                    raw(false, 0b100, 0x1, &z[..3], Some(KEY)),
                    raw(true, 0b100, 0x0, &z[3..], Some(KEY)),
                ]
                .concat(),
                ProtoError::ReservedBits,
                1002,
            ),
            // RSV2 and RSV3 stay reserved.
            (
                raw(true, 0b010, 0x1, b"x", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            (
                raw(true, 0b001, 0x2, b"x", Some(KEY)),
                ProtoError::ReservedBits,
                1002,
            ),
            // Not a deflate stream (reserved block type).
            (
                raw(true, 0b100, 0x2, &[0xff, 0xff, 0xff], Some(KEY)),
                ProtoError::InvalidCompressedData,
                1007,
            ),
            // Inflates to invalid UTF-8.
            (
                raw(
                    true,
                    0b100,
                    0x1,
                    &PeerDeflate::new(false).compress(b"ab\xff"),
                    Some(KEY),
                ),
                ProtoError::InvalidUtf8,
                1007,
            ),
            // Inflates to text that ends inside a code point.
            (
                raw(
                    true,
                    0b100,
                    0x1,
                    &PeerDeflate::new(false).compress(b"ab\xe2\x82"),
                    Some(KEY),
                ),
                ProtoError::InvalidUtf8,
                1007,
            ),
        ];
        for (wire, err, code) in cases {
            for chunk in [1, 3, wire.len()] {
                let mut s = deflate_server(nct(), Limits::default());
                assert_eq!(feed(&mut s, &wire, chunk), Err(err.clone()), "{err:?}");
                assert_eq!(close_code_on_wire(&mut s), Some(CloseCode(code)), "{err:?}");
            }
        }
        // Without the extension, RSV1 is a protocol error like any reserved bit.
        let mut s = server();
        assert_eq!(
            feed(&mut s, &raw(true, 0b100, 0x1, &z, Some(KEY)), 100),
            Err(ProtoError::ReservedBits)
        );
        assert_eq!(close_code_on_wire(&mut s), Some(CloseCode::PROTOCOL_ERROR));
    }

    #[test]
    fn send_compressed_both_roles() {
        let mut z = Compressor::default();
        let big = "{\"k\":\"value value value\"}".repeat(100);
        for bits in [None, Some(9), Some(8)] {
            let params = DeflateParams {
                server_max_window_bits: bits,
                client_max_window_bits: bits,
                ..nct()
            };
            for server_sends in [true, false] {
                let mut s = deflate_server(params, Limits::default());
                let mut c = deflate_client(params);
                let (from, to) = if server_sends {
                    (&mut s, &mut c)
                } else {
                    (&mut c, &mut s)
                };
                from.set_deflate(&params, 512);
                assert!(
                    !from
                        .send_compressed(MessageKind::Text, b"short", &mut z)
                        .unwrap()
                );
                let compressed = from
                    .send_compressed(MessageKind::Text, big.as_bytes(), &mut z)
                    .unwrap();
                // A peer that limits our window to 8 bits gets uncompressed messages.
                assert_eq!(compressed, bits != Some(8));
                let wire_len = from.pending_transmit();
                if compressed {
                    assert!(wire_len < big.len() / 4, "{wire_len}");
                    let st = from.take_deflate_stats().unwrap();
                    assert_eq!((st.compressed, st.compressed_in), (1, big.len() as u64));
                }
                assert_eq!(
                    pump(from, to, 50).unwrap(),
                    [
                        msg(MessageKind::Text, b"short"),
                        msg(MessageKind::Text, big.as_bytes())
                    ]
                );
            }
        }
        // Without the extension it is a plain send.
        let mut s = server();
        assert!(
            !s.send_compressed(MessageKind::Binary, big.as_bytes(), &mut z)
                .unwrap()
        );
        assert_eq!(s.pending_transmit(), 4 + big.len());
        s.close(CloseCode::NORMAL, "").unwrap();
        assert_eq!(
            s.send_compressed(MessageKind::Binary, b"x", &mut z),
            Err(SendError::Closed)
        );
    }

    #[test]
    fn empty_compressed_messages() {
        // An empty payload with RSV1, and the empty stream a sync flush of nothing gives.
        for payload in [&[][..], &[0x02, 0x00][..]] {
            let mut s = deflate_server(nct(), Limits::default());
            feed(&mut s, &raw(true, 0b100, 0x1, payload, Some(KEY)), 1).unwrap();
            assert_eq!(events(&mut s), [msg(MessageKind::Text, b"")]);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Msg(bool, Vec<u8>),
        Ping(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(t, d)| Op::Msg(t, d)),
            "\\PC{0,40}".prop_map(|s| Op::Msg(true, s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..125).prop_map(Op::Ping),
        ]
    }

    proptest! {
        #[test]
        fn random_streams_split_anywhere(ops in proptest::collection::vec(op(), 0..12), cuts in proptest::collection::vec(any::<usize>(), 0..10), frag in 1usize..4) {
            // Build a masked client stream: messages (text made valid) split into `frag`
            // fragments, pings in between.
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for op in &ops {
                match op {
                    Op::Msg(text, data) => {
                        let (kind, data) = if *text {
                            (MessageKind::Text, String::from_utf8_lossy(data).into_owned().into_bytes())
                        } else {
                            (MessageKind::Binary, data.clone())
                        };
                        let first = if kind == MessageKind::Text { OpCode::Text } else { OpCode::Binary };
                        let step = data.len() / frag + 1;
                        let pieces: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(step).collect() };
                        for (i, piece) in pieces.iter().enumerate() {
                            let op = if i == 0 { first } else { OpCode::Continuation };
                            wire.extend(cf(i + 1 == pieces.len(), op, piece));
                        }
                        expected.push(msg(kind, &data));
                    }
                    Op::Ping(p) => {
                        wire.extend(cf(true, OpCode::Ping, p));
                        expected.push(Event::Ping(Bytes::from(p.clone())));
                    }
                }
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.sort_unstable();
            points.push(wire.len());
            let mut s = server();
            let mut buf = BytesMut::new();
            let mut prev = 0;
            for p in points {
                buf.extend_from_slice(&wire[prev..p]);
                prev = p;
                s.handle_input(&mut buf).unwrap();
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(events(&mut s), expected);
        }

        #[test]
        fn compressed_streams_split_anywhere(
            msgs in proptest::collection::vec((any::<bool>(), any::<bool>(), "[a-c ]{0,600}", 1usize..5), 1..8),
            takeover in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            // Messages, each compressed or not (by a peer keeping its context or not), text or
            // binary, in 1-4 fragments; the stream cut at random points.
            let params = DeflateParams { client_no_context_takeover: !takeover, ..nct() };
            let mut peer = PeerDeflate::new(takeover);
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (compress, text, body, frags) in &msgs {
                let (kind, op) = if *text { (MessageKind::Text, OpCode::Text) } else { (MessageKind::Binary, OpCode::Binary) };
                if *compress {
                    let z = peer.compress(body.as_bytes());
                    wire.extend(compressed_frames(op, &z, *frags));
                } else {
                    wire.extend(cf(true, op, body.as_bytes()));
                }
                expected.push(msg(kind, body.as_bytes()));
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.sort_unstable();
            points.push(wire.len());
            let mut s = deflate_server(params, Limits::default());
            let mut buf = BytesMut::new();
            let mut prev = 0;
            for p in points {
                buf.extend_from_slice(&wire[prev..p]);
                prev = p;
                s.handle_input(&mut buf).unwrap();
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(events(&mut s), expected);
        }

        #[test]
        fn send_then_decode_is_identity(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 1..3), chunk in 1usize..9000, seed in any::<u64>()) {
            let (mut s, mut c) = (server(), client());
            c.set_mask_seed(seed);
            for p in &payloads {
                c.send(MessageKind::Binary, p).unwrap();
                s.send(MessageKind::Binary, p).unwrap();
            }
            let expected: Vec<Event> = payloads.iter().map(|p| msg(MessageKind::Binary, p)).collect();
            prop_assert_eq!(pump(&mut c, &mut s, chunk).unwrap(), expected.clone());
            prop_assert_eq!(pump(&mut s, &mut c, chunk).unwrap(), expected);
        }
    }
}
#[cfg(test)]
mod tmp_sizes {
    #[test]
    fn sizes() {
        use std::mem::size_of;
        eprintln!(
            "Conn {} FIP {} OptFIP {} DC {} Utf8 {} Event {} State {}",
            size_of::<super::Conn>(),
            size_of::<super::FrameInProgress>(),
            size_of::<Option<super::FrameInProgress>>(),
            size_of::<Option<super::DeferredClose>>(),
            size_of::<super::Utf8Validator>(),
            size_of::<super::Event>(),
            size_of::<super::State>()
        );
    }
}
