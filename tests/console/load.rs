//! Eight scripts polling the console's API with a viewer's Basic
//! credentials must not stall its pages (#37 item 4). Before, every call
//! ran argon2 on the console's one request thread: each page waited
//! behind the queued hashes. Now a checked credential is remembered for a
//! minute and hashing runs off that thread, so the pages answer as on an
//! idle console. What proves it is the count of password checks (one per
//! poller at most, not one per call); the pages' medians are printed, and
//! bounded only loosely (2 s): this test shares the suite's test threads,
//! and a speed goal belongs in the benchmark.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::web::{base64, relay_with_console, users_file, Web};
use common::*;

/// The median of `n` timed GETs of `path`.
async fn median_ms(web: &mut Web, path: &str, n: usize) -> f64 {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = web.get(path).await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    ms.sort_by(f64::total_cmp);
    ms[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_answer_while_eight_scripts_poll_the_api() {
    let db = TestDb::new().await;
    let users = users_file("console-load");
    let c = relay_with_console(&db, &key_prefix(), Some(&users), &[]).await;
    let mut alice = Web::new(c.port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let bob = format!("Basic {}", base64(b"bob:bob's password"));

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut pollers = Vec::new();
    for _ in 0..8 {
        let (stop, calls, bob, port) = (stop.clone(), calls.clone(), bob.clone(), c.port);
        pollers.push(tokio::spawn(async move {
            let mut api = Web::api(port);
            while !stop.load(Ordering::Relaxed) {
                let r = api.get_as("/api/v1/fleet", &bob).await;
                assert_eq!(r.status, 200, "{}", r.body);
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    wait_until("the scripts are polling", Duration::from_secs(30), || async {
        calls.load(Ordering::Relaxed) >= 80
    })
    .await;
    let login = median_ms(&mut Web::new(c.port), "/login", 40).await;
    let page = median_ms(&mut alice, "/dead-letters", 40).await;
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.await.expect("a poller");
    }
    let polled = calls.load(Ordering::Relaxed);
    eprintln!("median /login {login:.1} ms, /dead-letters {page:.1} ms, while {polled} API calls ran");
    assert!(login < 2000.0, "the sign-in page took {login:.1} ms (median)");
    assert!(page < 2000.0, "a signed-in page took {page:.1} ms (median)");
    // The scripts' credentials were hashed once or twice, not per call.
    let m = c.relay.http_get("/metrics").await.expect("metrics").1;
    let hashed = metric_value(&m, "outbox_relay_console_logins_total", &[("result", "ok")]).unwrap_or(0.0);
    assert!(
        hashed <= 1.0 + 8.0,
        "{hashed} password checks for {polled} API calls (alice's sign-in, and at most one per poller)"
    );
}
