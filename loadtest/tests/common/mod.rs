//! Shared harness for the wsedge-load tests: an in-process wsedge on 127.0.0.1:0 and a runner
//! for the binary that returns its `--json` report.
#![allow(dead_code)]

use std::process::Command;

use wsedge::config::Config;
use wsedge::shard::Server;

/// A wsedge with an `/echo` route; `listener_extra` adds `[[listener]]` keys.
pub fn server(shards: usize, listener_extra: &str) -> Server {
    let cfg = Config::parse(&format!(
        "[runtime]\nshards = {shards}\npin_threads = false\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[listener.route]]\npath = \"/echo\"\nkind = \"echo\"\n\
         [admin]\nenabled = false\n"
    ))
    .unwrap();
    Server::start(&cfg).unwrap()
}

/// `ws://…/echo` of the server's first listener.
pub fn echo_url(srv: &Server) -> String {
    format!("ws://{}/echo", srv.listen_addrs()[0].1)
}

/// Run `wsedge-load ARGS --json FILE`; assert success and a summary; return the report.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    run_json_expecting(args, 0)
}

/// As [`run_json`], asserting exit status `code` (3: the run completed with problems).
pub fn run_json_expecting(args: &[&str], code: i32) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "wsedge-load-{}-{}-{}.json",
        std::process::id(),
        args[0],
        args.len()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("p50"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}
