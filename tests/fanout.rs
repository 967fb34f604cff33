//! Broadcast fan-out over real sockets, on both I/O backends and several shards: ordering,
//! cross-shard delivery, topic cleanup, the admin publish API, all-to-all rooms, and slow
//! subscribers handled by policy while everyone else keeps up.

mod common;

use std::net::SocketAddr;

use common::{Client, READ_TIMEOUT, TestServer, http_get, http_post, raise_nofile, start};
use wsedge::config::IoMode;
use wsedge::fanout::DropReason;
use wsedge::proto::{CloseCode, MessageKind};

const ROUTES: &str = r#"
close_timeout_ms = 500
[[listener.route]]
path = "/pub/{topic}"
kind = "publish"
[[listener.route]]
path = "/sub/{topic}"
kind = "subscribe"
[[listener.route]]
path = "/room/{topic}"
kind = "pubsub"
[[listener.route]]
path = "/slow-close/{topic}"
kind = "subscribe"
max_queue_messages = 64
lag_policy = "close"
[[listener.route]]
path = "/slow-oldest/{topic}"
kind = "subscribe"
max_queue_messages = 64
lag_policy = "drop_oldest"
[[listener.route]]
path = "/slow-newest/{topic}"
kind = "subscribe"
max_queue_bytes = 65536
lag_policy = "drop_newest"
"#;

fn server(io: IoMode, shards: usize) -> TestServer {
    start(io, shards, ROUTES)
}

/// Wait until the server has registered `n` subscriptions (the 101 is written just before
/// the subscription exists, so a test must not publish before this).
fn wait_subscribed(srv: &TestServer, n: u64) {
    srv.wait_for("subscriptions", |t| t.fanout.subscribers == n);
}

/// Connect at least `min` subscribers to `path`, more until every shard has one.
fn subscribers_on_every_shard(srv: &TestServer, path: &str, min: usize) -> Vec<Client> {
    let mut subs: Vec<Client> = (0..min).map(|_| Client::connect(srv.addr, path)).collect();
    loop {
        wait_subscribed(srv, subs.len() as u64);
        if srv.per_shard().iter().all(|s| s.fanout.subscribers > 0) {
            return subs;
        }
        assert!(subs.len() < 500, "SO_REUSEPORT never picked some shard");
        subs.push(Client::connect(srv.addr, path));
    }
}

/// A connection on a chosen address with a tiny receive buffer: it never reads, so the
/// server's writes to it stall almost at once.
fn stalled_client(addr: SocketAddr, path: &str) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let stream: std::net::TcpStream = sock.into();
    Client::upgrade(stream, path, &[]).unwrap().0
}

fn every_subscriber_gets_every_message_in_order_across_shards(io: IoMode) {
    let srv = server(io, 3);
    let mut subs = subscribers_on_every_shard(&srv, "/sub/prices", 12);
    let mut pa = Client::connect(srv.addr, "/pub/prices");
    let mut pb = Client::connect(srv.addr, "/pub/prices");
    const N: u32 = 300;
    for i in 0..N {
        pa.send_text(&format!("a{i}"));
        let mut b = vec![b'b'];
        b.extend_from_slice(&i.to_be_bytes());
        pb.send_binary(&b);
    }
    for s in &mut subs {
        let (mut next_a, mut next_b) = (0u32, 0u32);
        for _ in 0..2 * N {
            match s.recv() {
                (MessageKind::Text, d) => {
                    assert_eq!(d, format!("a{next_a}").into_bytes(), "text kept, in order");
                    next_a += 1;
                }
                (MessageKind::Binary, d) => {
                    assert_eq!(d[0], b'b');
                    assert_eq!(d[1..], next_b.to_be_bytes(), "binary kept, in order");
                    next_b += 1;
                }
            }
        }
    }
    let n = subs.len() as u64;
    let t = srv.wait_for("deliveries", |t| t.fanout.deliveries == 2 * N as u64 * n);
    assert_eq!(t.fanout.published, 2 * N as u64);
    assert!(t.fanout.drops.is_empty(), "{:?}", t.fanout.drops);
    assert_eq!(t.fanout.ring_full_drops, 0);
    assert!(t.fanout.ring_batches_in > 0, "messages crossed shards");
    assert_eq!(t.fanout.ring_batches_in, t.fanout.ring_batches_out);
    // Publishers' messages are not echoed to them.
    assert_eq!(t.messages_out, 0);
    let (_, metrics) = http_get(srv.admin, "/metrics");
    assert!(metrics.contains(&format!(
        "wsedge_fanout_deliveries_total {}\n",
        2 * N as u64 * n
    )));
}

fn topics_are_removed_with_their_last_subscriber(io: IoMode) {
    let srv = server(io, 2);
    let subs: Vec<_> = (0..30)
        .map(|i| Client::connect(srv.addr, &format!("/sub/t{}", i % 10)))
        .collect();
    let t = srv.wait_for("30 subscriptions", |t| t.fanout.subscribers == 30);
    assert!((10..=20).contains(&t.fanout.topics), "{}", t.fanout.topics);
    drop(subs);
    srv.wait_for("cleanup", |t| {
        t.fanout.subscribers == 0 && t.fanout.topics == 0
    });
    // Publishing to a topic without subscribers creates nothing.
    let (status, body) = http_post(srv.admin, "/publish/ghost", "text/plain", b"boo");
    assert_eq!((status, body.as_str()), (200, "{\"subscribers\":0}\n"));
    let mut p = Client::connect(srv.addr, "/pub/ghost");
    p.send_text("anyone?");
    let t = srv.wait_for("published", |t| t.fanout.published == 2);
    assert_eq!((t.fanout.topics, t.fanout.deliveries), (0, 0));
}

fn admin_publish_reaches_subscribers(io: IoMode) {
    let srv = server(io, 2);
    let mut subs = subscribers_on_every_shard(&srv, "/sub/news", 4);
    let (status, body) = http_post(srv.admin, "/publish/news", "text/plain", "héllo".as_bytes());
    assert_eq!(status, 200);
    assert_eq!(body, format!("{{\"subscribers\":{}}}\n", subs.len()));
    let (status, _) = http_post(
        srv.admin,
        "/publish/news",
        "application/octet-stream",
        &[0xff, 0],
    );
    assert_eq!(status, 200);
    for s in &mut subs {
        assert_eq!(s.recv(), (MessageKind::Text, "héllo".as_bytes().to_vec()));
        assert_eq!(s.recv(), (MessageKind::Binary, vec![0xff, 0]));
    }
    let (status, body) = http_post(srv.admin, "/publish/news", "text/plain", &[0xff]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(http_post(srv.admin, "/publish/", "text/plain", b"x").0, 400);
    assert_eq!(http_get(srv.admin, "/publish/news").0, 405);
    assert_eq!(srv.totals().fanout.published, 2);
}

fn pubsub_room_is_all_to_all(io: IoMode) {
    let srv = server(io, 2);
    let mut members: Vec<_> = (0..6)
        .map(|_| Client::connect(srv.addr, "/room/lobby"))
        .collect();
    wait_subscribed(&srv, 6);
    const N: usize = 25;
    for i in 0..N {
        for (m, c) in members.iter_mut().enumerate() {
            c.send_text(&format!("{m}:{i}"));
        }
    }
    for c in &mut members {
        let mut next = [0usize; 6];
        for _ in 0..N * 6 {
            let (_, d) = c.recv();
            let text = String::from_utf8(d).unwrap();
            let (m, i) = text.split_once(':').unwrap();
            let m: usize = m.parse().unwrap();
            assert_eq!(i.parse::<usize>().unwrap(), next[m], "per-sender order");
            next[m] += 1;
        }
    }
    srv.wait_for("deliveries", |t| t.fanout.deliveries == (N * 36) as u64);
}

/// Publish `count` 4 KiB messages numbered from `first`, then have every reader read them.
fn publish_and_read(p: &mut Client, readers: &mut [Client], first: u32, count: u32) {
    let mut payload = vec![7u8; 4096];
    for i in first..first + count {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        p.send_binary(&payload);
    }
    for r in readers.iter_mut() {
        for i in first..first + count {
            let (_, d) = r.recv();
            assert_eq!(
                d[..4],
                i.to_be_bytes(),
                "a reading subscriber lost a message"
            );
        }
    }
}

fn stalled_subscriber_is_closed_while_1000_others_get_everything(io: IoMode) {
    raise_nofile();
    let srv = server(io, 2);
    let mut readers: Vec<_> = (0..1000)
        .map(|_| Client::connect(srv.addr, "/slow-close/feed"))
        .collect();
    let stalled = stalled_client(srv.addr, "/slow-close/feed");
    wait_subscribed(&srv, 1001);
    let mut p = Client::connect(srv.addr, "/pub/feed");
    // The stalled connection absorbs its socket buffers, one in-flight write and 64 queued
    // frames; everything after that overflows its queue. Bounded: at most 2,000 messages.
    let mut sent = 0;
    while srv.totals().fanout.drops(DropReason::SlowClose) == 0 {
        assert!(sent < 2000, "the stalled subscriber never overflowed");
        publish_and_read(&mut p, &mut readers, sent, 50);
        sent += 50;
        let t = srv.totals();
        assert!(
            t.fanout.queued_messages <= 64 * 1001,
            "queues stay within their caps: {}",
            t.fanout.queued_messages
        );
    }
    // The others keep receiving everything after the close.
    publish_and_read(&mut p, &mut readers, sent, 50);
    let t = srv.wait_for("the stalled subscriber is gone", |t| {
        t.fanout.subscribers == 1000 && t.closes(CloseCode::POLICY.0) == 1
    });
    assert_eq!(t.fanout.drops(DropReason::SlowClose), 1);
    assert_eq!(t.fanout.drops.len(), 1, "{:?}", t.fanout.drops);
    assert_eq!(t.fanout.queued_messages, 0, "readers drained everything");
    drop(stalled);
}

fn stalled_subscriber_drops_by_policy_and_stays(io: IoMode) {
    let srv = server(io, 2);
    for (route, reason) in [
        ("/slow-oldest/q", DropReason::DropOldest),
        ("/slow-newest/q", DropReason::DropNewest),
    ] {
        let mut readers: Vec<_> = (0..20).map(|_| Client::connect(srv.addr, route)).collect();
        let mut stalled = stalled_client(srv.addr, route);
        wait_subscribed(&srv, 21);
        let mut p = Client::connect(srv.addr, "/pub/q");
        let mut sent = 0;
        while srv.totals().fanout.drops(reason) == 0 {
            assert!(sent < 4000, "the stalled subscriber never filled its queue");
            // Small chunks: a reader's burst must fit its own (small) queue plus socket
            // buffers while the test reads the others one by one.
            publish_and_read(&mut p, &mut readers, sent, 10);
            sent += 10;
        }
        publish_and_read(&mut p, &mut readers, sent, 10);
        // Only the stalled subscriber's queue holds anything once the readers are done, and it
        // is within its cap: 64 frames on the drop_oldest route, 64 KiB (+ at most one
        // frame) on the drop_newest route.
        let t = srv.wait_for("readers drained", |t| {
            t.fanout.queued_messages <= 64 && t.fanout.subscribers == 21
        });
        if reason == DropReason::DropNewest {
            assert!(
                t.fanout.queued_bytes <= 65536 + 4096 + 4,
                "the stalled queue is within its cap: {}",
                t.fanout.queued_bytes
            );
        }
        // The stalled subscriber is still connected and, when it reads, gets a gap-bearing
        // but ordered stream.
        stalled.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut last = None;
        for _ in 0..50 {
            let (_, d) = stalled.recv();
            let i = u32::from_be_bytes(d[..4].try_into().unwrap());
            assert!(last.is_none_or(|l| i > l), "ordered");
            last = Some(i);
        }
        drop((readers, stalled, p));
        wait_subscribed(&srv, 0);
    }
}

/// A subscriber that closes while its topic is busy: broadcasts that reach its queue after
/// its close are never written (nothing may follow a close frame), and must not wake its loop
/// for nothing either. That loop once spun on them without returning to the executor, which
/// froze the whole shard: the linger timer, every other connection, the admin queries and
/// the shutdown.
fn a_subscriber_closing_on_a_busy_topic_does_not_freeze_its_shard(io: IoMode) {
    let srv = server(io, 1);
    let mut sub = Client::connect(srv.addr, "/sub/busy");
    wait_subscribed(&srv, 1);
    let mut publisher = Client::connect(srv.addr, "/pub/busy");
    sub.conn.close(CloseCode::NORMAL, "bye").unwrap();
    sub.flush();
    // Broadcasts until the close reply is seen, and then more, while the closed connection
    // lingers (it stays subscribed until it ends).
    let mut sent = 0;
    loop {
        publisher.send_text(&format!("m{sent}"));
        sent += 1;
        match sub.next_event() {
            Some(wsedge::proto::Event::Close { code, .. }) => {
                assert_eq!(code, Some(CloseCode::NORMAL));
                break;
            }
            Some(_) => {}
            None => panic!("connection ended before the close reply"),
        }
    }
    for i in 0..50 {
        publisher.send_text(&format!("after {i}"));
    }
    let mut other = Client::connect(srv.addr, "/echo");
    other.send_text("still here");
    assert_eq!(other.recv(), (MessageKind::Text, b"still here".to_vec()));
    srv.wait_for("the closed subscriber gone", |t| t.fanout.subscribers == 0);
    drop((sub, publisher, other));
    srv.shutdown();
}

/// During the drain window, broadcasts from other shards still reach the subscribers that
/// have not had their turn yet. (The shard used to stop taking its rings at the start of the
/// drain: a subscriber on another shard than the publisher went silent, uncounted.)
fn cross_shard_broadcasts_flow_during_the_drain(io: IoMode) {
    let srv = common::start_with(
        io,
        2,
        ROUTES,
        "drain_window_ms = 10000\ndrain_timeout_ms = 15000\n",
    );
    let mut subs = subscribers_on_every_shard(&srv, "/sub/d", 8);
    let before: Vec<u64> = srv.per_shard().iter().map(|s| s.connections_open).collect();
    let mut publisher = Client::connect(srv.addr, "/pub/d");
    let p_shard = loop {
        let now: Vec<u64> = srv.per_shard().iter().map(|s| s.connections_open).collect();
        if let Some(i) = (0..now.len()).find(|&i| now[i] > before[i]) {
            break i;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let local = srv.per_shard()[p_shard].fanout.subscribers as usize;
    let addr = srv.addr;
    let shutdown = std::thread::spawn(move || srv.shutdown());
    // The drain has begun on every shard once no listener accepts any more.
    while std::net::TcpStream::connect(addr).is_ok() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    publisher.send_text("during the drain");
    let mut got = 0;
    for s in &mut subs {
        // The message, or a close (this subscriber's turn came first), or silence.
        loop {
            match s.next_event_within(std::time::Duration::from_millis(500)) {
                Ok(Some(wsedge::proto::Event::Message { data, .. })) => {
                    assert_eq!(&data[..], b"during the drain");
                    got += 1;
                    break;
                }
                Ok(Some(wsedge::proto::Event::Close { .. })) | Ok(None) | Err(()) => break,
                Ok(Some(_)) => {}
            }
        }
    }
    assert!(
        got > local,
        "{got} of {} subscribers got a broadcast made during the drain; {local} are on the \
         publisher's shard",
        subs.len()
    );
    drop((subs, publisher));
    shutdown.join().unwrap();
}

both_backends!(
    cross_shard_broadcasts_flow_during_the_drain,
    a_subscriber_closing_on_a_busy_topic_does_not_freeze_its_shard,
    every_subscriber_gets_every_message_in_order_across_shards,
    topics_are_removed_with_their_last_subscriber,
    admin_publish_reaches_subscribers,
    pubsub_room_is_all_to_all,
    stalled_subscriber_is_closed_while_1000_others_get_everything,
    stalled_subscriber_drops_by_policy_and_stays,
);
