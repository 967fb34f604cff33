//! TLS over real sockets and real handshakes, on both backends, with certificates generated
//! per test: wss echo (large messages across records), SNI, hot reload with an open
//! connection, mTLS and client-certificate names per route, and wsedge as a TLS client of
//! wss upstreams (proxy routes and sources): custom CA, wrong CA, expired certificate,
//! hostname mismatch, mTLS with and without a client certificate; and an ingest route whose
//! WebSocket sink delivers over wss.

mod common;

use std::path::Path;

use common::pki::{Leaf, Pki, server_cn};
use common::{Client, Refused, TestServer, start, start_with};
use wsedge::config::IoMode;
use wsedge::proto::MessageKind;

/// `[listener.tls]` for `leaf`, plus more keys (inside the table).
fn tls_table(leaf: &Leaf, extra: &str) -> String {
    format!(
        "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
        leaf.cert.display(),
        leaf.key.display()
    )
}

fn wss(srv: &TestServer, name: &str, ca: &Path, path: &str) -> Client<common::pki::TlsStream> {
    Client::connect_tls(srv.addr, name, ca, None, path).expect("wss upgrade")
}

fn echo_round_trip<S: std::io::Read + std::io::Write>(c: &mut Client<S>) {
    c.send_text("hello over tls");
    assert_eq!(c.recv(), (MessageKind::Text, b"hello over tls".to_vec()));
    // Several TLS records each way, and a read that ends mid-record.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    c.send_binary(&big);
    assert_eq!(c.recv(), (MessageKind::Binary, big));
}

fn wss_echo_sni_and_plain_client_refused(io: IoMode) {
    let pki = Pki::new(&format!("echo-{io:?}"));
    let default = pki.leaf("default", "default", &["localhost"]);
    let api = pki.leaf("api", "api", &["api.test"]);
    let wild = pki.leaf("wild", "wild", &["*.wild.test"]);
    let sni = format!(
        "[[listener.tls.sni]]\nnames = [\"api.test\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[listener.tls.sni]]\nnames = [\"*.wild.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        api.cert.display(),
        api.key.display(),
        wild.cert.display(),
        wild.key.display()
    );
    let srv = start(io, 2, &tls_table(&default, &sni));
    let mut c = wss(&srv, "localhost", &pki.ca(), "/echo");
    assert_eq!(server_cn(&c.stream), "default");
    echo_round_trip(&mut c);
    let c2 = wss(&srv, "api.test", &pki.ca(), "/echo");
    assert_eq!(server_cn(&c2.stream), "api");
    let c3 = wss(&srv, "x.wild.test", &pki.ca(), "/echo");
    assert_eq!(server_cn(&c3.stream), "wild");
    // A plain WebSocket client on the TLS port gets no upgrade.
    assert!(Client::try_connect(srv.addr, "/echo").is_err());
    let t = srv.wait_for("the plain client counted as a TLS failure", |t| {
        t.handshake_failures
            .iter()
            .any(|(l, n)| *l == "tls" && *n >= 1)
    });
    assert_eq!(t.connections_open, 3);
    // The client's close reaches the server through TLS, and its close comes back.
    assert_eq!(
        {
            c.conn.close(wsedge::proto::CloseCode::NORMAL, "").unwrap();
            c.flush();
            c.expect_close()
        },
        Some(wsedge::proto::CloseCode::NORMAL)
    );
    srv.wait_for("close 1000 counted", |t| {
        t.closes.iter().any(|(c, n)| *c == 1000 && *n == 1)
    });
}

fn hot_reload_keeps_open_connections(io: IoMode) {
    let pki = Pki::new(&format!("reload-{io:?}"));
    let leaf = pki.leaf("server", "first", &["localhost"]);
    let mut srv = start(io, 2, &tls_table(&leaf, ""));
    let mut old = wss(&srv, "localhost", &pki.ca(), "/echo");
    assert_eq!(server_cn(&old.stream), "first");
    // The certificate is renewed in place, then reloaded (what SIGHUP does).
    pki.leaf("server", "second", &["localhost"]);
    assert_eq!(srv.reload_tls(), Ok(1));
    let mut new = wss(&srv, "localhost", &pki.ca(), "/echo");
    assert_eq!(server_cn(&new.stream), "second");
    echo_round_trip(&mut new);
    // The connection made before the reload is still served.
    echo_round_trip(&mut old);
    // A broken file: the reload fails, says why, and the current certificate stays.
    std::fs::write(&leaf.key, "not a key").unwrap();
    let err = srv.reload_tls().unwrap_err();
    assert!(err.contains("server.key"), "{err}");
    let c = wss(&srv, "localhost", &pki.ca(), "/echo");
    assert_eq!(server_cn(&c.stream), "second");
}

fn mtls_and_client_cert_names(io: IoMode) {
    let pki = Pki::new(&format!("mtls-{io:?}"));
    let leaf = pki.leaf("server", "server", &["localhost"]);
    let a = pki.leaf("a", "a.client", &["a.client"]);
    let b = pki.leaf("b", "b.client", &[]);
    let expired = pki.leaf_with("old", "a.client", &["a.client"], true);
    let other = Pki::new(&format!("mtls-other-{io:?}"));
    let stranger = other.leaf("stranger", "a.client", &["a.client"]);
    let extra = format!(
        "{}[[listener.route]]\npath = \"/only-a\"\nkind = \"echo\"\nclient_cert_names = [\"a.client\"]\n",
        tls_table(
            &leaf,
            &format!(
                "client_auth = \"required\"\nclient_ca = \"{}\"\n",
                pki.ca().display()
            )
        )
    );
    let srv = start(io, 1, &extra);
    let connect = |cert: Option<&Leaf>, path: &str| {
        Client::connect_tls(srv.addr, "localhost", &pki.ca(), cert, path)
    };
    // Certificates the server must refuse: none, expired, from another CA. TLS 1.3 reports
    // the refusal after the client's side of the handshake, so it shows at the upgrade.
    for (what, cert) in [
        ("no certificate", None),
        ("expired", Some(&expired)),
        ("another CA", Some(&stranger)),
    ] {
        match connect(cert, "/echo") {
            Err(Refused::Io(e)) => assert!(
                e.contains("alert") || e.contains("certificate") || e.contains("reset"),
                "{what}: {e}"
            ),
            Err(other) => panic!("{what}: {other:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    srv.wait_for("three TLS failures", |t| {
        t.handshake_failures
            .iter()
            .any(|(l, n)| *l == "tls" && *n == 3)
    });
    let mut ok = connect(Some(&a), "/only-a").expect("a.client may use /only-a");
    echo_round_trip(&mut ok);
    let mut plain = connect(Some(&b), "/echo").expect("any valid certificate may use /echo");
    echo_round_trip(&mut plain);
    match connect(Some(&b), "/only-a") {
        Err(Refused::Status(403, body)) => assert!(!body.contains("b.client"), "{body}"),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    srv.wait_for("the refusal counted", |t| {
        t.handshake_failures
            .iter()
            .any(|(l, n)| *l == "client_cert_forbidden" && *n == 1)
    });
}

fn wss_upstreams_for_proxy_routes(io: IoMode) {
    let pki = Pki::new(&format!("up-{io:?}"));
    let other = Pki::new(&format!("up-other-{io:?}"));
    let good = start(
        io,
        1,
        &tls_table(&pki.leaf("good", "good", &["localhost"]), ""),
    );
    let expired = start(
        io,
        1,
        &tls_table(
            &pki.leaf_with("expired", "expired", &["localhost"], true),
            "",
        ),
    );
    let mtls = start(
        io,
        1,
        &tls_table(
            &pki.leaf("mtls", "mtls", &["localhost"]),
            &format!(
                "client_auth = \"required\"\nclient_ca = \"{}\"\n",
                pki.ca().display()
            ),
        ),
    );
    let me = pki.leaf("proxy-client", "wsedge-proxy", &[]);
    let route = |path: &str, up: &TestServer, keys: &str| {
        format!(
            "[[listener.route]]\npath = \"{path}\"\nkind = \"proxy\"\n\
             upstream = \"wss://127.0.0.1:{}/echo\"\ntls_server_name = \"localhost\"\n{keys}\n",
            up.addr.port()
        )
    };
    let ca = format!("tls_ca = \"{}\"\n", pki.ca().display());
    let routes = [
        route("/good", &good, &ca),
        route(
            "/wrong-ca",
            &good,
            &format!("tls_ca = \"{}\"\n", other.ca().display()),
        ),
        route(
            "/wrong-name",
            &good,
            &ca.replace("tls_ca", "tls_server_name = \"elsewhere.test\"\ntls_ca"),
        ),
        route("/expired", &expired, &ca),
        route("/mtls-without", &mtls, &ca),
        route(
            "/mtls-with",
            &mtls,
            &format!(
                "{ca}tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                me.cert.display(),
                me.key.display()
            ),
        ),
    ]
    .concat();
    // `tls_server_name` twice in /wrong-name: the later key would be a TOML error, so it
    // is spelled out once there.
    let routes = routes.replace(
        "tls_server_name = \"localhost\"\ntls_server_name = \"elsewhere.test\"",
        "tls_server_name = \"elsewhere.test\"",
    );
    let proxy = start(io, 1, &routes);
    for path in ["/good", "/mtls-with"] {
        let mut c = Client::connect(proxy.addr, path);
        echo_round_trip(&mut c);
    }
    for path in ["/wrong-ca", "/wrong-name", "/expired", "/mtls-without"] {
        match Client::try_connect(proxy.addr, path) {
            Err(Refused::Status(502, _)) => {}
            other => panic!("{path}: expected 502, got {:?}", other.map(|_| ())),
        }
    }
    proxy.wait_for("four bad gateways", |t| {
        t.handshake_failures
            .iter()
            .any(|(l, n)| *l == "bad_gateway" && *n == 4)
    });
    // The upstreams saw the refused handshakes as TLS failures (the proxy's alert), except
    // the mTLS one without a certificate, which the upstream refused itself.
    mtls.wait_for("the certificate-less client refused", |t| {
        t.handshake_failures
            .iter()
            .any(|(l, n)| *l == "tls" && *n == 1)
    });
}

fn sources_connect_to_wss_upstreams(io: IoMode) {
    let pki = Pki::new(&format!("src-{io:?}"));
    let other = Pki::new(&format!("src-other-{io:?}"));
    // The upstream feed: a TLS listener whose subscribe route the source reads.
    let up = start(
        io,
        1,
        &format!(
            "{}[[listener.route]]\npath = \"/feed/{{topic}}\"\nkind = \"subscribe\"\n",
            tls_table(&pki.leaf("up", "up", &["localhost"]), "")
        ),
    );
    let source = |name: &str, ca: &Path| {
        format!(
            "[[source]]\nname = \"{name}\"\nurl = \"wss://127.0.0.1:{}/feed/x\"\n\
             topic = \"{name}\"\ntls_server_name = \"localhost\"\ntls_ca = \"{}\"\n\
             reconnect_initial_ms = 50\nreconnect_max_ms = 100\n",
            up.addr.port(),
            ca.display()
        )
    };
    let srv = start_with(
        io,
        1,
        "[[listener.route]]\npath = \"/sub/{topic}\"\nkind = \"subscribe\"\n",
        &format!(
            "{}{}",
            source("good", &pki.ca()),
            source("bad", &other.ca())
        ),
    );
    let mut sub = Client::connect(srv.addr, "/sub/good");
    srv.wait_for("the good source connected", |t| {
        t.sources
            .iter()
            .any(|s| s.name == "good" && s.state == "connected")
    });
    up.wait_for("the source subscribed upstream", |t| {
        t.fanout.subscribers == 1
    });
    // Published upstream, carried over TLS by the source, fanned out here.
    let (status, _) = common::http_post(up.admin, "/publish/x", "text/plain", b"tick");
    assert_eq!(status, 200);
    assert_eq!(sub.recv(), (MessageKind::Text, b"tick".to_vec()));
    // The source that does not trust the upstream's CA never connects, and says why.
    let t = srv.wait_for("the bad source failed verification", |t| {
        t.sources
            .iter()
            .any(|s| s.name == "bad" && s.last_error.contains("certificate"))
    });
    let bad = t.sources.iter().find(|s| s.name == "bad").unwrap();
    assert_eq!(bad.connects, 0, "{bad:?}");
}

fn ingest_into_a_wss_sink(io: IoMode) {
    let pki = Pki::new(&format!("sink-{io:?}"));
    // The sink's upstream: a TLS listener whose pubsub room the sink's batches are published
    // to; a plain subscriber of the same room reads them.
    let up = start(
        io,
        1,
        &format!(
            "{}[[listener.route]]\npath = \"/room/{{topic}}\"\nkind = \"pubsub\"\n\
             [[listener.route]]\npath = \"/watch/{{topic}}\"\nkind = \"subscribe\"\n",
            tls_table(&pki.leaf("up", "up", &["localhost"]), "")
        ),
    );
    let srv = start_with(
        io,
        1,
        "[[listener.route]]\npath = \"/in\"\nkind = \"ingest\"\nsink = \"up\"\n",
        &format!(
            "[[sink]]\nname = \"up\"\nkind = \"websocket\"\n\
             url = \"wss://127.0.0.1:{}/room/batches\"\ntls_server_name = \"localhost\"\n\
             tls_ca = \"{}\"\nmax_batch_messages = 5\n",
            up.addr.port(),
            pki.ca().display()
        ),
    );
    // The sink connects at startup: over TLS, verified against the test CA.
    let deadline = std::time::Instant::now() + common::READ_TIMEOUT;
    loop {
        let stats = common::http_get(srv.admin, "/stats").1;
        if stats.contains("\"state\": \"connected\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sink never connected: {stats}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut watch = wss(&up, "localhost", &pki.ca(), "/watch/batches");
    // Both in the room: the sink's connection and the watcher.
    up.wait_for("the watcher subscribed", |t| t.fanout.subscribers == 2);
    let mut c = Client::connect(srv.addr, "/in");
    for i in 0..10 {
        c.send_text(&format!("{{\"i\":{i}}}"));
    }
    // Two batches of five NDJSON lines arrive through the TLS connection.
    let mut lines = Vec::new();
    while lines.len() < 10 {
        let (kind, data) = watch.recv();
        assert_eq!(kind, MessageKind::Text);
        lines.extend(String::from_utf8(data).unwrap().lines().map(str::to_string));
    }
    let want: Vec<String> = (0..10).map(|i| format!("{{\"i\":{i}}}")).collect();
    assert_eq!(lines, want);
}

both_backends!(
    ingest_into_a_wss_sink,
    wss_echo_sni_and_plain_client_refused,
    hot_reload_keeps_open_connections,
    mtls_and_client_cert_names,
    wss_upstreams_for_proxy_routes,
    sources_connect_to_wss_upstreams,
);
