//! The HTTP endpoint serves exactly `GET /healthz`, `/readyz`, `/metrics`:
//! other methods are 405, other paths 404; sockets that never send a
//! request are closed after the head timeout, and 500 of them held open do
//! not stop the probes from answering.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the server has closed `s` (EOF or an error), without waiting.
fn closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        // A 408 before the close counts as closing: read on next time.
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

#[tokio::test]
async fn only_the_three_probes_are_served_and_idle_sockets_cannot_starve_them() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut relay = RelayProcess::spawn(&relay_env(&db, &shared_redis_url(), &prefix, &[]));
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;

    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = relay.http_get(path).await.expect(path);
        assert_eq!(status, 200, "GET {path}");
        for method in ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
            let (status, head) = relay.http_request(method, path).await.expect(path);
            assert_eq!(status, 405, "{method} {path}");
            assert!(
                head.to_ascii_lowercase().contains("allow: get"),
                "{method} {path}: {head}"
            );
        }
    }
    for path in ["/", "/healthz/", "/metrics.json", "/debug/pprof", "/../etc/passwd"] {
        let (status, _) = relay.http_request("GET", path).await.expect(path);
        assert_eq!(status, 404, "GET {path}");
    }

    // 500 sockets that connect and say nothing (a scanner, a slowloris).
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(
            TcpStream::connect(("127.0.0.1", relay.http_port))
                .await
                .expect("idle connect"),
        );
    }
    // One more that sends half a request head and stalls.
    let mut slow = TcpStream::connect(("127.0.0.1", relay.http_port))
        .await
        .expect("slow connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a head");
    let opened = Instant::now();

    let (status, _) = tokio::time::timeout(Duration::from_secs(10), relay.http_get("/healthz"))
        .await
        .expect("/healthz answers while 500 idle sockets are open")
        .expect("/healthz");
    assert_eq!(status, 200);
    let still_open = idle.iter().filter(|s| !closed(s)).count();
    assert!(
        still_open >= 450,
        "/healthz answered only after the server dropped the idle sockets ({still_open} of 500 open, {:?} after opening)",
        opened.elapsed()
    );

    // The server closes them after its head timeout (2 s), and answers the
    // stalled half-request with 408.
    wait_until(
        "the idle sockets are closed by the server",
        Duration::from_secs(20),
        || {
            let open = idle.iter().filter(|s| !closed(s)).count();
            async move { open == 0 }
        },
    )
    .await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut answer))
        .await
        .expect("the stalled request is closed")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(relay.is_running());
    relay.stop().await;
}
