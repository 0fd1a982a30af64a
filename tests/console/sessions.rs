//! The console's sign-in and sessions against a hostile or careless world
//! (#37 items 4 and 6): guessing at an operator's name from many addresses
//! slows the guesses without locking the operator out; behind a trusted
//! proxy the forwarded address is the one limited; sessions end when idle
//! and everywhere at once; HSTS and `__Host-` cookies with
//! `secure_cookie`; an anonymous console answers only to a loopback
//! `Host`; a sign-in never redirects off-site; a user name cannot forge a
//! log line; a request body that never finishes is cut off.

use crate::common;

use std::time::Duration;

use super::web::{base64, form, relay_with_console, users_file, Web};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send `request` as it is and read what comes back until the server
/// closes or `within` passes (None: nothing at all within it).
async fn raw(port: u16, request: &str, within: Duration) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    let read = read.await;
    let closed = read.is_ok();
    (closed || !buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// A sign-in through the form with `X-Forwarded-For: client`.
async fn sign_in_from(web: &mut Web, client: &str, name: &str, password: &str) -> u16 {
    let page = web.get("/login").await;
    let token = page.input("token").expect("the login form's token");
    let origin = web.origin.clone().expect("an origin");
    web.request(
        "POST",
        "/login",
        &[("Origin", &origin), ("X-Forwarded-For", client)],
        Some((
            "application/x-www-form-urlencoded",
            form(&[("token", &token), ("next", "/"), ("name", name), ("password", password)]),
        )),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_at_a_name_from_many_addresses_never_lock_its_operator_out() {
    let db = TestDb::new().await;
    let users = users_file("console-no-lockout");
    let c = relay_with_console(
        &db,
        &key_prefix(),
        Some(&users),
        &[("OUTBOX_RELAY_CONSOLE__TRUSTED_PROXIES", "127.0.0.1")],
    )
    .await;
    // An attacker rotating addresses: each address stays under its own
    // limit, the name collects the failures.
    let mut attacker = Web::new(c.port);
    for i in 1..=8 {
        let status = sign_in_from(&mut attacker, &format!("203.0.113.{i}"), "alice", "guess").await;
        assert_eq!(status, 401, "attempt {i}");
    }
    let m = c.relay.http_get("/metrics").await.expect("metrics").1;
    assert!(
        metric_value(&m, "outbox_relay_console_login_delays_total", &[]).unwrap_or(0.0) >= 1.0,
        "the name's later guesses were slowed"
    );
    // Alice, from her own address, with her password: in.
    let mut alice = Web::new(c.port);
    assert_eq!(
        sign_in_from(&mut alice, "198.51.100.7", "alice", "alice's password").await,
        303,
        "the operator signs in despite the guesses at her name"
    );
    assert_eq!(alice.get("/").await.status, 200);
    // One address that keeps guessing is refused outright, whatever name.
    let mut one = Web::new(c.port);
    for _ in 0..5 {
        assert_eq!(sign_in_from(&mut one, "192.0.2.9", "bob", "guess").await, 401);
    }
    assert_eq!(sign_in_from(&mut one, "192.0.2.9", "bob", "bob's password").await, 429);
    // Forwarded addresses count only from a trusted proxy: without the
    // setting, every attempt above would have been 127.0.0.1's.
    let failed = c.relay.records("console sign-in failed");
    assert!(
        failed.iter().any(|l| l["client"] == "203.0.113.3"),
        "the forwarded address is logged: {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_when_idle_and_everywhere_at_once() {
    let db = TestDb::new().await;
    let users = users_file("console-sessions");
    let c = relay_with_console(
        &db,
        &key_prefix(),
        Some(&users),
        &[("OUTBOX_RELAY_CONSOLE__IDLE_TIMEOUT", "2s")],
    )
    .await;
    let mut idle = Web::new(c.port);
    assert_eq!(idle.sign_in("alice", "alice's password").await.status, 303);
    assert_eq!(idle.get("/jobs").await.status, 200);
    // Nothing for longer than the idle timeout: the session is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(idle.get("/jobs").await.status, 303, "an idle session ends");

    // Two browsers of one user, one of another; sign out everywhere from
    // the first ends both of alice's sessions only.
    let (mut a1, mut a2, mut b) = (Web::new(c.port), Web::new(c.port), Web::new(c.port));
    assert_eq!(a1.sign_in("alice", "alice's password").await.status, 303);
    assert_eq!(a2.sign_in("alice", "alice's password").await.status, 303);
    assert_eq!(b.sign_in("bob", "bob's password").await.status, 303);
    let csrf = a1.csrf().await;
    let out = a1
        .post_form("/logout", &[("csrf", &csrf), ("everywhere", "true")])
        .await;
    assert_eq!(out.status, 303);
    assert_eq!(a1.get("/jobs").await.status, 303);
    assert_eq!(a2.get("/jobs").await.status, 303, "the other browser is signed out too");
    assert_eq!(b.get("/jobs").await.status, 200, "another user's session stays");
    assert!(!c.relay.records("console sign-out everywhere").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_tls_cookies_are_host_bound_and_hsts_is_sent() {
    let db = TestDb::new().await;
    let users = users_file("console-secure");
    let c = relay_with_console(
        &db,
        &key_prefix(),
        Some(&users),
        &[("OUTBOX_RELAY_CONSOLE__SECURE_COOKIE", "true")],
    )
    .await;
    let mut web = Web::new(c.port);
    let login = web.get("/login").await;
    assert!(
        login
            .header("strict-transport-security")
            .is_some_and(|v| v.contains("max-age=")),
        "{:?}",
        login.headers
    );
    let ok = web.sign_in("alice", "alice's password").await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let cookie = ok.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.starts_with("__Host-outbox_relay_session=") && cookie.contains("Secure") && cookie.contains("Path=/"),
        "{cookie}"
    );
    assert!(!cookie.contains("Domain"), "{cookie}");
    assert_eq!(web.get("/jobs").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_console_answers_only_to_a_loopback_host() {
    let db = TestDb::new().await;
    let c = relay_with_console(&db, &key_prefix(), None, &[]).await;
    let ask = |host: &str| format!("GET /api/v1/overview HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let rebound = raw(c.port, &ask("evil.example:9465"), Duration::from_secs(30))
        .await
        .expect("an answer");
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    assert!(!rebound.contains("overview"), "{rebound}");
    for host in [format!("127.0.0.1:{}", c.port), format!("localhost:{}", c.port)] {
        let ok = raw(c.port, &ask(&host), Duration::from_secs(30))
            .await
            .expect("an answer");
        assert!(ok.starts_with("HTTP/1.1 200"), "{host}: {ok}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_redirects_only_to_a_path_of_its_own() {
    let db = TestDb::new().await;
    let users = users_file("console-next");
    let c = relay_with_console(&db, &key_prefix(), Some(&users), &[]).await;
    let mut web = Web::new(c.port);
    for next in [
        "/%09/evil.example",
        "/%5Cevil.example",
        "%2F%2Fevil.example",
        "/%0A/evil.example",
    ] {
        let page = web.get(&format!("/login?next={next}")).await;
        assert_eq!(page.input("next").as_deref(), Some("/"), "{next}: {}", page.body);
    }
    // The form's own `next`, tampered with, is normalised the same way.
    let page = web.get("/login").await;
    let token = page.input("token").expect("token");
    let r = web
        .post_form(
            "/login",
            &[
                ("token", &token),
                ("next", "/\t/evil.example"),
                ("name", "alice"),
                ("password", "alice's password"),
            ],
        )
        .await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/"));
}

/// In the text log format a newline in a user name would start a line of
/// its own: `outbox-relay console` (text logs, as on a terminal) is given
/// a forged name, and no line of its output starts where the name's
/// second line does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_cannot_forge_a_log_line() {
    use std::io::BufRead;
    let db = TestDb::new().await;
    let users = users_file("console-log-forge");
    let (port, metrics_port) = (free_port(), free_port());
    let env: Vec<(String, String)> = [
        ("OUTBOX_RELAY_DATABASE__URL", db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL", shared_redis_url()),
        ("OUTBOX_RELAY_CONSOLE__LISTEN", format!("127.0.0.1:{port}")),
        ("OUTBOX_RELAY_CONSOLE__USERS_FILE", users.display().to_string()),
        ("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{metrics_port}")),
        ("OUTBOX_RELAY_LOG__FORMAT", "text".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut child = relay_command(&["console"], &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the console");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().expect("lines").push(l);
        }
    });
    wait_until("the console answers", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let mut web = Web::new(port);
    let forged = "mallory\nDEC 07 00:00:00.000 INFO console sign-in, user: root, role: operator";
    assert_eq!(web.sign_in(forged, "guess").await.status, 401);
    let logged = || lines.lock().expect("lines").clone();
    wait_until("the failed sign-in is logged", Duration::from_secs(30), || {
        let seen = logged().iter().any(|l| l.contains("console sign-in failed"));
        async move { seen }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let all = logged();
    assert!(
        !all.iter().any(|l| l.starts_with("DEC 07")),
        "a line was forged: {all:#?}"
    );
    assert!(
        all.iter().any(|l| l.contains("mallory\\nDEC 07")),
        "the name is logged, escaped: {all:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_ends_is_cut_off() {
    let db = TestDb::new().await;
    let users = users_file("console-slow-body");
    let c = relay_with_console(&db, &key_prefix(), Some(&users), &[]).await;
    let req = format!(
        "POST /login HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 100\r\n\r\nname=a",
        c.port
    );
    let answer = raw(c.port, &req, Duration::from_secs(40))
        .await
        .expect("the console answers or closes within 40 s, well past its body deadline");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
}

/// Guesses sent all at once from one address are limited like guesses
/// sent one by one: each attempt counts from before its check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_sent_at_once_from_one_address_are_limited_too() {
    let db = TestDb::new().await;
    let users = users_file("console-burst");
    let c = relay_with_console(&db, &key_prefix(), Some(&users), &[]).await;
    let wrong = format!("Basic {}", base64(b"alice:guess"));
    let mut burst = Vec::new();
    for _ in 0..30 {
        let (port, wrong) = (c.port, wrong.clone());
        burst.push(tokio::spawn(async move {
            Web::api(port).get_as("/api/v1/overview", &wrong).await.status
        }));
    }
    let mut statuses = Vec::new();
    for b in burst {
        statuses.push(b.await.expect("a guess"));
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert!(checked <= 5, "{checked} guesses were checked at once: {statuses:?}");
    assert!(statuses.iter().all(|s| [401, 429, 503].contains(s)), "{statuses:?}");
}

/// "Sign out everywhere" that is refused says so instead of looking done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sign_out_everywhere_says_so() {
    let db = TestDb::new().await;
    let users = users_file("console-signout-refused");
    let c = relay_with_console(&db, &key_prefix(), Some(&users), &[]).await;
    let (mut a1, mut a2) = (Web::new(c.port), Web::new(c.port));
    assert_eq!(a1.sign_in("alice", "alice's password").await.status, 303);
    assert_eq!(a2.sign_in("alice", "alice's password").await.status, 303);
    let r = a1
        .post_form("/logout", &[("csrf", "wrong"), ("everywhere", "true")])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("no session ended"), "{}", r.body);
    assert_eq!(a2.get("/jobs").await.status, 200);
}
