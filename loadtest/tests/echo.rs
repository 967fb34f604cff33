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
