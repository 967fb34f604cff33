//! The `wsedge` binary: `check`, `print-config`, the automatic epoll fallback under a seccomp
//! filter that blocks io_uring (as Docker's default profile does), and drain on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Client;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use wsedge::proto::CloseCode;

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsedge-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const SMALL_CONFIG: &str = "[runtime]\nshards = 1\ndrain_window_ms = 100\n\
    [[listener]]\nbind = \"127.0.0.1:0\"\n[[listener.route]]\npath = \"/echo\"\nkind = \"echo\"\n\
    [admin]\nenabled = false\n";

#[test]
fn check_accepts_valid_and_names_the_bad_key() {
    let good = temp_file("good.toml", SMALL_CONFIG);
    let out = Command::new(BIN).arg("check").arg(&good).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let bad = temp_file(
        "bad.toml",
        &SMALL_CONFIG.replace("kind = \"echo\"", "kind = \"echo\"\nttl = 3"),
    );
    let out = Command::new(BIN).arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listener[0].route[0]") && err.contains("ttl"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["check", "/nonexistent/wsedge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn print_config_is_the_valid_embedded_default() {
    let out = Command::new(BIN).arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, wsedge::config::DEFAULT_CONFIG_TOML);
    wsedge::config::Config::parse(&text).unwrap();
}

/// A seccomp program that makes the three io_uring syscalls fail with EPERM.
fn deny_io_uring() -> BpfProgram {
    // io_uring_setup, io_uring_enter, io_uring_register: the same numbers on x86_64 and aarch64.
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        [425, 426, 427].into_iter().map(|n| (n, vec![])).collect();
    let arch = std::env::consts::ARCH.try_into().expect("supported arch");
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(1), arch)
        .unwrap()
        .try_into()
        .unwrap()
}

/// Spawn wsedge from a thread that carries the filter; the child inherits it.
fn spawn_blocked(args: &[&str]) -> Child {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        seccompiler::apply_filter(&deny_io_uring()).expect("seccomp filter applies");
        Command::new(BIN)
            .args(&args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    })
    .join()
    .unwrap()
}

/// Forward the child's stderr lines to a channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

fn wait_listening(rx: &mpsc::Receiver<String>, log: &mut Vec<String>) -> SocketAddr {
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("wsedge logs its listener");
        log.push(l.clone());
        if let Some(i) = l.find("addr=") {
            let a = l[i + 5..].split_whitespace().next().unwrap();
            return a.parse().unwrap();
        }
    }
}

#[test]
fn falls_back_to_epoll_when_io_uring_is_blocked_and_drains_on_sigterm() {
    let cfg = temp_file("fallback.toml", SMALL_CONFIG);
    let mut child = spawn_blocked(&["--config", cfg.to_str().unwrap()]);
    let rx = lines(&mut child);
    let mut log = Vec::new();
    let addr = wait_listening(&rx, &mut log);
    let all = log.join("\n");
    assert!(all.contains("falling back to epoll"), "{all}");
    assert!(all.contains("io=epoll"), "{all}");

    let mut c = Client::connect(addr, "/echo");
    c.send_text("served on the fallback");
    assert_eq!(c.recv().1, b"served on the fallback");

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(c.expect_close(), Some(CloseCode::GOING_AWAY));
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after drain: {status:?}");
}

#[test]
fn forced_io_uring_fails_clearly_when_blocked() {
    let cfg = temp_file("forced.toml", SMALL_CONFIG);
    let child = spawn_blocked(&["--config", cfg.to_str().unwrap(), "--io", "uring"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring is unavailable"), "{err}");
}

#[test]
fn check_names_an_unreadable_tls_file_and_sighup_reloads_certificates() {
    use common::pki::{Pki, server_cn};
    let pki = Pki::new("cli");
    let leaf = pki.leaf("server", "before", &["localhost"]);
    let tls = format!(
        "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        leaf.cert.display(),
        leaf.key.display()
    );
    let with_tls = SMALL_CONFIG.replace("[[listener.route]]", &format!("{tls}[[listener.route]]"));
    let bad = temp_file(
        "bad-tls.toml",
        &with_tls.replace("server.key", "missing.key"),
    );
    let out = Command::new(BIN).arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listener[0].tls.cert") && err.contains("missing.key"),
        "{err}"
    );

    let cfg = temp_file("tls.toml", &with_tls);
    let mut child = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    let mut log = Vec::new();
    let addr = wait_listening(&rx, &mut log);
    let mut old = Client::connect_tls(addr, "localhost", &pki.ca(), None, "/echo").unwrap();
    assert_eq!(server_cn(&old.stream), "before");
    pki.leaf("server", "after", &["localhost"]);
    let kill = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    kill("-HUP");
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("wsedge logs the reload");
        if l.contains("TLS certificates reloaded") {
            break;
        }
    }
    let new = Client::connect_tls(addr, "localhost", &pki.ca(), None, "/echo").unwrap();
    assert_eq!(server_cn(&new.stream), "after");
    old.send_text("still here");
    assert_eq!(old.recv().1, b"still here");
    kill("-TERM");
    assert_eq!(old.expect_close(), Some(CloseCode::GOING_AWAY));
    assert!(child.wait().unwrap().success());
}
