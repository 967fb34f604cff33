//! `wsedge-load connect` against a real in-process wsedge: every connection is established,
//! held and closed with 1000, and the counts agree with the server's.

mod common;

use common::{echo_url, run_json, server};
use wsedge::metrics::merge;

#[test]
fn ramp_hold_and_close_agree_with_the_server() {
    let srv = server(2, "");
    let url = echo_url(&srv);
    let r = run_json(&[
        "connect", &url, "--conns", "300", "--rate", "1500", "--hold", "0.5",
    ]);
    assert_eq!(r["conns_established"], 300, "{r}");
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    assert!(r["handshake_latency"]["p50_us"].as_f64().unwrap() > 0.0);
    // Every connection was closed by the client with 1000 after the hold.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let t = merge(&srv.shards().snapshots());
        if t.closes(1000) == 300 {
            assert_eq!(t.connections_total, 300);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "server saw {t:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    srv.shutdown();
}

#[test]
fn churn_reconnects_on_schedule_and_the_server_agrees() {
    let srv = server(2, "");
    let url = echo_url(&srv);
    // 100 connections cycling every 100 / 200 = 0.5 s during a 1 s hold: each is closed and
    // re-opened exactly twice (at its phase in [0, 0.5) s and 0.5 s later).
    let r = run_json(&[
        "connect", &url, "--conns", "100", "--rate", "1000", "--hold", "1", "--churn", "200",
    ]);
    assert_eq!(r["conns_established"], 100, "{r}");
    assert_eq!(r["reconnects"], 200, "{r}");
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let t = merge(&srv.shards().snapshots());
        if t.closes(1000) == 300 {
            assert_eq!(
                t.connections_total, 300,
                "every handshake reached the server"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "server saw {t:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    srv.shutdown();
}
