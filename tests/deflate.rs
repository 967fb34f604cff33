//! permessage-deflate (RFC 7692) over real sockets, on both I/O backends: negotiation, echo
//! of compressed messages, a broadcast that reaches deflate and plain subscribers with the
//! right bytes (compressed once per shard), decompression bombs, and the listener switch.

mod common;

use common::{Client, http_get, raw_http, start, upgrade_request};
use wsedge::config::IoMode;
use wsedge::proto::{CloseCode, Compressor, MessageKind};

const ROUTES: &str = r#"
[[listener.route]]
path = "/pub/{topic}"
kind = "publish"
[[listener.route]]
path = "/sub/{topic}"
kind = "subscribe"
"#;

/// A JSON-ish message that compresses well.
fn ticks(n: usize) -> String {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"symbol\":\"BTC-USD\",\"price\":{}.5,\"size\":0.0{},\"side\":\"buy\"}},",
            43_000 + i % 50,
            i % 9
        ));
        i += 1;
    }
    s.truncate(n);
    s
}

fn metric(srv: &common::TestServer, name: &str) -> u64 {
    let (_, body) = http_get(srv.admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

fn echo_compressed(io: IoMode) {
    let srv = start(io, 1, "");
    let mut c = Client::connect_deflate(srv.addr, "/echo", 512);
    assert!(c.conn.deflate_enabled(), "the server accepted the offer");
    let big = ticks(20_000);
    // Compressed both ways; the echo arrives compressed (counted by the client's core).
    assert!(c.send_compressed(MessageKind::Text, big.as_bytes()));
    assert_eq!(c.recv(), (MessageKind::Text, big.clone().into_bytes()));
    let st = c.conn.take_deflate_stats().unwrap();
    assert_eq!(st.inflated, 1);
    assert!(st.inflated_in < big.len() as u64 / 4, "{st:?}");
    // Below the threshold: plain both ways.
    assert!(!c.send_compressed(MessageKind::Binary, b"tiny"));
    assert_eq!(c.recv(), (MessageKind::Binary, b"tiny".to_vec()));
    assert_eq!(c.conn.take_deflate_stats(), None);
    // An uncompressed large message from the client is still echoed compressed.
    c.send_text(&big);
    assert_eq!(c.recv().1, big.as_bytes());
    assert_eq!(c.conn.take_deflate_stats().unwrap().inflated, 1);
    // Fragmented compressed message: RSV1 on the first frame only.
    let mut z = Compressor::default();
    let payload = z.compress(big.as_bytes(), 15).unwrap().to_vec();
    let (a, b) = payload.split_at(payload.len() / 2);
    let mut first = common::masked_frame(false, 0x1, a);
    first[0] |= 0x40;
    c.send_raw(&first);
    c.send_raw(&common::masked_frame(true, 0x0, b));
    assert_eq!(c.recv().1, big.as_bytes());
    srv.wait_for("deflate counters", |t| t.deflate.stats.inflated == 2);
    assert_eq!(metric(&srv, "wsedge_deflate_connections_total"), 1);
    assert_eq!(metric(&srv, "wsedge_deflate_messages_inflated_total"), 2);
    assert_eq!(metric(&srv, "wsedge_deflate_messages_compressed_total"), 3);
    assert!(
        metric(&srv, "wsedge_deflate_compressed_bytes_out_total")
            < metric(&srv, "wsedge_deflate_compressed_bytes_in_total") / 4
    );
    c.conn.close(CloseCode::NORMAL, "").unwrap();
    c.flush();
    assert_eq!(c.expect_close(), Some(CloseCode::NORMAL));
}

fn broadcast_reaches_deflate_and_plain_subscribers(io: IoMode) {
    let srv = start(io, 2, ROUTES);
    // Subscribers of both kinds on every shard.
    let mut zs = Vec::new();
    let mut plain = Vec::new();
    loop {
        zs.push(Client::connect_deflate(srv.addr, "/sub/t", 512));
        plain.push(Client::connect(srv.addr, "/sub/t"));
        let n = (zs.len() + plain.len()) as u64;
        srv.wait_for("subscriptions", |t| t.fanout.subscribers == n);
        let shards = srv.per_shard();
        // Every shard has a deflate subscriber and a plain one (SO_REUSEPORT picks the
        // shard per connection, so keep adding pairs until it has happened).
        if shards
            .iter()
            .all(|s| s.deflate.connections >= 1 && s.fanout.subscribers > s.deflate.connections)
        {
            break;
        }
        assert!(zs.len() < 200, "SO_REUSEPORT never picked some shard");
    }
    let mut publisher = Client::connect(srv.addr, "/pub/t");
    let big = ticks(8_000);
    publisher.send_text(&big);
    publisher.send_text("small");
    for c in zs.iter_mut().chain(plain.iter_mut()) {
        assert_eq!(c.recv(), (MessageKind::Text, big.clone().into_bytes()));
        assert_eq!(c.recv(), (MessageKind::Text, b"small".to_vec()));
    }
    // Deflate subscribers got the compressed frame (a plain client would have failed on
    // RSV1), the small message plain.
    for c in &mut zs {
        let st = c
            .conn
            .take_deflate_stats()
            .expect("a compressed frame arrived");
        assert_eq!(st.inflated, 1);
        assert!(st.inflated_in < big.len() as u64 / 4);
    }
    // Compressed once per shard, not per subscriber.
    let t = srv.totals();
    assert_eq!(t.fanout.deflated, 2, "{:?}", t.fanout);
    assert_eq!(t.fanout.deflated_deliveries, zs.len() as u64);
    assert_eq!(metric(&srv, "wsedge_fanout_deflated_total"), 2);
    // The admin API's publishes take the same path.
    let (status, _) = common::http_post(srv.admin, "/publish/t", "text/plain", big.as_bytes());
    assert_eq!(status, 200);
    for c in zs.iter_mut().chain(plain.iter_mut()) {
        assert_eq!(c.recv().1, big.as_bytes());
    }
    assert_eq!(srv.totals().fanout.deflated, 4);
}

fn decompression_bomb_closes_1009(io: IoMode) {
    let srv = start(io, 1, "max_message_bytes = 1048576\n");
    let mut c = Client::connect_deflate(srv.addr, "/echo", 512);
    // 64 MiB of zeros in one compressed frame of ~64 KB.
    let mut z = flate2::Compress::new(flate2::Compression::best(), false);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::with_capacity(1 << 20);
    for i in 0..64 {
        let flush = if i == 63 {
            flate2::FlushCompress::Sync
        } else {
            flate2::FlushCompress::None
        };
        let mut input = &zeros[..];
        loop {
            let before = z.total_in();
            bomb.reserve(1 << 16);
            z.compress_vec(input, &mut bomb, flush).unwrap();
            input = &input[(z.total_in() - before) as usize..];
            if input.is_empty() && bomb.len() < bomb.capacity() {
                break;
            }
        }
    }
    bomb.truncate(bomb.len() - 4);
    assert!(bomb.len() < 200_000, "{}", bomb.len());
    let mut frame = common::masked_frame(true, 0x2, &bomb);
    frame[0] |= 0x40;
    c.send_raw(&frame);
    assert_eq!(c.expect_close(), Some(CloseCode::TOO_BIG));
    srv.wait_for("bomb counted", |t| t.deflate.bomb_closes == 1);
    assert_eq!(metric(&srv, "wsedge_deflate_bomb_closes_total"), 1);
    srv.wait_for("connection closed with 1009", |t| t.closes(1009) == 1);
}

fn negotiation_and_the_listener_switch(io: IoMode) {
    let srv = start(io, 1, "");
    // A client that offers nothing gets no extension (the test client refuses any).
    let mut c = Client::connect(srv.addr, "/echo");
    assert!(!c.conn.deflate_enabled());
    c.send_text(&ticks(5_000));
    assert_eq!(c.recv().1.len(), 5_000);
    // The answer to an offer.
    let mut req = upgrade_request("/echo");
    let at = req.len() - 2;
    req.splice(
        at..at,
        b"Sec-WebSocket-Extensions: x-foo, permessage-deflate; server_max_window_bits=10; client_max_window_bits\r\n"
            .iter()
            .copied(),
    );
    let resp = raw_http(srv.addr, &req);
    assert!(
        resp.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10\r\n"),
        "{resp}"
    );
    // A malformed extension list is a bad request.
    let mut req = upgrade_request("/echo");
    let at = req.len() - 2;
    req.splice(
        at..at,
        b"Sec-WebSocket-Extensions: permessage-deflate; =\r\n"
            .iter()
            .copied(),
    );
    assert!(raw_http(srv.addr, &req).starts_with("HTTP/1.1 400 "));
    drop(srv);
    // Switched off: the offer is ignored and RSV1 is a protocol error.
    let srv = start(io, 1, "permessage_deflate = false\n");
    let mut c = Client::connect_deflate(srv.addr, "/echo", 0);
    assert!(!c.conn.deflate_enabled());
    let mut frame = common::masked_frame(true, 0x1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    frame[0] |= 0x40;
    c.send_raw(&frame);
    assert_eq!(c.expect_close(), Some(CloseCode::PROTOCOL_ERROR));
}

fn proxy_and_source_negotiate_upstream(io: IoMode) {
    // Upstream: a wsedge echo with deflate. Front: a proxy route offering deflate upstream,
    // and a source reading the upstream's broadcast with deflate.
    let up = start(io, 1, ROUTES);
    let front = start(
        io,
        1,
        &format!(
            "[[listener.route]]\npath = \"/p\"\nkind = \"proxy\"\nupstream = \"ws://{}/echo\"\n\
             upstream_permessage_deflate = true\n\
             [[listener.route]]\npath = \"/sub/{{topic}}\"\nkind = \"subscribe\"\n\
             [[source]]\nname = \"feed\"\nurl = \"ws://{}/sub/feed\"\ntopic = \"f\"\n\
             permessage_deflate = true\n",
            up.addr, up.addr
        ),
    );
    let big = ticks(10_000);
    // Both hops compressed: the client's and the upstream's.
    let mut c = Client::connect_deflate(front.addr, "/p", 512);
    assert!(c.conn.deflate_enabled());
    assert!(c.send_compressed(MessageKind::Text, big.as_bytes()));
    assert_eq!(c.recv().1, big.as_bytes());
    assert_eq!(c.conn.take_deflate_stats().unwrap().inflated, 1);
    // The front inflated from the client and from the upstream, and compressed both ways.
    let t = front.wait_for("proxy deflate", |t| t.deflate.stats.inflated >= 2);
    assert!(t.deflate.connections >= 2, "{:?}", t.deflate);
    assert!(t.deflate.stats.compressed >= 2, "{:?}", t.deflate);
    // The source's upstream sends a compressed broadcast; its subscriber (plain) gets it.
    front.wait_for("source connected", |t| {
        t.sources.first().is_some_and(|s| s.state == "connected")
    });
    let mut sub = Client::connect(front.addr, "/sub/f");
    front.wait_for("subscribed", |t| t.fanout.subscribers == 1);
    up.wait_for("source subscribed upstream", |t| t.fanout.subscribers == 1);
    let mut publisher = Client::connect(up.addr, "/pub/feed");
    publisher.send_text(&big);
    assert_eq!(sub.recv().1, big.as_bytes());
    assert_eq!(up.totals().fanout.deflated, 1, "the upstream compressed it");
}

both_backends!(
    echo_compressed,
    broadcast_reaches_deflate_and_plain_subscribers,
    decompression_bomb_closes_1009,
    negotiation_and_the_listener_switch,
    proxy_and_source_negotiate_upstream,
);
