//! Dead-letter triage through the real binary: list with a summary by
//! error, requeue (atomic, conflict-safe, racing a live sweep), purge in
//! batches that never touch newer rows, dry runs that change nothing, bad
//! input refused, and retention run by the DeadLetterActor.

use crate::common;

use std::process::Output;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;

fn cli(db: &TestDb, args: &[&str]) -> Output {
    cli_on(&db.url, args)
}

/// A triage command connecting with `url` (e.g. as outbox_triage).
fn cli_on(url: &str, args: &[&str]) -> Output {
    let env = vec![("OUTBOX_RELAY_DATABASE__URL".to_string(), url.to_string())];
    relay_command(args, &env).output().expect("run outbox-relay")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// Insert `n` dead letters for `job` with `error`, dead-lettered `age` ago.
async fn insert_dead(db: &TestDb, job: uuid::Uuid, n: i64, error: &str, age: &str) {
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                               source_type, run_at, attempts, last_error, dead_lettered_at,
                                               created_at)
                 SELECT i, gen_random_uuid(), $1, i::int, 'h.example', '/dead/' || i, 1, 'sitemap', now(), 3, $2,
                        now() - interval '{age}', now() - interval '{age}'
                   FROM generate_series(1, $3::int8) AS i"
            ),
            &[&job, &error, &n],
        )
        .await
        .expect("insert dead letters");
}

#[tokio::test]
async fn list_summarises_by_error_and_filters() {
    let db = TestDb::new().await;
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    insert_dead(
        &db,
        a,
        5,
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "1 hour",
    )
    .await;
    insert_dead(
        &db,
        a,
        3,
        "field path contains the separator '|' and cannot be encoded",
        "2 days",
    )
    .await;
    insert_dead(&db, b, 1, "OOM command not allowed", "10 minutes").await;

    let v = json(&cli(&db, &["dead-letter", "list", "--json", "--limit", "4"]));
    assert_eq!(v["total"], 9);
    assert_eq!(
        v["rows"].as_array().map(Vec::len),
        Some(4),
        "limit applies to rows only"
    );
    let by_error: Vec<(String, i64)> = v["by_error"]
        .as_array()
        .expect("by_error")
        .iter()
        .map(|e| {
            (
                e["error"].as_str().unwrap_or_default().to_string(),
                e["count"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        by_error,
        [
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value".to_string(),
                5
            ),
            (
                "field path contains the separator '|' and cannot be encoded".to_string(),
                3
            ),
            ("OOM command not allowed".to_string(), 1),
        ]
    );
    // Newest first.
    let first = &v["rows"][0];
    assert_eq!(first["last_error"], "OOM command not allowed");

    let v = json(&cli(
        &db,
        &[
            "dead-letter",
            "list",
            "--json",
            "--job",
            &a.to_string(),
            "--since",
            "1d",
        ],
    ));
    assert_eq!(v["total"], 5);
    let v = json(&cli(&db, &["dead-letter", "list", "--json", "--error", "separator"]));
    assert_eq!(v["total"], 3);

    let text = cli(&db, &["dead-letter", "list"]);
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.contains("9 dead letters match"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("5  WRONGTYPE")), "{out}");
}

#[tokio::test]
async fn requeue_after_fixing_the_key_delivers_the_rows() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 300, 3).await;
    let broken = jobs[1];
    let expected = expected_members(&db).await;
    let key = format!("{}sched:{broken}", &*prefix);
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn.set(&key, "oops").await.expect("SET");

    // Least privilege: the relay as outbox_relay (it moves rows to the dead
    // table), triage as outbox_triage.
    let relay_url = db.url_as("outbox_relay").await;
    let triage = db.url_as("outbox_triage").await;
    let env = relay_env_as(
        &db,
        &relay_url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until(
        "broken job's rows are dead-lettered",
        Duration::from_secs(30),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    let v = json(&cli_on(&triage, &["dead-letter", "list", "--json"]));
    assert_eq!(v["total"], 100);
    assert!(v["by_error"][0]["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("WRONGTYPE")));

    // Dry run: counts, changes nothing.
    let v = json(&cli_on(
        &triage,
        &["dead-letter", "requeue", "--error", "WRONGTYPE", "--dry-run", "--json"],
    ));
    assert_eq!(
        (v["matched"].as_u64(), v["requeued"].as_u64(), v["dry_run"].as_bool()),
        (Some(100), Some(100), Some(true))
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 100);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 0);

    let _: () = conn.del(&key).await.expect("DEL");
    let v = json(&cli_on(
        &triage,
        &["dead-letter", "requeue", "--error", "WRONGTYPE", "--json"],
    ));
    assert_eq!((v["requeued"].as_u64(), v["skipped"].as_u64()), (Some(100), Some(0)));
    wait_drained(&db, Duration::from_secs(30)).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    // Requeued rows are due "now", so their score is the requeue time; the
    // members themselves are exactly the expected ones.
    let members = schedule_members(&redis_url, &prefix).await;
    let mut have: Vec<&String> = members.keys().collect();
    let mut want: Vec<&String> = expected.values().map(|(_, m, _)| m).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want);
    relay.stop().await;
}

#[tokio::test]
async fn requeue_racing_a_running_sweep_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    for j in &jobs {
        insert_dead(&db, *j, 2_000, "WRONGTYPE old trouble", "1 hour").await;
    }
    // Live traffic at the same time.
    seed(&db, 5_000, 5).await;
    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    let mut handles = Vec::new();
    for j in &jobs {
        let env = vec![("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone())];
        let job = j.to_string();
        handles.push(std::thread::spawn(move || {
            relay_command(&["dead-letter", "requeue", "--job", &job, "--json"], &env)
                .output()
                .expect("requeue")
        }));
    }
    let mut requeued = 0;
    for h in handles {
        let o = h.join().expect("requeue thread");
        requeued += json(&o)["requeued"].as_u64().unwrap_or(0);
    }
    assert_eq!(requeued, 8_000);
    wait_drained(&db, Duration::from_secs(120)).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 13_000, "each task exactly once");
    for j in &jobs {
        let n: i64 = conn_zcard(&redis_url, &format!("{}sched:{j}", &*prefix)).await;
        assert_eq!(n, 2_000);
    }
    relay.stop().await;
}

async fn conn_zcard(url: &str, key: &str) -> i64 {
    redis_conn(url).await.zcard(key).await.expect("ZCARD")
}

#[tokio::test]
async fn requeue_skips_tasks_already_in_the_outbox_and_refuses_bad_input() {
    let db = TestDb::new().await;
    let job = uuid::Uuid::new_v4();
    insert_dead(&db, job, 3, "WRONGTYPE x", "1 hour").await;
    let c = db.client().await;
    // One of the dead tasks was re-produced meanwhile.
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         SELECT task_id, job_id, page_id, host, path, priority, source_type, now() + interval '1 hour'
           FROM task_outbox_dead ORDER BY id LIMIT 1",
    )
    .await
    .expect("re-produce");
    let ids: Vec<i64> = c
        .query("SELECT id FROM task_outbox_dead ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Unknown id among known ones: clear error, nothing changes.
    let o = cli(&db, &["dead-letter", "requeue", "--id", &format!("{},999999", ids[1])]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no dead letter with id 999999"));
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 3);

    // --all needs --yes.
    let o = cli(&db, &["dead-letter", "requeue", "--all"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 3);

    // A job id the dead table's job_id column cannot hold names no dead
    // letter (job ids are text where jobs.id is TEXT): nothing matches.
    let v = json(&cli(&db, &["dead-letter", "requeue", "--job", "not-a-uuid", "--json"]));
    assert_eq!(v["matched"], 0, "{v}");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 3);

    // Usage errors: no selector, two selectors, bad duration.
    for args in [
        &["dead-letter", "requeue"][..],
        &["dead-letter", "requeue", "--all", "--job", &job.to_string()],
        &["dead-letter", "purge", "--older-than", "7 days"],
        &["dead-letter", "list", "--since", "-5m"],
    ] {
        let o = cli(&db, args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 3);

    let v = json(&cli(
        &db,
        &[
            "dead-letter",
            "requeue",
            "--id",
            &ids[0].to_string(),
            "--id",
            &ids[1].to_string(),
            "--json",
        ],
    ));
    assert_eq!(
        (v["matched"].as_u64(), v["requeued"].as_u64(), v["skipped"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        2,
        "no duplicate of the re-produced task"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead").await,
        2,
        "the skipped row stays"
    );
    let requeued = c
        .query_one(
            "SELECT attempts, run_at <= now() FROM task_outbox WHERE run_at <= now() + interval '1 minute'",
            &[],
        )
        .await
        .expect("requeued row");
    assert_eq!((requeued.get::<_, i32>(0), requeued.get::<_, bool>(1)), (0, true));
}

#[tokio::test]
async fn purge_deletes_only_older_rows_in_batches_and_dry_run_changes_nothing() {
    let db = TestDb::new().await;
    let job = uuid::Uuid::new_v4();
    insert_dead(&db, job, 2_500, "old", "10 days").await;
    insert_dead(&db, job, 10, "recent", "1 hour").await;

    let v = json(&cli(
        &db,
        &["dead-letter", "purge", "--older-than", "7d", "--dry-run", "--json"],
    ));
    assert_eq!((v["matched"].as_i64(), v["deleted"].as_u64()), (Some(2_500), Some(0)));
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 2_510);

    let o = cli(&db, &["dead-letter", "purge", "--older-than", "7d"]);
    assert_eq!(o.status.code(), Some(1), "purge without --yes refuses");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 2_510);

    let v = json(&cli(
        &db,
        &["dead-letter", "purge", "--older-than", "7d", "--yes", "--json"],
    ));
    assert_eq!(v["deleted"].as_u64(), Some(2_500));
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 10);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead WHERE last_error = 'recent'")
            .await,
        10
    );
}

#[tokio::test]
async fn retention_is_enforced_by_the_dead_letter_actor() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let job = uuid::Uuid::new_v4();
    insert_dead(&db, job, 1_500, "old", "3 days").await;
    insert_dead(&db, job, 7, "recent", "1 hour").await;
    let env = relay_env(
        &db,
        &shared_redis_url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_DEAD_LETTER__RETENTION", "2d"),
            ("OUTBOX_RELAY_DEAD_LETTER__PURGE_INTERVAL", "200ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("old dead letters purged", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox_dead").await == 7
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead WHERE last_error = 'recent'")
            .await,
        7
    );
    let purged: u64 = relay
        .records("dead letters purged by retention")
        .iter()
        .filter_map(|r| r["count"].as_u64())
        .sum();
    assert_eq!(purged, 1_500);
    relay.stop().await;
}
