//! `wsedge-load ingest` against a real in-process wsedge with an ingest route and file sinks:
//! what the client counts as sent is what the server accepted and what the sink wrote, line
//! for line and connection by connection; invalid messages match the server's invalid counter
//! and the dead-letter sink; a close on error is reported by code; and a sink that cannot
//! write shows as backpressure on both sides. Assertions are on counts, never on timings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use wsedge::config::Config;
use wsedge::metrics::merge;
use wsedge::shard::Server;

/// A temporary directory, removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("wsedge-load-ingest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A wsedge with an ingest route `/ingest` into the sink `main` (`route_extra` adds route
/// keys), the `[[sink]]` tables `sinks`, and an admin listener for `/metrics`.
fn server(shards: usize, runtime_extra: &str, route_extra: &str, sinks: &str) -> Server {
    let cfg = Config::parse(&format!(
        "[runtime]\nshards = {shards}\npin_threads = false\n{runtime_extra}\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath = \"/ingest\"\nkind = \"ingest\"\nsink = \"main\"\n\
         {route_extra}\n{sinks}\n\
         [admin]\nbind = \"127.0.0.1:0\"\n"
    ))
    .unwrap();
    Server::start(&cfg).unwrap()
}

/// `(ws://…/ingest, http://…/metrics)` of a server.
fn urls(srv: &Server) -> (String, String) {
    (
        format!("ws://{}/ingest", srv.listen_addrs()[0].1),
        format!("http://{}/metrics", srv.admin_addr().unwrap()),
    )
}

/// Run `wsedge-load ingest ARGS --json FILE`; assert success; return the report.
fn run(dir: &Dir, args: &[&str]) -> Value {
    run_expecting(dir, args, 0)
}

/// As [`run`], asserting exit status `code` (3: the run completed with errors).
fn run_expecting(dir: &Dir, args: &[&str], code: i32) -> Value {
    let json = dir.file("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .arg("ingest")
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
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn u(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{key}` in {r}"))
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(conn, seq)` of a message the client built (`{"conn":C,"seq":S,...}`, or the same text
/// made invalid by a trailing `,`).
fn ids(text: &str) -> (u64, u64) {
    let num = |key: &str| {
        let at = text.find(key).unwrap() + key.len();
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    (num("\"conn\":"), num("\"seq\":"))
}

/// Check the sink (`main`, NDJSON of the messages) and the dead-letter sink (`dlq`, if any)
/// against the client's numbering: per connection, the sequence numbers in `main` increase,
/// none is one of the invalid ones (every `k`-th), the dead-letter sink holds exactly the
/// invalid ones, and together they are `0..n` without a gap or a duplicate. Returns the
/// lines of `main` and of `dlq`.
fn check_sinks(main: &Path, dlq: Option<&Path>, k: Option<u64>) -> (u64, u64) {
    let invalid = |s: u64| k.is_some_and(|k| (s + 1) % k == 0);
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let good = lines(main);
    for v in &good {
        let (c, s) = (v["conn"].as_u64().unwrap(), v["seq"].as_u64().unwrap());
        assert!(!invalid(s), "invalid message {c}/{s} in the sink");
        let seqs = seen.entry(c).or_default();
        assert!(seqs.last().is_none_or(|&l| l < s), "{c}/{s} out of order");
        seqs.push(s);
    }
    let dead = dlq.map(lines).unwrap_or_default();
    for v in &dead {
        assert_eq!(v["reason"], "not a JSON value", "{v}");
        let (c, s) = ids(v["message"].as_str().unwrap());
        assert!(invalid(s), "valid message {c}/{s} in the dead-letter sink");
        seen.entry(c).or_default().push(s);
    }
    for (c, seqs) in &mut seen {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(*seqs, (0..n).collect::<Vec<_>>(), "connection {c}");
    }
    (good.len() as u64, dead.len() as u64)
}

#[test]
fn closed_loop_sent_equals_accepted_equals_sink_lines() {
    let d = Dir::new("closed");
    let (main, dlq) = (d.file("main.ndjson"), d.file("dlq.ndjson"));
    let srv = server(
        2,
        "",
        "dead_letter = \"dlq\"\n",
        &format!(
            "[[sink]]\nname = \"main\"\npath = \"{}\"\n\
             [[sink]]\nname = \"dlq\"\npath = \"{}\"\n",
            main.display(),
            dlq.display()
        ),
    );
    let (url, metrics) = urls(&srv);
    let html = d.file("report.html");
    let r = run(
        &d,
        &[
            &url,
            "--conns",
            "4",
            "--threads",
            "2",
            "--size",
            "120",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--invalid-every",
            "7",
            "--metrics",
            &metrics,
            "--html",
            html.to_str().unwrap(),
        ],
    );
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    assert_eq!(u(&r, "conns_established"), 4, "{r}");
    let (sent, invalid) = (u(&r, "sent"), u(&r, "invalid_sent"));
    assert!(invalid > 0 && sent > invalid, "{r}");
    assert_eq!(u(&r, "unsent"), 0, "{r}");
    // Every connection closed with 1000 and the server answered.
    assert_eq!(u(&r, "closes_completed"), 4, "{r}");
    assert_eq!(r["close_codes"], serde_json::json!({"1000": 4}), "{r}");

    // The server: accepted the valid ones, counted the invalid ones, as its /metrics said.
    let t = merge(&srv.shards().snapshots());
    assert_eq!(t.ingest_accepted, sent - invalid, "{r}");
    assert_eq!(t.ingest_invalid, invalid, "{r}");
    assert_eq!(u(&r["server"], "accepted"), t.ingest_accepted, "{r}");
    assert_eq!(u(&r["server"], "invalid"), t.ingest_invalid, "{r}");
    assert_eq!(u(&r["server"], "backpressure_waits"), t.ingest_waits, "{r}");
    assert_eq!(r["server"]["metrics_url"], metrics.as_str());
    srv.shutdown();

    // The sinks: one line per message, exactly the messages the client sent.
    let (good, dead) = check_sinks(&main, Some(&dlq), Some(7));
    assert_eq!(good, sent - invalid);
    assert_eq!(dead, invalid);

    // The report agrees with itself: every message is 120 bytes, the timeline adds up to
    // the measured window, closed loop writes one message at a time (plus, per connection,
    // at most the write in flight at the end, recorded without messages).
    assert_eq!(u(&r, "sent_bytes"), sent * 120);
    let measured = u(&r, "measured_messages");
    assert!(measured > 0 && measured <= sent, "{r}");
    assert_eq!(u(&r, "measured_bytes"), measured * 120);
    let timeline = r["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 2, "{r}");
    let sum = |k: &str| timeline.iter().map(|s| u(s, k)).sum::<u64>();
    assert_eq!(sum("messages"), measured);
    assert_eq!(sum("bytes"), measured * 120);
    assert_eq!(
        r["rate_msgs_per_s"].as_f64().unwrap(),
        measured as f64 / 2.0
    );
    let writes = u(&r, "writes");
    assert!((measured..=measured + 4).contains(&writes), "{r}");
    assert!(u(&r, "blocked_writes") <= writes);
    assert!(r["write_latency"]["p50_us"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(
        r["write_latency_percentiles"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["latency_us"],
        r["write_latency"]["max_us"]
    );
    assert!(r["lag"].is_null(), "closed loop has no schedule: {r}");
    assert_eq!(r["lag_percentiles"].as_array().unwrap().len(), 0);
    assert_eq!(r["mode"], "closed-loop");
    assert_eq!(r["invalid_every"], 7);

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("wsedge-load ingest") && page.contains(&url));
    assert_eq!(page.matches("<svg ").count(), 2, "two charts");
}

#[test]
fn open_loop_sent_equals_accepted_equals_sink_lines() {
    let d = Dir::new("open");
    let main = d.file("main.ndjson");
    let srv = server(
        2,
        "",
        "",
        &format!("[[sink]]\nname = \"main\"\npath = \"{}\"\n", main.display()),
    );
    let (url, metrics) = urls(&srv);
    // 400 msg/s over 4 connections for 2.5 s: at most 250 scheduled per connection.
    let r = run(
        &d,
        &[
            &url,
            "--conns",
            "4",
            "--rate",
            "400",
            "--size",
            "200",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--metrics",
            &metrics,
        ],
    );
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    let sent = u(&r, "sent");
    assert!(sent > 0 && sent <= 1000, "{r}");
    assert_eq!(u(&r, "invalid_sent"), 0);
    assert_eq!(u(&r, "unsent"), 0, "{r}");
    assert_eq!(u(&r, "skipped_sends"), 0, "{r}");
    assert_eq!(u(&r, "closes_completed"), 4, "{r}");
    assert_eq!(u(&r["server"], "accepted"), sent, "{r}");
    let t = merge(&srv.shards().snapshots());
    assert_eq!(t.ingest_accepted, sent);
    assert_eq!(t.ingest_invalid, 0);
    srv.shutdown();
    let (good, _) = check_sinks(&main, None, None);
    assert_eq!(good, sent);

    // Open loop: every message of the measured window has a lag.
    assert_eq!(r["mode"], "open-loop 400 msg/s");
    let lag = &r["lag"];
    assert!(lag["p50_us"].as_f64().unwrap() > 0.0, "{r}");
    assert!(lag["max_us"].as_f64().unwrap() >= lag["p99_us"].as_f64().unwrap());
    let curve = r["lag_percentiles"].as_array().unwrap();
    assert_eq!(curve.last().unwrap()["latency_us"], lag["max_us"]);
    assert_eq!(u(&r, "sent_bytes"), sent * 200);
}

#[test]
fn a_close_on_error_is_reported_by_code() {
    let d = Dir::new("strict");
    let main = d.file("main.ndjson");
    let srv = server(
        1,
        "",
        "on_error = \"close\"\n",
        &format!("[[sink]]\nname = \"main\"\npath = \"{}\"\n", main.display()),
    );
    let (url, metrics) = urls(&srv);
    // Message 5 of each connection is invalid: the server takes 0..4 and closes with 1007
    // (errors, so the run ends with status 3).
    let r = run_expecting(
        &d,
        &[
            &url,
            "--conns",
            "3",
            "--invalid-every",
            "5",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--metrics",
            &metrics,
        ],
        3,
    );
    assert_eq!(r["close_codes"], serde_json::json!({"1007": 3}), "{r}");
    assert_eq!(
        r["errors"],
        serde_json::json!({"closed by server: 1007 not a JSON value": 3}),
        "{r}"
    );
    // The client answered each close and saw the server's FIN.
    assert_eq!(u(&r, "closes_completed"), 3, "{r}");
    // The client may have sent more before it read the close; the server took 4 per
    // connection and one invalid, and refused the rest.
    assert!(u(&r, "sent") >= 15 && u(&r, "invalid_sent") >= 3, "{r}");
    assert_eq!(u(&r["server"], "accepted"), 12, "{r}");
    assert_eq!(u(&r["server"], "invalid"), 3, "{r}");
    let t = merge(&srv.shards().snapshots());
    assert_eq!((t.ingest_accepted, t.ingest_invalid), (12, 3));
    assert_eq!(t.closes(1007), 3);
    srv.shutdown();
    assert_eq!(check_sinks(&main, None, Some(5)).0, 12);
}

/// A sink that cannot write (its directory does not exist) keeps its one batch and retries;
/// its one-chunk queue fills and the server stops reading the clients. The client's writes
/// then cannot complete: it reports blocked writes and unsent messages, and the server
/// counted its waits.
#[test]
fn a_stalled_sink_shows_as_backpressure_on_both_sides() {
    let d = Dir::new("stalled");
    let srv = server(
        1,
        "drain_window_ms = 0\ndrain_timeout_ms = 1000\n",
        "",
        "[[sink]]\nname = \"main\"\npath = \"/nonexistent-wsedge-load-dir/x\"\n\
         buffer_chunks = 1\nmax_batch_messages = 1\n",
    );
    let (url, metrics) = urls(&srv);
    // Closed loop, 64 KiB messages: the socket buffers hold a few MiB, so both connections
    // write until a write cannot complete (an error each: status 3).
    let r = run_expecting(
        &d,
        &[
            &url,
            "--conns",
            "2",
            "--size",
            "65536",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--metrics",
            &metrics,
        ],
        3,
    );
    assert!(u(&r, "blocked_writes") >= 1, "{r}");
    assert!(r["blocked_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(u(&r, "unsent") >= 1, "{r}");
    // The server never read the closes.
    assert_eq!(u(&r, "closes_completed"), 0, "{r}");
    assert!(!r["errors"].as_object().unwrap().is_empty(), "{r}");
    let t = merge(&srv.shards().snapshots());
    assert!(t.ingest_waits >= 1, "{t:?}");
    assert_eq!(u(&r["server"], "backpressure_waits"), t.ingest_waits, "{r}");
    // What the socket took is more than what the server read and handed to the sink.
    assert!(t.ingest_accepted < u(&r, "sent"), "{r}");
    assert_eq!(u(&r["server"], "accepted"), t.ingest_accepted, "{r}");
    let warnings = r["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("the server accepted")),
        "{r}"
    );
    srv.shutdown();
}
