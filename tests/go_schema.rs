//! Drop-in on the Go sweeper's production database (SPEC §3, issue #19):
//! TEXT ids in the outbox, UUID ids in the dead table, TEXT `jobs.id`,
//! checks on task_type and lighthouse routing, a foreign key to
//! `lighthouse_runs`, its own index names. These tests always build that
//! schema; `scripts/test` also runs the data tests on it
//! (`OUTBOX_TEST_SCHEMA=go`).

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

/// Column types, constraints and indexes of the outbox tables, as text.
async fn catalog(db: &TestDb) -> (Vec<String>, Vec<String>, Vec<String>) {
    let c = db.client().await;
    let col = |r: &tokio_postgres::Row| r.get::<_, String>(0);
    let columns = c
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' ||
                    COALESCE(column_default, '-')
               FROM information_schema.columns
              WHERE table_name IN ('task_outbox', 'task_outbox_dead', 'jobs') ORDER BY 1",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(col)
        .collect();
    let constraints = c
        .query(
            "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
               FROM pg_constraint
              WHERE conrelid IN ('task_outbox'::regclass, 'task_outbox_dead'::regclass, 'jobs'::regclass)
              ORDER BY 1",
            &[],
        )
        .await
        .expect("constraints")
        .iter()
        .map(col)
        .collect();
    let indexes = c
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename IN ('task_outbox', 'task_outbox_dead', 'jobs') ORDER BY 1",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(col)
        .collect();
    (columns, constraints, indexes)
}

#[tokio::test]
async fn migrate_adds_only_what_is_missing_and_dry_run_says_what_it_would_do() {
    let mut db = TestDb::empty().await;
    db.create_go_schema().await;
    let (columns, constraints, indexes) = catalog(&db).await;
    let env = vec![("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone())];

    let o = relay_command(&["migrate", "--dry-run"], &env)
        .output()
        .expect("migrate");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    for line in [
        "skip: CREATE TABLE IF NOT EXISTS task_outbox ( (table task_outbox exists)",
        "the existing index idx_task_outbox_run_at on task_outbox is equivalent",
        "the existing index idx_task_outbox_dead_job_id on task_outbox_dead is equivalent",
        "the existing index idx_task_outbox_dead_dead_lettered_at on task_outbox_dead is equivalent",
        "skip: CREATE TABLE IF NOT EXISTS jobs ( (table jobs exists)",
        "migration 2: run: CREATE TRIGGER task_outbox_notify",
        "migration 3: run: CREATE INDEX IF NOT EXISTS task_outbox_run_at_id_idx ON task_outbox (run_at, id)",
        "nothing changed",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
    assert_eq!(
        catalog(&db).await,
        (columns.clone(), constraints.clone(), indexes.clone())
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'outbox_relay_migrations'")
            .await,
        0,
        "a dry run creates nothing, not even the bookkeeping table"
    );

    let o = relay_command(&["migrate"], &env).output().expect("migrate");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (after_columns, after_constraints, after_indexes) = catalog(&db).await;
    assert_eq!(after_columns, columns, "no column type, nullability or default changed");
    assert_eq!(after_constraints, constraints, "no constraint changed");
    let added: Vec<&String> = after_indexes.iter().filter(|i| !indexes.contains(i)).collect();
    assert_eq!(added, ["task_outbox_run_at_id_idx"], "only the claim index is new");
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname = 'task_outbox_notify'")
            .await,
        1
    );
    // Twice is a no-op.
    let o = relay_command(&["migrate", "--dry-run"], &env)
        .output()
        .expect("migrate");
    assert!(String::from_utf8_lossy(&o.stdout).contains("dry run: 0 migrations would be applied"));
}

#[tokio::test]
async fn a_text_id_the_dead_table_cannot_hold_is_set_aside_without_blocking_the_others() {
    let db = TestDb::go().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let job = uuid::Uuid::new_v4();
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO jobs (id, status) VALUES ('{job}', 'running');
             INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at,
                                      task_type, lighthouse_run_id)
             SELECT gen_random_uuid(), '{job}', i, 'h', '/ok/' || i, 1, 's', now(),
                    CASE WHEN i % 5 = 0 THEN 'lighthouse' ELSE 'crawl' END,
                    CASE WHEN i % 5 = 0 THEN 7 END
               FROM generate_series(1, 200) i;
             -- Poison rows: one the dead table can hold, one it cannot
             -- (task_id is not a UUID), one lighthouse row with its run.
             INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at,
                                      task_type, lighthouse_run_id)
             VALUES (gen_random_uuid(), '{job}', 1, 'h', '/bad|1', 1, 's', now(), 'crawl', NULL),
                    ('legacy-task-1', '{job}', 2, 'h', '/bad|2', 1, 's', now(), 'crawl', NULL),
                    (gen_random_uuid(), '{job}', 3, 'h', '/bad|3', 1, 's', now(), 'lighthouse', 9);"
        ))
        .await
        .expect("rows");
    let url = db.url_as("outbox_relay").await;
    let env = relay_env_as(
        &db,
        &url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("due rows settled", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE run_at <> 'infinity'")
            .await
            == 0
    })
    .await;

    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 200, "every good row delivered");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead WHERE task_type = 'lighthouse' AND lighthouse_run_id = 9")
            .await,
        1,
        "a dead-lettered lighthouse row keeps its run"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM task_outbox
              WHERE task_id = 'legacy-task-1' AND run_at = 'infinity' AND attempts = 1"
        )
        .await,
        1,
        "the row the dead table cannot hold stays in the outbox, set aside"
    );
    wait_until(
        "the set-aside row is named in an error line",
        Duration::from_secs(10),
        || {
            let named = relay.records("set aside").iter().any(|r| {
                r["level"] == "error"
                    && r["reason"].as_str().is_some_and(|x| {
                        x.contains("\"legacy-task-1\"") && x.contains("task_outbox_dead.task_id (uuid)")
                    })
            });
            async move { named }
        },
    )
    .await;
    wait_until("metrics count it", Duration::from_secs(10), || async {
        let m = scrape(&relay).await;
        metric_value(&m, "outbox_relay_sweep_rows_total", &[("outcome", "set_aside")]) == Some(1.0)
            && metric_value(&m, "outbox_relay_set_aside_rows", &[]) == Some(1.0)
            && metric_value(&m, "outbox_relay_sweep_rows_total", &[("outcome", "dead_lettered")]) == Some(2.0)
    })
    .await;
    let o = relay_command(&["status", "--json"], &env).output().expect("status");
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    assert_eq!(st["set_aside_rows"], 1, "{st}");
    assert_eq!(st["future_rows"], 0, "{st}");
    relay.stop().await;
    assert_eq!(
        db.count("SELECT attempts::int8 FROM task_outbox WHERE task_id = 'legacy-task-1'")
            .await,
        1,
        "never claimed again: no hot retry loop"
    );
}

#[tokio::test]
async fn text_job_ids_drain_sync_and_cancel() {
    let db = TestDb::go().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    db.client()
        .await
        .batch_execute(
            "INSERT INTO jobs (id, status) VALUES ('site-42', 'running'), ('site-43', 'running');
             INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT 'task-' || i, CASE WHEN i % 2 = 0 THEN 'site-42' ELSE 'site-43' END, i, 'h', '/p/' || i,
                    1, 's', now()
               FROM generate_series(1, 100) i;",
        )
        .await
        .expect("rows");
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .hset_multiple(format!("{}running", &*prefix), &[("site-42", 3), ("site-43", 5)])
        .await
        .expect("HSET");
    let url = db.url_as("outbox_relay").await;
    let env = relay_env_as(
        &db,
        &url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(30)).await;
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 100);
    assert!(
        members.keys().any(|m| m.starts_with("task-2|site-42|2|h|/p/2|1.0000|")),
        "{members:?}"
    );
    wait_until("TEXT job ids synced", Duration::from_secs(30), || async {
        db.count("SELECT sum(running_tasks) FILTER (WHERE id = 'site-42') * 10 + sum(running_tasks) FILTER (WHERE id = 'site-43') FROM jobs")
            .await
            == 35
    })
    .await;

    // cancel-job with a TEXT id, as the triage role.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             VALUES ('late-1', 'site-42', 1, 'h', '/late', 1, 's', now() + interval '1 hour')",
        )
        .await
        .expect("late row");
    let triage = db.url_as("outbox_triage").await;
    let cancel_env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), triage),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.clone()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    let o = relay_command(&["cancel-job", "site-42", "--json"], &cancel_env)
        .output()
        .expect("cancel-job");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["outbox_rows_deleted"], 1, "{v}");
    assert_eq!(v["schedule_key"], format!("{}sched:site-42", &*prefix));
    let exists: bool = conn.exists(format!("{}sched:site-42", &*prefix)).await.expect("EXISTS");
    assert!(!exists, "the schedule is gone");
    assert_eq!(
        db.count("SELECT count(*) FROM jobs WHERE id = 'site-42' AND status = 'cancelled'")
            .await,
        1
    );
    relay.stop().await;
}

#[tokio::test]
async fn requeue_leaves_a_lighthouse_row_whose_run_is_gone() {
    let db = TestDb::go().await;
    let job = uuid::Uuid::new_v4();
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO lighthouse_runs (id, job_id) VALUES (5001, '{job}'), (5002, '{job}');
             INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority, source_type,
                                           run_at, attempts, created_at, task_type, lighthouse_run_id, last_error)
             VALUES (1, gen_random_uuid(), '{job}', 1, 'h', '/a', 1, 's', now(), 3, now(), 'lighthouse', 5001, 'WRONGTYPE'),
                    (2, gen_random_uuid(), '{job}', 2, 'h', '/b', 1, 's', now(), 3, now(), 'lighthouse', 5002, 'WRONGTYPE'),
                    (3, gen_random_uuid(), '{job}', 3, 'h', '/c', 1, 's', now(), 3, now(), 'crawl', NULL, 'WRONGTYPE');
             DELETE FROM lighthouse_runs WHERE id = 5002;"
        ))
        .await
        .expect("dead letters");
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead WHERE lighthouse_run_id IS NULL AND task_type = 'lighthouse'")
            .await,
        1,
        "the dead table's foreign key set the run id NULL"
    );
    let env = vec![(
        "OUTBOX_RELAY_DATABASE__URL".to_string(),
        db.url_as("outbox_triage").await,
    )];
    let o = relay_command(&["dead-letter", "requeue", "--job", &job.to_string(), "--json"], &env)
        .output()
        .expect("requeue");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(
        (&v["matched"], &v["requeued"], &v["skipped"], &v["lighthouse_run_gone"]),
        (&3.into(), &2.into(), &1.into(), &1.into()),
        "{v}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE task_type = 'lighthouse' AND lighthouse_run_id = 5001")
            .await,
        1
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 1);
}

#[tokio::test]
async fn a_schema_the_relay_cannot_work_with_is_named_line_by_line() {
    let db = TestDb::go().await;
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE task_outbox_dead DROP COLUMN last_error;
             ALTER TABLE jobs ALTER COLUMN id TYPE bigint USING 0;",
        )
        .await
        .expect("break the schema");
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), shared_redis_url()),
    ];
    for args in [&["run"][..], &["check-config"], &["status"]] {
        let o = relay_command(args, &env).output().expect("relay");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("Postgres at")).collect();
        assert_eq!(lines.len(), 2, "{args:?}: {err}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("column task_outbox_dead.last_error is missing")),
            "{err}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("column jobs.id has type bigint; the relay works with uuid or text ids")),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A cascading delete of a `lighthouse_runs` row while a tick holds that
/// run's outbox rows, which must stay (their ZADD fails): a delete claim's
/// put-back INSERT checks the foreign key again, waiting for the deleter's
/// lock on the run while the deleter waits for the tick's row locks, and
/// Postgres aborts one of them (40P01). With a foreign key on task_outbox
/// the relay claims by locking: the retried rows are updated, not
/// re-inserted, no foreign key is checked, and both finish.
#[tokio::test]
async fn a_cascading_delete_during_a_tick_does_not_deadlock() {
    let db = TestDb::go().await;
    let prefix = key_prefix();
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    let job = "job-of-run-7";
    let c = db.client().await;
    c.batch_execute(&format!(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at,
                                  task_type, lighthouse_run_id)
         SELECT gen_random_uuid(), '{job}', i, 'h', '/p' || i, 1, 's', now(), 'lighthouse', 7
           FROM generate_series(1, 20) i"
    ))
    .await
    .expect("rows of run 7");
    // Their ZADDs fail (WRONGTYPE), so the rows stay in the outbox.
    let mut conn = redis_conn(&server.url()).await;
    let _: () = conn
        .set(format!("{}sched:{job}", &*prefix), "not a sorted set")
        .await
        .expect("SET");
    proxy.hold_when(job);

    let mut relay = RelayProcess::spawn(&relay_env(&db, &proxy.url(), &prefix, &[]));
    relay.wait_started().await;
    wait_until("the tick's write is held", Duration::from_secs(30), || async {
        proxy.held() >= 1
    })
    .await;
    // The tick holds the rows; the cascade waits for them.
    let deleter = {
        let url = db.url.clone();
        tokio::spawn(async move {
            pg_connect(&url)
                .await
                .execute("DELETE FROM lighthouse_runs WHERE id = 7", &[])
                .await
                .map_err(|e| {
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or(e.to_string())
                })
        })
    };
    wait_lock_waiter(
        &db,
        "DELETE FROM lighthouse_runs",
        "the cascade waits for the tick's rows",
    )
    .await;
    proxy.release();
    let deleted = tokio::time::timeout(Duration::from_secs(30), deleter)
        .await
        .expect("the cascading delete finished")
        .expect("task");
    assert_eq!(deleted, Ok(1), "the cascading delete");
    wait_until("the run's rows went with it", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    assert!(
        relay.lines().iter().all(|l| !l.contains("deadlock detected")),
        "{:#?}",
        relay.lines()
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}
