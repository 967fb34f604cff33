//! `--metrics URL`: read counters from a Prometheus text endpoint (wsedge's admin
//! `/metrics`), so a run can report what the server counted beside what the client sent.
//!
//! This module owns the `http://` URL, one blocking HTTP/1.1 GET (`Connection: close`, body
//! by `Content-Length`, chunked or to EOF) and the lookup of a counter in the text format.
//! It runs on the main thread before the workers start and after they have finished, never
//! during the run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};

/// How long one scrape may take (connect, and each read or write).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Responses larger than this are refused (wsedge's `/metrics` is a few KiB).
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone)]
pub struct MetricsUrl {
    /// The URL as given, for reports.
    pub url: String,
    addr: SocketAddr,
    host: String,
    path: String,
}

impl MetricsUrl {
    /// Parse an `http://` URL with an IP or resolvable host name (port 80 by default).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            anyhow::anyhow!("--metrics: only http:// URLs are supported (got `{url}`)")
        })?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        let with_port = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("--metrics: `{hostport}`"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("--metrics: `{hostport}` does not resolve"))?;
        Ok(Self {
            url: url.to_string(),
            addr,
            host: hostport.to_string(),
            path: path.to_string(),
        })
    }

    /// GET the page; the body of a 200 response.
    pub fn get(&self) -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&self.addr, TIMEOUT)
            .with_context(|| format!("--metrics: connect to {}", self.addr))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        write!(
            s,
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            self.path, self.host
        )?;
        let mut raw = Vec::new();
        s.take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .with_context(|| format!("--metrics: reading {}", self.url))?;
        let body = parse_response(&raw).with_context(|| format!("--metrics: {}", self.url))?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Read each counter of `names` (see [`value`]); a missing one is an error.
    pub fn counters(&self, names: &[&str]) -> anyhow::Result<Vec<u64>> {
        let body = self.get()?;
        names
            .iter()
            .map(|n| {
                value(&body, n)
                    .map(|v| v as u64)
                    .ok_or_else(|| anyhow::anyhow!("--metrics: no `{n}` in {}", self.url))
            })
            .collect()
    }
}

/// The body of an HTTP/1.x response, if its status is 200.
fn parse_response(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("incomplete HTTP response ({} bytes)", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: `{status_line}`"))?;
    if status != 200 {
        bail!("HTTP status {status}");
    }
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return dechunk(body);
    }
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if n <= body.len() => Ok(body[..n].to_vec()),
        Some(n) => bail!("body cut short: {} of {n} bytes", body.len()),
        None => Ok(body.to_vec()),
    }
}

/// Decode a chunked body.
fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            bail!("bad chunked body");
        };
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| anyhow::anyhow!("bad chunk size `{size_hex}`"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("chunked body cut short");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The value of counter `name` in Prometheus text format: the sum of its samples over all
/// label sets, or `None` if it has none.
pub fn value(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name 12`, `name{a="b"} 12`, not `name_other 12`.
        let rest = match rest.as_bytes().first() {
            Some(b' ' | b'\t') => rest,
            Some(b'{') => match rest.rfind('}') {
                Some(i) => &rest[i + 1..],
                None => continue,
            },
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_by_exact_name_over_label_sets() {
        let body = "# HELP wsedge_ingest_accepted_total Valid.\n\
                    # TYPE wsedge_ingest_accepted_total counter\n\
                    wsedge_ingest_accepted_total 1234\n\
                    wsedge_ingest_accepted_total_other 7\n\
                    wsedge_sink_messages_total{sink=\"a\"} 10\n\
                    wsedge_sink_messages_total{sink=\"b {x}\"} 5 1700000000\n";
        assert_eq!(value(body, "wsedge_ingest_accepted_total"), Some(1234.0));
        assert_eq!(value(body, "wsedge_sink_messages_total"), Some(15.0));
        assert_eq!(value(body, "wsedge_ingest_invalid_total"), None);
    }

    #[test]
    fn parses_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        assert_eq!(parse_response(ok).unwrap(), b"hello");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"abcde");
        let to_eof = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(parse_response(to_eof).unwrap(), b"all of it");
        assert!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn parses_urls() {
        let u = MetricsUrl::parse("http://127.0.0.1:9090/metrics").unwrap();
        assert_eq!(
            (u.host.as_str(), u.path.as_str()),
            ("127.0.0.1:9090", "/metrics")
        );
        assert_eq!(u.addr.port(), 9090);
        let u = MetricsUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (80, "/metrics"));
        assert!(MetricsUrl::parse("https://127.0.0.1/metrics").is_err());
    }
}
