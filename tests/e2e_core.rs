//! End-to-end tests of the core server over real sockets on 127.0.0.1:0, each run on both
//! I/O backends (io_uring and the epoll fallback).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Client, Refused, masked_frame, raw_http, start, upgrade_request};
use wsedge::config::IoMode;
use wsedge::metrics::HandshakeFailure;
use wsedge::proto::{CloseCode, Event, MessageKind};

fn echo_text_binary_and_fragments(io: IoMode) {
    let srv = start(io, 1, "");
    let mut c = Client::connect(srv.addr, "/echo");
    c.send_text("hello");
    assert_eq!(c.recv(), (MessageKind::Text, b"hello".to_vec()));
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    c.send_binary(&big);
    assert_eq!(c.recv(), (MessageKind::Binary, big));
    c.send_text("");
    assert_eq!(c.recv(), (MessageKind::Text, Vec::new()));
    // A fragmented text message with a ping between the fragments.
    let mut raw = masked_frame(false, 0x1, "héllo ".as_bytes());
    raw.extend(masked_frame(true, 0x9, b"p"));
    raw.extend(masked_frame(true, 0x0, "wörld".as_bytes()));
    c.send_raw(&raw);
    match c.next_event() {
        Some(Event::Pong(p)) => assert_eq!(&p[..], b"p"),
        other => panic!("expected pong, got {other:?}"),
    }
    assert_eq!(
        c.recv(),
        (MessageKind::Text, "héllo wörld".as_bytes().to_vec())
    );
    // Client-initiated close: the server echoes the code and closes TCP.
    c.conn.close(CloseCode::NORMAL, "bye").unwrap();
    c.flush();
    assert_eq!(c.expect_close(), Some(CloseCode::NORMAL));
    assert!(c.server_closed_tcp());
    let t = srv.wait_for("close counted", |t| t.closes(1000) == 1);
    assert_eq!(t.messages_in, 4);
    assert_eq!(t.messages_out, 4);
    assert_eq!(t.connections_total, 1);
}

fn subprotocol_is_negotiated_by_server_preference(io: IoMode) {
    let srv = start(io, 1, "");
    let (_, chosen) =
        Client::try_connect_with(srv.addr, "/echo", &["v1.wsedge", "v2.wsedge"]).unwrap();
    assert_eq!(chosen.as_deref(), Some("v2.wsedge"), "server order wins");
    let (_, chosen) = Client::try_connect_with(srv.addr, "/echo", &["mqtt", "v1.wsedge"]).unwrap();
    assert_eq!(chosen.as_deref(), Some("v1.wsedge"));
    let (mut c, chosen) = Client::try_connect_with(srv.addr, "/echo", &["mqtt"]).unwrap();
    assert_eq!(
        chosen, None,
        "no common protocol: none selected, connection proceeds"
    );
    c.send_text("ok");
    assert_eq!(c.recv().1, b"ok");
}

fn pipelined_messages_come_back_in_order(io: IoMode) {
    let srv = start(io, 1, "");
    let mut c = Client::connect(srv.addr, "/echo");
    for i in 0..2000u32 {
        c.conn
            .send(MessageKind::Text, i.to_string().as_bytes())
            .unwrap();
    }
    c.flush();
    for i in 0..2000u32 {
        assert_eq!(c.recv().1, i.to_string().into_bytes());
    }
}

fn unmasked_client_frame_is_closed_with_1002(io: IoMode) {
    let srv = start(io, 1, "");
    let mut c = Client::connect(srv.addr, "/echo");
    c.send_raw(&[0x81, 0x02, b'h', b'i']);
    assert_eq!(c.expect_close(), Some(CloseCode::PROTOCOL_ERROR));
    srv.wait_for("1002 counted", |t| t.closes(1002) == 1);
}

fn invalid_utf8_is_closed_with_1007(io: IoMode) {
    let srv = start(io, 1, "");
    let mut c = Client::connect(srv.addr, "/echo");
    c.send_raw(&masked_frame(true, 0x1, &[b'o', b'k', 0xC0, 0xAF]));
    assert_eq!(c.expect_close(), Some(CloseCode::INVALID_PAYLOAD));
}

fn oversized_frame_is_closed_with_1009(io: IoMode) {
    let srv = start(io, 1, "max_frame_bytes = 1024\nmax_message_bytes = 4096");
    let mut c = Client::connect(srv.addr, "/echo");
    // Only the header: the server must refuse on the announced length alone.
    c.send_raw(&[0x82, 0x80 | 127, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(c.expect_close(), Some(CloseCode::TOO_BIG));
    // Many small fragments exceeding the message cap.
    let mut c = Client::connect(srv.addr, "/echo");
    let mut raw = Vec::new();
    raw.extend(masked_frame(false, 0x2, &[0; 1000]));
    for _ in 0..5 {
        raw.extend(masked_frame(false, 0x0, &[0; 1000]));
    }
    c.send_raw(&raw);
    assert_eq!(c.expect_close(), Some(CloseCode::TOO_BIG));
}

fn bad_handshakes_get_precise_statuses(io: IoMode) {
    let srv = start(io, 1, "");
    let ok = String::from_utf8(upgrade_request("/echo")).unwrap();
    let resp = raw_http(
        srv.addr,
        ok.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8")
            .as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Version: 13"), "{resp}");
    let no_key: String = ok
        .lines()
        .filter(|l| !l.starts_with("Sec-WebSocket-Key"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let resp = raw_http(srv.addr, no_key.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = raw_http(srv.addr, ok.replacen("GET", "POST", 1).as_bytes());
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp = raw_http(srv.addr, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = raw_http(srv.addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = raw_http(srv.addr, ok.replace("/echo", "/nowhere").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let huge = ok.replace(
        "\r\n\r\n",
        &format!("\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000)),
    );
    let resp = raw_http(srv.addr, huge.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let t = srv.wait_for("failures counted", |t| {
        t.handshake_failures(HandshakeFailure::NoRoute) == 1
    });
    assert_eq!(t.handshake_failures(HandshakeFailure::Malformed), 3);
    assert_eq!(
        t.handshake_failures(HandshakeFailure::UnsupportedVersion),
        1
    );
    assert_eq!(t.handshake_failures(HandshakeFailure::MethodNotAllowed), 1);
    assert_eq!(t.handshake_failures(HandshakeFailure::TooLarge), 1);
    assert_eq!(t.connections_total, 0);
}

fn over_capacity_gets_503(io: IoMode) {
    let srv = start(io, 2, "max_connections = 2");
    let a = Client::connect(srv.addr, "/echo");
    let mut b = Client::connect(srv.addr, "/echo");
    match Client::try_connect(srv.addr, "/echo") {
        Err(Refused::Status(503, text)) => assert!(text.contains("Retry-After: 1"), "{text}"),
        Err(other) => panic!("expected 503, got {other:?}"),
        Ok(_) => panic!("third connection must be refused"),
    }
    // A slot frees up when a connection closes.
    drop(a);
    srv.wait_for("slot freed", |t| t.connections_open == 1);
    let mut c = Client::connect(srv.addr, "/echo");
    c.send_text("x");
    b.send_text("y");
    assert_eq!(c.recv().1, b"x");
    assert_eq!(b.recv().1, b"y");
    let t = srv.totals();
    assert_eq!(t.handshake_failures(HandshakeFailure::OverCapacity), 1);
}

fn slow_handshake_times_out(io: IoMode) {
    let srv = start(io, 1, "handshake_timeout_ms = 300");
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(common::READ_TIMEOUT)).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n").unwrap();
    // The server gives up and closes; the read returns EOF (not our 10 s timeout).
    let mut b = [0u8; 16];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    srv.wait_for("timeout counted", |t| {
        t.handshake_failures(HandshakeFailure::Timeout) == 1
    });
}

fn idle_connection_is_pinged_then_closed(io: IoMode) {
    let srv = start(io, 1, "idle_timeout_ms = 100\npong_timeout_ms = 100");
    let mut c = Client::connect(srv.addr, "/echo");
    // Never flush the automatic pong: the server must give up on us.
    match c.next_event() {
        Some(Event::Ping(_)) => {}
        other => panic!("expected a keepalive ping, got {other:?}"),
    }
    let _ = c.conn.poll_transmit(&mut Vec::new());
    assert_eq!(c.expect_close(), Some(CloseCode::GOING_AWAY));
    let t = srv.wait_for("idle close counted", |t| t.idle_closes == 1);
    assert!(t.pings_sent >= 1);
}

fn answered_pings_keep_the_connection(io: IoMode) {
    let srv = start(io, 1, "idle_timeout_ms = 50\npong_timeout_ms = 2000");
    let mut c = Client::connect(srv.addr, "/echo");
    for _ in 0..3 {
        match c.next_event() {
            Some(Event::Ping(_)) => c.flush(), // sends the automatic pong
            other => panic!("expected ping, got {other:?}"),
        }
    }
    c.send_text("still here");
    assert_eq!(c.recv().1, b"still here");
    assert_eq!(srv.totals().idle_closes, 0);
}

fn drain_sends_1001_and_stops(io: IoMode) {
    let srv = common::start_with(io, 2, "", "drain_window_ms = 200\ndrain_timeout_ms = 5000");
    let mut clients: Vec<Client> = (0..6).map(|_| Client::connect(srv.addr, "/echo")).collect();
    let addr = srv.addr;
    let stopper = std::thread::spawn(move || srv.shutdown());
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), Some(CloseCode::GOING_AWAY));
        assert!(c.server_closed_tcp());
    }
    stopper.join().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener must be closed after drain"
    );
}

fn metrics_and_health_endpoints(io: IoMode) {
    let srv = start(io, 2, "");
    let (status, body) = common::http_get(srv.admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let mut c = Client::connect(srv.addr, "/echo");
    c.send_text("abc");
    c.recv();
    srv.wait_for("message counted", |t| t.messages_in == 1);
    let (status, body) = common::http_get(srv.admin, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("wsedge_connections_open 1\n"), "{body}");
    assert!(body.contains("wsedge_messages_in_total 1\n"), "{body}");
    assert!(body.contains("wsedge_bytes_in_total 3\n"), "{body}");
    let backend = match io {
        IoMode::Epoll => "epoll",
        _ => "io_uring",
    };
    assert!(
        body.contains(&format!("io_backend=\"{backend}\"")),
        "{body}"
    );
    let (status, body) = common::http_get(srv.admin, "/stats");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["info"]["shards"], 2);
    assert_eq!(v["total"]["messages_in"], 1);
    assert_eq!(common::http_get(srv.admin, "/nope").0, 404);
}

fn many_connections_over_several_shards(io: IoMode) {
    let srv = start(io, 2, "");
    let mut clients: Vec<Client> = (0..64)
        .map(|_| Client::connect(srv.addr, "/echo"))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("m{i}"));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv().1, format!("m{i}").into_bytes());
    }
    let (_, stats) = common::http_get(srv.admin, "/stats");
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["total"]["connections_open"], 64);
}

/// A client that sends a large message and its close frame, then stops reading: our echo
/// cannot be written, and neither can our close reply behind it. The close came from the
/// peer, but it still gets only `close_timeout_ms`: then the connection (its slot, its
/// buffers) is let go.
fn a_peer_close_behind_a_stalled_write_times_out(io: IoMode) {
    let srv = start(
        io,
        1,
        "close_timeout_ms = 300\nmax_pending_write_bytes = 67108864\n",
    );
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&srv.addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(common::READ_TIMEOUT)).unwrap();
    let (mut c, _) = Client::upgrade(stream, "/echo", &[]).unwrap();
    // One write: the message and the close, so the server reads the close too.
    c.conn
        .send(MessageKind::Binary, &vec![1u8; 8 << 20])
        .unwrap();
    c.conn.close(CloseCode::NORMAL, "bye").unwrap();
    c.flush();
    let t = srv.wait_for("the connection let go", |t| t.closes(1000) == 1);
    assert_eq!(t.messages_in, 1);
}

both_backends!(
    a_peer_close_behind_a_stalled_write_times_out,
    echo_text_binary_and_fragments,
    pipelined_messages_come_back_in_order,
    subprotocol_is_negotiated_by_server_preference,
    unmasked_client_frame_is_closed_with_1002,
    invalid_utf8_is_closed_with_1007,
    oversized_frame_is_closed_with_1009,
    bad_handshakes_get_precise_statuses,
    over_capacity_gets_503,
    slow_handshake_times_out,
    idle_connection_is_pinged_then_closed,
    answered_pings_keep_the_connection,
    drain_sends_1001_and_stops,
    metrics_and_health_endpoints,
    many_connections_over_several_shards,
);

/// A client that trickles its admin request (a byte a second, the slowloris pattern) holds
/// neither the admin listener (`/healthz` answers meanwhile, from another thread) nor its own
/// connection past the request deadline (5 s for the whole request).
#[test]
fn a_trickling_admin_client_blocks_nothing() {
    let srv = start(IoMode::Auto, 1, "");
    let mut slow = TcpStream::connect(srv.admin).unwrap();
    slow.write_all(b"GET /hea").unwrap();
    let mut trickler = slow.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        // Never completes the head; stops when the server has let go.
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if trickler.write_all(b"l").is_err() {
                break;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (status, body) = common::http_get(srv.admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // The server closes the trickling connection at the deadline (read: EOF or reset).
    slow.set_read_timeout(Some(common::READ_TIMEOUT)).unwrap();
    let mut b = [0u8; 64];
    let r = slow.read(&mut b);
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the trickling admin connection was kept: {r:?}"
    );
    drop(slow);
    t.join().unwrap();
}
