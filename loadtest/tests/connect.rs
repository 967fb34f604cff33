//! `wsedge-load connect` against a real in-process wsedge: every connection is established,
//! held and closed with 1000, and the counts agree with the server's.

use std::process::Command;

use wsedge::config::Config;
use wsedge::metrics::merge;
use wsedge::shard::Server;

#[test]
fn ramp_hold_and_close_agree_with_the_server() {
    let cfg = Config::parse(
        "[runtime]\nshards = 2\npin_threads = false\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath = \"/echo\"\nkind = \"echo\"\n\
         [admin]\nenabled = false\n",
    )
    .unwrap();
    let srv = Server::start(&cfg).unwrap();
    let url = format!("ws://{}/echo", srv.listen_addrs()[0].1);
    let json = std::env::temp_dir().join(format!("wsedge-connect-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "connect", &url, "--conns", "300", "--rate", "1500", "--hold", "0.5",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
