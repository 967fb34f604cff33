//! permessage-deflate (RFC 7692): negotiation in both roles, inflating received messages
//! under a size cap, and compressing outgoing ones.
//!
//! This module owns the extension's wire rules: parsing `Sec-WebSocket-Extensions` offers
//! ([`negotiate`], server role) and answers ([`accept_response`], client role), the
//! parameters both sides agreed on ([`DeflateParams`]), the per-connection receive state that
//! [`super::Conn`] keeps only when the extension was negotiated (`ConnDeflate`), and the
//! [`Compressor`] that turns a message payload into a compressed one.
//!
//! # Memory
//! Sending never uses context takeover: every message is compressed on its own, so the
//! sender's LZ77 window is not kept per connection. The server always answers
//! `server_no_context_takeover`, which lets one [`Compressor`] per thread (shard) serve every
//! connection and lets a broadcast be compressed once and shared. Receiving keeps an inflate
//! state (47.7 KB with zlib-rs, whatever the window size: its window buffer is always 32 KiB)
//! only while a compressed message is being received, unless the peer keeps its compression
//! context across messages (a client that was allowed to, or an upstream server that did not
//! accept `server_no_context_takeover`); then it is kept for the life of the connection.
//!
//! # Decompression bombs
//! A compressed message is inflated in steps of at most [`INFLATE_STEP`] bytes into a buffer
//! that grows geometrically but never beyond `max_message_bytes + 1`: the step that makes
//! the message one byte too large fails it with [`ProtoError::InflatedTooLarge`] (1009), so a
//! bomb costs at most the configured message size, never its inflated size. Text is
//! validated as UTF-8 after each step, so invalid text fails before the rest is inflated.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::error::{HandshakeError, ProtoError};
use super::utf8::Utf8Validator;

/// The extension token.
pub const EXTENSION: &str = "permessage-deflate";
/// The tail a sync flush ends with, removed by the sender and appended by the receiver
/// (RFC 7692 7.2.1 and 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Largest output of one inflate step: the granularity of the size and UTF-8 checks.
pub const INFLATE_STEP: usize = 64 * 1024;
/// Compression level of outgoing messages: zlib-rs level 1 (measured in
/// `docs/design/006-permessage-deflate.md`: 3-4 µs per 2 KiB of JSON, 4-8x smaller).
pub const LEVEL: u32 = 1;
/// Smallest window zlib-rs can compress raw deflate with. A peer that limits our window to
/// 8 bits (256 bytes) gets uncompressed messages (allowed: RSV1 is per message).
const MIN_DEFLATE_WINDOW: u8 = 9;

/// What this endpoint negotiates, from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Messages with fewer payload bytes are sent uncompressed: on small messages deflate
    /// costs more CPU than it saves bytes. Default 512.
    pub threshold_bytes: usize,
    /// Let the peer keep its compression context between messages. Server role: when
    /// false (the default), the answer carries `client_no_context_takeover`, so no inflate
    /// state outlives a message; when true, a client that did not offer that parameter may
    /// keep its context and its connection keeps a 47.7 KB inflate state. Client role: when
    /// false the offer asks for `server_no_context_takeover`.
    pub peer_context_takeover: bool,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            threshold_bytes: 512,
            peer_context_takeover: false,
        }
    }
}

/// The agreed parameters of one connection (RFC 7692 section 7.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server compresses every message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses every message on its own.
    pub client_no_context_takeover: bool,
    /// Largest LZ77 window (log2, 8..=15) the server may use; `None`: not limited (15).
    pub server_max_window_bits: Option<u8>,
    /// Largest LZ77 window (log2, 8..=15) the client may use; `None`: not limited (15).
    pub client_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value that states these parameters (the server's
    /// answer).
    pub fn header_value(&self) -> String {
        let mut s = String::from(EXTENSION);
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if let Some(b) = self.server_max_window_bits {
            s.push_str(&format!("; server_max_window_bits={b}"));
        }
        if let Some(b) = self.client_max_window_bits {
            s.push_str(&format!("; client_max_window_bits={b}"));
        }
        s
    }
}

/// One element of an extension list: its token and parameters (values unquoted).
struct Extension<'a> {
    name: &'a str,
    params: Vec<(&'a str, Option<&'a str>)>,
}

/// Parse one comma-separated element of `Sec-WebSocket-Extensions` (RFC 6455 9.1:
/// `extension-token *( ";" extension-param )`, `extension-param = token [ "=" (token |
/// quoted-string) ]`). `None` if it does not follow that grammar.
fn parse_extension(element: &str) -> Option<Extension<'_>> {
    let mut parts = element.split(';').map(|p| p.trim_matches([' ', '\t']));
    let name = parts.next().filter(|n| is_token(n))?;
    let mut params = Vec::new();
    for p in parts {
        let (key, value) = match p.split_once('=') {
            None => (p, None),
            Some((k, v)) => {
                let v = v.trim_matches([' ', '\t']);
                let v = match v.strip_prefix('"') {
                    // A quoted value must itself be a token once unquoted (RFC 6455 9.1);
                    // token characters never need escaping.
                    Some(q) => q.strip_suffix('"').filter(|q| is_token(q))?,
                    None => Some(v).filter(|v| is_token(v))?,
                };
                (k.trim_matches([' ', '\t']), Some(v))
            }
        };
        if !is_token(key) {
            return None;
        }
        params.push((key, value));
    }
    Some(Extension { name, params })
}

/// An RFC 7230 token: one or more of `!#$%&'*+-.^_`|~`, digits and letters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A window-bits value: a decimal integer 8..=15 without leading zeroes.
fn window_bits(v: &str) -> Option<u8> {
    match v.as_bytes() {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// Server role: choose the first acceptable `permessage-deflate` offer among the client's
/// `Sec-WebSocket-Extensions` elements (as in [`super::UpgradeRequest::extensions`]) and
/// return the parameters to answer with ([`DeflateParams::header_value`]); `Ok(None)` when
/// no offer is acceptable (the connection proceeds without compression).
///
/// An offer is declined (RFC 7692 7.1) if it has an unknown parameter, a parameter twice, or
/// an invalid value; the next one is then considered. Every accepted offer is answered with
/// `server_no_context_takeover` (we never keep a compression context), with
/// `client_no_context_takeover` unless `cfg.peer_context_takeover` allows the client to keep
/// its own, and with `server_max_window_bits` if the client asked for it.
///
/// # Errors
/// [`HandshakeError::InvalidExtensions`] (400) if an element is not an extension at all by
/// the grammar of RFC 6455 9.1: RFC 6455 4.2.1 asks for 400 when a request does not follow
/// the handshake's description.
pub fn negotiate(
    extensions: &[String],
    cfg: &DeflateConfig,
) -> Result<Option<DeflateParams>, HandshakeError> {
    let mut chosen = None;
    for element in extensions {
        let ext = parse_extension(element).ok_or(HandshakeError::InvalidExtensions)?;
        if chosen.is_none() && ext.name.eq_ignore_ascii_case(EXTENSION) {
            chosen = accept_offer(&ext.params, cfg);
        }
    }
    Ok(chosen)
}

/// The extension's parameters (RFC 7692 7.1), in the order [`param_index`] numbers them.
const PARAMS: [&str; 4] = [
    "server_no_context_takeover",
    "client_no_context_takeover",
    "server_max_window_bits",
    "client_max_window_bits",
];

/// The index in [`PARAMS`] of `key` (case-insensitive), marking it in `seen`; `None` for an
/// unknown parameter or one already seen (both make an offer or an answer invalid).
fn param_index(key: &str, seen: &mut [bool; 4]) -> Option<usize> {
    let i = PARAMS.iter().position(|k| key.eq_ignore_ascii_case(k))?;
    (!std::mem::replace(&mut seen[i], true)).then_some(i)
}

/// The answer to one offer, or `None` to decline it.
fn accept_offer(params: &[(&str, Option<&str>)], cfg: &DeflateConfig) -> Option<DeflateParams> {
    let mut seen = [false; 4];
    let mut client_nct = false;
    let mut server_bits = None;
    for (key, value) in params {
        match (param_index(key, &mut seen)?, value) {
            // The context-takeover parameters have no value.
            (0, None) => {}
            (1, None) => client_nct = true,
            (2, Some(v)) => server_bits = Some(window_bits(v)?),
            // No value (the client supports the parameter) or a hint of its own window;
            // either way any client window fits our 15-bit inflate window.
            (3, None) => {}
            (3, Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
    }
    Some(DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: client_nct || !cfg.peer_context_takeover,
        server_max_window_bits: server_bits,
        client_max_window_bits: None,
    })
}

/// Client role: the `Sec-WebSocket-Extensions` value we offer: one offer that says we never
/// use context takeover ourselves (`client_no_context_takeover`), accepts a window limit
/// (`client_max_window_bits`), and unless `cfg.peer_context_takeover` asks the server not to
/// keep its context either (`server_no_context_takeover`), so no inflate state outlives a
/// message.
pub fn client_offer(cfg: &DeflateConfig) -> String {
    let mut s = format!("{EXTENSION}; client_no_context_takeover; client_max_window_bits");
    if !cfg.peer_context_takeover {
        s.push_str("; server_no_context_takeover");
    }
    s
}

/// Client role: judge the `Sec-WebSocket-Extensions` of the server's 101 (`headers` as in
/// [`super::UpgradeResponse::headers`]), given whether we offered permessage-deflate.
/// `Ok(None)`: no extension in use.
///
/// # Errors
/// [`HandshakeError::UnexpectedExtension`] (we fail the connection, RFC 6455 4.1 and RFC
/// 7692 7.1) when the server answered an extension we did not offer, more than one, or
/// permessage-deflate with an unknown or repeated parameter or an invalid value (a window
/// outside 8..=15, a value on a context-takeover parameter, `client_max_window_bits` without
/// a value).
pub fn accept_response(
    headers: &[(String, String)],
    offered: bool,
) -> Result<Option<DeflateParams>, HandshakeError> {
    let mut elements = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .flat_map(|(_, v)| v.split(','))
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty());
    let Some(first) = elements.next() else {
        return Ok(None);
    };
    let bad = HandshakeError::UnexpectedExtension;
    if !offered || elements.next().is_some() {
        return Err(bad);
    }
    let ext = parse_extension(first).ok_or(bad.clone())?;
    if !ext.name.eq_ignore_ascii_case(EXTENSION) {
        return Err(bad);
    }
    let mut p = DeflateParams::default();
    let mut seen = [false; 4];
    for (key, value) in &ext.params {
        match (param_index(key, &mut seen).ok_or(bad.clone())?, value) {
            (0, None) => p.server_no_context_takeover = true,
            (1, None) => p.client_no_context_takeover = true,
            (2, Some(v)) => p.server_max_window_bits = Some(window_bits(v).ok_or(bad.clone())?),
            (3, Some(v)) => p.client_max_window_bits = Some(window_bits(v).ok_or(bad.clone())?),
            _ => return Err(bad),
        }
    }
    Ok(Some(p))
}

/// Counters of one connection's compression, taken with [`super::Conn::take_deflate_stats`];
/// also the message and byte part of a shard's deflate counters (`metrics::DeflateSnapshot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DeflateStats {
    /// Messages sent compressed.
    pub compressed: u64,
    /// Their payload bytes before compression.
    pub compressed_in: u64,
    /// Their payload bytes after compression.
    pub compressed_out: u64,
    /// Compressed messages received and inflated.
    pub inflated: u64,
    /// Their payload bytes as received.
    pub inflated_in: u64,
    /// Their payload bytes after inflating.
    pub inflated_out: u64,
}

impl DeflateStats {
    /// Add `o`'s counts to these (wrapping, as counters do).
    pub fn add(&mut self, o: &DeflateStats) {
        let pairs = [
            (&mut self.compressed, o.compressed),
            (&mut self.compressed_in, o.compressed_in),
            (&mut self.compressed_out, o.compressed_out),
            (&mut self.inflated, o.inflated),
            (&mut self.inflated_in, o.inflated_in),
            (&mut self.inflated_out, o.inflated_out),
        ];
        for (a, b) in pairs {
            *a = a.wrapping_add(b);
        }
    }
}

/// Compresses message payloads (RFC 7692 7.2.1) without context takeover: each payload is
/// a raw DEFLATE stream of its own, sync-flushed, with the `00 00 ff ff` tail removed.
///
/// Holds one zlib state per window size in use (about 250-380 KB each, created on first
/// use), so it belongs to a thread (one per shard), not to a connection.
pub struct Compressor {
    level: Compression,
    /// Index: window bits - 9.
    states: [Option<Compress>; 7],
    out: Vec<u8>,
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new(LEVEL)
    }
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level.level())
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor at zlib `level` (0..=9).
    pub fn new(level: u32) -> Self {
        Self {
            level: Compression::new(level.min(9)),
            states: Default::default(),
            out: Vec::new(),
        }
    }

    /// Compress `payload` with an LZ77 window of at most `2^window_bits` bytes. `None` when
    /// the result would not be smaller than the payload, or the window is below 9 bits
    /// (send the message uncompressed then). The result is valid until the next call.
    pub fn compress(&mut self, payload: &[u8], window_bits: u8) -> Option<&[u8]> {
        if !(MIN_DEFLATE_WINDOW..=15).contains(&window_bits) {
            return None;
        }
        let level = self.level;
        let i = usize::from(window_bits - MIN_DEFLATE_WINDOW);
        let z = self.states[i]
            .get_or_insert_with(|| Compress::new_with_window_bits(level, false, window_bits));
        z.reset();
        // A burst of large messages does not leave a large buffer behind for good.
        if self.out.capacity() > 1 << 20 && payload.len() < 1 << 16 {
            self.out = Vec::new();
        }
        self.out.clear();
        // Room for the worst case (level 1 codes literals in up to 9 bits), so the stream is
        // always finished: see the reset note below.
        self.out
            .reserve_exact(payload.len() + payload.len() / 8 + 64);
        let mut input = payload;
        let complete = loop {
            let (in_before, out_before) = (z.total_in(), self.out.len());
            // Errors only for a misused stream (impossible after `reset`): send uncompressed.
            if z.compress_vec(input, &mut self.out, FlushCompress::Sync)
                .is_err()
            {
                break false;
            }
            let consumed = (z.total_in() - in_before) as usize;
            input = &input[consumed..];
            if self.out.len() < self.out.capacity() && input.is_empty() {
                break true;
            }
            if self.out.len() == self.out.capacity()
                || (consumed == 0 && self.out.len() == out_before)
            {
                break false;
            }
        };
        if !complete {
            // zlib-rs 0.6.8 does not clear all the state of an unfinished stream on reset
            // (level 1 keeps its open block, and a later stream overflows its pending
            // buffer: a panic, or corrupt output in release builds). Never reached with the
            // room reserved above; if it is, the next message gets a fresh state.
            self.states[i] = None;
            return None;
        }
        // A complete sync flush ends with the empty stored block's tail.
        let n = self.out.len().checked_sub(TAIL.len())?;
        if self.out[n..] != TAIL || n >= payload.len() {
            return None;
        }
        Some(&self.out[..n])
    }
}

/// The receive side of a connection that negotiated permessage-deflate.
#[derive(Debug)]
pub(crate) struct ConnDeflate {
    /// The peer keeps its compression context: keep the inflate state between messages.
    keep_context: bool,
    /// Window for our outgoing messages; `None`: never compress (a limit below 9 bits).
    pub(crate) out_window: Option<u8>,
    /// Smallest payload sent compressed.
    pub(crate) threshold: u32,
    /// The inflate state: present during a compressed message, and between messages when
    /// `keep_context`. Boxed: `Decompress` is 152 bytes inline (a zlib stream), which
    /// every idle deflate connection would otherwise carry.
    inflater: Option<Box<Decompress>>,
    /// The peer's stream ended (a block with BFINAL set) during this message: ignore the
    /// rest of the message and start a new stream with the next one.
    ended: bool,
    /// The message being received is compressed (RSV1 on its first frame).
    pub(crate) receiving: bool,
    /// Compressed payload bytes of the message being received.
    message_in: u64,
    /// Inflated bytes of the message being received (at the front of its buffer).
    filled: usize,
    pub(crate) stats: DeflateStats,
}

impl ConnDeflate {
    /// The receive and send settings for an endpoint of `role` that agreed on `params`.
    pub(crate) fn new(params: &DeflateParams, server: bool, threshold: usize) -> Self {
        let (peer_nct, out_bits) = if server {
            (
                params.client_no_context_takeover,
                params.server_max_window_bits,
            )
        } else {
            (
                params.server_no_context_takeover,
                params.client_max_window_bits,
            )
        };
        let out_bits = out_bits.unwrap_or(15);
        Self {
            keep_context: !peer_nct,
            out_window: (out_bits >= MIN_DEFLATE_WINDOW).then_some(out_bits),
            threshold: u32::try_from(threshold).unwrap_or(u32::MAX),
            inflater: None,
            ended: false,
            receiving: false,
            message_in: 0,
            filled: 0,
            stats: DeflateStats::default(),
        }
    }

    /// Inflate the next piece of a compressed message (`tail`: this is the message's end,
    /// after the last byte of its final frame) into `out`, which never grows beyond
    /// `limit + 1` bytes. New text is fed to `utf8`.
    ///
    /// During a message `out` is kept initialized up to its length and only its first
    /// `filled` bytes are data, so a step writes into memory zeroed once, when it grew,
    /// instead of zeroing a step's room for every piece (a 256-byte frame would otherwise
    /// clear up to [`INFLATE_STEP`] bytes). [`ConnDeflate::finish_message`] cuts it to the
    /// data.
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        tail: bool,
        out: &mut Vec<u8>,
        limit: usize,
        mut utf8: Option<&mut Utf8Validator>,
    ) -> Result<(), ProtoError> {
        self.message_in += input.len() as u64;
        if self.ended {
            return Ok(());
        }
        let z = self
            .inflater
            .get_or_insert_with(|| Box::new(Decompress::new(false)));
        let (mut input, flush) = if tail {
            (&TAIL[..], FlushDecompress::Sync)
        } else {
            (input, FlushDecompress::None)
        };
        loop {
            if self.filled == out.len() {
                if self.filled > limit {
                    return Err(ProtoError::InflatedTooLarge);
                }
                // Geometric growth, starting from a guess of 4x the compressed piece, into a
                // zeroed allocation (calloc: no pass over the memory) of exactly that size.
                let want = (out.len() * 2)
                    .max(input.len().saturating_mul(4))
                    .max(256)
                    .min(limit + 1);
                let mut bigger = vec![0u8; want];
                bigger[..self.filled].copy_from_slice(&out[..self.filled]);
                *out = bigger;
            }
            let start = self.filled;
            let step = (out.len() - start).min(INFLATE_STEP);
            let (in_before, out_before) = (z.total_in(), z.total_out());
            let status = z.decompress(input, &mut out[start..start + step], flush);
            let consumed = (z.total_in() - in_before) as usize;
            let produced = (z.total_out() - out_before) as usize;
            self.filled += produced;
            // Past the limit is 1009 even if the same step then met invalid data: the output
            // came first in stream order, whatever pieces the stream arrived in.
            if self.filled > limit {
                return Err(ProtoError::InflatedTooLarge);
            }
            let status = status.map_err(|_| ProtoError::InvalidCompressedData)?;
            input = &input[consumed..];
            if let Some(v) = utf8.as_deref_mut() {
                v.feed(&out[start..self.filled])
                    .map_err(|_| ProtoError::InvalidUtf8)?;
            }
            if status == Status::StreamEnd {
                // The peer ended its stream (BFINAL); what follows in this message is not
                // deflate data (RFC 7692 7.2.3.4 allows it).
                self.ended = true;
                return Ok(());
            }
            if produced < step && input.is_empty() {
                return Ok(());
            }
            if produced == 0 && consumed == 0 {
                // No progress with room to write: the stream cannot go on.
                return Err(ProtoError::InvalidCompressedData);
            }
        }
    }

    /// The compressed message is complete: cut `out` to its data, count it, and drop or
    /// reset the inflate state.
    pub(crate) fn finish_message(&mut self, out: &mut Vec<u8>) {
        out.truncate(self.filled);
        self.stats.inflated += 1;
        self.stats.inflated_in += self.message_in;
        self.stats.inflated_out += out.len() as u64;
        self.message_in = 0;
        self.filled = 0;
        self.receiving = false;
        if !self.keep_context {
            self.inflater = None;
        } else if self.ended {
            if let Some(z) = self.inflater.as_mut() {
                z.reset(false);
            }
        }
        self.ended = false;
    }

    /// A compressed message was abandoned (close in its middle, protocol error).
    pub(crate) fn abandon_message(&mut self) {
        self.receiving = false;
        self.filled = 0;
        self.ended = false;
        self.message_in = 0;
        self.inflater = None;
    }

    /// Is an inflate state held right now? (Memory accounting and tests.)
    pub(crate) fn holds_inflater(&self) -> bool {
        self.inflater.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn neg(list: &[&str]) -> Result<Option<DeflateParams>, HandshakeError> {
        negotiate(&offers(list), &DeflateConfig::default())
    }

    fn answer(list: &[&str]) -> Option<String> {
        neg(list).unwrap().map(|p| p.header_value())
    }

    #[test]
    fn negotiation_matrix() {
        let nct = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        let cases: &[(&[&str], Option<&str>)] = &[
            // Browsers.
            (&["permessage-deflate; client_max_window_bits"], Some(nct)),
            (&["permessage-deflate"], Some(nct)),
            // Parameters are case-insensitive, values may be quoted.
            (
                &["Permessage-Deflate; SERVER_MAX_WINDOW_BITS=\"10\""],
                Some(
                    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10",
                ),
            ),
            // Autobahn 13.x offers.
            (
                &[
                    "permessage-deflate; client_no_context_takeover; client_max_window_bits; server_max_window_bits=9",
                ],
                Some(
                    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9",
                ),
            ),
            (
                &["permessage-deflate; server_max_window_bits=8"],
                Some(
                    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8",
                ),
            ),
            (&["permessage-deflate; client_max_window_bits=8"], Some(nct)),
            // Declined: unknown parameter, duplicate, invalid values.
            (&["permessage-deflate; mem_level=8"], None),
            (
                &["permessage-deflate; server_no_context_takeover; server_no_context_takeover"],
                None,
            ),
            (&["permessage-deflate; server_max_window_bits"], None),
            (&["permessage-deflate; server_max_window_bits=7"], None),
            (&["permessage-deflate; server_max_window_bits=16"], None),
            (&["permessage-deflate; server_max_window_bits=010"], None),
            (&["permessage-deflate; server_max_window_bits=a"], None),
            (&["permessage-deflate; client_max_window_bits=16"], None),
            (&["permessage-deflate; server_no_context_takeover=1"], None),
            (
                &["permessage-deflate; client_no_context_takeover=\"x\""],
                None,
            ),
            // Other extensions are ignored.
            (&["x-webkit-deflate-frame"], None),
            (&[], None),
            // The first acceptable offer wins; declined ones are skipped.
            (
                &[
                    "x-foo; bar=1",
                    "permessage-deflate; server_max_window_bits=99",
                    "permessage-deflate; server_max_window_bits=12",
                    "permessage-deflate",
                ],
                Some(
                    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12",
                ),
            ),
        ];
        for (list, expected) in cases {
            assert_eq!(answer(list).as_deref(), *expected, "{list:?}");
        }
    }

    #[test]
    fn malformed_extension_lists_are_400() {
        for bad in [
            "permessage-deflate;",
            "; server_no_context_takeover",
            "permessage-deflate; =3",
            "permessage-deflate; a b",
            "permessage-deflate; x=\"unterminated",
            "permessage-deflate; x=\"a b\"",
            "per message",
        ] {
            let e = neg(&[bad]).unwrap_err();
            assert_eq!(e, HandshakeError::InvalidExtensions, "{bad}");
            assert_eq!(e.status(), 400);
        }
        // Even after an accepted offer, a malformed element makes the request invalid.
        assert!(neg(&["permessage-deflate", "x;"]).is_err());
    }

    #[test]
    fn client_context_takeover_when_allowed() {
        let cfg = DeflateConfig {
            peer_context_takeover: true,
            ..DeflateConfig::default()
        };
        let p = negotiate(&offers(&["permessage-deflate"]), &cfg)
            .unwrap()
            .unwrap();
        assert_eq!(
            p.header_value(),
            "permessage-deflate; server_no_context_takeover"
        );
        // A client that offers no context takeover itself keeps it.
        let p = negotiate(
            &offers(&["permessage-deflate; client_no_context_takeover"]),
            &cfg,
        )
        .unwrap()
        .unwrap();
        assert!(p.client_no_context_takeover);
    }

    fn resp(v: &str) -> Vec<(String, String)> {
        vec![("sec-websocket-extensions".into(), v.into())]
    }

    #[test]
    fn client_judges_the_answer() {
        assert_eq!(accept_response(&[], true), Ok(None));
        assert_eq!(accept_response(&[], false), Ok(None));
        let p = accept_response(
            &resp("permessage-deflate; server_no_context_takeover; client_max_window_bits=10"),
            true,
        )
        .unwrap()
        .unwrap();
        assert!(p.server_no_context_takeover && !p.client_no_context_takeover);
        assert_eq!(p.client_max_window_bits, Some(10));
        for bad in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; x=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate, permessage-deflate",
            "x-other",
            "permessage-deflate;",
        ] {
            assert_eq!(
                accept_response(&resp(bad), true),
                Err(HandshakeError::UnexpectedExtension),
                "{bad}"
            );
        }
        // Not offered: any extension in the answer is refused.
        assert_eq!(
            accept_response(&resp("permessage-deflate"), false),
            Err(HandshakeError::UnexpectedExtension)
        );
        // Our own offer is accepted by our own server.
        let offer = client_offer(&DeflateConfig::default());
        let p = negotiate(&offers(&[&offer]), &DeflateConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(accept_response(&resp(&p.header_value()), true), Ok(Some(p)));
    }

    fn inflate_all(d: &mut ConnDeflate, data: &[u8], limit: usize) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::new();
        d.inflate(data, false, &mut out, limit, None)?;
        d.inflate(&[], true, &mut out, limit, None)?;
        d.finish_message(&mut out);
        Ok(out)
    }

    fn server_deflate() -> ConnDeflate {
        ConnDeflate::new(
            &DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                ..DeflateParams::default()
            },
            true,
            0,
        )
    }

    #[test]
    fn compress_then_inflate_round_trips() {
        let mut c = Compressor::default();
        let text = "{\"symbol\":\"BTC-USD\",\"price\":43125.5,\"side\":\"buy\"}".repeat(40);
        for bits in 9..=15 {
            let z = c.compress(text.as_bytes(), bits).unwrap().to_vec();
            assert!(z.len() < text.len() / 4, "{bits}: {}", z.len());
            let mut d = server_deflate();
            assert_eq!(inflate_all(&mut d, &z, 1 << 20).unwrap(), text.as_bytes());
            assert!(
                !d.holds_inflater(),
                "no state kept without context takeover"
            );
        }
        // Window 8 and incompressible data: not compressed.
        assert!(c.compress(text.as_bytes(), 8).is_none());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(c.compress(&noise, 15).is_none());
        assert_eq!(c.compress(b"", 15), None);
    }

    #[test]
    fn the_idle_state_is_small() {
        // Boxed in every connection that negotiated deflate (documented as 96 B there).
        assert!(std::mem::size_of::<ConnDeflate>() <= 96);
    }

    #[test]
    fn a_message_after_an_incompressible_one_is_valid() {
        // zlib-rs 0.6.8 keeps level 1's open block across a reset of an unfinished stream;
        // a compressor reused after giving up on incompressible data must still produce
        // valid streams (found by Autobahn 12.2.11 with lena512.bmp).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect()
        };
        let mut c = Compressor::default();
        for round in 0..3 {
            // Several give-ups in a row (the bug needed a few), then a compressible message.
            for n in [100, 8192, 100_000] {
                for _ in 0..4 {
                    assert_eq!(c.compress(&noise(n), 15), None);
                    // Finished within the reserved room: the state is reused.
                    assert!(c.states[6].is_some());
                }
            }
            let text = format!("{round} {}", "abc def ".repeat(600));
            let z = c.compress(text.as_bytes(), 15).unwrap().to_vec();
            let mut d = server_deflate();
            assert_eq!(inflate_all(&mut d, &z, 1 << 20).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn rfc_7692_examples_inflate() {
        // 7.2.3.1: "Hello" in one fixed-Huffman block; 7.2.3.2: the same with a stored
        // block; 7.2.3.4: with BFINAL set (and the tail's first bits after it).
        for wire in [
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00][..],
            &[
                0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
            ][..],
            &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00][..],
        ] {
            let mut d = server_deflate();
            assert_eq!(inflate_all(&mut d, wire, 100).unwrap(), b"Hello");
        }
    }

    #[test]
    fn inflating_past_the_limit_fails_without_growing_past_it() {
        let mut c = Compressor::default();
        let big = vec![b'a'; 10 << 20];
        let z = c.compress(&big, 15).unwrap().to_vec();
        // Level 1 (static Huffman codes) still shrinks it 100x.
        assert!(z.len() < 200_000, "{}", z.len());
        let mut d = server_deflate();
        let mut out = Vec::new();
        let limit = 100_000;
        let r = d.inflate(&z, false, &mut out, limit, None);
        assert_eq!(r, Err(ProtoError::InflatedTooLarge));
        assert!(out.capacity() <= limit + 1, "{}", out.capacity());
        // Exactly at the limit is fine.
        let exact = vec![b'b'; limit];
        let z = c.compress(&exact, 15).unwrap().to_vec();
        let mut d = server_deflate();
        assert_eq!(inflate_all(&mut d, &z, limit).unwrap().len(), limit);
    }

    #[test]
    fn corrupt_data_and_invalid_text() {
        let mut d = server_deflate();
        // BTYPE 11 is reserved.
        assert_eq!(
            inflate_all(&mut d, &[0xff, 0xff, 0xff], 100),
            Err(ProtoError::InvalidCompressedData)
        );
        let mut c = Compressor::default();
        let mut bad = "ok ".repeat(300).into_bytes();
        bad.push(0xff);
        bad.extend_from_slice("more".repeat(100).as_bytes());
        let z = c.compress(&bad, 15).unwrap().to_vec();
        let mut d = server_deflate();
        let mut v = Utf8Validator::new();
        let mut out = Vec::new();
        assert_eq!(
            d.inflate(&z, false, &mut out, 1 << 20, Some(&mut v)),
            Err(ProtoError::InvalidUtf8)
        );
    }
}
