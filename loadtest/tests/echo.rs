//! `wsedge-load echo` against a real in-process wsedge: the run completes, reports no
//! errors, and its message count agrees with what the server counted.

use std::process::Command;

use wsedge::config::Config;
use wsedge::metrics::merge;
use wsedge::shard::Server;

fn server() -> Server {
    server_with("")
}

fn server_with(listener_extra: &str) -> Server {
    let cfg = Config::parse(&format!(
        "[runtime]\nshards = 1\npin_threads = false\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[listener.route]]\npath = \"/echo\"\nkind = \"echo\"\n\
         [admin]\nenabled = false\n"
    ))
    .unwrap();
    Server::start(&cfg).unwrap()
}

fn run(args: &[&str]) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "wsedge-load-{}-{}.json",
        std::process::id(),
        args.len()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("latency"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn closed_and_open_loop_counts_agree_with_the_server() {
    let srv = server();
    let url = format!("ws://{}/echo", srv.listen_addrs()[0].1);
    let r = run(&[
        "echo",
        &url,
        "--conns",
        "8",
        "--duration",
        "1",
        "--warmup",
        "0.3",
    ]);
    assert_eq!(r["conns_established"], 8);
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    let measured = r["messages"].as_u64().unwrap();
    assert!(measured > 0);
    assert!(r["latency"]["p99_us"].as_f64().unwrap() > 0.0);
    let r2 = run(&[
        "echo",
        &url,
        "--conns",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--rate",
        "400",
        "--size",
        "64",
    ]);
    assert_eq!(r2["errors"].as_object().unwrap().len(), 0, "{r2}");
    let measured2 = r2["messages"].as_u64().unwrap();
    // Open loop at 400 msg/s for 1 s: the schedule, not the server, sets the count.
    assert!((300..=500).contains(&measured2), "{measured2}");
    // The server echoed at least every message the client counted (warm-up and the final
    // in-flight messages are not in the client's measured window).
    let t = merge(&srv.shards().snapshots());
    assert!(
        t.messages_out >= measured + measured2,
        "{} < {}",
        t.messages_out,
        measured + measured2
    );
    assert_eq!(t.connections_total, 12);
    srv.shutdown();
}

#[test]
fn clear_error_when_nothing_listens() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "echo",
            "ws://127.0.0.1:1/echo",
            "--conns",
            "2",
            "--duration",
            "0.2",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connect: refused"), "{text}");
}

/// Large messages faster than the server drains them: the server stops reading (its write
/// queue is capped), so a client that wrote without reading would deadlock. The run must end
/// on time.
#[test]
fn open_loop_survives_server_backpressure() {
    let srv = server_with("max_pending_write_bytes = 1024");
    let url = format!("ws://{}/echo", srv.listen_addrs()[0].1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "echo", &url, "--conns", "2", "--size", "262144", "--rate", "4000",
        ])
        .args(["--duration", "1", "--warmup", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The run lasts 1 s; 60 s means it hung.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // It may report that it could not keep the rate; it must not hang.
            let _ = status;
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wsedge-load hung against a server applying backpressure");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    srv.shutdown();
}
