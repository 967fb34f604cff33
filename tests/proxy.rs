//! Proxy routes over real sockets on both backends: wsedge in front of a real upstream (a
//! second wsedge, or a small scripted upstream built on the protocol core where the test must
//! see what the proxy sent), checking relaying, subprotocols, forwarding headers, close codes
//! both ways, 502 for unreachable or silent upstreams, and end-to-end backpressure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use bytes::BytesMut;
use common::{Client, Refused, TestServer, start};
use wsedge::config::IoMode;
use wsedge::metrics::HandshakeFailure;
use wsedge::proto::handshake::{HandshakeLimits, parse_request, write_response_101};
use wsedge::proto::{CloseCode, Conn, Event, Limits, MessageKind, Role};

fn proxy_to(io: IoMode, upstream: &str, extra: &str) -> TestServer {
    start(
        io,
        2,
        &format!(
            "close_timeout_ms = 1000\n[[listener.route]]\npath = \"/p\"\nkind = \"proxy\"\n\
             upstream = \"{upstream}\"\nheaders = {{ \"X-Api-Key\" = \"k-123\" }}\n{extra}\n"
        ),
    )
}

fn echo_through_a_real_upstream(io: IoMode) {
    let up = start(io, 1, "");
    let srv = proxy_to(io, &format!("ws://{}/echo", up.addr), "");
    let (mut c, proto) = Client::try_connect_with(srv.addr, "/p", &["v1.wsedge"]).unwrap();
    assert_eq!(
        proto.as_deref(),
        Some("v1.wsedge"),
        "upstream's choice passed back"
    );
    c.send_text("hello");
    assert_eq!(c.recv(), (MessageKind::Text, b"hello".to_vec()));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    c.send_binary(&big);
    assert_eq!(c.recv(), (MessageKind::Binary, big));
    for i in 0..200 {
        c.send_text(&i.to_string());
    }
    for i in 0..200 {
        assert_eq!(c.recv().1, i.to_string().into_bytes(), "in order");
    }
    c.conn.close(CloseCode::NORMAL, "done").unwrap();
    c.flush();
    assert_eq!(c.expect_close(), Some(CloseCode::NORMAL));
    let t = up.wait_for("upstream saw the close", |t| t.closes(1000) == 1);
    assert_eq!(t.messages_in, 202);
    let t = srv.wait_for("proxy saw the close", |t| t.closes(1000) == 1);
    // The proxy counts what it relayed, both ways: 202 messages of 1,000,495 payload bytes
    // ("hello", the 1 MB binary, "0".."199"), in from the client, passed upstream, back from
    // the upstream and queued for the client.
    let bytes = 5
        + 1_000_000
        + (0..200)
            .map(|i: u32| i.to_string().len() as u64)
            .sum::<u64>();
    assert_eq!((t.messages_in, t.bytes_in), (202, bytes));
    let p = &t.proxy;
    assert_eq!((p.to_upstream_messages, p.to_upstream_bytes), (202, bytes));
    assert_eq!(
        (p.from_upstream_messages, p.from_upstream_bytes),
        (202, bytes)
    );
    assert_eq!((t.messages_out, t.bytes_out), (202, bytes));
}

/// A scripted upstream: accepts connections on its own thread; for each, sends the request
/// headers it received as a text message, then follows `script`.
#[derive(Clone, Copy)]
enum Script {
    /// Wait for the client's close frame, report its code, answer it.
    ReportClientClose,
    /// Close at once with 4001 "bye".
    CloseWith4001,
    /// Read nothing ever (backpressure).
    NeverRead,
    /// Read nothing ever and send 1 KiB binary messages as fast as the socket takes them.
    Firehose,
}

fn scripted_upstream(scripts: Vec<Script>) -> (SocketAddr, mpsc::Receiver<Option<u16>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for script in scripts {
            let (mut s, _) = l.accept().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || serve_scripted(&mut s, script, &tx));
        }
    });
    (addr, rx)
}

fn serve_scripted(s: &mut TcpStream, script: Script, tx: &mpsc::Sender<Option<u16>>) {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let req = loop {
        let n = s.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some((req, used)) = parse_request(&buf, &HandshakeLimits::default()).unwrap() {
            let _ = buf.split_to(used);
            break req;
        }
    };
    let mut out = Vec::new();
    write_response_101(&req.key, None, &[], &mut out);
    let mut conn = Conn::new(Role::Server, Limits::default());
    let headers: Vec<String> = req
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    conn.send(MessageKind::Text, headers.join("\n").as_bytes())
        .unwrap();
    if let Script::CloseWith4001 = script {
        conn.close(CloseCode(4001), "bye").unwrap();
    }
    conn.poll_transmit(&mut out);
    s.write_all(&out).unwrap();
    match script {
        Script::NeverRead => std::thread::sleep(Duration::from_secs(30)),
        Script::Firehose => loop {
            let mut out = Vec::new();
            for _ in 0..64 {
                conn.send(MessageKind::Binary, &[7u8; 1024]).unwrap();
            }
            conn.poll_transmit(&mut out);
            if s.write_all(&out).is_err() {
                return;
            }
        },
        Script::CloseWith4001 | Script::ReportClientClose => loop {
            let n = s.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                let _ = tx.send(None);
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let _ = conn.handle_input(&mut buf);
            while let Some(ev) = conn.poll_event() {
                if let Event::Close { code, .. } = ev {
                    let mut out = Vec::new();
                    conn.poll_transmit(&mut out);
                    let _ = s.write_all(&out);
                    let _ = tx.send(code.map(|c| c.0));
                    return;
                }
            }
        },
    }
}

/// The route's message rate applies to the client's messages: the first one over it
/// closes the client with 1008 and the upstream with 1001, and is not passed on.
fn rate_limits_close_the_client_with_1008(io: IoMode) {
    let (up, codes) = scripted_upstream(vec![Script::ReportClientClose; 2]);
    let srv = proxy_to(io, &format!("ws://{up}/"), "max_messages_per_second = 10");
    let mut c = Client::connect(srv.addr, "/p");
    let _ = c.recv();
    for _ in 0..50 {
        c.send_text("x");
    }
    assert_eq!(c.expect_close(), Some(CloseCode::POLICY));
    assert_eq!(
        codes.recv_timeout(common::READ_TIMEOUT).unwrap(),
        Some(CloseCode::GOING_AWAY.0)
    );
    let t = srv.wait_for("the 1008 close", |t| t.closes(1008) == 1);
    assert_eq!(t.rate_limit_closes, vec![("messages", 1), ("bytes", 0)]);
    // One second of burst (10), and what refilled while the 50 were sent.
    let passed = t.proxy.to_upstream_messages;
    assert!(
        (10..=12).contains(&passed),
        "{passed} messages passed upstream"
    );

    // Over the limit only behind the client's own close (one read holds both): the message
    // is dropped, but the close codes stay the client's, and no 1008 is counted.
    let mut c = Client::connect(srv.addr, "/p");
    let _ = c.recv();
    for _ in 0..11 {
        c.conn.send(MessageKind::Text, b"x").unwrap();
    }
    c.conn.close(CloseCode::NORMAL, "done").unwrap();
    c.flush();
    assert_eq!(c.expect_close(), Some(CloseCode::NORMAL));
    assert_eq!(
        codes.recv_timeout(common::READ_TIMEOUT).unwrap(),
        Some(CloseCode::NORMAL.0)
    );
    let t = srv.wait_for("the 1000 close", |t| t.closes(1000) == 1);
    assert_eq!(t.rate_limit_closes, vec![("messages", 1), ("bytes", 0)]);
}

fn forwarding_headers_and_close_codes_both_ways(io: IoMode) {
    let (up, codes) = scripted_upstream(vec![Script::ReportClientClose, Script::CloseWith4001]);
    let srv = proxy_to(io, &format!("ws://{up}/feed?x=1"), "");

    // Client-initiated close: the upstream sees the client's code.
    let mut c = Client::connect(srv.addr, "/p");
    let (_, headers) = c.recv();
    let headers = String::from_utf8(headers).unwrap();
    for h in [
        "x-api-key: k-123",
        "x-forwarded-for: 127.0.0.1",
        "forwarded: for=127.0.0.1;proto=ws",
        &format!("host: {up}"),
    ] {
        assert!(headers.contains(h), "`{h}` missing from:\n{headers}");
    }
    c.conn.close(CloseCode(4321), "client done").unwrap();
    c.flush();
    assert_eq!(
        codes.recv_timeout(common::READ_TIMEOUT).unwrap(),
        Some(4321)
    );
    assert_eq!(c.expect_close(), Some(CloseCode(4321)));

    // Upstream-initiated close: the client sees the upstream's code.
    let mut c = Client::connect(srv.addr, "/p");
    let _ = c.recv();
    assert_eq!(c.expect_close(), Some(CloseCode(4001)));
    let t = srv.wait_for("both closes counted", |t| t.connections_open == 0);
    assert_eq!(t.closes(4321) + t.closes(4001), 2, "{:?}", t.closes);
}

fn unreachable_or_silent_upstream_gets_502(io: IoMode) {
    // Nothing listens on a port we just released.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let srv = proxy_to(io, &format!("ws://{free}/"), "");
    match Client::try_connect(srv.addr, "/p") {
        Err(Refused::Status(502, _)) => {}
        other => panic!("expected 502, got {:?}", other.map(|_| ())),
    }
    // Accepts TCP, never answers the upgrade: the connect timeout applies.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let srv2 = proxy_to(
        io,
        &format!("ws://{}/", silent.local_addr().unwrap()),
        "connect_timeout_ms = 300",
    );
    match Client::try_connect(srv2.addr, "/p") {
        Err(Refused::Status(502, _)) => {}
        other => panic!("expected 502, got {:?}", other.map(|_| ())),
    }
    for s in [&srv, &srv2] {
        let t = s.totals();
        assert_eq!(t.handshake_failures(HandshakeFailure::BadGateway), 1);
        assert_eq!(t.connections_open, 0, "the capacity slot was given back");
    }
}

fn a_stalled_upstream_stops_the_client_flow(io: IoMode) {
    let (up, _codes) = scripted_upstream(vec![Script::NeverRead]);
    let srv = proxy_to(io, &format!("ws://{up}/"), "");
    let mut c = Client::connect(srv.addr, "/p");
    let _ = c.recv();
    c.stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    // If the proxy kept reading while it cannot write, the client could write forever. It must
    // stall after the kernel buffers on both hops and one queue of max_pending_write_bytes.
    let msg = vec![0u8; 1 << 20];
    let mut written = 0usize;
    let limit = 64 << 20;
    while written < limit {
        c.conn.send(MessageKind::Binary, &msg).unwrap();
        let mut out = Vec::new();
        c.conn.poll_transmit(&mut out);
        match c.stream.write(&out) {
            Ok(n) if n == out.len() => written += n,
            Ok(n) => {
                written += n;
                break;
            }
            Err(_) => break,
        }
    }
    eprintln!("stalled after {written} bytes");
    assert!(
        written < limit,
        "the proxy buffered {written} bytes for a stalled upstream"
    );
}

/// A client that breaks the protocol has its close held back until the upstream answers ours
/// (replies to its valid messages go first). An upstream that meanwhile keeps sending and
/// never answers is not read past `max_pending_write_bytes` queued for the held client:
/// nothing piles up behind the held close for the `close_timeout_ms` it may last.
fn a_held_close_does_not_buffer_the_upstream(io: IoMode) {
    let (up, _codes) = scripted_upstream(vec![Script::Firehose]);
    let srv = start(
        io,
        1,
        &format!(
            "close_timeout_ms = 4000\nmax_pending_write_bytes = 65536\n\
             [[listener.route]]\npath = \"/p\"\nkind = \"proxy\"\nupstream = \"ws://{up}/\"\n"
        ),
    );
    let mut c = Client::connect(srv.addr, "/p");
    let _ = c.recv();
    // An unmasked frame: a protocol error (1002) on the client's hop.
    c.send_raw(&[0x82, 0x02, b'h', b'i']);
    // Keep reading (and dropping) what arrives, so that the write to the client in flight at
    // the error completes and the only thing left to hold the upstream back is the limit.
    c.stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let mut read_for = |c: &mut Client, d: Duration| {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            let _ = c.stream.read(&mut sink);
        }
    };
    read_for(&mut c, Duration::from_millis(1000));
    let a = srv.totals().proxy.from_upstream_messages;
    read_for(&mut c, Duration::from_millis(500));
    let b = srv.totals().proxy.from_upstream_messages;
    assert!(
        b - a < 1000,
        "the proxy kept reading the upstream behind a held close: {a} then {b} messages"
    );
}

/// A client that floods pings and never reads: each ping owes a pong on the client's own
/// hop, which the proxy cannot write while the client does not read. The pongs must not
/// pile up in wsedge: once the client reads again it gets far fewer pongs than it sent
/// pings (the rest were replaced while queued), and the last one answers its latest ping.
fn a_ping_flood_from_a_client_that_never_reads_is_bounded(io: IoMode) {
    let (up, _codes) = scripted_upstream(vec![Script::NeverRead]);
    let srv = start(
        io,
        1,
        &format!(
            "[[listener.route]]\npath = \"/p\"\nkind = \"proxy\"\nupstream = \"ws://{up}/\"\n"
        ),
    );
    let mut c = Client::connect(srv.addr, "/p");
    const PINGS: u32 = 200_000;
    let mut wire = Vec::new();
    for i in 0..PINGS {
        // A masked ping (mask key 0) of 125 bytes that starts with its sequence number.
        let mut payload = [b'p'; 125];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        wire.extend_from_slice(&[0x89, 0x80 | 125, 0, 0, 0, 0]);
        wire.extend_from_slice(&payload);
    }
    c.stream.write_all(&wire).unwrap();
    // Read what came back: the upstream's greeting, then pongs until the latest ping's.
    let mut conn = Conn::new(Role::Client, Limits::default());
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut pongs = 0u32;
    let mut last = None;
    while last != Some(PINGS - 1) {
        let n = c
            .stream
            .read(&mut chunk)
            .expect("the pong to the last ping");
        assert!(n > 0, "closed after {pongs} pongs");
        buf.extend_from_slice(&chunk[..n]);
        conn.handle_input(&mut buf).unwrap();
        while let Some(e) = conn.poll_event() {
            if let Event::Pong(p) = e {
                pongs += 1;
                last = Some(u32::from_be_bytes(p[..4].try_into().unwrap()));
            }
        }
    }
    assert!(
        pongs < PINGS / 2,
        "{pongs} pongs for {PINGS} pings: they were all queued"
    );
}

/// A connection that always has work (an upstream that never stops sending, a client that
/// reads as fast as it can) does not keep its shard to itself: another client on the same
/// (only) shard still gets its echo, and the admin endpoint still answers. On epoll an
/// operation on a ready socket completes inside its first poll, so without a turn budget such
/// a loop would never return to the executor.
fn a_busy_connection_does_not_starve_its_shard(io: IoMode) {
    let (up, _codes) = scripted_upstream(vec![Script::Firehose]);
    let srv = start(
        io,
        1,
        &format!(
            "[[listener.route]]\npath = \"/p\"\nkind = \"proxy\"\nupstream = \"ws://{up}/\"\n"
        ),
    );
    let mut busy = Client::connect(srv.addr, "/p");
    let _ = busy.recv();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match busy.stream.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            total
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut other = Client::connect(srv.addr, "/echo");
    other.send_text("still here");
    assert_eq!(other.recv(), (MessageKind::Text, b"still here".to_vec()));
    // The shard also answers its control channel (a snapshot request not answered within
    // 1 s leaves that shard out, so poll: on a loaded machine one request may miss).
    srv.wait_for("the busy connection relaying", |t| {
        t.proxy.from_upstream_messages > 0
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

both_backends!(
    a_busy_connection_does_not_starve_its_shard,
    a_held_close_does_not_buffer_the_upstream,
    a_ping_flood_from_a_client_that_never_reads_is_bounded,
    echo_through_a_real_upstream,
    forwarding_headers_and_close_codes_both_ways,
    rate_limits_close_the_client_with_1008,
    unreachable_or_silent_upstream_gets_502,
    a_stalled_upstream_stops_the_client_flow,
);
