//! `cancel-job`: allowed states, idempotence, clear refusals, and no
//! schedule entry left behind by a sweep draining at the same moment.

use crate::common;

use std::process::Output;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;

fn cancel(db: &TestDb, redis_url: &str, prefix: &str, job: &str) -> Output {
    cancel_on(&db.url, redis_url, prefix, job)
}

/// `cancel-job` connecting with `db_url` (e.g. as the triage role).
fn cancel_on(db_url: &str, redis_url: &str, prefix: &str, job: &str) -> Output {
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db_url.to_string()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.to_string()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    relay_command(&["cancel-job", job, "--json"], &env)
        .output()
        .expect("cancel-job")
}

#[tokio::test]
async fn cancel_job_states_and_refusals() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let statuses = ["pending", "running", "paused", "initialising", "completed", "failed"];
    let ids: Vec<Uuid> = statuses.iter().map(|_| Uuid::new_v4()).collect();
    let c = db.client().await;
    for (id, st) in ids.iter().zip(statuses) {
        c.execute("INSERT INTO jobs (id, status) VALUES ($1::uuid, $2)", &[id, &st])
            .await
            .expect("job");
        c.execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT gen_random_uuid(), $1::uuid, i, 'h', '/x', 1, 's', now() + interval '1 hour' FROM generate_series(1, 3) i",
            &[id],
        )
        .await
        .expect("rows");
    }
    let mut conn = redis_conn(&redis_url).await;
    let running = ids[1];
    let key = format!("{}sched:{running}", &*prefix);
    let _: () = conn.zadd(&key, "m", 1).await.expect("ZADD");
    let _: () = conn
        .hset(format!("{}running", &*prefix), running.to_string(), 4)
        .await
        .expect("HSET");

    for (id, st) in ids.iter().zip(statuses).take(4) {
        let o = cancel(&db, &redis_url, &prefix, &id.to_string());
        assert!(o.status.success(), "{st}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["outbox_rows_deleted"], 3, "{st}");
        assert_eq!(v["already_cancelled"], false);
        let row = c
            .query_one(
                "SELECT status, completed_at IS NOT NULL FROM jobs WHERE id::text = $1::uuid::text",
                &[id],
            )
            .await
            .expect("job");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, bool>(1)),
            ("cancelled".to_string(), true)
        );
    }
    assert!(
        !conn.exists::<_, bool>(&key).await.expect("EXISTS"),
        "schedule key removed"
    );
    let field: Option<i64> = conn
        .hget(format!("{}running", &*prefix), running.to_string())
        .await
        .expect("HGET");
    assert_eq!(field, None, "running counter field removed");

    // Again: a no-op success.
    let o = cancel(&db, &redis_url, &prefix, &running.to_string());
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["already_cancelled"].as_bool(), v["outbox_rows_deleted"].as_u64()),
        (Some(true), Some(0))
    );

    for (id, st) in ids.iter().zip(statuses).skip(4) {
        let o = cancel(&db, &redis_url, &prefix, &id.to_string());
        assert_eq!(o.status.code(), Some(1), "{st}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("is {st}")));
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{id}'"))
                .await,
            3,
            "{st} untouched"
        );
    }
    let o = cancel(&db, &redis_url, &prefix, &Uuid::new_v4().to_string());
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no job with id"));
    // Any text is a job id where jobs.id is TEXT (the Go schema); where it
    // is a UUID, an id that is not one simply names no job.
    let o = cancel(&db, &redis_url, &prefix, "not-a-uuid");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no job with id not-a-uuid"));
}

/// One job's cancel fence never refuses another job's rows, whatever the
/// prefix (untagged, or tagged as docs/redis.md advises for a cluster) and the
/// job ids (on the Go schema, TEXT ids sharing a `{tag}`). Before each
/// job had a fence of its own, a tagged prefix gave every job the fence
/// `{t}:cancelled:{t}`: after one cancel, every other job's rows were
/// deleted unsent.
async fn a_cancel_fences_only_its_own_job(prefix: Prefix) {
    let db = TestDb::new().await;
    let redis_url = shared_redis_url();
    // TEXT job ids (Go schema) may hold braces; on a UUID column they are UUIDs.
    let (a, b) = if db.go {
        ("job{x}-a".to_string(), "job{x}-b".to_string())
    } else {
        (Uuid::new_v4().to_string(), Uuid::new_v4().to_string())
    };
    let c = db.client().await;
    for j in [&a, &b] {
        c.batch_execute(&format!("INSERT INTO jobs (id, status) VALUES ('{j}', 'running')"))
            .await
            .expect("job");
    }
    let o = cancel(&db, &redis_url, &prefix, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.batch_execute(&format!(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         SELECT gen_random_uuid(), '{b}', i, 'h', '/p' || i, 1, 's', now() FROM generate_series(1, 500) i"
    ))
    .await
    .expect("rows of job B");

    let mut relay = RelayProcess::spawn(&relay_env(&db, &redis_url, &prefix, &[]));
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let mut conn = redis_conn(&redis_url).await;
    let depth: i64 = conn.zcard(format!("{}sched:{b}", &*prefix)).await.expect("ZCARD");
    let dead = db.count("SELECT count(*) FROM task_outbox_dead").await;
    assert_eq!(
        (depth, dead),
        (500, 0),
        "job B's rows after job A's cancel under prefix {:?}",
        &*prefix
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_cancel_fences_only_its_own_job_untagged_prefix() {
    a_cancel_fences_only_its_own_job(key_prefix()).await;
}

#[tokio::test]
async fn a_cancel_fences_only_its_own_job_tagged_prefix() {
    a_cancel_fences_only_its_own_job(tagged_key_prefix()).await;
}

async fn cancel_during_a_drain_leaves_no_schedule_entry_behind(prefix: Prefix) {
    let db = TestDb::new().await;
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 30_000, 3).await;
    let victim = jobs[0];
    let c = db.client().await;
    for j in &jobs {
        c.execute("INSERT INTO jobs (id, status) VALUES ($1::uuid, 'running')", &[j])
            .await
            .expect("job");
    }
    // Least privilege: the relays as outbox_relay, cancel-job as outbox_triage.
    let relay_url = db.url_as("outbox_relay").await;
    let triage_url = db.url_as("outbox_triage").await;
    let env = relay_env_as(
        &db,
        &relay_url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "300")],
    );
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;
    let key = format!("{}sched:{victim}", &*prefix);
    let mut conn = redis_conn(&redis_url).await;
    wait_until("the victim's schedule is filling", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { conn.zcard::<_, i64>(&key).await.unwrap_or(0) > 100 }
    })
    .await;
    let o = cancel_on(&triage_url, &redis_url, &prefix, &victim.to_string());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        conn.zcard::<_, i64>(&key).await.expect("ZCARD"),
        0,
        "nothing left right after cancel-job returned"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        v["outbox_rows_deleted"].as_u64().unwrap_or(0) > 0,
        "cancelled mid-drain: {v}"
    );

    wait_drained(&db, Duration::from_secs(120)).await;
    assert_eq!(
        conn.zcard::<_, i64>(&key).await.expect("ZCARD"),
        0,
        "no late entry from a sweep"
    );
    for j in &jobs[1..] {
        assert_eq!(
            conn.zcard::<_, i64>(format!("{}sched:{j}", &*prefix))
                .await
                .expect("ZCARD"),
            10_000
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A tick sends the job's ZADD into a black hole (the proxy holds it, as a
/// stalled Redis or a partitioned network would), passes its deadline and
/// rolls back; `cancel-job` (straight to Redis) then cancels the job. When
/// the held write finally reaches Redis, the job's cancel fence refuses it:
/// the cancelled schedule is not recreated. Later rows of the job (a
/// producer racing the cancel) are deleted unsent, counted as cancelled.
async fn a_zadd_stuck_past_its_tick_cannot_resurrect_a_cancelled_job(prefix: Prefix) {
    let db = TestDb::new().await;
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    let job = Uuid::new_v4();
    let c = db.client().await;
    c.execute("INSERT INTO jobs (id, status) VALUES ($1::uuid, 'running')", &[&job])
        .await
        .expect("job");
    proxy.hold_when(&job.to_string());
    let rows = |n: i32| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 SELECT gen_random_uuid(), $1::uuid, i, 'h', '/x', 1, 's', now() FROM generate_series(1, $2) i",
                &[&job, &n],
            )
            .await
            .expect("rows");
        }
    };
    rows(20).await;

    let env = relay_env(
        &db,
        &proxy.url(),
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "1s")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the job's write is held in flight", Duration::from_secs(30), || async {
        proxy.held() >= 1
    })
    .await;
    wait_until("the tick gave up and rolled back", Duration::from_secs(30), || {
        let relay = &relay;
        async move { !relay.records("sweep tick failed").is_empty() }
    })
    .await;

    let o = cancel(&db, &server.url(), &prefix, &job.to_string());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["outbox_rows_deleted"], 20, "the rolled-back tick's rows are deleted");

    // The stuck write arrives now, after the cancel.
    proxy.release();
    wait_until("the held write reached Redis", Duration::from_secs(30), || async {
        proxy.held_answered() >= 1
    })
    .await;
    let key = format!("{}sched:{job}", &*prefix);
    let mut conn = redis_conn(&server.url()).await;
    let exists: bool = conn.exists(&key).await.expect("EXISTS");
    assert!(!exists, "a write sent before cancel-job recreated {key}");

    // A producer racing the cancel: its rows are deleted unsent.
    rows(5).await;
    wait_until(
        "late rows of the cancelled job are cleared",
        Duration::from_secs(30),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    let exists: bool = conn.exists(&key).await.expect("EXISTS");
    assert!(!exists, "late rows recreated {key}");
    let (_, scrape) = relay.http_get("/metrics").await.expect("scrape");
    assert_eq!(
        metric_value(&scrape, "outbox_relay_sweep_rows_total", &[("outcome", "cancelled")]),
        Some(5.0)
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn cancel_during_a_drain_leaves_no_schedule_entry_behind_untagged_prefix() {
    cancel_during_a_drain_leaves_no_schedule_entry_behind(key_prefix()).await;
}

#[tokio::test]
async fn cancel_during_a_drain_leaves_no_schedule_entry_behind_tagged_prefix() {
    cancel_during_a_drain_leaves_no_schedule_entry_behind(tagged_key_prefix()).await;
}

#[tokio::test]
async fn a_zadd_stuck_past_its_tick_cannot_resurrect_a_cancelled_job_untagged_prefix() {
    a_zadd_stuck_past_its_tick_cannot_resurrect_a_cancelled_job(key_prefix()).await;
}

#[tokio::test]
async fn a_zadd_stuck_past_its_tick_cannot_resurrect_a_cancelled_job_tagged_prefix() {
    a_zadd_stuck_past_its_tick_cannot_resurrect_a_cancelled_job(tagged_key_prefix()).await;
}

/// `cancel-job` while a tick holds rows of the job that must stay (their
/// ZADD fails, so a delete claim puts them back as new row versions that
/// the cancel's DELETE, waiting for the tick, cannot see). One DELETE is
/// enough: the rows put back meet the job's cancel fence at their next
/// claim and are deleted unsent, counted as cancelled; nothing reaches
/// Redis.
#[tokio::test]
async fn rows_put_back_while_cancel_job_waits_are_cleared_by_the_fence() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    let job = Uuid::new_v4();
    let c = db.client().await;
    c.batch_execute(&format!(
        "INSERT INTO jobs (id, status) VALUES ('{job}', 'running');
         INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         SELECT gen_random_uuid(), '{job}', i, 'h', '/p' || i, 1, 's', now() FROM generate_series(1, 20) i"
    ))
    .await
    .expect("job and rows");
    let key = format!("{}sched:{job}", &*prefix);
    let mut conn = redis_conn(&server.url()).await;
    let _: () = conn.set(&key, "not a sorted set").await.expect("SET");
    proxy.hold_when(&job.to_string());

    let env = relay_env(
        &db,
        &proxy.url(),
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the tick's write is held", Duration::from_secs(30), || async {
        proxy.held() >= 1
    })
    .await;
    let canceller = {
        let (db_url, redis_url, prefix) = (db.url.clone(), server.url(), prefix.to_string());
        let job = job.to_string();
        tokio::task::spawn_blocking(move || cancel_on(&db_url, &redis_url, &prefix, &job))
    };
    wait_lock_waiter(&db, "DELETE FROM task_outbox", "cancel-job waits for the tick's rows").await;
    proxy.release();
    let o = canceller.await.expect("cancel-job");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    wait_until("the rows put back are cleared", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    assert!(!conn.exists::<_, bool>(&key).await.expect("EXISTS"), "{key} exists");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let (_, scrape) = relay.http_get("/metrics").await.expect("scrape");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let cancelled = metric_value(&scrape, "outbox_relay_sweep_rows_total", &[("outcome", "cancelled")]).unwrap_or(0.0);
    // The premise: the tick put the rows back after cancel-job's DELETE
    // had looked, so that DELETE found none of them. (On the Go schema the
    // relay claims by locking, its foreign key: the retried rows are
    // updated in place and the DELETE takes them.)
    if !db.go {
        assert_eq!(v["outbox_rows_deleted"], 0, "{v}");
    }
    assert_eq!(
        v["outbox_rows_deleted"].as_u64().unwrap_or(0) as f64 + cancelled,
        20.0,
        "every row deleted once, by cancel-job or unsent by the sweep: {v}, {cancelled} cancelled"
    );
    relay.stop().await;
}

/// With `redis.wait_replicas > 0`, cancel-job waits for that many replicas
/// to hold the fence and the schedule's removal (`WAIT`), as the relay's
/// writes do: without it, a failover right after a cancel could promote a
/// replica that still had the schedule and not the fence (#38 code-read
/// item 1). With no replica to acknowledge, it says so and fails (exit 1;
/// Postgres is cancelled, run it again); with one, the replica holds the
/// fence when it returns.
#[tokio::test]
async fn cancel_job_waits_for_the_replicas_it_is_told_to() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let primary = RedisServer::start().await;
    let job = Uuid::new_v4();
    db.client()
        .await
        .execute("INSERT INTO jobs (id, status) VALUES ($1::uuid, 'running')", &[&job])
        .await
        .expect("job");
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), primary.url()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
        ("OUTBOX_RELAY_REDIS__WAIT_REPLICAS".to_string(), "1".to_string()),
    ];
    let run = || {
        relay_command(&["cancel-job", &job.to_string(), "--json"], &env)
            .output()
            .expect("cancel-job")
    };
    let alone = run();
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success(), "no replica acknowledged: {stderr}");
    assert!(
        stderr.contains("0 of 1 replicas") && stderr.contains("run cancel-job again"),
        "{stderr}"
    );

    let replica = RedisServer::start_replica_of(primary.port).await;
    let mut on_replica = redis_conn(&replica.url()).await;
    wait_until("the replica is in sync", Duration::from_secs(30), || async {
        let mut c = redis_conn(&replica.url()).await;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    let synced = run();
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    let key = format!("{}sched:{job}", &*prefix);
    let fence = outbox_relay::domain::cancel_fence_key(&prefix, &key);
    let fenced: bool = on_replica.exists(&fence).await.expect("EXISTS");
    assert!(fenced, "the replica holds {fence} when cancel-job returns");
}
