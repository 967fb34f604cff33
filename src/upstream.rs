//! Upstream WebSocket endpoints: URL parsing and the upgrade request wsedge sends as a client.
//!
//! Runtime-free like [`crate::proto`]: the shard runtime connects the socket and uses these to
//! build and check the handshake. Used by proxy routes and sources; `wss://` URLs carry the
//! TLS settings to connect with ([`crate::tls::ClientTls`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use crate::proto::handshake::write_client_request;
use crate::tls::{CertFiles, ClientTls};

/// TLS settings of a `wss://` upstream (config keys `tls_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA file to trust instead of the system roots.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate to present (mTLS).
    pub client_cert: Option<CertFiles>,
    /// Name for SNI and certificate verification, if not the URL's host.
    pub server_name: Option<String>,
    /// Accept any certificate (testing only).
    pub insecure_skip_verify: bool,
}

impl TlsOptions {
    /// True if any option is set (they only make sense with `wss://`).
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }
}

/// A parsed `ws://host[:port][/path]` or `wss://` URL, resolved once. `Display` and `Debug`
/// leave the query out.
#[derive(Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `Host` header value (`host` or `host:port` as written).
    pub host: String,
    /// Request target (path and query), at least `/`.
    pub path: String,
    /// Address the host resolved to when the configuration was loaded.
    pub addr: SocketAddr,
    /// `wss://`: how to run TLS (boxed: most URLs are plain).
    pub tls: Option<Box<ClientTls>>,
}

impl WsUrl {
    /// Parse and resolve a `ws://` URL, or a `wss://` one with default TLS settings (system
    /// roots, SNI from the host).
    ///
    /// # Errors
    /// A message naming what is wrong: scheme, empty host, bad port, resolution failure.
    pub fn parse(url: &str) -> Result<Self, String> {
        Self::parse_with(url, &TlsOptions::default())
    }

    /// Parse and resolve; a `wss://` URL gets `tls`.
    ///
    /// # Errors
    /// As [`WsUrl::parse`]; TLS options on a `ws://` URL; unreadable TLS files.
    pub fn parse_with(url: &str, tls: &TlsOptions) -> Result<Self, String> {
        let (secure, rest) = match url.split_once("://") {
            Some(("ws", rest)) => (false, rest),
            Some(("wss", rest)) => (true, rest),
            _ => return Err(format!("`{}` is not a ws:// or wss:// URL", redacted(url))),
        };
        if !secure && tls.is_set() {
            return Err("tls_* options need a wss:// URL".into());
        }
        let (hostport, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if hostport.is_empty() || hostport.contains('@') {
            return Err(format!(
                "`{}` has no usable host (credentials go in headers, not the URL)",
                redacted(url)
            ));
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| format!("`{p}` is not a port number"))?;
                (h, port)
            }
            _ => (hostport, if secure { 443 } else { 80 }),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tls = match secure {
            false => None,
            true => {
                let name = tls.server_name.as_deref().unwrap_or(bare);
                Some(Box::new(ClientTls::new(
                    name,
                    tls.ca.clone(),
                    tls.client_cert.clone(),
                    tls.insecure_skip_verify,
                )?))
            }
        };
        let addr = (bare, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{bare}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{bare}` resolves to no address"))?;
        Ok(Self {
            host: hostport.to_string(),
            path,
            addr,
            tls,
        })
    }
}

/// For logs and errors: scheme, host and path, without the query (which may carry a token,
/// often from `${env:NAME}`).
impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let path = match self.path.split_once('?') {
            Some((p, _)) => format!("{p}?…"),
            None => self.path.clone(),
        };
        write!(f, "{scheme}://{}{path}", self.host)
    }
}

impl fmt::Debug for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsUrl")
            .field("url", &self.to_string())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// `url` for an error message: no user-info (`user:secret@`) and no query.
fn redacted(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, _)) => (h, "?…"),
        None => (url, ""),
    };
    let (scheme, rest) = head.split_once("://").unwrap_or(("", head));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => authority.to_string(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    format!("{scheme}{sep}{authority}{path}{query}")
}

/// What the client's request contributes to the upstream request.
pub struct Forwarding<'a> {
    /// The client's address.
    pub peer: IpAddr,
    /// The client's own `X-Forwarded-For`, if any (we append to it).
    pub x_forwarded_for: Option<&'a str>,
    /// The client's `Origin`, passed through.
    pub origin: Option<&'a str>,
    /// The client came over TLS (`Forwarded: proto=wss`).
    pub client_tls: bool,
}

/// Write the upgrade request for `url`: configured headers; when relaying a client (`fwd`),
/// `X-Forwarded-For` (appended), `Forwarded` (RFC 7239) and the client's `Origin`; the
/// subprotocol offers; and `Sec-WebSocket-Extensions: extensions` if given.
pub fn write_request(
    url: &WsUrl,
    key: &str,
    headers: &[(String, String)],
    fwd: Option<&Forwarding<'_>>,
    protocols: &[String],
    extensions: Option<&str>,
    out: &mut Vec<u8>,
) {
    let mut extra: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (xff, forwarded);
    if let Some(fwd) = fwd {
        xff = match fwd.x_forwarded_for {
            Some(prev) if !prev.is_empty() => format!("{prev}, {}", fwd.peer),
            _ => fwd.peer.to_string(),
        };
        let proto = if fwd.client_tls { "wss" } else { "ws" };
        forwarded = match fwd.peer {
            IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
        };
        extra.push(("X-Forwarded-For", &xff));
        extra.push(("Forwarded", &forwarded));
        if let Some(o) = fwd.origin {
            extra.push(("Origin", o));
        }
    }
    if let Some(e) = extensions {
        extra.push(("Sec-WebSocket-Extensions", e));
    }
    let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
    write_client_request(&url.host, &url.path, key, &protocols, &extra, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = WsUrl::parse("ws://127.0.0.1:9001/feed?x=1").unwrap();
        assert_eq!(u.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(
            (u.host.as_str(), u.path.as_str()),
            ("127.0.0.1:9001", "/feed?x=1")
        );
        let u = WsUrl::parse("ws://localhost").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (80, "/"));
        let u = WsUrl::parse("ws://[::1]:81?q").unwrap();
        assert_eq!(
            (u.addr, u.path.as_str()),
            ("[::1]:81".parse().unwrap(), "/?q")
        );
        // Logs and errors never show a query or user-info: either may carry a secret.
        assert_eq!(u.to_string(), "ws://[::1]:81/?…");
        let u = WsUrl::parse("ws://127.0.0.1:9/feed?token=s3cret").unwrap();
        assert_eq!(u.to_string(), "ws://127.0.0.1:9/feed?…");
        assert_eq!(u.path, "/feed?token=s3cret", "the request still carries it");
        assert!(!format!("{u:?}").contains("s3cret"));
        for (bad, shown) in [
            (
                "ws://user:s3cret@h/x?k=s3cret",
                "`ws://…@h/x?…` has no usable host",
            ),
            ("http://h/?token=s3cret", "`http://h/?…` is not a ws://"),
        ] {
            let e = WsUrl::parse(bad).unwrap_err();
            assert!(e.contains(shown) && !e.contains("s3cret"), "{e}");
        }
        for bad in ["http://x/", "ws://", "ws://h:99999/", "ws://u@h/"] {
            assert!(WsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_carries_forwarding_and_headers() {
        let u = WsUrl::parse("ws://127.0.0.1:9/up").unwrap();
        let mut out = Vec::new();
        let protocols = vec!["v1".to_string()];
        write_request(
            &u,
            "dGhlIHNhbXBsZSBub25jZQ==",
            &[("X-Api-Key".into(), "k".into())],
            Some(&Forwarding {
                peer: "10.0.0.7".parse().unwrap(),
                x_forwarded_for: Some("1.2.3.4"),
                origin: Some("https://a.example"),
                client_tls: false,
            }),
            &protocols,
            Some("permessage-deflate; client_max_window_bits"),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /up HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"));
        for h in [
            "X-Api-Key: k\r\n",
            "X-Forwarded-For: 1.2.3.4, 10.0.0.7\r\n",
            "Forwarded: for=10.0.0.7;proto=ws\r\n",
            "Origin: https://a.example\r\n",
            "Sec-WebSocket-Protocol: v1\r\n",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        ] {
            assert!(text.contains(h), "{h} in {text}");
        }
    }
}
