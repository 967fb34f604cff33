//! `wsedge-load echo --html` against a real in-process wsedge: the report is a
//! self-contained page with both charts, and, when `/usr/bin/chromium` exists, a headless
//! browser renders it to a non-trivial PNG. Without chromium the browser check is skipped
//! (and says so); the structure checks still run. Set `WSEDGE_LOAD_SCREENSHOT=FILE` to keep
//! the screenshot.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{echo_url, server};

const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn echo_html_report_renders_in_a_browser() {
    let srv = server(1, "");
    let url = echo_url(&srv);
    let dir = std::env::temp_dir().join(format!("wsedge-load-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (html_path, json_path) = (dir.join("report.html"), dir.join("report.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge-load"))
        .args([
            "echo",
            &url,
            "--conns",
            "8",
            "--duration",
            "3",
            "--warmup",
            "0.3",
        ])
        .arg("--html")
        .arg(&html_path)
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.shutdown();

    // The JSON report gained the percentile curve; its other fields are unchanged.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let curve = json["latency_percentiles"].as_array().unwrap();
    assert_eq!(curve.last().unwrap()["percentile"], 100.0);
    assert_eq!(
        curve.last().unwrap()["latency_us"],
        json["latency"]["max_us"]
    );

    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains(&url), "the target URL is in the header");
    assert_eq!(html.matches("<svg ").count(), 2, "two charts");
    assert!(
        html.contains("<polyline class=\"curve\""),
        "percentile curve"
    );
    assert!(html.contains("<rect class=\"bar\""), "throughput bars");
    assert!(html.contains("<circle class=\"p99pt\""), "p99 per second");
    assert!(html.contains("No errors."), "errors section");
    for bad in ["<script", "http://", "https://", "src=", "href=", "url("] {
        assert!(!html.contains(bad), "the report must not contain {bad}");
    }

    if !Path::new(CHROMIUM).exists() {
        // CI installs chromium and sets this, so there the check can never be skipped.
        assert!(
            std::env::var_os("WSEDGE_REQUIRE_BROWSER").is_none(),
            "WSEDGE_REQUIRE_BROWSER is set but {CHROMIUM} is missing"
        );
        println!("SKIPPED: browser check ({CHROMIUM} not found); the HTML structure was checked");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let png = dir.join("report.png");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,1600")
        .arg(format!("file://{}", html_path.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish the screenshot in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "chromium failed: {status}");
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank 1200x1600 page is about 9 KB of PNG; the report (text, two charts) over 100 KB.
    assert!(
        bytes.len() > 30_000,
        "screenshot is only {} bytes: did the page render?",
        bytes.len()
    );
    println!(
        "browser check: chromium rendered {} bytes of PNG",
        bytes.len()
    );
    if let Ok(keep) = std::env::var("WSEDGE_LOAD_SCREENSHOT") {
        std::fs::copy(&png, &keep).unwrap();
        std::fs::copy(&html_path, format!("{keep}.html")).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
