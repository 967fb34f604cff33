//! Sources over real sockets on both backends: wsedge connects out to scripted upstreams
//! (built on the protocol core) and publishes into topics; subscribe messages after every
//! reconnect, format validation, backoff, giving up, and zombie detection by ping and by
//! application heartbeat.

mod common;

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::{Client, Peer, READ_TIMEOUT, TestServer, start_with};
use wsedge::config::IoMode;
use wsedge::metrics::SourceSnapshot;
use wsedge::proto::{CloseCode, Event, MessageKind};

const SUB_ROUTE: &str = "[[listener.route]]\npath = \"/sub/{topic}\"\nkind = \"subscribe\"\n";

fn server_with_source(io: IoMode, source: &str) -> TestServer {
    start_with(io, 2, SUB_ROUTE, &format!("\n[[source]]\n{source}\n"))
}

fn source(srv: &TestServer) -> SourceSnapshot {
    let t = srv.totals();
    assert_eq!(t.sources.len(), 1, "{:?}", t.sources);
    t.sources[0].clone()
}

fn wait_source(
    srv: &TestServer,
    what: &str,
    pred: impl Fn(&SourceSnapshot) -> bool,
) -> SourceSnapshot {
    srv.wait_for(what, |t| t.sources.first().is_some_and(&pred));
    source(srv)
}

fn publishes_validates_and_resubscribes_after_reconnect(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (sub_tx, sub_rx) = mpsc::channel::<(String, String)>();
    let upstream = std::thread::spawn(move || {
        // First connection: wait for the test's go, send 3 messages and one binary (invalid
        // for a text source), then close with 1001.
        let mut p = Peer::accept(&l);
        let key = p
            .request
            .headers
            .iter()
            .find(|(k, _)| k == "x-api-key")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        sub_tx.send((p.recv_text().unwrap(), key)).unwrap();
        go_rx.recv().unwrap();
        for m in ["m1", "m2", "m3"] {
            p.send_text(m);
        }
        p.conn.send(MessageKind::Binary, b"\xff").unwrap();
        p.conn.close(CloseCode::GOING_AWAY, "restart").unwrap();
        p.flush();
        while p.next_event().is_some() {}
        // Second connection: the subscription comes again, then more messages.
        let mut p = Peer::accept(&l);
        sub_tx
            .send((p.recv_text().unwrap(), String::new()))
            .unwrap();
        for m in ["m4", "m5"] {
            p.send_text(m);
        }
        while p.next_event().is_some() {}
    });
    let srv = server_with_source(
        io,
        &format!(
            "name = \"feed\"\nurl = \"ws://{up}/stream\"\ntopic = \"btc\"\n\
             subscribe = [\"SUB btc\"]\nheaders = {{ \"X-Api-Key\" = \"s3cret\" }}\n\
             reconnect_initial_ms = 50"
        ),
    );
    let mut sub = Client::connect(srv.addr, "/sub/btc");
    srv.wait_for("subscribed", |t| t.fanout.subscribers == 1);
    assert_eq!(
        sub_rx.recv_timeout(READ_TIMEOUT).unwrap(),
        ("SUB btc".to_string(), "s3cret".to_string())
    );
    go_tx.send(()).unwrap();
    for m in ["m1", "m2", "m3"] {
        assert_eq!(sub.recv(), (MessageKind::Text, m.as_bytes().to_vec()));
    }
    assert_eq!(
        sub_rx.recv_timeout(READ_TIMEOUT).unwrap().0,
        "SUB btc",
        "re-subscribed"
    );
    for m in ["m4", "m5"] {
        assert_eq!(sub.recv(), (MessageKind::Text, m.as_bytes().to_vec()));
    }
    let s = wait_source(&srv, "5 messages", |s| s.messages == 5);
    assert_eq!((s.connects, s.disconnects, s.invalid), (2, 1, 1), "{s:?}");
    assert_eq!(s.state, "connected");
    assert!(s.last_error.contains("1001"), "{}", s.last_error);
    let (_, metrics) = common::http_get(srv.admin, "/metrics");
    assert!(
        metrics.contains("wsedge_source_up{source=\"feed\"} 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("s3cret"));
    drop(srv); // drain: the upstream gets close 1001 and the thread ends
    upstream.join().unwrap();
}

fn retries_with_backoff_then_connects_or_gives_up(io: IoMode) {
    // Nothing listens at first.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = server_with_source(
        io,
        &format!(
            "url = \"ws://127.0.0.1:{port}/\"\ntopic = \"t\"\n\
             reconnect_initial_ms = 20\nreconnect_max_ms = 100"
        ),
    );
    let s = wait_source(&srv, "failed attempts", |s| {
        s.last_error.contains("connect")
    });
    assert_eq!(s.connects, 0);
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _p = Peer::accept(&l);
    wait_source(&srv, "connected", |s| {
        s.state == "connected" && s.connects == 1
    });

    let srv2 = server_with_source(
        io,
        &format!(
            "url = \"ws://127.0.0.1:{}/\"\ntopic = \"t\"\n\
             reconnect_initial_ms = 10\nreconnect_max_ms = 20\nreconnect_max_attempts = 3",
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        ),
    );
    let s = wait_source(&srv2, "gave up", |s| s.state == "failed");
    assert_eq!(s.connects, 0);
    let (_, metrics) = common::http_get(srv2.admin, "/metrics");
    assert!(
        metrics.contains("wsedge_source_failed{source=\"source0\"} 1\n"),
        "{metrics}"
    );
}

/// An upstream that sends one message and hangs up at once, every time (an error reply,
/// say): each such session is a failure, so the source backs off and, with
/// reconnect_max_attempts, gives up, instead of redialling every few ms forever.
fn a_flapping_upstream_is_backed_off_and_given_up_on(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    std::thread::spawn(move || {
        loop {
            let mut p = Peer::accept(&l);
            p.send_text("{\"error\":\"unauthorized\"}");
            let _ = p.conn.close(CloseCode::POLICY, "unauthorized");
            p.flush();
        }
    });
    let srv = server_with_source(
        io,
        &format!(
            "url = \"ws://{up}/\"\ntopic = \"t\"\n\
             reconnect_initial_ms = 5\nreconnect_max_ms = 10\nreconnect_max_attempts = 4"
        ),
    );
    let s = wait_source(&srv, "gave up", |s| s.state == "failed");
    assert_eq!(s.connects, 4, "{s:?}");
}

/// An upstream that completes the handshake and then neither reads nor writes (a zombie).
fn silent_upstream_is_replaced(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let p = Peer::accept(&l);
            tx.send(p).unwrap(); // kept open, never read
        }
    });
    let srv = server_with_source(
        io,
        &format!(
            "url = \"ws://{up}/\"\ntopic = \"t\"\nping_interval_ms = 50\npong_timeout_ms = 100\n\
             reconnect_initial_ms = 10"
        ),
    );
    let s = wait_source(&srv, "a reconnect", |s| s.connects == 2);
    assert!(s.last_error.contains("pong_timeout"), "{}", s.last_error);
    drop(rx);
}

/// Heartbeat with an expected reply: WebSocket pings are answered (the TCP and WebSocket
/// layers are alive) but the application is not; and the reply, when it comes, is not
/// published.
fn heartbeat_reply_proves_liveness(io: IoMode) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    std::thread::spawn(move || {
        // 1: answers pings, ignores the heartbeat.
        let mut p = Peer::accept(&l);
        while p.next_event().is_some() {}
        // 2: answers every heartbeat with "pong" and sends one data message.
        let mut p = Peer::accept(&l);
        p.send_text("data");
        while let Some(ev) = p.next_event() {
            if matches!(&ev, Event::Message { data, .. } if &data[..] == b"hb") {
                p.send_text("pong");
            }
        }
    });
    let srv = server_with_source(
        io,
        &format!(
            "url = \"ws://{up}/\"\ntopic = \"t\"\nping_interval_ms = 20\npong_timeout_ms = 400\n\
             heartbeat_message = \"hb\"\nheartbeat_interval_ms = 50\nheartbeat_expect = \"pong\"\n\
             reconnect_initial_ms = 10"
        ),
    );
    let s = wait_source(&srv, "reconnect after a missing reply", |s| s.connects == 2);
    assert!(s.last_error.contains("heartbeat reply"), "{}", s.last_error);
    // On the second connection replies keep it alive through several timeouts' worth of time.
    std::thread::sleep(Duration::from_millis(1200));
    let s = source(&srv);
    assert_eq!((s.connects, s.state), (2, "connected"), "{s:?}");
    assert_eq!(
        s.messages, 1,
        "only the data message is published, not the replies"
    );
}

both_backends!(
    a_flapping_upstream_is_backed_off_and_given_up_on,
    publishes_validates_and_resubscribes_after_reconnect,
    retries_with_backoff_then_connects_or_gives_up,
    silent_upstream_is_replaced,
    heartbeat_reply_proves_liveness,
);
