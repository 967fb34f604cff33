//! `wsedge-load echo` against a real in-process wsedge: the run completes, reports no
//! errors, and its message count agrees with what the server counted.

mod common;

use std::process::Command;

use common::{echo_url, run_json as run, server};
use wsedge::metrics::merge;

#[test]
fn closed_and_open_loop_counts_agree_with_the_server() {
    let srv = server(1, "");
    let url = echo_url(&srv);
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
    let srv = server(1, "max_pending_write_bytes = 1024");
    let url = echo_url(&srv);
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
