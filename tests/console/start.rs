//! How the console starts (#30): exposed without users it is refused at
//! start with one line; `outbox-relay console` alone sweeps nothing, writes
//! no heartbeat, counts its own overview, and with `console.read_only`
//! hides and refuses every action.

use crate::common;

use super::web::{console_alone, users_file, Web};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_console_without_users_is_refused_with_one_line() {
    let env = vec![("OUTBOX_RELAY_CONSOLE__LISTEN".to_string(), "0.0.0.0:9465".to_string())];
    let out = relay_command(&["check-config", "--no-connect"], &env)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("console.listen") && err.contains("not a loopback address"),
        "{err}"
    );

    let dir = scratch_dir("console-bad-users");
    let bad = dir.join("users");
    std::fs::write(&bad, "alice:admin:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n").expect("write");
    let env = vec![(
        "OUTBOX_RELAY_CONSOLE__USERS_FILE".to_string(),
        bad.display().to_string(),
    )];
    let out = relay_command(&["check-config", "--no-connect"], &env)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("viewer or operator"), "{err}");
    assert!(!err.contains("argon2id$v"), "no hash printed: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_alone_sweeps_nothing_and_read_only_refuses_actions() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-alone");
    let (port, metrics_port) = (free_port(), free_port());
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), shared_redis_url()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.0.clone()),
        ("OUTBOX_RELAY_CONSOLE__LISTEN".to_string(), format!("127.0.0.1:{port}")),
        (
            "OUTBOX_RELAY_CONSOLE__USERS_FILE".to_string(),
            users.display().to_string(),
        ),
        ("OUTBOX_RELAY_CONSOLE__READ_ONLY".to_string(), "true".to_string()),
        (
            "OUTBOX_RELAY_HTTP__LISTEN".to_string(),
            format!("127.0.0.1:{metrics_port}"),
        ),
    ];
    let mut child = console_alone(&env, port).await;
    let jobs = seed(&db, 50, 1).await;
    let mut alice = Web::new(port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let page = alice.get("/jobs").await;
    assert!(page.body.contains(&jobs[0].to_string()), "{}", page.body);
    assert!(!page.body.contains(">Pause<"), "read-only hides actions: {}", page.body);
    let csrf = page.input("csrf").expect("csrf");
    let r = alice
        .post_form("/jobs/pause", &[("csrf", &csrf), ("job", &jobs[0].to_string())])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("read-only"), "{}", r.body);
    db.set_first_row("run_at = '-infinity'").await;
    let overview = alice.get("/api/v1/overview").await.json();
    assert_eq!(overview["overview"]["due"]["count"], 50, "{overview}");
    assert!(
        overview["overview"]["oldest_due_seconds"].as_f64().is_some(),
        "a row due at -infinity breaks no count: {overview}"
    );
    assert_eq!(overview["overview"]["source"]["kind"], "console", "{overview}");
    // No sweeping: the rows are all still there after the console served
    // twenty more reads (a relay would have taken them within its first
    // tick), and no relay wrote a heartbeat.
    for _ in 0..20 {
        assert_eq!(alice.get("/api/v1/overview").await.status, 200);
    }
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 50);
    assert_eq!(db.count("SELECT count(*) FROM outbox_relay_instances").await, 0);
    let mut m = Web::new(metrics_port);
    let scrape = m.get("/metrics").await;
    assert!(
        scrape.body.contains("outbox_relay_console_actions_total"),
        "{}",
        scrape.body
    );
    let _ = child.kill();
    let _ = child.wait();
}
