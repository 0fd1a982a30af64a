//! Redis loses data; the relay notices and writes the lost entries again:
//! a restart without persistence (with and without
//! `journal.still_pending`), a Sentinel failover at `wait_replicas = 0`
//! with replication cut, a `FLUSHALL` under a running relay; and on demand
//! (`reconcile`), with a cancelled job's entries left lost and a pause
//! holding entries back (a reconcile under failing dependencies: `faults`).

use crate::common;

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::{delivered, journal_rows, reconcile, wait_for_marker, JOURNAL};
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
