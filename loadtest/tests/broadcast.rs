//! `wsedge-load broadcast`: against a real in-process wsedge every message reaches every
//! subscriber once, in order, and the counts agree with the server's; against a fake server
//! that drops, swaps, duplicates and delays messages, exactly those faults are reported.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use wsedge::config::Config;
use wsedge::metrics::merge;
use wsedge::proto::handshake::{parse_request, write_response_101};
use wsedge::proto::{Conn, Event, HandshakeLimits, Limits, MessageKind, Role};
use wsedge::shard::Server;

/// Run `wsedge-load broadcast ARGS --json FILE`; assert success; return the report.
fn run(tag: &str, args: &[&str]) -> serde_json::Value {
    run_expecting(tag, args, 0)
}

/// As [`run`], asserting exit status `code` (3: completed, with problems such as losses).
fn run_expecting(tag: &str, args: &[&str], code: i32) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "wsedge-load-broadcast-{}-{tag}.json",
        std::process::id()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .arg("broadcast")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("p50"), "{stdout}");
    let r = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    r
}

fn u(r: &serde_json::Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{key}` in {r}"))
}

#[test]
fn every_subscriber_gets_every_message_and_counts_agree_with_the_server() {
    let cfg = Config::parse(
        "[runtime]\nshards = 2\npin_threads = false\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath = \"/pub/{topic}\"\nkind = \"publish\"\n\
         [[listener.route]]\npath = \"/sub/{topic}\"\nkind = \"subscribe\"\n\
         [admin]\nenabled = false\n",
    )
    .unwrap();
    let srv = Server::start(&cfg).unwrap();
    let addr = srv.listen_addrs()[0].1;
    let (pub_url, sub_url) = (
        format!("ws://{addr}/pub/bench"),
        format!("ws://{addr}/sub/bench"),
    );
    let r = run(
        "wsedge",
        &[
            "--pub-url",
            &pub_url,
            "--sub-url",
            &sub_url,
            "--subs",
            "50",
            "--rate",
            "200",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--threads",
            "2",
        ],
    );
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    assert_eq!(u(&r, "subs_connected"), 50, "{r}");
    assert_eq!(u(&r, "subs_complete"), 50, "{r}");
    assert_eq!(u(&r, "publishers_connected"), 1, "{r}");
    let published = u(&r, "published");
    // 200 msg/s for 2.5 s: the schedule sets the count (±1 for where the end falls).
    assert!((499..=501).contains(&published), "{r}");
    assert_eq!(
        (u(&r, "lost"), u(&r, "duplicated"), u(&r, "reordered")),
        (0, 0, 0),
        "{r}"
    );
    assert_eq!(u(&r, "stale"), 0, "{r}");
    assert_eq!(u(&r, "delivered"), published * 50, "{r}");
    assert_eq!(u(&r, "expected_deliveries"), published * 50, "{r}");
    // Latency covers the measured 2 s only: 400 messages × 50 subscribers, ±1 message.
    let measured = u(&r, "measured_deliveries");
    assert!((399 * 50..=401 * 50).contains(&measured), "{r}");
    assert!(r["latency"]["p50_us"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["timeline"].as_array().unwrap().len(), 2, "{r}");
    // The server published and delivered exactly what the client counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = merge(&srv.shards().snapshots());
        if t.fanout.deliveries == published * 50 && t.fanout.published == published {
            assert!(t.fanout.drops.is_empty(), "{:?}", t.fanout.drops);
            assert_eq!(t.fanout.ring_full_drops, 0);
            break;
        }
        assert!(Instant::now() < deadline, "server counted {:?}", t.fanout);
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.shutdown();
}

/// Delay the fake server adds to every message.
const DELAY: Duration = Duration::from_millis(50);

/// What the fake server does to sequence number `s` (per block of 10): 9 is dropped, 3 is
/// held back and sent after 4, 5 is sent twice.
fn fault(s: u64) -> u64 {
    s % 10
}

/// A broadcast server with faults: accepts publishers on `/pub/...` and subscribers on
/// `/sub/...` and forwards each published message to every subscriber `DELAY` after it
/// arrived, with the faults of [`fault`]. Threads end with the test process.
fn faulty_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let subs: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    {
        let subs = subs.clone();
        std::thread::spawn(move || {
            for (due, frame) in rx {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                subs.lock()
                    .unwrap()
                    .retain_mut(|s| s.write_all(&frame).is_ok());
            }
        });
    }
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (subs, tx) = (subs.clone(), tx.clone());
            std::thread::spawn(move || serve(stream, &subs, &tx));
        }
    });
    addr
}

/// Upgrade one connection; register a subscriber, or forward a publisher's messages.
fn serve(
    mut stream: TcpStream,
    subs: &Mutex<Vec<TcpStream>>,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
) {
    stream.set_nodelay(true).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let req = loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((req, used)) = parse_request(&buf, &HandshakeLimits::default()).unwrap() {
            let _ = buf.split_to(used);
            break req;
        }
    };
    let mut ok = Vec::new();
    write_response_101(&req.key, None, &[], &mut ok);
    if req.path.starts_with("/sub/") {
        // Registered under the lock, so no frame can precede the 101.
        let mut subs = subs.lock().unwrap();
        stream.write_all(&ok).unwrap();
        subs.push(stream);
        return;
    }
    assert!(req.path.starts_with("/pub/"), "{}", req.path);
    stream.write_all(&ok).unwrap();
    // Frames to subscribers are unmasked, so one encoder serves them all.
    let mut enc = Conn::new(Role::Server, Limits::default());
    let frame = |enc: &mut Conn, data: &[u8]| {
        enc.send(MessageKind::Binary, data).unwrap();
        let mut out = Vec::new();
        enc.poll_transmit(&mut out);
        out
    };
    let mut conn = Conn::new(Role::Server, Limits::default());
    let mut held = None;
    'conn: loop {
        conn.handle_input(&mut buf).unwrap();
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Message { data, .. } => {
                    let due = Instant::now() + DELAY;
                    let mut seq = [0u8; 8];
                    seq.copy_from_slice(&data[4..12]);
                    let f = frame(&mut enc, &data);
                    match fault(u64::from_le_bytes(seq)) {
                        9 => {}
                        3 => held = Some(f),
                        4 => {
                            tx.send((due, f)).unwrap();
                            if let Some(h) = held.take() {
                                tx.send((due, h)).unwrap();
                            }
                        }
                        5 => {
                            tx.send((due, f.clone())).unwrap();
                            tx.send((due, f)).unwrap();
                        }
                        _ => tx.send((due, f)).unwrap(),
                    }
                }
                Event::Close { .. } => break 'conn,
                Event::Ping(_) | Event::Pong(_) => {}
            }
        }
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    // The publisher is done: a message still held back goes out (in order, not reordered).
    if let Some(h) = held {
        tx.send((Instant::now() + DELAY, h)).unwrap();
    }
}

#[test]
fn loss_duplicates_reordering_and_delay_are_detected() {
    let addr = faulty_server();
    const SUBS: u64 = 20;
    // Losses and duplicates make the run end with status 3.
    let r = run_expecting(
        "faulty",
        &[
            "--pub-url",
            &format!("ws://{addr}/pub/x"),
            "--sub-url",
            &format!("ws://{addr}/sub/x"),
            "--subs",
            &SUBS.to_string(),
            "--rate",
            "200",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
        3,
    );
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    assert_eq!(u(&r, "subs_complete"), SUBS, "{r}");
    let n = u(&r, "published");
    assert!(n >= 100, "{r}");
    let count = |f: &dyn Fn(u64) -> bool| (0..n).filter(|&s| f(s)).count() as u64;
    // Every 10th (…9) never arrives.
    let lost = count(&|s| fault(s) == 9);
    // …3 arrives after …4, unless …3 was the last message (then it is released in order).
    let reordered = count(&|s| fault(s) == 3 && s + 1 < n);
    // …5 arrives twice.
    let duplicated = count(&|s| fault(s) == 5);
    assert_eq!(u(&r, "lost"), lost * SUBS, "{r}");
    assert_eq!(u(&r, "reordered"), reordered * SUBS, "{r}");
    assert_eq!(u(&r, "duplicated"), duplicated * SUBS, "{r}");
    assert_eq!(u(&r, "stale"), 0, "{r}");
    assert_eq!(u(&r, "delivered"), (n - lost + duplicated) * SUBS, "{r}");
    assert_eq!(u(&r, "expected_deliveries"), n * SUBS, "{r}");
    // The invariant documented in docs/loadtest.md.
    assert_eq!(
        u(&r, "delivered") - u(&r, "duplicated") + u(&r, "lost"),
        u(&r, "expected_deliveries")
    );
    // Every message was held DELAY by the server: the latency shows it.
    let p50 = r["latency"]["p50_us"].as_f64().unwrap();
    assert!(p50 >= DELAY.as_micros() as f64, "{r}");
}
