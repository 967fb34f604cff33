//! WebSocket sinks over real sockets on both backends, against upstreams the tests run on
//! 127.0.0.1 (built on the protocol core, `common::Peer`): headers and subprotocol upstream,
//! one message per batch (text, gzip, zstd decoded back), confirmation by ping/pong, an
//! outage in the middle of a stream that loses nothing (duplicates bounded by the
//! redelivery counter), an upstream that never comes back (bounded pending, backpressure,
//! counted drops at shutdown), an upstream that never answers pings, a sink that gives up,
//! and the flush at shutdown.
//!
//! The test upstreams record every message of a read before they let the pongs of that read
//! go out, so a confirmed batch is always a recorded one.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Client, Peer, READ_TIMEOUT, TestServer, http_get, start_with};
use serde_json::Value;
use wsedge::config::IoMode;
use wsedge::proto::{Event, MessageKind};

/// What a test upstream saw.
#[derive(Debug)]
enum Got {
    /// A connection's upgrade request: path, headers (lowercase names), subprotocols.
    Conn(String, Vec<(String, String)>, Vec<String>),
    /// A message on the connection to `path`.
    Msg(String, MessageKind, Vec<u8>),
}

/// Serve one upstream connection: record each read's messages, then answer its pings.
/// `kill(n)` is asked after each message with the count so far; `true` drops the
/// connection at once, before the pongs of that read go out.
fn serve(mut p: Peer, tx: &mpsc::Sender<Got>, mut kill: impl FnMut(usize) -> bool) -> bool {
    let path = p.request.path.clone();
    let _ = tx.send(Got::Conn(
        path.clone(),
        p.request.headers.clone(),
        p.request.protocols.clone(),
    ));
    let mut n = 0;
    while let Some(events) = p.read_events() {
        for ev in events {
            match ev {
                Event::Message { kind, data } => {
                    n += 1;
                    let _ = tx.send(Got::Msg(path.clone(), kind, data.to_vec()));
                    if kill(n) {
                        let _ = p.stream.shutdown(std::net::Shutdown::Both);
                        return true;
                    }
                }
                Event::Close { .. } => {
                    p.flush();
                    return false;
                }
                _ => {}
            }
        }
        p.flush();
    }
    false
}

/// An upstream that accepts connections on `l` until the test ends, one thread each.
fn upstream(l: TcpListener, tx: mpsc::Sender<Got>) {
    std::thread::spawn(move || {
        loop {
            let p = Peer::accept(&l);
            let tx = tx.clone();
            std::thread::spawn(move || serve(p, &tx, |_| false));
        }
    });
}

/// A sink's entry in `/stats`.
fn sink(srv: &TestServer, name: &str) -> Value {
    let (_, body) = http_get(srv.admin, "/stats");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["info"]["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no sink {name} in {v}"))
        .clone()
}

/// Poll `/stats` until `pred` holds for the sink (bounded by READ_TIMEOUT).
fn wait_sink(srv: &TestServer, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let s = sink(srv, name);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Receive from the upstream until `done` says so (bounded by READ_TIMEOUT).
fn collect(rx: &mpsc::Receiver<Got>, out: &mut Vec<Got>, done: impl Fn(&[Got]) -> bool) {
    let deadline = Instant::now() + READ_TIMEOUT;
    while !done(out) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(g) => out.push(g),
            Err(_) => panic!("upstream got too little: {out:?}"),
        }
    }
}

/// The lines of a batch message, decoded by its framing and compression.
fn decode(kind: MessageKind, data: &[u8], compression: &str) -> String {
    match compression {
        "none" => {
            assert_eq!(kind, MessageKind::Text, "uncompressed batches are text");
            String::from_utf8(data.to_vec()).unwrap()
        }
        "gzip" => {
            assert_eq!(kind, MessageKind::Binary);
            let mut s = String::new();
            flate2::read::GzDecoder::new(data)
                .read_to_string(&mut s)
                .unwrap();
            s
        }
        _ => {
            assert_eq!(kind, MessageKind::Binary);
            String::from_utf8(zstd::decode_all(data).unwrap()).unwrap()
        }
    }
}

fn ws_sink(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"{name}\"\nkind = \"websocket\"\nurl = \"ws://127.0.0.1:{port}/{name}\"\n{extra}\n"
    )
}

/// One shard with the ingest route `/in` into the WebSocket sink `up` on `port` (`extra`:
/// sink options).
fn sink_server(io: IoMode, port: u16, extra: &str) -> TestServer {
    start_with(
        io,
        1,
        &ingest_route("/in", "up", ""),
        &ws_sink("up", port, extra),
    )
}

fn ingest_route(path: &str, sink: &str, extra: &str) -> String {
    format!(
        "[[listener.route]]\npath = \"{path}\"\nkind = \"ingest\"\nsink = \"{sink}\"\n{extra}\n"
    )
}

fn delivers_batches_with_headers_text_and_compressed(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    upstream(l, tx);
    let srv = start_with(
        io,
        2,
        &[
            ingest_route("/nd", "nd", ""),
            ingest_route("/gz", "gz", ""),
            ingest_route("/zs", "zs", "format = \"text\""),
        ]
        .concat(),
        &[
            ws_sink(
                "nd",
                port,
                "max_batch_messages = 10\nsubprotocol = \"ingest.v1\"\n\
                 headers = { \"X-Api-Key\" = \"k1\", Authorization = \"Bearer ${env:PATH}\" }",
            ),
            ws_sink(
                "gz",
                port,
                "framing = \"json_array\"\ncompression = \"gzip\"\nmax_batch_messages = 10",
            ),
            ws_sink("zs", port, "compression = \"zstd\"\nmax_batch_messages = 7"),
        ]
        .concat(),
    );
    let mut a = Client::connect(srv.addr, "/nd");
    let mut b = Client::connect(srv.addr, "/gz");
    let mut c = Client::connect(srv.addr, "/zs");
    for i in 0..100 {
        a.send_text(&format!("{{\"i\":{i}}}"));
        b.send_text(&format!("{{\"i\":{i}}}"));
        c.send_text(&format!("text {i}\nline two"));
    }
    srv.wait_for("300 accepted", |t| t.ingest_accepted == 300);
    for name in ["nd", "gz", "zs"] {
        let s = wait_sink(&srv, name, "all confirmed", |s| s["messages"] == 100);
        assert_eq!(
            (s["state"].as_str(), n(&s, "redeliveries"), n(&s, "dropped")),
            (Some("connected"), 0, 0),
            "{s}"
        );
        assert_eq!(n(&s, "pending_batches"), 0, "{s}");
    }
    let (_, metrics) = http_get(srv.admin, "/metrics");
    assert!(
        metrics.contains("wsedge_sink_connected{sink=\"nd\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("wsedge_sink_redeliveries_total{sink=\"gz\"} 0\n"));
    // Confirmed implies recorded (the upstream records before it answers the ping).
    let got: Vec<Got> = rx.try_iter().collect();
    let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut batches: BTreeMap<String, usize> = BTreeMap::new();
    for g in &got {
        match g {
            Got::Conn(path, headers, protocols) if path == "/nd" => {
                let h = |k: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.as_str())
                };
                assert_eq!(h("x-api-key"), Some("k1"));
                // (PATH: a variable every test process has; the value itself is not secret.)
                let expanded = format!("Bearer {}", std::env::var("PATH").unwrap());
                assert_eq!(h("authorization"), Some(expanded.as_str()), "env expanded");
                assert_eq!(protocols, &["ingest.v1".to_string()]);
            }
            Got::Conn(..) => {}
            Got::Msg(path, kind, data) => {
                let name = &path[1..];
                let compression = match name {
                    "nd" => "none",
                    "gz" => "gzip",
                    _ => "zstd",
                };
                let text = decode(*kind, data, compression);
                *batches.entry(name.to_string()).or_default() += 1;
                let out = lines.entry(name.to_string()).or_default();
                if name == "gz" {
                    // One JSON array per message.
                    let arr: Vec<Value> = serde_json::from_str(text.trim_end()).unwrap();
                    out.extend(arr.iter().map(|v| v.to_string()));
                } else {
                    out.extend(text.lines().map(str::to_string));
                }
            }
        }
    }
    let json: Vec<String> = (0..100).map(|i| format!("{{\"i\":{i}}}")).collect();
    assert_eq!(lines["nd"], json);
    assert_eq!(lines["gz"], json);
    let texts: Vec<String> = lines["zs"]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(texts.len(), 100);
    assert_eq!(texts[42], "text 42\nline two");
    // Batches of 10 (or 7): at least that few messages.
    assert!(
        batches["nd"] >= 10 && batches["gz"] >= 10 && batches["zs"] >= 15,
        "{batches:?}"
    );
    let s = sink(&srv, "nd");
    assert_eq!(n(&s, "batches") as usize, batches["nd"], "{s}");
    drop((a, b, c));
    srv.shutdown();
}

/// The upstream is killed (connection dropped, listener closed) in the middle of a stream,
/// the sink fails to reconnect while more messages are accepted, then the upstream comes
/// back on the same port. Asserted: every accepted message arrives upstream at least once;
/// the number of duplicates is at least 1 (the batch being read at the kill was never
/// confirmed: the upstream died before its pong) and at most the redelivered-messages
/// counter (a re-sent batch is a duplicate only if the dead connection had read it, which
/// it may not have).
fn outage_mid_stream_loses_nothing(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    let (killed_tx, killed_rx) = mpsc::channel();
    let first = {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let p = Peer::accept(&l);
            // Kill on the 5th message (batches of 10 lines: mid-stream).
            let killed = serve(p, &tx, |n| n >= 5);
            drop(l);
            killed_tx.send(killed).unwrap();
        })
    };
    let srv = start_with(
        io,
        2,
        &ingest_route("/in", "up", ""),
        &ws_sink(
            "up",
            port,
            "max_batch_messages = 10\nmax_batch_delay_ms = 20\n\
             reconnect_initial_ms = 20\nreconnect_max_ms = 100",
        ),
    );
    let mut c = Client::connect(srv.addr, "/in");
    let send = |c: &mut Client, r: std::ops::Range<u32>| {
        for i in r {
            c.send_text(&format!("{{\"i\":{i}}}"));
        }
    };
    send(&mut c, 0..150);
    assert!(killed_rx.recv_timeout(READ_TIMEOUT).unwrap(), "killed");
    first.join().unwrap();
    let s = wait_sink(&srv, "up", "the outage noticed and a retry refused", |s| {
        n(s, "disconnects") >= 1 && n(s, "connect_failures") >= 1
    });
    assert_ne!(s["state"], "connected", "{s}");
    // More messages while the upstream is away: held, not lost.
    send(&mut c, 150..300);
    srv.wait_for("300 accepted", |t| t.ingest_accepted == 300);
    // The upstream comes back on the same port.
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    upstream(l, tx);
    let s = wait_sink(&srv, "up", "all confirmed", |s| s["messages"] == 300);
    let got: Vec<Got> = rx.try_iter().collect();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for g in &got {
        if let Got::Msg(_, kind, data) = g {
            for l in decode(*kind, data, "none").lines() {
                let v: Value = serde_json::from_str(l).unwrap();
                *seen.entry(v["i"].as_u64().unwrap()).or_default() += 1;
            }
        }
    }
    let received: usize = seen.values().sum();
    let unique = seen.len();
    assert_eq!(unique, 300, "every accepted message arrived");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>()
    );
    let duplicates = (received - unique) as u64;
    assert!(
        duplicates >= 1,
        "the batch read at the kill came again: {s}"
    );
    assert!(n(&s, "redeliveries") >= 1, "{s}");
    assert!(
        duplicates <= n(&s, "redelivered_messages"),
        "{duplicates} duplicates, {s}"
    );
    assert_eq!(
        (
            n(&s, "messages"),
            n(&s, "pending_batches"),
            n(&s, "dropped")
        ),
        (300, 0, 0),
        "{s}"
    );
    assert!(n(&s, "connects") >= 2, "{s}");
    drop(c);
    let fin = srv.shutdown();
    assert_eq!(fin[0].dropped, 0);
}

/// An upstream that never comes back: the sink holds at most max_pending_batches, then stops
/// taking chunks; its one-chunk queue fills and the ingest connection stops being read
/// (counted). Nothing more is accepted however long the client keeps sending; at shutdown
/// the held messages are counted as dropped.
fn upstream_that_never_returns_backpressures_within_the_bound(io: IoMode) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = start_with(
        io,
        1,
        &ingest_route("/in", "up", ""),
        &format!(
            "drain_window_ms = 0\ndrain_timeout_ms = 1000\n{}",
            ws_sink(
                "up",
                port,
                "max_batch_messages = 1\nbuffer_chunks = 1\nmax_pending_batches = 2\n\
                 reconnect_initial_ms = 10\nreconnect_max_ms = 50\nflush_timeout_ms = 200",
            )
        ),
    );
    let mut c = Client::connect(srv.addr, "/in");
    // One message per server read: a message is sent only once the previous one was
    // accepted (handed to the sink's queue). Stop when one is not: the sink holds 2
    // batches, its queue 1 chunk, and the connection waits on the full queue. (The state
    // is re-checked after a pause so that a queue that was full only for a moment, while
    // the sink was still taking its first chunks, is not mistaken for it.)
    let mut sent = 0u64;
    let blocked = |t: &wsedge::metrics::Snapshot, sent: u64| {
        t.ingest_waits > 0
            && t.ingest_accepted + 1 == sent
            && n(&sink(&srv, "up"), "pending_batches") == 2
    };
    loop {
        let t = srv.totals();
        if t.ingest_accepted == sent {
            assert!(sent < 100, "no backpressure after {sent} messages: {t:?}");
            c.send_text(&format!("{{\"i\":{sent}}}"));
            sent += 1;
        } else if blocked(&t, sent) {
            std::thread::sleep(Duration::from_millis(100));
            if blocked(&srv.totals(), sent) {
                break;
            }
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The connection is not read any more: however much the client sends, nothing more is
    // accepted and the sink holds no more than its bound.
    for i in 0..20 {
        c.send_text(&format!("{{\"more\":{i}}}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = srv.totals();
    let s = sink(&srv, "up");
    assert_eq!(n(&s, "pending_batches"), 2, "never above the bound: {s}");
    assert_eq!(
        t.ingest_accepted, 3,
        "2 pending batches of one message + 1 queued chunk: {t:?}"
    );
    assert!(t.ingest_waits >= 1);
    assert_eq!((n(&s, "messages"), n(&s, "connects")), (0, 0), "{s}");
    assert!(n(&s, "connect_failures") >= 1, "{s}");
    assert!(s["last_error"].as_str().unwrap().contains("connect"), "{s}");
    let (_, metrics) = http_get(srv.admin, "/metrics");
    assert!(
        metrics.contains("wsedge_sink_pending_batches{sink=\"up\"} 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("wsedge_sink_connected{sink=\"up\"} 0\n"));
    drop(c);
    let fin = srv.shutdown();
    assert_eq!(
        (fin[0].dropped, fin[0].messages, fin[0].state),
        (t.ingest_accepted, 0, "stopped"),
        "every accepted message is delivered or counted: {:?}",
        fin[0]
    );
}

/// reconnect_max_attempts reached: state failed, and from then on messages are dropped and
/// counted rather than blocking the clients forever.
fn a_sink_that_gives_up_drops_and_counts(io: IoMode) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = sink_server(
        io,
        port,
        "reconnect_initial_ms = 5\nreconnect_max_ms = 10\nreconnect_max_attempts = 2\n\
         max_batch_messages = 1\nbuffer_chunks = 1\nmax_pending_batches = 1",
    );
    wait_sink(&srv, "up", "gave up", |s| s["state"] == "failed");
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..50 {
        c.send_text(&format!("{{\"i\":{i}}}"));
    }
    srv.wait_for("all accepted", |t| t.ingest_accepted == 50);
    let s = wait_sink(&srv, "up", "all dropped", |s| n(s, "dropped") == 50);
    assert_eq!(n(&s, "connect_failures"), 2, "{s}");
    let (_, metrics) = http_get(srv.admin, "/metrics");
    assert!(
        metrics.contains("wsedge_sink_failed{sink=\"up\"} 1\n"),
        "{metrics}"
    );
}

/// At shutdown a partial batch (its delay far away) is sealed, sent and confirmed before
/// the sink ends; the upstream gets a close 1001.
fn pending_batches_are_flushed_at_shutdown(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    upstream(l, tx);
    let srv = start_with(
        io,
        2,
        &ingest_route("/in", "up", ""),
        &ws_sink(
            "up",
            port,
            "max_batch_messages = 10\nmax_batch_delay_ms = 600000",
        ),
    );
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..25 {
        c.send_text(&format!("{{\"i\":{i}}}"));
    }
    srv.wait_for("25 accepted", |t| t.ingest_accepted == 25);
    wait_sink(&srv, "up", "two full batches", |s| s["messages"] == 20);
    drop(c);
    let fin = srv.shutdown();
    assert_eq!(
        (fin[0].messages, fin[0].batches, fin[0].dropped),
        (25, 3, 0),
        "{:?}",
        fin[0]
    );
    let mut got = Vec::new();
    collect(&rx, &mut got, |g| {
        g.iter().filter(|g| matches!(g, Got::Msg(..))).count() == 3
    });
    let last = got
        .iter()
        .rev()
        .find_map(|g| match g {
            Got::Msg(_, k, d) => Some(decode(*k, d, "none")),
            _ => None,
        })
        .unwrap();
    assert_eq!(last.lines().count(), 5, "{last}");
}

/// An upstream that reads but never answers pings (a zombie endpoint): nothing is
/// confirmed, the connection is dropped after ack_timeout_ms and the batches are re-sent on
/// the next one, where they are confirmed.
fn unanswered_pings_mean_a_dead_connection(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut p = Peer::accept(&l);
        let mut zombie_read = 0;
        // Read (and count) everything, flush nothing: no pong ever leaves.
        while let Some(events) = p.read_events() {
            zombie_read += events
                .iter()
                .filter(|e| matches!(e, Event::Message { .. }))
                .count();
        }
        assert!(zombie_read > 0, "the zombie was written to");
        upstream(l, tx);
    });
    let srv = sink_server(
        io,
        port,
        "max_batch_messages = 5\nack_timeout_ms = 300\nreconnect_initial_ms = 10",
    );
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..20 {
        c.send_text(&format!("{{\"i\":{i}}}"));
    }
    let s = wait_sink(&srv, "up", "confirmed on the second connection", |s| {
        s["messages"] == 20
    });
    assert!(
        s["last_error"].as_str().unwrap().contains("ack_timeout"),
        "{s}"
    );
    // (≥: on a loaded machine a good connection could miss the timeout once too.)
    assert!(n(&s, "connects") >= 2 && n(&s, "disconnects") >= 1, "{s}");
    assert!(n(&s, "redeliveries") >= 1, "{s}");
    let mut lines = Vec::new();
    for g in rx.try_iter() {
        if let Got::Msg(_, k, d) = g {
            lines.extend(decode(k, &d, "none").lines().map(str::to_string));
        }
    }
    let mut want: Vec<String> = (0..20).map(|i| format!("{{\"i\":{i}}}")).collect();
    want.sort();
    lines.sort();
    lines.dedup();
    assert_eq!(lines, want, "the answering connection got everything");
}

/// An upstream that reads every batch but never answers a ping did not work, however long
/// each session lasted: each ack timeout counts as a failure, so the backoff grows and
/// `reconnect_max_attempts` is reached. (It used to count as productive, once it lasted
/// ack_timeout, and the sink reconnected and re-sent at the initial delay forever.)
fn an_upstream_that_never_confirms_is_given_up_on(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        loop {
            let mut p = Peer::accept(&l);
            // Read everything, flush nothing: no pong ever leaves.
            std::thread::spawn(move || while p.read_events().is_some() {});
        }
    });
    let srv = sink_server(
        io,
        port,
        "max_batch_messages = 1\nack_timeout_ms = 150\nreconnect_initial_ms = 5\n\
         reconnect_max_ms = 10\nreconnect_max_attempts = 3",
    );
    let mut c = Client::connect(srv.addr, "/in");
    c.send_text("{\"i\":1}");
    let s = wait_sink(&srv, "up", "gave up", |s| s["state"] == "failed");
    assert!(
        s["last_error"].as_str().unwrap().contains("ack_timeout"),
        "{s}"
    );
    assert_eq!(n(&s, "connects"), 3, "{s}");
}

/// A slow consumer (small receive buffer, paced reads: about 2 MB/s here) with a backlog
/// deeper than `ack_timeout_ms` is not a dead one: it answers each 1 MiB round in about half
/// a second, and each ack is timed from its round's write or the previous pong, so the
/// connection stays up and nothing is sent twice. Timed from when each ping was queued (the
/// old rule), the pongs behind the megabytes in the kernel's send queue came after 1.2 s and
/// the sink reconnected and re-sent in a loop.
fn a_slow_consumer_is_not_timed_out(io: IoMode) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    sock.bind(&addr.into()).unwrap();
    sock.listen(16).unwrap();
    let l: TcpListener = sock.into();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        loop {
            let mut p = Peer::accept(&l);
            std::thread::spawn(move || {
                while p.read_events().is_some() {
                    p.flush();
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
    });
    let srv = sink_server(
        io,
        port,
        "max_batch_messages = 1\nack_timeout_ms = 1200\nreconnect_initial_ms = 10",
    );
    let mut c = Client::connect(srv.addr, "/in");
    let pad = "x".repeat(64 * 1024);
    let total = 96;
    for i in 0..total {
        c.send_text(&format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"));
    }
    let s = wait_sink(&srv, "up", "all confirmed", |s| s["messages"] == total);
    assert_eq!(n(&s, "connects"), 1, "{s}");
    assert_eq!(n(&s, "disconnects"), 0, "{s}");
    assert_eq!(n(&s, "redeliveries"), 0, "{s}");
}

both_backends!(
    unanswered_pings_mean_a_dead_connection,
    delivers_batches_with_headers_text_and_compressed,
    outage_mid_stream_loses_nothing,
    upstream_that_never_returns_backpressures_within_the_bound,
    a_sink_that_gives_up_drops_and_counts,
    pending_batches_are_flushed_at_shutdown,
    a_slow_consumer_is_not_timed_out,
    an_upstream_that_never_confirms_is_given_up_on,
);
