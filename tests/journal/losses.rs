//! Redis loses data; the relay notices and writes the lost entries again:
//! a restart without persistence (with and without
//! `journal.still_pending`), a Sentinel failover at `wait_replicas = 0`
//! with replication cut, a `FLUSHALL` under a running relay; and on demand
//! (`reconcile`), with a cancelled job's entries left lost and a pause
//! holding entries back; Redis or Postgres frozen in the middle of one,
//! Postgres stopped or refusing.

use crate::common;

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::{delivered, delivered_by, journal_rows, reconcile, with, JOURNAL};
use common::*;

/// A Redis restarted without persistence after 10,000 journaled
/// deliveries, 200 of which a consumer took and marked done.
async fn restart_after_consumers_took_200(still_pending: bool) -> (usize, usize) {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE app_tasks (id TEXT PRIMARY KEY, status TEXT NOT NULL);
             ALTER TABLE app_tasks OWNER TO CURRENT_USER",
        )
        .await
        .expect("the application's table");
    let sql = "SELECT id FROM app_tasks WHERE id = ANY($1) AND status = 'pending'";
    let extra: &[(&str, &str)] = if still_pending {
        &[("OUTBOX_RELAY_JOURNAL__STILL_PENDING", sql)]
    } else {
        &[]
    };
    let (relay, members) = delivered(&db, &redis.url(), &prefix, 10_000, extra).await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO app_tasks SELECT unnest(task_ids), 'pending' FROM outbox_relay_journal")
        .await
        .expect("the tasks");
    // A consumer takes 200 entries and finishes their tasks.
    let taken: Vec<(String, String, String)> = c
        .query(
            "SELECT e.task, e.key, e.member
               FROM outbox_relay_journal, unnest(outbox_ids, task_ids, schedule_keys, members) AS e(id, task, key, member)
              ORDER BY e.id LIMIT 200",
            &[],
        )
        .await
        .expect("pick 200")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut conn = redis_conn(&redis.url()).await;
    for (task, key, member) in &taken {
        let removed: i64 = conn.zrem(key, member).await.expect("ZREM");
        assert_eq!(removed, 1);
        c.execute("UPDATE app_tasks SET status = 'done' WHERE id = $1", &[task])
            .await
            .expect("done");
    }
    // Redis restarts with nothing on disk.
    redis.stop();
    redis.resume().await;
    let expected = if still_pending { 9_800 } else { 10_000 };
    wait_until("the lost entries written again", Duration::from_secs(90), || async {
        schedule_members(&redis.url(), &prefix).await.len() >= expected
    })
    .await;
    wait_until("the reconcile's summary", Duration::from_secs(30), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    let back = schedule_members(&redis.url(), &prefix).await;
    let loss = relay.records("redis lost data");
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert_eq!(loss[0]["cause"], "restart");
    assert_eq!(
        relay
            .metric("outbox_relay_redis_data_loss_total", &[("cause", "restart")])
            .await,
        Some(1.0)
    );
    for (member, score) in &back {
        assert_eq!(members.get(member), Some(score), "written again as it was: {member}");
    }
    let taken_back = taken.iter().filter(|(_, _, m)| back.contains_key(m)).count();
    relay.stop().await;
    (back.len(), taken_back)
}

#[tokio::test]
async fn a_restart_without_persistence_gets_back_what_is_still_pending() {
    let (back, taken_back) = restart_after_consumers_took_200(true).await;
    assert_eq!((back, taken_back), (9_800, 0));
}

#[tokio::test]
async fn a_restart_without_persistence_gets_everything_back_without_still_pending() {
    // At-least-once: the 200 a consumer took come back too.
    let (back, taken_back) = restart_after_consumers_took_200(false).await;
    assert_eq!((back, taken_back), (10_000, 200));
}

#[tokio::test]
async fn flushall_then_reconcile_restores_once() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (relay, members) = delivered(&db, &redis.url(), &prefix, 500, &[]).await;
    relay.stop().await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    let env = relay_env(&db, &redis.url(), &prefix, JOURNAL);

    let dry = reconcile(&env, &["--dry-run"]);
    assert_eq!(
        (dry["missing"].as_u64(), dry["written"].as_u64()),
        (Some(500), Some(500)),
        "{dry}"
    );
    assert!(
        schedule_members(&redis.url(), &prefix).await.is_empty(),
        "a dry run writes nothing"
    );

    // A pause holds the entries back, as it holds the rows.
    let pause = relay_command(&["pause", "--reason", "INC-42"], &env)
        .output()
        .expect("pause");
    assert!(pause.status.success(), "{}", String::from_utf8_lossy(&pause.stderr));
    let held = relay_command(&["reconcile", "--json"], &env)
        .output()
        .expect("reconcile");
    assert_eq!(held.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&held.stdout).expect("the report");
    assert_eq!(
        (report["paused"].as_u64(), report["written"].as_u64()),
        (Some(500), Some(0)),
        "{report}"
    );
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("after `outbox-relay resume`"),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());
    let resume = relay_command(&["resume"], &env).output().expect("resume");
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));

    let done = reconcile(&env, &[]);
    assert_eq!(
        (done["examined"].as_u64(), done["written"].as_u64()),
        (Some(500), Some(500)),
        "{done}"
    );
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);

    let again = reconcile(&env, &[]);
    assert_eq!(
        (again["present"].as_u64(), again["written"].as_u64()),
        (Some(500), Some(0)),
        "{again}"
    );

    // --job and --since narrow it.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    let job: String = db
        .client()
        .await
        .query_one("SELECT job_ids[1] FROM outbox_relay_journal LIMIT 1", &[])
        .await
        .expect("a job")
        .get(0);
    let one = reconcile(&env, &["--job", &job, "--since", "1h"]);
    let of_job = db
        .count(&format!(
            "SELECT count(*) FROM outbox_relay_journal, unnest(job_ids) AS j WHERE j = '{job}'"
        ))
        .await;
    assert_eq!(one["written"].as_i64(), Some(of_job), "{one}");
    let none = reconcile(&env, &["--since", "0s"]);
    assert_eq!(none["examined"].as_u64(), Some(0), "{none}");
}

#[tokio::test]
async fn a_flushall_is_noticed_and_repaired_by_the_running_relay() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (relay, members) = delivered(&db, &redis.url(), &prefix, 500, &[]).await;
    // The watch has looked at least once with the marker there.
    wait_for_marker(&redis.url(), &prefix).await;
    // At once: the look that wrote the marker is the one compared with
    // (the first review found a FLUSHALL right after it went unseen).
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    let flushed = Instant::now();
    wait_until("the entries written again", Duration::from_secs(60), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    let took = flushed.elapsed();
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    let loss = relay.records("redis lost data");
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert_eq!(loss[0]["cause"], "vanished");
    eprintln!(
        "restored {} entries {:.1}s after the FLUSHALL",
        members.len(),
        took.as_secs_f64()
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_cancelled_jobs_entries_stay_lost() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let jobs = new_jobs(2);
    for j in &jobs {
        running_job(&db, j).await;
    }
    seed_for(&db, 400, &jobs).await;
    let env = relay_env(&db, &redis.url(), &prefix, JOURNAL);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained_by(&db, Duration::from_secs(60), &relay).await;
    wait_until("journaled", Duration::from_secs(30), || async {
        journal_rows(&db).await == 400
    })
    .await;
    relay.stop().await;
    let cancelled = jobs[0].to_string();
    let out = relay_command(&["cancel-job", &cancelled], &env)
        .output()
        .expect("cancel-job");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The FLUSHALL takes the cancel fence too: the journal must not bring
    // the cancelled job back.
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    let report = reconcile(&env, &[]);
    let of_cancelled = db
        .count(&format!(
            "SELECT count(*) FROM outbox_relay_journal, unnest(job_ids) AS j WHERE j = '{cancelled}'"
        ))
        .await;
    assert!(of_cancelled > 0);
    assert_eq!(report["cancelled"].as_i64(), Some(of_cancelled), "{report}");
    assert_eq!(report["written"].as_i64(), Some(400 - of_cancelled), "{report}");
    let gone: bool = conn
        .exists(format!("{}sched:{cancelled}", &*prefix))
        .await
        .expect("EXISTS");
    assert!(!gone, "the cancelled job's schedule came back");
    let kept: bool = conn
        .exists(format!("{}sched:{}", &*prefix, jobs[1]))
        .await
        .expect("EXISTS");
    assert!(kept);
}

/// Sentinel at `wait_replicas = 0`: replication is cut (the replica's
/// user disabled on the master, its link killed) while a second batch is
/// delivered, then the master is killed and the replica promoted. The
/// promoted replica lacks exactly the second batch; the relay notices the
/// failover by its `master_replid2`, and writes back that batch and
/// nothing else: the first, which the new master has, is not even looked
/// at again.
#[tokio::test]
async fn a_failover_with_replication_paused_gets_every_lost_entry_back() {
    let mut master = RedisServer::start().await;
    let mut m = redis_conn(&master.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "repl",
            "on",
            ">replpw",
            "+psync",
            "+replconf",
            "+ping",
            "+sync",
        ])
        .query_async(&mut m)
        .await
        .expect("the replication user");
    let port = master.port.to_string();
    let replica = RedisServer::start_with_args(&[
        "--replicaof",
        "127.0.0.1",
        &port,
        "--masteruser",
        "repl",
        "--masterauth",
        "replpw",
    ])
    .await;
    let sentinel = RedisSentinel::start(master.port).await;
    wait_until("the sentinel knows the replica", Duration::from_secs(30), || async {
        sentinel.replicas().await == 1
    })
    .await;
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut env = shipped_env(&db.url, "redis://127.0.0.1:1/0", &prefix);
    for (k, v) in [
        ("OUTBOX_RELAY_REDIS__MODE", "sentinel".to_string()),
        ("OUTBOX_RELAY_REDIS__SENTINEL_MASTER", RedisSentinel::MASTER.to_string()),
        ("OUTBOX_RELAY_REDIS__SENTINEL_URLS", sentinel.url()),
        ("OUTBOX_RELAY_JOURNAL__KEEP", "1h".to_string()),
        ("OUTBOX_RELAY_JOURNAL__WATCH_INTERVAL", "1s".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let jobs = new_jobs(5);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    seed_for(&db, 500, &jobs).await;
    wait_drained_by(&db, Duration::from_secs(60), &relay).await;
    wait_until("the replica has the first batch", Duration::from_secs(30), || async {
        schedule_members(&replica.url(), &prefix).await.len() == 500
    })
    .await;

    // Replication stops: the replica cannot log in again.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "repl", "off"])
        .query_async(&mut m)
        .await
        .expect("ACL SETUSER repl off");
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "repl"])
        .query_async(&mut m)
        .await
        .expect("CLIENT KILL USER repl");
    seed_for(&db, 500, &jobs).await;
    wait_drained_by(&db, Duration::from_secs(60), &relay).await;
    wait_until("both batches journaled", Duration::from_secs(30), || async {
        journal_rows(&db).await == 1_000
    })
    .await;
    let all = schedule_members(&master.url(), &prefix).await;
    assert_eq!(all.len(), 1_000);
    assert_eq!(
        schedule_members(&replica.url(), &prefix).await.len(),
        500,
        "replication was not cut"
    );

    master.stop();
    wait_until("the sentinel promotes the replica", Duration::from_secs(90), || async {
        sentinel.master_port().await == Some(replica.port)
    })
    .await;
    wait_until("the lost batch written again", Duration::from_secs(90), || async {
        schedule_members(&replica.url(), &prefix).await.len() == 1_000
    })
    .await;
    wait_until("the reconcile's summary", Duration::from_secs(30), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    assert_eq!(schedule_members(&replica.url(), &prefix).await, all);
    let loss = relay.records("redis lost data");
    assert_eq!(loss.len(), 1, "{loss:?}");
    assert_eq!(loss[0]["cause"], "failover");
    let summary = &relay.records("journal reconciled")[0];
    assert_eq!(
        (summary["examined"].as_u64(), summary["written"].as_u64()),
        (Some(500), Some(500)),
        "only the batch the replica lacked: {summary}"
    );
    assert_eq!(
        relay
            .metric("outbox_relay_redis_data_loss_total", &[("cause", "failover")])
            .await,
        Some(1.0)
    );
    relay.stop().await;
}

/// Redis frozen (SIGSTOP) in the middle of a reconcile for longer than a
/// page may take: the reconcile gives up, the relay neither exits nor
/// wedges, and once Redis thaws the next round writes back the rest.
#[tokio::test]
async fn a_redis_frozen_mid_reconcile_is_waited_out() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    redis.pause();
    let frozen = Instant::now();
    wait_until("the reconcile gives up", Duration::from_secs(120), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    let gave_up = frozen.elapsed();
    redis.unpause();
    assert!(relay.is_running(), "{:#?}", relay.lines());
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    wait_until("the reconcile's summary", Duration::from_secs(30), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    eprintln!("the reconcile gave up {:.1}s into the freeze", gave_up.as_secs_f64());
    relay.stop().await;
}

/// Postgres frozen (SIGSTOP: every backend, nothing answers, no socket
/// closes) in the middle of a reconcile: the page read it waits on is
/// bounded, so the reconcile gives up instead of holding the journal actor;
/// the relay neither exits nor wedges, and once Postgres thaws the next
/// round writes back the rest, exactly once.
#[tokio::test]
async fn a_postgres_frozen_mid_reconcile_is_waited_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    let frozen = pg.freeze();
    let at = Instant::now();
    wait_until("the reconcile gives up", Duration::from_secs(120), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    let gave_up = at.elapsed();
    // Not all of it: the freeze caught it in the middle.
    let before_thaw = schedule_members(&redis.url(), &prefix).await.len();
    drop(frozen);
    assert!(relay.is_running(), "{:#?}", relay.lines());
    assert!(before_thaw < members.len(), "the reconcile finished before the freeze");
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    wait_until("the reconcile's summary", Duration::from_secs(60), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    eprintln!("the reconcile gave up {:.1}s into the freeze", gave_up.as_secs_f64());
    relay.stop().await;
}

/// Postgres stopped (`pg_ctl stop -m fast`: every session cut) in the
/// middle of a reconcile: it fails at once, the loss stays pending, and
/// once Postgres is back a later try writes back the rest, exactly once.
#[tokio::test]
async fn a_postgres_stopped_mid_reconcile_is_waited_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    pg.stop();
    wait_until("the reconcile fails", Duration::from_secs(60), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    assert!(schedule_members(&redis.url(), &prefix).await.len() < members.len());
    pg.start_again().await;
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    assert!(relay.is_running(), "{:#?}", relay.lines());
    relay.stop().await;
}

/// Postgres refusing the reconcile's reads (the relay's role lost SELECT
/// on the journal) for as long as it lasts: one warning that names the
/// error, then retries further and further apart (each an info line, not a
/// warning every round), and once the grant is back the next try writes
/// everything back.
#[tokio::test]
async fn a_reconcile_postgres_refuses_backs_off_quietly_until_the_grant() {
    let db = TestDb::new().await;
    let relay_url = db.url_as("outbox_relay").await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let env = relay_env_as(&db, &relay_url, &redis.url(), &prefix, &with(&[]));
    let (relay, members) = delivered_by(&db, &env, &redis.url(), &prefix, 2_000).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let admin = db.client().await;
    admin
        .batch_execute("REVOKE SELECT ON outbox_relay_journal FROM outbox_relay")
        .await
        .expect("REVOKE");
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    // Three tries refused: at the loss, then 5 s and 10 s further on.
    wait_until("three refused tries", Duration::from_secs(90), || async {
        relay.records("journal reconcile failed").len() >= 3
    })
    .await;
    let tries = relay.records("journal reconcile failed");
    let warnings: Vec<_> = tries.iter().filter(|v| v["level"] == "warn").collect();
    assert_eq!(warnings.len(), 1, "one warning for a lasting refusal: {tries:#?}");
    assert!(
        warnings[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied")),
        "{tries:#?}"
    );
    let waits: Vec<u64> = tries.iter().filter_map(|v| v["retry_in_s"].as_u64()).collect();
    assert!(
        waits.len() >= 3 && waits.windows(2).all(|w| w[1] > w[0]),
        "each try waits longer than the last: {waits:?}"
    );
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());
    admin
        .batch_execute("GRANT SELECT ON outbox_relay_journal TO outbox_relay")
        .await
        .expect("GRANT");
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    relay.stop().await;
}

/// Until the watch has looked once and written its marker key.
async fn wait_for_marker(url: &str, prefix: &str) {
    wait_until("the marker key", Duration::from_secs(30), || async {
        let mut conn = redis_conn(url).await;
        conn.exists::<_, bool>(format!("{prefix}journal:marker"))
            .await
            .unwrap_or(false)
    })
    .await;
}
