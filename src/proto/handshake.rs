//! The HTTP/1.1 upgrade handshake (RFC 6455 section 4), both roles.
//!
//! This module owns parsing and validating the client's upgrade request
//! ([`parse_request`]), computing `Sec-WebSocket-Accept` ([`accept_key`]), writing the 101
//! answer and HTTP error answers ([`write_response_101`], [`write_error_response`],
//! [`HandshakeError::write_response`]), and the client side: writing an upgrade request
//! ([`write_client_request`]) and validating the server's answer ([`parse_response`]).
//!
//! Parsing is incremental in the "call again with more bytes" sense: `Ok(None)` means the
//! header block is not complete yet. Memory and work are bounded by
//! [`HandshakeLimits::max_request_bytes`]: only that many bytes are ever looked at, and a header
//! block that does not fit is rejected with 431 even before it is complete. The handshake is
//! not a hot path, so the parsed request owns its strings.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest as _, Sha1};

use super::error::HandshakeError;

/// The GUID appended to the client key before hashing (RFC 6455 section 1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Bounds on the size of a handshake's header block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest accepted header block (request line + headers + blank line), in bytes.
    /// Default 8192.
    pub max_request_bytes: usize,
    /// Largest accepted number of header lines. Default 64.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 8192,
            max_headers: 64,
        }
    }
}

/// A valid WebSocket upgrade request (always a GET over HTTP/1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The request target as sent (normally origin-form, `/path?query`).
    pub path: String,
    /// The `Host` header value (trimmed, non-empty).
    pub host: String,
    /// The `Sec-WebSocket-Key` value (trimmed; decodes to 16 bytes). Pass it to
    /// [`write_response_101`].
    pub key: String,
    /// The `Origin` header, if any.
    pub origin: Option<String>,
    /// `Sec-WebSocket-Protocol` tokens: comma-split, trimmed, in order, over all header lines.
    pub protocols: Vec<String>,
    /// Raw `Sec-WebSocket-Extensions` offers: comma-split, trimmed, over all header lines.
    pub extensions: Vec<String>,
    /// Every header in order, name lowercased, value trimmed, for later policy (auth,
    /// forwarding).
    pub headers: Vec<(String, String)>,
}

impl UpgradeRequest {
    /// The first value of header `name` (ASCII case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// The server's valid answer to our upgrade request (client role).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeResponse {
    /// The subprotocol the server selected (one of those we offered), if any.
    pub protocol: Option<String>,
    /// Every header in order, name lowercased, value trimmed. Note that
    /// `Sec-WebSocket-Extensions` is not checked here: the caller must refuse extensions it
    /// did not offer (without any, RSV bits in frames fail the connection with 1002).
    pub headers: Vec<(String, String)>,
}

/// Parse and validate a client's upgrade request from the start of `buf`.
///
/// `Ok(None)`: need more bytes (and `buf.len() < max_request_bytes`; if
/// `buf.len() >= max_request_bytes` with no complete request ->
/// [`HandshakeError::RequestTooLarge`], status 431). `Ok(Some((req, consumed)))` for a complete
/// valid upgrade request (`consumed` = bytes up to and including the blank line; anything after
/// it is already WebSocket data).
///
/// # Errors
/// See [`HandshakeError`]; checks are made in this order: parse errors (400/431), method (405),
/// HTTP version, Host, Upgrade, Connection (400), Sec-WebSocket-Version (426),
/// Sec-WebSocket-Key, body (400).
pub fn parse_request(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    // Never look past the size cap: bounds the (re)parsing work and rejects oversized
    // header blocks whether or not they are complete.
    let window = &buf[..buf.len().min(limits.max_request_bytes)];
    let mut slots = header_slots(limits);
    let mut req = httparse::Request::new(&mut slots);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_request_bytes {
                Err(HandshakeError::RequestTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(_) => return Err(HandshakeError::MalformedRequest),
    };
    // A complete parse fills method, path and version.
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HandshakeError::MalformedRequest);
    };
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version != 1 {
        return Err(HandshakeError::UnsupportedHttpVersion);
    }
    let headers = collect_headers(req.headers).ok_or(HandshakeError::InvalidHeaderValue)?;

    let host = single_header(&headers, "host", HandshakeError::DuplicateHeader("Host"))?
        .filter(|h| !h.is_empty())
        .ok_or(HandshakeError::MissingHost)?
        .to_owned();
    if !has_token(&headers, "upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if !has_token(&headers, "connection", "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    let version_ok = {
        let mut versions = header_values(&headers, "sec-websocket-version").peekable();
        versions.peek().is_some() && versions.all(|v| v == "13")
    };
    if !version_ok {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = single_header(
        &headers,
        "sec-websocket-key",
        HandshakeError::DuplicateHeader("Sec-WebSocket-Key"),
    )?
    .filter(|k| is_valid_key(k))
    .ok_or(HandshakeError::BadKey)?
    .to_owned();
    // Body bytes would be taken for WebSocket frames: refuse requests that announce one.
    if find_header(&headers, "transfer-encoding").is_some()
        || header_values(&headers, "content-length").any(|v| v != "0")
    {
        return Err(HandshakeError::UnexpectedBody);
    }

    let request = UpgradeRequest {
        path: path.to_owned(),
        host,
        key,
        origin: find_header(&headers, "origin").map(str::to_owned),
        protocols: tokens(&headers, "sec-websocket-protocol")
            .map(str::to_owned)
            .collect(),
        extensions: tokens(&headers, "sec-websocket-extensions")
            .map(str::to_owned)
            .collect(),
        headers,
    };
    Ok(Some((request, consumed)))
}

/// `base64(SHA-1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))`, the `Sec-WebSocket-Accept`
/// value for a `Sec-WebSocket-Key`.
///
/// RFC 6455 section 1.3 example: `"dGhlIHNhbXBsZSBub25jZQ=="` -> `"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Append `HTTP/1.1 101 Switching Protocols` with `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept`, optional `Sec-WebSocket-Protocol`, and extra headers, then the
/// blank line.
///
/// Header pairs containing CR or LF are skipped (no header injection).
pub fn write_response_101(
    key: &str,
    protocol: Option<&str>,
    extra_headers: &[(&str, &str)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(out, "Sec-WebSocket-Accept", &accept_key(key));
    if let Some(protocol) = protocol {
        push_header(out, "Sec-WebSocket-Protocol", protocol);
    }
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Append an error response: status line with the standard reason phrase,
/// `Content-Type: text/plain; charset=utf-8`, `Content-Length`, `Connection: close`, extra
/// headers, then body = `body` + `"\n"`.
///
/// A `status` outside 100..=599 is replaced by 500. Header pairs containing CR or LF are
/// skipped.
pub fn write_error_response(
    status: u16,
    body: &str,
    extra_headers: &[(&str, &str)],
    out: &mut Vec<u8>,
) {
    let status = if (100..=599).contains(&status) {
        status
    } else {
        500
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason_phrase(status),
        body.len() + 1
    );
    out.extend_from_slice(head.as_bytes());
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

impl HandshakeError {
    /// Append the HTTP error response for this error: [`HandshakeError::status`], body
    /// [`HandshakeError::reason`], plus `Sec-WebSocket-Version: 13` for 426 and `Allow: GET`
    /// for 405.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        let extra: &[(&str, &str)] = match self.status() {
            426 => &[("Sec-WebSocket-Version", "13")],
            405 => &[("Allow", "GET")],
            _ => &[],
        };
        write_error_response(self.status(), self.reason(), extra, out);
    }
}

/// Client role: the `Sec-WebSocket-Key` for 16 caller-provided random bytes (base64; the
/// protocol core has no RNG).
pub fn generate_key(nonce: [u8; 16]) -> String {
    BASE64.encode(nonce)
}

/// Client role: append a GET upgrade request for `path` on `host` with `Upgrade`,
/// `Connection`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Protocol`
/// (if `protocols` is not empty) and extra headers, then the blank line.
///
/// Header pairs containing CR or LF are skipped.
pub fn write_client_request(
    host: &str,
    path: &str,
    key: &str,
    protocols: &[&str],
    extra_headers: &[(&str, &str)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, "Host", host);
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    push_header(out, "Sec-WebSocket-Key", key);
    out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    if !protocols.is_empty() {
        push_header(out, "Sec-WebSocket-Protocol", &protocols.join(", "));
    }
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Client role: parse and validate the server's answer to an upgrade request sent with `key`
/// and `offered_protocols`.
///
/// `Ok(None)`: need more bytes (same size rules as [`parse_request`]).
/// `Ok(Some((resp, consumed)))`: a valid 101; bytes after `consumed` are WebSocket frames.
///
/// # Errors
/// [`HandshakeError::UnexpectedStatus`] if the status is not 101,
/// [`HandshakeError::ResponseNotUpgrade`] for missing/incorrect `Upgrade`/`Connection`,
/// [`HandshakeError::AcceptMismatch`], [`HandshakeError::UnexpectedProtocol`] for a protocol
/// that was not offered, [`HandshakeError::MalformedResponse`] for anything unparseable or
/// too large.
pub fn parse_response(
    buf: &[u8],
    key: &str,
    offered_protocols: &[&str],
    limits: &HandshakeLimits,
) -> Result<Option<(UpgradeResponse, usize)>, HandshakeError> {
    let window = &buf[..buf.len().min(limits.max_request_bytes)];
    let mut slots = header_slots(limits);
    let mut resp = httparse::Response::new(&mut slots);
    let consumed = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < limits.max_request_bytes => return Ok(None),
        Ok(httparse::Status::Partial) | Err(_) => return Err(HandshakeError::MalformedResponse),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err(HandshakeError::MalformedResponse);
    };
    if code != 101 {
        return Err(HandshakeError::UnexpectedStatus(code));
    }
    if version != 1 {
        return Err(HandshakeError::MalformedResponse);
    }
    let headers = collect_headers(resp.headers).ok_or(HandshakeError::MalformedResponse)?;
    if !has_token(&headers, "upgrade", "websocket") || !has_token(&headers, "connection", "upgrade")
    {
        return Err(HandshakeError::ResponseNotUpgrade);
    }
    let accept = single_header(
        &headers,
        "sec-websocket-accept",
        HandshakeError::AcceptMismatch,
    )?;
    if accept != Some(accept_key(key.trim()).as_str()) {
        return Err(HandshakeError::AcceptMismatch);
    }
    let protocol = match single_header(
        &headers,
        "sec-websocket-protocol",
        HandshakeError::UnexpectedProtocol,
    )? {
        None => None,
        Some(p) if offered_protocols.contains(&p) => Some(p.to_owned()),
        Some(_) => return Err(HandshakeError::UnexpectedProtocol),
    };
    Ok(Some((UpgradeResponse { protocol, headers }, consumed)))
}

/// Header slots for httparse; never more than the byte cap could possibly hold (a header line
/// is at least 3 bytes), so a huge `max_headers` cannot cause a huge allocation.
fn header_slots(limits: &HandshakeLimits) -> Vec<httparse::Header<'static>> {
    let n = limits.max_headers.min(limits.max_request_bytes / 3 + 1);
    vec![httparse::EMPTY_HEADER; n]
}

/// Owned (lowercased name, trimmed value) pairs; `None` if a value is not UTF-8.
fn collect_headers(raw: &[httparse::Header<'_>]) -> Option<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            let value = std::str::from_utf8(h.value).ok()?;
            Some((h.name.to_ascii_lowercase(), trim_ows(value).to_owned()))
        })
        .collect()
}

/// Trim HTTP optional whitespace (SP / HTAB).
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Values of every header named `name` (already lowercase).
fn header_values<'a, 'n>(
    headers: &'a [(String, String)],
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The first value of header `name`.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    header_values(headers, name).next()
}

/// The value of a header that must appear at most once.
fn single_header<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
    duplicate: HandshakeError,
) -> Result<Option<&'a str>, HandshakeError> {
    let mut values = header_values(headers, name);
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        _ => Err(duplicate),
    }
}

/// Comma-separated, trimmed, non-empty tokens over every header line named `name`.
fn tokens<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Does any `name` header contain `token` (ASCII case-insensitive) in its comma list?
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// A `Sec-WebSocket-Key` must be the base64 encoding of exactly 16 bytes (24 characters).
fn is_valid_key(key: &str) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && BASE64.decode_slice(key, &mut decoded) == Ok(16)
}

/// Append `name: value\r\n`, unless either contains CR or LF (which would inject headers).
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    let bad = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
    if bad(name) || bad(value) {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The standard reason phrase for a status code ("" when unknown, which HTTP allows).
fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn parse(s: &str) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
        parse_request(s.as_bytes(), &HandshakeLimits::default())
    }

    /// Replace the header line starting with `prefix` by `line` (or drop it if empty).
    fn with(prefix: &str, line: &str) -> String {
        let mut out = String::new();
        for l in request("").trim_end_matches("\r\n").split("\r\n") {
            let l = if l.starts_with(prefix) { line } else { l };
            if !l.is_empty() {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        out.push_str("\r\n");
        out
    }

    fn err(s: &str) -> HandshakeError {
        parse(s).expect_err("request should be rejected")
    }

    #[test]
    fn rfc_accept_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_rfc_request() {
        let text = request("");
        let mut bytes = text.clone().into_bytes();
        bytes.extend_from_slice(b"\x81\x80rest");
        let (req, n) = parse_request(&bytes, &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(n, text.len());
        assert_eq!(req.path, "/chat?x=1");
        assert_eq!(req.host, "server.example.com");
        assert_eq!(req.key, KEY);
        assert_eq!(req.origin.as_deref(), Some("http://example.com"));
        assert_eq!(req.protocols, ["chat", "superchat"]);
        assert!(req.extensions.is_empty());
        assert_eq!(req.header("SEC-websocket-version"), Some("13"));
        assert_eq!(
            req.headers[0],
            ("host".to_owned(), "server.example.com".to_owned())
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let text = request("");
        for cut in 0..text.len() {
            assert_eq!(parse(&text[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn token_lists_and_case() {
        let r = with("Connection", "connection: keep-alive, Upgrade");
        assert!(parse(&r).unwrap().is_some());
        let r = with("Upgrade", "UPGRADE: h2c, WebSocket");
        assert!(parse(&r).unwrap().is_some());
        let r = request(
            "Sec-WebSocket-Protocol: v3\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-foo\r\n",
        );
        let (req, _) = parse(&r).unwrap().unwrap();
        assert_eq!(req.protocols, ["chat", "superchat", "v3"]);
        assert_eq!(
            req.extensions,
            ["permessage-deflate; client_max_window_bits", "x-foo"]
        );
    }

    #[test]
    fn validation_errors() {
        assert_eq!(
            err(&request("").replacen("GET", "POST", 1)),
            HandshakeError::MethodNotAllowed
        );
        assert_eq!(
            err(&request("").replacen("HTTP/1.1", "HTTP/1.0", 1)),
            HandshakeError::UnsupportedHttpVersion
        );
        assert_eq!(err(&with("Host", "")), HandshakeError::MissingHost);
        assert_eq!(err(&with("Host", "Host: ")), HandshakeError::MissingHost);
        assert_eq!(
            err(&request("Host: evil\r\n")),
            HandshakeError::DuplicateHeader("Host")
        );
        assert_eq!(
            err(&with("Upgrade", "Upgrade: h2c")),
            HandshakeError::NotUpgrade
        );
        assert_eq!(err(&with("Upgrade", "")), HandshakeError::NotUpgrade);
        assert_eq!(
            err(&with("Connection", "Connection: keep-alive")),
            HandshakeError::MissingConnectionUpgrade
        );
        assert_eq!(
            err(&with("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8")),
            HandshakeError::UnsupportedVersion
        );
        assert_eq!(
            err(&with("Sec-WebSocket-Version", "")),
            HandshakeError::UnsupportedVersion
        );
        assert_eq!(err(&with("Sec-WebSocket-Key", "")), HandshakeError::BadKey);
        assert_eq!(
            err(&with(
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZQ=="
            )),
            HandshakeError::BadKey
        );
        assert_eq!(
            err(&with(
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="
            )),
            HandshakeError::BadKey
        );
        assert_eq!(
            err(&request("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n")),
            HandshakeError::DuplicateHeader("Sec-WebSocket-Key")
        );
        assert_eq!(
            err(&request("Content-Length: 5\r\n")),
            HandshakeError::UnexpectedBody
        );
        assert_eq!(
            err(&request("Transfer-Encoding: chunked\r\n")),
            HandshakeError::UnexpectedBody
        );
        assert!(parse(&request("Content-Length: 0\r\n")).unwrap().is_some());
        assert_eq!(
            err("GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            HandshakeError::MalformedRequest
        );
        assert_eq!(
            err(&request("X-Bin: \u{e9}\r\n").replace('\u{e9}', "\u{1}")),
            HandshakeError::MalformedRequest
        );
        let mut latin1 = request("X-Bin: a\r\n").into_bytes();
        let pos = latin1.iter().position(|&b| b == b'X').unwrap() + 7;
        latin1[pos] = 0xE9;
        assert_eq!(
            parse_request(&latin1, &HandshakeLimits::default()),
            Err(HandshakeError::InvalidHeaderValue)
        );
    }

    #[test]
    fn size_limits() {
        let limits = HandshakeLimits {
            max_request_bytes: 100,
            max_headers: 4,
        };
        // Complete but larger than the cap.
        assert_eq!(
            parse_request(request("").as_bytes(), &limits),
            Err(HandshakeError::RequestTooLarge)
        );
        // Incomplete and already at the cap.
        let junk = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(200));
        assert_eq!(
            parse_request(junk.as_bytes(), &limits),
            Err(HandshakeError::RequestTooLarge)
        );
        assert_eq!(parse_request(&junk.as_bytes()[..99], &limits), Ok(None));
        // Too many headers.
        let limits = HandshakeLimits {
            max_request_bytes: 8192,
            max_headers: 4,
        };
        assert_eq!(
            parse_request(request("").as_bytes(), &limits),
            Err(HandshakeError::TooManyHeaders)
        );
        // A header block of exactly the cap is fine.
        let text = request("");
        let limits = HandshakeLimits {
            max_request_bytes: text.len(),
            max_headers: 64,
        };
        assert!(parse_request(text.as_bytes(), &limits).unwrap().is_some());
        // Huge max_headers does not allocate hugely.
        let limits = HandshakeLimits {
            max_request_bytes: 8192,
            max_headers: usize::MAX,
        };
        assert!(parse_request(text.as_bytes(), &limits).unwrap().is_some());
    }

    fn parse_http_response(bytes: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut slots);
        let n = match resp.parse(bytes).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial response"),
        };
        let headers = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        (resp.code.unwrap(), headers, bytes[n..].to_vec())
    }

    #[test]
    fn response_101() {
        let mut out = Vec::new();
        write_response_101(
            KEY,
            Some("chat"),
            &[("X-Shard", "3"), ("Bad", "a\r\nInjected: 1")],
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\nX-Shard: 3\r\n\r\n"
        );
    }

    #[test]
    fn error_responses() {
        for e in [
            HandshakeError::MethodNotAllowed,
            HandshakeError::UnsupportedVersion,
            HandshakeError::RequestTooLarge,
            HandshakeError::NotUpgrade,
            HandshakeError::UnexpectedStatus(500),
        ] {
            let mut out = Vec::new();
            e.write_response(&mut out);
            let (code, headers, body) = parse_http_response(&out);
            assert_eq!(code, e.status());
            assert_eq!(body, format!("{}\n", e.reason()).into_bytes());
            let get = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(get("Content-Length"), Some(body.len().to_string().as_str()));
            assert_eq!(get("Connection"), Some("close"));
            assert_eq!(get("Content-Type"), Some("text/plain; charset=utf-8"));
            assert_eq!(get("Sec-WebSocket-Version").is_some(), code == 426);
            assert_eq!(get("Allow") == Some("GET"), code == 405);
        }
        let mut out = Vec::new();
        write_error_response(403, "forbidden", &[("X-Reason", "origin")], &mut out);
        assert!(out.starts_with(b"HTTP/1.1 403 Forbidden\r\n"));
        out.clear();
        write_error_response(7, "x", &[], &mut out);
        assert!(out.starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
        out.clear();
        write_error_response(599, "x", &[], &mut out);
        assert_eq!(parse_http_response(&out).0, 599);
    }

    #[test]
    fn client_round_trip() {
        let key = generate_key(*b"0123456789abcdef");
        let mut req = Vec::new();
        write_client_request(
            "up.example:8080",
            "/ws",
            &key,
            &["a", "b"],
            &[("X-Fwd", "1")],
            &mut req,
        );
        let (parsed, n) = parse_request(&req, &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(n, req.len());
        assert_eq!(parsed.key, key);
        assert_eq!(parsed.host, "up.example:8080");
        assert_eq!(parsed.path, "/ws");
        assert_eq!(parsed.protocols, ["a", "b"]);
        assert_eq!(parsed.header("x-fwd"), Some("1"));

        let mut resp = Vec::new();
        write_response_101(&parsed.key, Some("b"), &[], &mut resp);
        resp.extend_from_slice(b"\x81\x00");
        let limits = HandshakeLimits::default();
        let (r, n) = parse_response(&resp, &key, &["a", "b"], &limits)
            .unwrap()
            .unwrap();
        assert_eq!(n, resp.len() - 2);
        assert_eq!(r.protocol.as_deref(), Some("b"));
        for cut in 0..n {
            assert_eq!(
                parse_response(&resp[..cut], &key, &["a", "b"], &limits),
                Ok(None)
            );
        }
        // Not offered.
        assert_eq!(
            parse_response(&resp, &key, &["a"], &limits),
            Err(HandshakeError::UnexpectedProtocol)
        );
        // Wrong key.
        assert_eq!(
            parse_response(&resp, KEY, &["b"], &limits),
            Err(HandshakeError::AcceptMismatch)
        );
        // No protocol selected is fine.
        let mut plain = Vec::new();
        write_response_101(&key, None, &[], &mut plain);
        assert_eq!(
            parse_response(&plain, &key, &["a"], &limits)
                .unwrap()
                .unwrap()
                .0
                .protocol,
            None
        );
        // Not a 101.
        let mut e = Vec::new();
        write_error_response(404, "nope", &[], &mut e);
        assert_eq!(
            parse_response(&e, &key, &[], &limits),
            Err(HandshakeError::UnexpectedStatus(404))
        );
        // Missing Upgrade.
        let s = String::from_utf8(plain)
            .unwrap()
            .replace("Upgrade: websocket\r\n", "");
        assert_eq!(
            parse_response(s.as_bytes(), &key, &[], &limits),
            Err(HandshakeError::ResponseNotUpgrade)
        );
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let limits = HandshakeLimits { max_request_bytes: 200, max_headers: 8 };
            if let Ok(Some((_, n))) = parse_request(&data, &limits) {
                prop_assert!(n <= data.len() && n <= 200);
            }
            let _ = parse_response(&data, KEY, &["x"], &limits);
        }

        #[test]
        fn mutated_requests_never_panic(pos in any::<usize>(), byte in any::<u8>()) {
            let mut data = request("").into_bytes();
            let i = pos % data.len();
            data[i] = byte;
            match parse(std::str::from_utf8(&data).unwrap_or("")) {
                Ok(Some((req, n))) => prop_assert!(n <= data.len() && !req.key.is_empty()),
                Ok(None) => {}
                Err(e) => {
                    let mut out = Vec::new();
                    e.write_response(&mut out);
                    prop_assert_eq!(parse_http_response(&out).0, e.status());
                }
            }
        }
    }
}
