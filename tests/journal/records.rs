//! What a tick keeps of its deliveries: every delivery once, with its exact
//! entry and the node that acknowledged it, in both claim modes; a journal
//! that refuses costs the journal, not the settle; retention keeps it flat.

use crate::common;

use std::time::{Duration, Instant};

use super::{delivered, journal_rows, JOURNAL};
use common::*;

#[tokio::test]
async fn each_delivery_is_journaled_with_its_exact_entry_and_node() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (relay, members) = delivered(&db, &redis.url(), &prefix, 300, &[]).await;
    relay.stop().await;
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT e.key, e.score, e.member, node_run_id, node_replid, node_offset, e.job
               FROM outbox_relay_journal,
                    unnest(schedule_keys, scores, members, job_ids) AS e(key, score, member, job)",
            &[],
        )
        .await
        .expect("read the journal");
    let mut conn = redis_conn(&redis.url()).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    let run_id = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("run_id:"))
        .expect("run_id")
        .to_string();
    for r in &rows {
        let (key, score, member): (String, i64, String) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(members.get(&member), Some(&(score as f64)), "{member}");
        let job: String = r.get(6);
        assert!(key == format!("{}sched:{job}", &*prefix), "{key} for job {job}");
        let (node, replid, offset): (String, String, i64) = (r.get(3), r.get(4), r.get(5));
        assert_eq!(node, run_id);
        assert_eq!(replid.len(), 40, "{replid}");
        // 0 until a replica attaches (no replication backlog before).
        assert!(offset >= 0);
    }
    assert_eq!(rows.len(), 300);
}

#[tokio::test]
async fn a_locking_claim_journals_too() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    db.client()
        .await
        .batch_execute("ALTER TABLE task_outbox ADD COLUMN note TEXT NOT NULL DEFAULT 'unset'")
        .await
        .expect("a column the relay does not know: it claims by locking");
    let (relay, _) = delivered(&db, &redis.url(), &prefix, 200, &[]).await;
    assert!(!relay.records("claiming with SELECT").is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn retention_keeps_the_journal_flat() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let jobs = new_jobs(4);
    create_ledger(&db).await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_JOURNAL__KEEP", "30s"),
            ("OUTBOX_RELAY_JOURNAL__WATCH_INTERVAL", "1s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    // 20 rows every 100ms for 100s: over three retention periods.
    let producer = Producer::start(db.url.clone(), jobs, 20, Duration::from_millis(100));
    let started = Instant::now();
    let mut samples: Vec<(f64, i64, f64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(100) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let c = db.client().await;
        let row = c
            .query_one(
                "SELECT coalesce(sum(cardinality(outbox_ids)), 0)::int8,
                        coalesce(extract(epoch FROM now() - min(delivered_at))::float8, 0)
                   FROM outbox_relay_journal",
                &[],
            )
            .await
            .expect("journal size");
        samples.push((started.elapsed().as_secs_f64(), row.get(0), row.get(1)));
    }
    let produced = producer.stop().await;
    let emptied = relay.records("journal slot emptied").len();
    let about: Vec<String> = relay
        .lines()
        .into_iter()
        .filter(|l| l.contains("ournal"))
        .take(20)
        .collect();
    relay.stop().await;
    assert!(produced > 10_000, "{produced}");
    assert!(
        emptied >= 15,
        "100s of 3s slices: {emptied} emptied; {samples:?} {about:#?}"
    );
    // keep 30s: 3s slices; the slice written, 13 before it, and the next
    // two until they are emptied: nothing older than 16 slices (48s), and
    // some margin for a round that comes late.
    let late: Vec<&(f64, i64, f64)> = samples.iter().filter(|(t, _, _)| *t > 55.0).collect();
    assert!(late.len() >= 8, "{samples:?}");
    for (t, _, oldest) in &late {
        assert!(
            *oldest <= 52.0,
            "at {t:.0}s the oldest journaled row is {oldest:.0}s old: {samples:?}"
        );
        assert!(
            *oldest >= 30.0,
            "at {t:.0}s rows younger than keep were dropped: {samples:?}"
        );
    }
    let most = late.iter().map(|(_, n, _)| *n).max().unwrap_or(0);
    let least = late.iter().map(|(_, n, _)| *n).min().unwrap_or(0);
    assert!(
        most as f64 <= least as f64 * 1.5,
        "the journal grew from {least} to {most} rows: {samples:?}"
    );
}

/// A journal that refuses its insert (a trigger here; a revoked INSERT or
/// a partition gone in life) costs the journal, not the settle: every row
/// is delivered, a poison row is still dead-lettered, a retried one
/// retried, and the refusal is one warning and a count.
#[tokio::test]
async fn a_journal_that_refuses_costs_the_journal_not_the_settle() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION journal_guard() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'the journal is under maintenance'; END $$;
             CREATE TRIGGER journal_guard BEFORE INSERT ON outbox_relay_journal
                FOR EACH ROW EXECUTE FUNCTION journal_guard();",
        )
        .await
        .expect("the journal's guard");
    seed(&db, 300, 5).await;
    db.set_first_row("path = 'a|b'").await;
    let mut relay = RelayProcess::spawn(&relay_env(&db, &redis.url(), &prefix, JOURNAL));
    relay.wait_started().await;
    wait_drained_by(&db, Duration::from_secs(60), &relay).await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await.len(), 299);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 1);
    assert_eq!(journal_rows(&db).await, 0);
    let warned = relay.records("postgres refused the delivery journal");
    assert!(!warned.is_empty(), "{:#?}", relay.lines());
    assert!(
        warned[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("under maintenance")),
        "{warned:?}"
    );
    assert_eq!(
        relay
            .metric(
                "outbox_relay_settle_refused_rows_total",
                &[("stage", "journal deliveries")]
            )
            .await,
        Some(299.0)
    );
    relay.stop().await;
}
