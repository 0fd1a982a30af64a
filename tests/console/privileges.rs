//! The console with exactly the least privilege the docs give it (#37
//! item 5): Postgres as `outbox_triage` with `deploy/postgres/roles.sql`,
//! Redis as docs/redis.md's `outbox-console` user (`console.redis_url`), beside a
//! relay running as `outbox_relay` and docs/redis.md's `outbox-relay` Redis user,
//! the layout of `deploy/kubernetes/`. Every page is served and every
//! action runs, with no Redis or Postgres refusal anywhere.
//!
//! Before: the console borrowed the relays' Redis user, which may not
//! `ZCARD` (schedules answered 503, the jobs list showed no sizes, a
//! cancel's Redis cleanup failed), and the set-aside requeue's `UPDATE` was
//! not granted to `outbox_triage`.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use super::web::{base64, bound, users_file, Web};
use common::*;

const PASSWORD: &str = "console-acl-pw";
const PREFIX: &str = "hover:";

fn as_user(user: &str, port: u16) -> String {
    format!("redis://{user}:{PASSWORD}@127.0.0.1:{port}/0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_action_runs_with_the_documented_users_and_roles() {
    let server = RedisServer::start().await;
    let mut admin = redis_conn(&server.url()).await;
    for user in ["outbox-relay", "outbox-console"] {
        let _: () = redis::cmd("ACL")
            .arg(readme_acl(user, PASSWORD))
            .query_async(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("docs/redis.md's ACL line for {user}: {e}"));
    }
    let db = TestDb::new().await;
    let relay_url = db.url_as("outbox_relay").await;
    let triage_url = db.role_url("outbox_triage");

    // Job A delivers, then is paused with rows waiting; B is cancelled;
    // A has dead letters and one row set aside.
    let jobs = new_jobs(2);
    let (a, b) = (jobs[0], jobs[1]);
    running_job(&db, &a).await;
    running_job(&db, &b).await;
    seed_for(&db, 300, &[a, b]).await;
    let mut relay = RelayProcess::spawn(&shipped_env(&relay_url, &as_user("outbox-relay", server.port), PREFIX));
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                           source_type, run_at, attempts, last_error)
             SELECT i, gen_random_uuid(), '{a}', i::int, 'example.com', '/dead/' || i, 0.5, 'sitemap', now(), 5,
                    'WRONGTYPE'
               FROM generate_series(1, 40) AS i;"
        ))
        .await
        .expect("dead letters");

    let users = users_file("console-privileges");
    let (port, metrics_port) = (free_port(), free_port());
    let env: Vec<(String, String)> = [
        ("OUTBOX_RELAY_DATABASE__URL", triage_url.clone()),
        // The relays' user: the console must not borrow it (it may not
        // ZCARD), and does not with console.redis_url set.
        ("OUTBOX_RELAY_REDIS__URL", as_user("outbox-relay", server.port)),
        (
            "OUTBOX_RELAY_CONSOLE__REDIS_URL",
            as_user("outbox-console", server.port),
        ),
        ("OUTBOX_RELAY_CONSOLE__LISTEN", format!("127.0.0.1:{port}")),
        ("OUTBOX_RELAY_CONSOLE__USERS_FILE", users.display().to_string()),
        ("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{metrics_port}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut console = relay_command(&["console"], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the console");
    wait_until("the console answers", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(port);
    let mut web = Web::new(port);
    assert_eq!(web.sign_in("alice", "alice's password").await.status, 303);
    let csrf = web.csrf().await;

    // Reads: every API answer and every page, no refusal in any.
    let overview = api.get_as("/api/v1/overview", &alice).await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.json()["redis_error"].is_null(), "{}", overview.body);
    for path in [
        "/api/v1/fleet",
        "/api/v1/minutes",
        "/api/v1/dead-letters",
        "/api/v1/set-aside",
    ] {
        let r = api.get_as(path, &alice).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let listed = api.get_as("/api/v1/jobs", &alice).await.json();
    assert!(listed["redis_error"].is_null(), "{listed}");
    let a_row = listed["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["job_id"] == a.to_string()).cloned())
        .unwrap_or_else(|| panic!("job A listed: {listed}"));
    assert!(a_row["schedule_size"].as_i64().is_some_and(|n| n > 0), "{listed}");
    let sched = api.get_as(&format!("/api/v1/jobs/{a}/schedule"), &alice).await;
    assert_eq!(sched.status, 200, "{}", sched.body);
    let dead_id = db.count("SELECT min(id) FROM task_outbox_dead").await;
    for page in [
        "/".to_string(),
        "/jobs".to_string(),
        format!("/jobs/schedule?job={a}"),
        format!("/jobs/cancel?job={b}"),
        "/dead-letters".to_string(),
        format!("/dead-letters?job={a}"),
        format!("/dead-letters/confirm?action=purge&job={a}"),
        format!("/dead-letters/{dead_id}"),
        "/set-aside".to_string(),
    ] {
        let r = web.get(&page).await;
        assert_eq!(r.status, 200, "{page}: {}", r.body);
        assert!(
            !r.body.contains("NoPerm") && !r.body.contains("NOPERM") && !r.body.contains("permission denied"),
            "{page}: {}",
            r.body
        );
    }

    // Actions: pause and resume A, cancel B, requeue and purge dead
    // letters, requeue a set-aside row.
    for action in ["pause", "resume"] {
        let r = web
            .post_form(&format!("/jobs/{action}"), &[("csrf", &csrf), ("job", &a.to_string())])
            .await;
        assert_eq!(r.status, 200, "{action}: {}", r.body);
    }
    let r = web
        .post_form("/jobs/cancel", &[("csrf", &csrf), ("job", &b.to_string())])
        .await;
    assert_eq!(r.status, 200, "cancel: {}", r.body);
    assert!(r.body.contains("cancelled job"), "{}", r.body);
    let key_b: bool = redis::cmd("EXISTS")
        .arg(format!("{PREFIX}sched:{b}"))
        .query_async(&mut admin)
        .await
        .expect("EXISTS");
    assert!(!key_b, "B's schedule is gone");

    let seen = api
        .get_as(&format!("/api/v1/dead-letters/confirm?job={a}&error=WRONGTYPE"), &alice)
        .await
        .json();
    assert_eq!(seen["expect_rows"], 40, "{seen}");
    db.client()
        .await
        .batch_execute(&format!(
            "UPDATE task_outbox_dead SET last_error = 'kept' WHERE id IN
               (SELECT id FROM task_outbox_dead WHERE job_id = '{a}' ORDER BY id LIMIT 10)"
        ))
        .await
        .expect("mark ten to purge later");
    let seen = api
        .get_as(&format!("/api/v1/dead-letters/confirm?job={a}&error=WRONGTYPE"), &alice)
        .await
        .json();
    let r = api
        .post_json_as(
            "/api/v1/dead-letters/requeue",
            &alice,
            &bound(serde_json::json!({ "job": a.to_string(), "error": "WRONGTYPE" }), &seen),
        )
        .await;
    assert_eq!(r.status, 200, "requeue: {}", r.body);
    assert_eq!(r.json()["rows"], 30, "{}", r.body);
    let seen = api
        .get_as(&format!("/api/v1/dead-letters/confirm?job={a}"), &alice)
        .await
        .json();
    let r = api
        .post_json_as(
            "/api/v1/dead-letters/purge",
            &alice,
            &bound(serde_json::json!({ "job": a.to_string() }), &seen),
        )
        .await;
    assert_eq!(r.status, 200, "purge: {}", r.body);
    assert_eq!(r.json()["rows"], 10, "{}", r.body);

    // A row set aside (as the relay does for an id the dead table cannot
    // hold), made due again from the console.
    wait_drained(&db, Duration::from_secs(60)).await;
    cli(&db, &["pause", "--reason", "hold the set-aside row"]);
    seed_for(&db, 1, &[a]).await;
    db.set_first_row("run_at = 'infinity'").await;
    let seen = api.get_as("/api/v1/set-aside", &alice).await.json();
    assert_eq!(seen["expect_rows"], 1, "{seen}");
    let r = api
        .post_json_as(
            "/api/v1/set-aside/requeue",
            &alice,
            &bound(serde_json::json!({ "all": true }), &seen),
        )
        .await;
    assert_eq!(r.status, 200, "set-aside requeue: {}", r.body);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE run_at = 'infinity'")
            .await,
        0
    );

    let _ = console.kill();
    let _ = console.wait();
    relay.stop().await;
}
