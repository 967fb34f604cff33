//! `wsedge-load echo` against a real in-process wsedge: the run completes, reports no
//! errors, and its message count agrees with what the server counted. Against faulty echo
//! servers (one that stops answering, one that answers wrongly, one that never upgrades) the
//! faults are reported and the run ends with status 3 (or 1 if nothing connected).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{echo_url, run_json as run, run_json_expecting, server};
use wsedge::metrics::merge;
use wsedge::proto::handshake::{parse_request, write_response_101};
use wsedge::proto::{Conn, Event, HandshakeLimits, Limits, Role};

/// How a [`faulty_echo`] server misbehaves after answering `after` messages properly.
#[derive(Clone, Copy)]
enum Fault {
    /// Keep reading, answer nothing more.
    Stall,
    /// Answer each further message with its payload reversed (the sequence number is wrong).
    Garble,
    /// Read nothing more.
    Deaf,
}

/// A one-connection-at-a-time echo server with a fault.
fn faulty_echo(after: usize, fault: Fault) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = BytesMut::new();
                let mut chunk = vec![0u8; 65536];
                let req = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Ok(Some((req, used))) = parse_request(&buf, &HandshakeLimits::default())
                    {
                        let _ = buf.split_to(used);
                        break req;
                    }
                };
                let mut out = Vec::new();
                write_response_101(&req.key, None, &[], &mut out);
                let _ = s.write_all(&out);
                let mut conn = Conn::new(Role::Server, Limits::default());
                let mut answered = 0;
                loop {
                    if conn.handle_input(&mut buf).is_err() {
                        return;
                    }
                    while let Some(ev) = conn.poll_event() {
                        if let Event::Message { kind, data } = ev {
                            if answered < after {
                                let _ = conn.send(kind, &data);
                            } else if let Fault::Garble = fault {
                                let mut d = data.to_vec();
                                d.reverse();
                                let _ = conn.send(kind, &d);
                            }
                            answered += 1;
                        }
                    }
                    let mut out = Vec::new();
                    conn.poll_transmit(&mut out);
                    if !out.is_empty() && s.write_all(&out).is_err() {
                        return;
                    }
                    if let (Fault::Deaf, true) = (fault, answered >= after) {
                        std::thread::sleep(Duration::from_secs(30));
                        return;
                    }
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    addr
}

/// One connection, no warm-up, against a [`faulty_echo`] for `duration` seconds with
/// `extra` options; the run must end with status 3 (problems). Returns the report.
fn run_faulty(after: usize, fault: Fault, duration: &str, extra: &[&str]) -> serde_json::Value {
    let url = format!("ws://{}/echo", faulty_echo(after, fault));
    let mut args = vec![
        "echo",
        &url,
        "--conns",
        "1",
        "--duration",
        duration,
        "--warmup",
        "0",
    ];
    args.extend_from_slice(extra);
    run_json_expecting(&args, 3)
}

/// A server that stops answering: the unanswered message is in the report with its age
/// (at least the stall) as a latency, a warning says so, and the status is 3.
#[test]
fn a_stalled_server_shows_as_unanswered_latency() {
    let r = run_faulty(50, Fault::Stall, "2", &[]);
    assert_eq!(r["messages"], 50, "{r}");
    assert_eq!(r["unanswered"], 1, "{r}");
    let oldest = r["oldest_unanswered_ms"].as_f64().unwrap();
    assert!(oldest > 1000.0, "{r}");
    assert!(r["latency"]["max_us"].as_f64().unwrap() > 1e6, "{r}");
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains("unanswered"), "{warnings}");
}

/// An echo that does not match its message (here: the payload reversed, so the sequence
/// number in its first bytes is wrong) is an error, not a completed round trip.
#[test]
fn a_wrong_echo_is_an_error() {
    let r = run_faulty(10, Fault::Garble, "0.5", &[]);
    assert_eq!(r["messages"], 10, "{r}");
    let errors = r["errors"].to_string();
    assert!(errors.contains("out of sequence"), "{errors}");
}

/// Open loop with large messages against a server that never reads: the client stops
/// queueing at 16 MiB (it would otherwise hold every scheduled 1 MiB message) and counts the
/// sends it skipped.
#[test]
fn a_server_that_never_reads_does_not_grow_the_client() {
    let r = run_faulty(5, Fault::Deaf, "1", &["--size", "1048576", "--rate", "200"]);
    let skipped = r["skipped_sends"].as_u64().unwrap();
    // 200 scheduled; 16 MiB queued plus what the socket buffers took were sent.
    assert!(skipped >= 100, "{r}");
}

/// Open loop with fewer connections than asked for: the refused ones are errors (status 3),
/// and a warning says the offered rate was only their share.
#[test]
fn refused_connections_lower_the_offered_rate_and_say_so() {
    let srv = server(1, "max_connections = 2");
    let url = echo_url(&srv);
    let args = [
        "echo",
        &url,
        "--conns",
        "4",
        "--rate",
        "400",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    ];
    let r = run_json_expecting(&args, 3);
    assert_eq!(r["conns_established"], 2, "{r}");
    assert_eq!(r["errors"]["handshake status 503"], 2, "{r}");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("about 200 msg/s were offered"),
        "{warnings}"
    );
    srv.shutdown();
}

/// A listener that completes TCP handshakes but never upgrades: each connection fails with
/// `connect: timeout` after `--connect-timeout`, and the run ends instead of waiting forever.
#[test]
fn a_server_that_never_upgrades_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/echo", l.local_addr().unwrap());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "echo",
            &url,
            "--conns",
            "2",
            "--duration",
            "0.2",
            "--warmup",
            "0",
        ])
        .args(["--connect-timeout", "0.5"])
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "it hung");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connect: timeout"), "{text}");
    drop(l);
}

/// Options that cannot make a run are refused with a message naming them.
#[test]
fn bad_rates_and_durations_are_refused() {
    for (args, needle) in [
        (&["--rate", "0"][..], "--rate must be"),
        (&["--rate", "nan"][..], "--rate must be"),
        (&["--rate", "1e12"][..], "1 per µs"),
        (&["--duration", "nan"][..], "--duration must be"),
        (&["--warmup=-1"][..], "--warmup must be"),
        (
            &["--rate", "10", "--inflight", "4"][..],
            "--inflight is for the closed loop",
        ),
        (&["--connect-timeout", "0"][..], "--connect-timeout must be"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
            .args(["echo", "ws://127.0.0.1:1/echo", "--conns", "1"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

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

/// A CA and a server certificate for `localhost`, as PEM files in a temporary folder.
fn certificates(tag: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("wsedge-load-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, leaf.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

#[test]
fn echo_over_wss_with_a_custom_ca_and_a_refused_certificate() {
    let (ca, cert, key) = certificates("echo");
    let srv = server(
        1,
        &format!(
            "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let url = format!("wss://{}/echo", srv.listen_addrs()[0].1);
    let ca_arg = ca.display().to_string();
    let tls = ["--tls-ca", &ca_arg, "--tls-server-name", "localhost"];
    let mut args = vec![
        "echo",
        &url,
        "--conns",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ];
    args.extend(tls);
    let r = run(&args);
    assert_eq!(r["conns_established"], 4, "{r}");
    assert_eq!(r["errors"].as_object().unwrap().len(), 0, "{r}");
    let measured = r["messages"].as_u64().unwrap();
    assert!(measured > 0);
    let t = merge(&srv.shards().snapshots());
    assert!(t.messages_out >= measured);
    // Without the CA the server's certificate is refused, and the report says so.
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "echo",
            &url,
            "--conns",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ])
        .args(["--tls-server-name", "localhost"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tls:") && text.contains("certificate"),
        "{text}"
    );
    srv.shutdown();
}
