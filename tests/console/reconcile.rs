//! The console's reconcile action (#40): an operator writes a job's lost
//! schedule entries again from the delivery journal, from the job's
//! schedule page or the API, as the console's own Postgres role and Redis
//! user would; a viewer may not, and the other jobs are left alone.

use crate::common;

use std::time::Duration;

use super::web::{base64, console_alone, users_file, Web};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reconciles_one_job_from_its_schedule_page() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let jobs = new_jobs(2);
    seed_for(&db, 300, &jobs).await;
    let mut relay = RelayProcess::spawn(&relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[("OUTBOX_RELAY_JOURNAL__KEEP", "1h")],
    ));
    relay.wait_started().await;
    wait_drained_by(&db, Duration::from_secs(60), &relay).await;
    wait_until("journaled", Duration::from_secs(30), || async {
        db.count("SELECT coalesce(sum(cardinality(outbox_ids)), 0)::int8 FROM outbox_relay_journal")
            .await
            == 300
    })
    .await;
    relay.stop().await;
    let before = schedule_members(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");

    // The console alone: no watch to repair it first.
    let users = users_file("console-reconcile");
    let (port, metrics_port) = (free_port(), free_port());
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis.url()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.0.clone()),
        ("OUTBOX_RELAY_CONSOLE__LISTEN".to_string(), format!("127.0.0.1:{port}")),
        (
            "OUTBOX_RELAY_CONSOLE__USERS_FILE".to_string(),
            users.display().to_string(),
        ),
        (
            "OUTBOX_RELAY_HTTP__LISTEN".to_string(),
            format!("127.0.0.1:{metrics_port}"),
        ),
    ];
    let mut child = console_alone(&env, port).await;

    let (a, b) = (jobs[0].to_string(), jobs[1].to_string());
    // A viewer sees no button and may not act.
    let mut bob = Web::new(port);
    assert_eq!(bob.sign_in("bob", "bob's password").await.status, 303);
    let page = bob.get(&format!("/jobs/schedule?job={a}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("Reconcile from the journal"), "{}", page.body);
    let r = Web::api(port)
        .post_json_as(
            &format!("/api/v1/jobs/{a}/reconcile"),
            &format!("Basic {}", base64(b"bob:bob's password")),
            "{}",
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());

    // The operator's button on job A's schedule page restores A only.
    let mut alice = Web::new(port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let page = alice.get(&format!("/jobs/schedule?job={a}")).await;
    assert!(page.body.contains("Reconcile from the journal"), "{}", page.body);
    let csrf = page.input("csrf").expect("csrf");
    let r = alice
        .post_form("/jobs/reconcile", &[("csrf", &csrf), ("job", &a)])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let back = schedule_members(&redis.url(), &prefix).await;
    let of = |job: &str| before.keys().filter(|m| m.contains(job)).count();
    assert_eq!(back.len(), of(&a), "job A's entries, and only those");
    assert!(back.keys().all(|m| m.contains(&a)));
    for (m, score) in &back {
        assert_eq!(before.get(m), Some(score));
    }
    assert!(r.body.contains(&format!("{} written again", of(&a))), "{}", r.body);

    // The API does the same for B; a second time writes nothing.
    let basic = format!("Basic {}", base64(b"alice:alice's password"));
    let r = Web::api(port)
        .post_json_as(&format!("/api/v1/jobs/{b}/reconcile"), &basic, "{}")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["rows"].as_u64(), Some(of(&b) as u64), "{}", r.body);
    assert_eq!(schedule_members(&redis.url(), &prefix).await, before);
    let r = Web::api(port)
        .post_json_as(&format!("/api/v1/jobs/{b}/reconcile"), &basic, "{}")
        .await;
    assert_eq!(r.json()["rows"].as_u64(), Some(0), "{}", r.body);
    let _ = child.kill();
    let _ = child.wait();
}
