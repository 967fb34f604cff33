//! Ingest routes and file sinks over real sockets on both backends: validation, dead-letter,
//! batching, framing (NDJSON, JSON array), compression (gzip, zstd; decoded back here),
//! rotation by size, close on error, and pending batches written at shutdown.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::{Client, TestServer, start_with};
use wsedge::config::IoMode;
use wsedge::proto::CloseCode;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("wsedge-ingest-{tag}-{}", std::process::id()));
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

fn server(io: IoMode, routes: &str, sinks: &str) -> TestServer {
    start_with(io, 2, routes, sinks)
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn ndjson_with_dead_letter_and_flush_at_shutdown(io: IoMode) {
    let d = Dir::new(&format!("nd-{io:?}"));
    let (main, dlq) = (d.file("main.ndjson"), d.file("dlq.ndjson"));
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/in\"\nkind = \"ingest\"\nsink = \"main\"\ndead_letter = \"dlq\"\n",
        &format!(
            // A long delay: these batches are written by the shutdown, not by the timer.
            "[[sink]]\nname = \"main\"\npath = \"{}\"\nmax_batch_delay_ms = 60000\n\
             [[sink]]\nname = \"dlq\"\npath = \"{}\"\n",
            main.display(),
            dlq.display()
        ),
    );
    let mut clients: Vec<_> = (0..3).map(|_| Client::connect(srv.addr, "/in")).collect();
    for i in 0..100 {
        for (c, cl) in clients.iter_mut().enumerate() {
            cl.send_text(&format!("{{\"c\":{c},\"i\":{i}}}"));
        }
    }
    clients[0].send_text("oops");
    let t = srv.wait_for("all handed to the sink", |t| {
        t.ingest_accepted == 300 && t.ingest_invalid == 1
    });
    assert_eq!(
        t.closes.len(),
        0,
        "on_error = continue keeps the connection"
    );
    drop(clients);
    srv.shutdown();
    let got = lines(&main);
    assert_eq!(got.len(), 300, "pending batch written at shutdown");
    let mut next = [0u64; 3];
    for l in &got {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let c = v["c"].as_u64().unwrap() as usize;
        assert_eq!(v["i"].as_u64().unwrap(), next[c], "per-client order");
        next[c] += 1;
    }
    let dead = lines(&dlq);
    assert_eq!(dead.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&dead[0]).unwrap();
    assert_eq!(
        (
            v["reason"].as_str(),
            v["message"].as_str(),
            v["route"].as_str()
        ),
        (Some("not a JSON value"), Some("oops"), Some("/in"))
    );
}

fn compression_framing_and_rotation(io: IoMode) {
    let d = Dir::new(&format!("cz-{io:?}"));
    let (gz, zs, rot) = (
        d.file("a.json.gz"),
        d.file("t.ndjson.zst"),
        d.file("r.ndjson"),
    );
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/gz\"\nkind = \"ingest\"\nsink = \"gz\"\n\
         [[listener.route]]\npath = \"/zs\"\nkind = \"ingest\"\nsink = \"zs\"\nformat = \"text\"\n\
         [[listener.route]]\npath = \"/rot\"\nkind = \"ingest\"\nsink = \"rot\"\n",
        &format!(
            "[[sink]]\nname = \"gz\"\npath = \"{}\"\nframing = \"json_array\"\ncompression = \"gzip\"\n\
             max_batch_messages = 10\n\
             [[sink]]\nname = \"zs\"\npath = \"{}\"\ncompression = \"zstd\"\nmax_batch_messages = 7\n\
             [[sink]]\nname = \"rot\"\npath = \"{}\"\nrotate_bytes = 2000\nmax_batch_messages = 10\n",
            gz.display(),
            zs.display(),
            rot.display()
        ),
    );
    let mut a = Client::connect(srv.addr, "/gz");
    let mut b = Client::connect(srv.addr, "/zs");
    let mut r = Client::connect(srv.addr, "/rot");
    for i in 0..100 {
        a.send_text(&format!("{{\"i\":{i}}}"));
        b.send_text(&format!("line {i}\nwith a newline"));
        r.send_text(&format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(30)));
    }
    srv.wait_for("300 accepted", |t| t.ingest_accepted == 300);
    let (_, metrics) = common::http_get(srv.admin, "/metrics");
    drop((a, b, r));
    srv.shutdown();

    // gzip, a JSON array per batch of 10: 10 members, 100 values in order.
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&gz).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let values: Vec<u64> = text
        .lines()
        .flat_map(|l| {
            let v: Vec<serde_json::Value> = serde_json::from_str(l).unwrap();
            v.into_iter().map(|x| x["i"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(values, (0..100).collect::<Vec<_>>());
    assert_eq!(text.lines().count(), 10);
    // zstd, text with newlines kept intact as JSON strings.
    let raw = zstd::decode_all(std::fs::File::open(&zs).unwrap()).unwrap();
    let texts: Vec<String> = String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(texts.len(), 100);
    assert_eq!(texts[42], "line 42\nwith a newline");
    // Rotation: every file under 2000 bytes, nothing lost across them.
    let mut total = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(&d.0).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("r.ndjson")
        {
            assert!(std::fs::metadata(&p).unwrap().len() <= 2000, "{p:?}");
            total += lines(&p).len();
            files += 1;
        }
    }
    assert_eq!(total, 100);
    assert!(files >= 3, "rotated into {files} files");
    assert!(
        metrics.contains("wsedge_sink_rotations_total{sink=\"rot\"}"),
        "{metrics}"
    );
}

fn close_on_error_closes_with_1007(io: IoMode) {
    let d = Dir::new(&format!("ce-{io:?}"));
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/strict\"\nkind = \"ingest\"\nsink = \"s\"\non_error = \"close\"\n",
        &format!(
            "[[sink]]\nname = \"s\"\npath = \"{}\"\n",
            d.file("s").display()
        ),
    );
    let mut c = Client::connect(srv.addr, "/strict");
    c.send_text("{\"ok\":1}");
    c.send_binary(b"\x00not json");
    // Sent before the client sees the close: not taken, and counted as such.
    c.send_text("{\"after\":1}");
    assert_eq!(c.expect_close(), Some(CloseCode::INVALID_PAYLOAD));
    srv.wait_for("counted", |t| {
        t.ingest_invalid == 1
            && t.ingest_accepted == 1
            && t.ingest_refused == 1
            && t.closes(1007) == 1
    });
    let (_, m) = common::http_get(srv.admin, "/metrics");
    assert!(m.contains("wsedge_ingest_refused_total 1\n"), "{m}");
}

/// The route's byte rate applies to ingest clients: the message over it closes the client
/// with 1008, and it and the ones after it are refused (counted), never written.
fn rate_limits_close_with_1008_and_count_the_refused(io: IoMode) {
    let d = Dir::new(&format!("rl-{io:?}"));
    let out = d.file("s");
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/in\"\nkind = \"ingest\"\nsink = \"s\"\nformat = \"text\"\n\
         max_bytes_per_second = 1000\n",
        &format!(
            "[[sink]]\nname = \"s\"\npath = \"{}\"\nmax_batch_delay_ms = 10\n",
            out.display()
        ),
    );
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..5 {
        c.send_text(&format!("{i}{}", "x".repeat(299)));
    }
    assert_eq!(c.expect_close(), Some(CloseCode::POLICY));
    let t = srv.wait_for("counted", |t| {
        t.ingest_accepted + t.ingest_refused == 5 && t.closes(1008) == 1
    });
    // A one-second burst of 1000 bytes holds three 300-byte messages.
    assert_eq!((t.ingest_accepted, t.ingest_refused), (3, 2));
    assert_eq!(t.rate_limit_closes, vec![("messages", 0), ("bytes", 1)]);
    let written = (0..50)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            lines(&out)
        })
        .find(|l| l.len() == 3)
        .expect("the three accepted messages written");
    assert!(
        written
            .iter()
            .all(|l| l.len() == 300 && l.as_bytes()[0] < b'3')
    );

    // Over the rate only behind the client's own close, in one read: refused and counted,
    // but the connection ends with the client's 1000, not a 1008 it was never sent.
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..4 {
        c.conn
            .send(
                wsedge::proto::MessageKind::Text,
                format!("{i}{}", "y".repeat(299)).as_bytes(),
            )
            .unwrap();
    }
    c.conn.close(CloseCode::NORMAL, "").unwrap();
    c.flush();
    assert_eq!(c.expect_close(), Some(CloseCode::NORMAL));
    let t = srv.wait_for("counted", |t| t.closes(1000) == 1);
    assert_eq!((t.ingest_accepted, t.ingest_refused), (6, 3));
    assert_eq!(t.rate_limit_closes, vec![("messages", 0), ("bytes", 1)]);
}

/// A client that never answers our 1007 close does not hold its
/// connection: after `close_timeout_ms` the server drops it.
fn an_unanswered_close_times_out(io: IoMode) {
    let d = Dir::new(&format!("ct-{io:?}"));
    let srv = server(
        io,
        "close_timeout_ms = 300\n\
         [[listener.route]]\npath = \"/strict\"\nkind = \"ingest\"\nsink = \"s\"\non_error = \"close\"\n",
        &format!(
            "[[sink]]\nname = \"s\"\npath = \"{}\"\n",
            d.file("s").display()
        ),
    );
    let mut c = Client::connect(srv.addr, "/strict");
    c.send_text("not json");
    loop {
        match c.next_event() {
            Some(wsedge::proto::Event::Close { code, .. }) => {
                assert_eq!(code, Some(CloseCode::INVALID_PAYLOAD));
                break;
            }
            Some(_) => {}
            None => panic!("connection ended before the close frame"),
        }
    }
    // Not answered (the client's core has queued its reply; it is never written).
    assert!(
        c.server_closed_tcp(),
        "the server kept a connection whose close was never answered"
    );
    srv.wait_for("counted", |t| t.ingest_invalid == 1 && t.closes(1007) == 1);
}

/// A sink that cannot write (its directory does not exist) keeps its batch and retries, its
/// one-chunk queue fills, and the ingest connection stops being read: counted as waits.
fn a_stuck_sink_backpressures_its_clients(io: IoMode) {
    let srv = start_with(
        io,
        1,
        "[[listener.route]]\npath = \"/in\"\nkind = \"ingest\"\nsink = \"s\"\n",
        "drain_window_ms = 0\ndrain_timeout_ms = 1000\n\
         [[sink]]\nname = \"s\"\npath = \"/nonexistent-wsedge-dir/x\"\n\
         max_batch_messages = 1\nbuffer_chunks = 1\n",
    );
    let mut c = Client::connect(srv.addr, "/in");
    // One message per read: the sink takes the first chunk and is stuck writing it, the
    // queue holds the second, the third has to wait. (Paced so that the server reads them
    // one at a time; the assertion is on the counter, not on the timing.)
    let mut i = 0;
    while srv.totals().ingest_waits == 0 {
        assert!(i < 1000, "no backpressure wait after {i} messages");
        c.send_text(&format!("{{\"i\":{i}}}"));
        i += 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (_, m) = common::http_get(srv.admin, "/metrics");
    assert!(
        !m.contains("wsedge_sink_write_errors_total{sink=\"s\"} 0\n"),
        "{m}"
    );
    drop(c);
    srv.shutdown();
}

/// A declared schema: good rows reach the sink unchanged, and each kind of bad row reaches
/// the dead-letter sink with its precise reason (and is counted).
fn schema_rows_pass_or_reach_the_dead_letter_sink(io: IoMode) {
    let d = Dir::new(&format!("sc-{io:?}"));
    let (main, dlq) = (d.file("main.ndjson"), d.file("dlq.ndjson"));
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/typed\"\nkind = \"ingest\"\nsink = \"main\"\n\
         dead_letter = \"dlq\"\nschema_extra_fields = \"refuse\"\nschema = [\n\
         { name = \"id\", type = \"integer\" },\n\
         { name = \"name\", type = \"string\", nullable = true },\n\
         { name = \"price\", type = \"number\" },\n\
         { name = \"ok\", type = \"boolean\", nullable = true },\n\
         { name = \"tags\", type = \"array\", nullable = true },\n\
         { name = \"attrs\", type = \"object\", nullable = true },\n\
         { name = \"at\", type = \"timestamp\", nullable = true },\n]\n",
        &format!(
            "[[sink]]\nname = \"main\"\npath = \"{}\"\n[[sink]]\nname = \"dlq\"\npath = \"{}\"\n",
            main.display(),
            dlq.display()
        ),
    );
    let good = [
        r#"{"id":1,"price":2}"#,
        r#"{"id":2,"price":2.5,"name":null,"ok":true,"tags":["a"],"attrs":{"k":1},"at":"2024-05-01T12:00:00.25+02:00"}"#,
        r#"{"id":-3,"name":"x","price":0}"#,
    ];
    let bad = [
        ("not json", "not a JSON value"),
        ("[1,2]", "not a JSON object (got array)"),
        (r#"{"price":1}"#, r#"column "id": missing"#),
        (
            r#"{"id":null,"price":1}"#,
            r#"column "id": null in a non-nullable column"#,
        ),
        (
            r#"{"id":"7","price":1}"#,
            r#"column "id": expected integer, got string"#,
        ),
        (
            r#"{"id":7.5,"price":1}"#,
            r#"column "id": expected integer, got number"#,
        ),
        (
            r#"{"id":7,"price":true}"#,
            r#"column "price": expected number, got boolean"#,
        ),
        (
            r#"{"id":7,"price":1,"ok":"yes"}"#,
            r#"column "ok": expected boolean, got string"#,
        ),
        (
            r#"{"id":7,"price":1,"tags":"a"}"#,
            r#"column "tags": expected array, got string"#,
        ),
        (
            r#"{"id":7,"price":1,"attrs":[]}"#,
            r#"column "attrs": expected object, got array"#,
        ),
        (
            r#"{"id":7,"price":1,"at":"2024-02-30T00:00:00Z"}"#,
            r#"column "at": expected timestamp, got a string that is not RFC 3339"#,
        ),
        (
            r#"{"id":7,"price":1,"colour":"red"}"#,
            r#"field "colour" is not in the schema"#,
        ),
    ];
    let mut c = Client::connect(srv.addr, "/typed");
    for (i, g) in good.iter().enumerate() {
        c.send_text(g);
        c.send_text(bad[i].0);
    }
    for (b, _) in &bad[good.len()..] {
        c.send_text(b);
    }
    srv.wait_for("all validated", |t| {
        t.ingest_accepted == good.len() as u64 && t.ingest_invalid == bad.len() as u64
    });
    drop(c);
    srv.shutdown();
    assert_eq!(lines(&main), good, "good rows unchanged, in order");
    let dead: Vec<(String, String)> = lines(&dlq)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["message"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = bad
        .iter()
        .map(|(m, r)| (m.to_string(), r.to_string()))
        .collect();
    assert_eq!(dead, want);
}

/// `metadata`: each accepted message is wrapped with the connection's facts (Tremor's
/// `$ws_server`), JSON as is and text as a string; the dead-letter line carries them too.
fn metadata_wraps_each_message(io: IoMode) {
    let d = Dir::new(&format!("md-{io:?}"));
    let (main, text, dlq) = (d.file("m"), d.file("t"), d.file("d"));
    let srv = server(
        io,
        "[[listener.route]]\npath = \"/m\"\nkind = \"ingest\"\nsink = \"main\"\n\
         dead_letter = \"dlq\"\nmetadata = [\"peer\", \"tls\", \"path\", \"header:X-Device-Id\", \"header:x-absent\"]\n\
         [[listener.route]]\npath = \"/t\"\nkind = \"ingest\"\nsink = \"text\"\nformat = \"text\"\n\
         metadata = [\"tls\"]\n",
        &format!(
            "[[sink]]\nname = \"main\"\npath = \"{}\"\n[[sink]]\nname = \"text\"\npath = \"{}\"\n\
             [[sink]]\nname = \"dlq\"\npath = \"{}\"\n",
            main.display(),
            text.display(),
            dlq.display()
        ),
    );
    let mut c = Client::connect_with_headers(srv.addr, "/m?v=1", &[("X-Device-Id", "abc")]);
    let peer = c.stream.local_addr().unwrap().to_string();
    c.send_text("{\"n\":1}");
    c.send_text("{\n  \"n\": 2,\r\n  \"big\": 1e400,\n  \"s\": \"\\ud800\"\n}");
    c.send_text("broken");
    let mut t = Client::connect(srv.addr, "/t");
    t.send_text("two\nlines");
    srv.wait_for("accepted", |t| {
        t.ingest_accepted == 3 && t.ingest_invalid == 1
    });
    drop((c, t));
    srv.shutdown();
    let meta = format!(
        "{{\"peer\":\"{peer}\",\"tls\":false,\"path\":\"/m?v=1\",\"x-device-id\":\"abc\",\"x-absent\":null}}"
    );
    let got = lines(&main);
    assert_eq!(
        got[0],
        format!("{{\"meta\":{meta},\"message\":{{\"n\":1}}}}")
    );
    // A pretty-printed message is put on one line, its line breaks turned into spaces and
    // every other byte kept: valid JSON that has no `serde_json::Value` (a number beyond f64,
    // an escaped lone surrogate) arrives as it was sent, not as `null`.
    assert_eq!(
        got[1],
        format!(
            "{{\"meta\":{meta},\"message\":{{   \"n\": 2,    \"big\": 1e400,   \"s\": \"\\ud800\" }}}}"
        )
    );
    assert_eq!(got.len(), 2);
    assert_eq!(
        lines(&text),
        ["{\"meta\":{\"tls\":false},\"message\":\"two\\nlines\"}"]
    );
    let dead: serde_json::Value = serde_json::from_str(&lines(&dlq)[0]).unwrap();
    assert_eq!(dead["meta"]["peer"], peer.as_str());
    assert_eq!(dead["message"], "broken");
}

both_backends!(
    metadata_wraps_each_message,
    schema_rows_pass_or_reach_the_dead_letter_sink,
    a_stuck_sink_backpressures_its_clients,
    ndjson_with_dead_letter_and_flush_at_shutdown,
    compression_framing_and_rotation,
    close_on_error_closes_with_1007,
    an_unanswered_close_times_out,
    rate_limits_close_with_1008_and_count_the_refused,
);
