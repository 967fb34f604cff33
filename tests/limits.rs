//! Access control and abuse limits over real sockets on both backends: bearer tokens (401),
//! origin allow-list (403), per-IP connection cap (429), accept rate (503 with Retry-After),
//! per-connection message and byte rates (close 1008), each counted.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{Client, READ_TIMEOUT, Refused, start};
use wsedge::config::IoMode;
use wsedge::metrics::HandshakeFailure;
use wsedge::proto::CloseCode;
use wsedge::proto::handshake::{generate_key, write_client_request};

const ROUTES: &str = r#"
[[listener.route]]
path = "/o"
kind = "echo"
allowed_origins = ["https://good.example"]
[[listener.route]]
path = "/slow-msgs"
kind = "echo"
max_messages_per_second = 20
[[listener.route]]
path = "/slow-bytes"
kind = "echo"
max_bytes_per_second = 1000
[[listener.route]]
path = "/secure"
kind = "echo"
bearer_tokens = ["t0ken-1", "t0ken-2"]
"#;

/// Upgrade `path` with an optional Origin; returns the status line's code and the raw head.
fn status_with_origin(addr: SocketAddr, path: &str, origin: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    status_with_headers(addr, path, &headers)
}

/// Upgrade `path` with extra headers; returns the status line's code and the raw head.
fn status_with_headers(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut req = Vec::new();
    write_client_request("x", path, &generate_key([1; 16]), &[], headers, &mut req);
    s.write_all(&req).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    (text[9..12].parse().unwrap(), text)
}

fn origin_allow_list(io: IoMode) {
    let srv = start(io, 2, ROUTES);
    assert_eq!(
        status_with_origin(srv.addr, "/o", Some("https://good.example")).0,
        101
    );
    assert_eq!(
        status_with_origin(srv.addr, "/o", Some("https://evil.example")).0,
        403
    );
    assert_eq!(
        status_with_origin(srv.addr, "/o", None).0,
        101,
        "non-browser clients pass"
    );
    assert_eq!(
        status_with_origin(srv.addr, "/echo", Some("https://evil.example")).0,
        101
    );
    let t = srv.totals();
    assert_eq!(t.handshake_failures(HandshakeFailure::OriginForbidden), 1);
}

fn per_ip_cap(io: IoMode) {
    let srv = start(io, 2, "max_connections_per_ip = 3");
    let mut held: Vec<_> = (0..3).map(|_| Client::connect(srv.addr, "/echo")).collect();
    match Client::try_connect(srv.addr, "/echo") {
        Err(Refused::Status(429, text)) => assert!(text.contains("Retry-After: 1"), "{text}"),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Closing one frees its slot.
    let mut c = held.pop().unwrap();
    c.conn.close(CloseCode::NORMAL, "").unwrap();
    c.flush();
    let _ = c.expect_close();
    srv.wait_for("the close", |t| t.connections_open == 2);
    let _again = Client::connect(srv.addr, "/echo");
    assert_eq!(
        srv.totals()
            .handshake_failures(HandshakeFailure::PerIpLimit),
        1
    );
}

fn accept_rate(io: IoMode) {
    // 2 new connections per second over 2 shards: each shard admits one, then one per second.
    let srv = start(io, 2, "accept_rate = 2");
    let mut refused = 0;
    let mut held = Vec::new();
    for _ in 0..6 {
        match Client::try_connect(srv.addr, "/echo") {
            Ok(c) => held.push(c),
            Err(Refused::Status(503, text)) => {
                assert!(text.contains("Retry-After: 1"), "{text}");
                refused += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(refused >= 1, "6 connections at once against a rate of 2/s");
    assert_eq!(
        srv.totals()
            .handshake_failures(HandshakeFailure::AcceptRate),
        refused
    );
}

fn message_and_byte_rates_close_with_1008(io: IoMode) {
    let srv = start(io, 2, ROUTES);
    let mut c = Client::connect(srv.addr, "/slow-msgs");
    for _ in 0..100 {
        c.send_text("x");
    }
    assert_eq!(c.expect_close(), Some(CloseCode::POLICY));
    let mut c = Client::connect(srv.addr, "/slow-bytes");
    c.send_binary(&[0u8; 600]);
    c.send_binary(&[0u8; 600]);
    assert_eq!(c.expect_close(), Some(CloseCode::POLICY));
    let t = srv.wait_for("two 1008 closes", |t| t.closes(1008) == 2);
    assert_eq!(
        t.rate_limit_closes,
        vec![("messages", 1), ("bytes", 1)],
        "{:?}",
        t.rate_limit_closes
    );
    let (_, m) = common::http_get(srv.admin, "/metrics");
    assert!(m.contains("wsedge_rate_limit_closes_total{reason=\"messages\"} 1\n"));
}

fn bearer_tokens(io: IoMode) {
    let srv = start(io, 2, ROUTES);
    let s = |path: &str, h: &[(&str, &str)]| status_with_headers(srv.addr, path, h);
    let (code, head) = s("/secure", &[]);
    assert_eq!(code, 401);
    assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    assert_eq!(s("/secure", &[("Authorization", "Bearer nope")]).0, 401);
    assert_eq!(s("/secure", &[("Authorization", "Basic t0ken-1")]).0, 401);
    assert_eq!(s("/secure", &[("Authorization", "Bearer t0ken-2")]).0, 101);
    assert_eq!(s("/secure", &[("Authorization", "bearer t0ken-1")]).0, 101);
    assert_eq!(s("/secure?access_token=t0ken-1", &[]).0, 101);
    assert_eq!(s("/secure?x=1&access_token=t0ken", &[]).0, 401);
    assert_eq!(s("/echo", &[]).0, 101, "other routes stay open");
    let t = srv.totals();
    assert_eq!(t.handshake_failures(HandshakeFailure::AuthMissing), 2);
    assert_eq!(t.handshake_failures(HandshakeFailure::AuthInvalid), 2);
}

both_backends!(
    bearer_tokens,
    origin_allow_list,
    per_ip_cap,
    accept_rate,
    message_and_byte_rates_close_with_1008,
);
