//! Redis Cluster mode against a real cluster on loopback (3 masters, with
//! or without replicas, started per test): every member lands on the node
//! owning its key's slot, a dead node defers only its own entries (no
//! attempt counted) while the others are delivered, and a master that dies
//! mid-drain fails over without dead letters or loss.

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::RedisCluster;
use common::*;
use outbox_relay::redis::pipeline::key_slot;

fn cluster_env(db: &TestDb, cluster: &RedisCluster, prefix: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let seeds = cluster.seed_urls();
    let mut all: Vec<(&str, &str)> = vec![
        ("OUTBOX_RELAY_REDIS__MODE", "cluster"),
        ("OUTBOX_RELAY_REDIS__CLUSTER_URLS", seeds.as_str()),
    ];
    all.extend_from_slice(extra);
    // `redis.url` is unused in cluster mode: point it nowhere useful.
    relay_env(db, "redis://127.0.0.1:1/0", prefix, &all)
}

/// Watch the outbox while a test runs: the highest `attempts` any row had.
fn watch_attempts(url: String) -> (Arc<AtomicI64>, tokio::task::JoinHandle<()>) {
    let max = Arc::new(AtomicI64::new(0));
    let seen = max.clone();
    let handle = tokio::spawn(async move {
        let c = pg_connect(&url).await;
        loop {
            if let Ok(row) = c
                .query_one("SELECT COALESCE(max(attempts), 0)::int8 FROM task_outbox", &[])
                .await
            {
                seen.fetch_max(row.get(0), Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (max, handle)
}

#[tokio::test]
async fn cluster_delivers_every_member_to_the_node_owning_its_slot() {
    let cluster = RedisCluster::start(3, 1).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(200);
    produce(&db.client().await, &js, 20_000).await.expect("seed");

    let env = cluster_env(&db, &cluster, &prefix, &[("OUTBOX_RELAY_SWEEP__CONCURRENCY", "2")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(120)).await;

    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered, 20_000);
    assert_eq!(report.dead_lettered, 0);

    // Each master holds exactly the schedules whose slot it owns, and
    // together they hold all 200 (keys stay `{prefix}sched:{job_id}`).
    let masters = cluster.masters().expect("cluster topology");
    assert_eq!(masters.len(), 3);
    let mut seen: HashSet<String> = HashSet::new();
    for m in &masters {
        let keys = RedisCluster::keys_on(m.port, &format!("{}sched:*", &*prefix));
        assert!(!keys.is_empty(), "master {} holds some schedules", m.port);
        for k in &keys {
            assert!(
                m.owns(key_slot(k)),
                "{k} (slot {}) is on master {}",
                key_slot(k),
                m.port
            );
            assert!(seen.insert(k.clone()), "{k} on two masters");
        }
    }
    let want: HashSet<String> = js.iter().map(|j| format!("{}sched:{j}", &*prefix)).collect();
    assert_eq!(seen, want);

    // `status` finds the schedules on every master.
    let out = relay_command(&["status", "--json"], &env).output().expect("run status");
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let schedules = st["schedules"].as_array().expect("schedules");
    assert_eq!(schedules.len(), 10, "{st}");
    assert!(schedules.iter().all(|s| s["depth"] == 100), "{st}");
    relay.stop().await;
}

/// `cancel-job` on a cluster, under an untagged prefix and under a tagged
/// one (docs/redis.md's advice for a cluster): the fence refuses the cancelled
/// job's rows and no other job's. (A tagged prefix once gave every job one
/// shared fence, so every other job's rows were deleted unsent.)
#[tokio::test]
async fn a_cancel_fences_only_its_own_job_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    for prefix in [key_prefix(), tagged_key_prefix()] {
        let db = TestDb::new().await;
        create_ledger(&db).await;
        let js = new_jobs(4);
        let c = db.client().await;
        for j in &js {
            c.batch_execute(&format!("INSERT INTO jobs (id, status) VALUES ('{j}', 'running')"))
                .await
                .expect("job");
        }
        let env = cluster_env(&db, &cluster, &prefix, &[]);
        let out = relay_command(&["cancel-job", &js[0].to_string()], &env)
            .output()
            .expect("run cancel-job");
        assert!(
            out.status.success(),
            "cancel-job: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        produce(&c, &js, 4_000).await.expect("seed");

        let mut relay = RelayProcess::spawn(&env);
        relay.wait_started().await;
        wait_drained(&db, Duration::from_secs(120)).await;
        let mut conn = cluster.connection().await;
        let mut depths = Vec::new();
        for j in &js {
            let key = format!("{}sched:{j}", &*prefix);
            let depth: i64 = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("ZCARD");
            depths.push(depth);
        }
        assert_eq!(depths, [0, 1_000, 1_000, 1_000], "prefix {:?}", &*prefix);
        assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
        relay.stop().await;
    }
}

/// A master frozen mid-drain (SIGSTOP: the ZADDs sent to it get no answer
/// before the tick's deadline, and land when it thaws): its entries are
/// re-sent with their own scores, never postponed with new ones, so every
/// member ends with its row's `run_at` as its score, exactly.
#[tokio::test]
async fn entries_of_a_stalled_node_are_resent_with_their_own_scores() {
    let cluster = RedisCluster::start(3, 0).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(30);
    let env = cluster_env(&db, &cluster, &prefix, &[("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "1s")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    // Connected to every node first (a cluster connection is built from
    // all of them): a first batch delivered.
    produce(&db.client().await, &js, 300).await.expect("seed");
    wait_drained(&db, Duration::from_secs(60)).await;
    let masters = cluster.masters().expect("cluster topology");
    let frozen = masters[0].port;
    cluster.signal(frozen, "STOP");
    produce(&db.client().await, &js, 2_700).await.expect("seed");
    let unreachable = |text: &str| metric_value(text, "outbox_relay_redis_unreachable_entries_total", &[]);
    wait_until("a tick met the stalled node", Duration::from_secs(60), || async {
        unreachable(&scrape(&relay).await).is_some_and(|v| v > 0.0)
    })
    .await;
    let first = unreachable(&scrape(&relay).await).unwrap_or(0.0);
    // More ticks meet it: the same rows are sent again, still unanswered.
    wait_until("more ticks met the stalled node", Duration::from_secs(60), || async {
        unreachable(&scrape(&relay).await).is_some_and(|v| v > first)
    })
    .await;
    cluster.signal(frozen, "CONT");
    wait_drained(&db, Duration::from_secs(120)).await;

    let mut conn = cluster.connection().await;
    let mut scores = std::collections::HashMap::new();
    for j in &js {
        let pairs: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(format!("{}sched:{j}", &*prefix))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .expect("ZRANGE");
        for (member, score) in pairs {
            let task = member.split('|').next().unwrap_or_default().to_string();
            scores.insert(task, score);
        }
    }
    let rows = db
        .client()
        .await
        .query(
            "SELECT task_id::text, floor(extract(epoch FROM run_at) * 1000)::int8 FROM produced",
            &[],
        )
        .await
        .expect("ledger");
    let moved: Vec<_> = rows
        .iter()
        .filter(|r| scores.get(&r.get::<_, String>(0)) != Some(&r.get::<_, i64>(1)))
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                scores.get(&r.get::<_, String>(0)).copied(),
            )
        })
        .collect();
    assert!(
        moved.is_empty(),
        "{} of 3000 members lack their row's score: {:?}",
        moved.len(),
        &moved[..moved.len().min(5)]
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

/// Memory back-pressure in a cluster: every master is watched. One master
/// filled past `redis.max_memory_ratio` (another tenant's keys) holds the
/// relay's writes back, rows wait without an attempt, and writing resumes
/// once it has room. (Before, INFO was never read in cluster mode and
/// back-pressure silently did nothing.)
#[tokio::test]
async fn a_nearly_full_master_holds_writes_back() {
    let cluster = RedisCluster::start(3, 0).await;
    let masters = cluster.masters().expect("cluster topology");
    for m in &masters {
        common::cluster::cli(m.port, &["CONFIG", "SET", "maxmemory", "16mb"]).expect("CONFIG SET");
    }
    let full = &masters[0];
    let node_url = format!("redis://127.0.0.1:{}/0", full.port);
    let mut node = redis_conn(&node_url).await;
    let fillers = fill_redis_to(&mut node, 0.85, |k| full.owns(key_slot(k))).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(30);
    let env = cluster_env(
        &db,
        &cluster,
        &prefix,
        &[("OUTBOX_RELAY_REDIS__MAX_MEMORY_RATIO", "0.8")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    produce(&db.client().await, &js, 30).await.expect("seed");
    wait_until("back-pressure engages", Duration::from_secs(60), || async {
        metric_value(&scrape(&relay).await, "outbox_relay_redis_backpressure", &[]) == Some(1.0)
    })
    .await;
    let before = db.count("SELECT count(*) FROM task_outbox").await;
    produce(&db.client().await, &js, 300).await.expect("seed");
    let t0 = relay.ok_ticks().await;
    wait_until("ticks while held back", Duration::from_secs(30), || async {
        relay.ok_ticks().await >= t0 + 4.0
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        before + 300,
        "held back"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await, 0);

    for key in &fillers {
        let _: () = redis::cmd("DEL").arg(key).query_async(&mut node).await.expect("DEL");
    }
    wait_drained(&db, Duration::from_secs(60)).await;
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!((report.delivered, report.dead_lettered), (330, 0));
    relay.stop().await;
}

/// Redis's default `cluster-require-full-coverage yes`: once a master
/// without a replica is found dead, every node answers `CLUSTERDOWN`, so
/// every entry waits (not only the dead master's), without an attempt
/// counted or a dead letter, and all is delivered once it is back.
#[tokio::test]
async fn stock_full_coverage_stops_the_whole_cluster_without_attempts() {
    let mut cluster = RedisCluster::start_stock(3, 0).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(30);
    let env = cluster_env(&db, &cluster, &prefix, &[]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let masters = cluster.masters().expect("cluster topology");
    let (dead, alive) = (masters[0].port, masters[1].port);
    cluster.kill(dead);
    wait_until("the cluster reports itself down", Duration::from_secs(30), || async {
        common::cluster::cli(alive, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:fail"))
    })
    .await;
    let (max_attempts, watcher) = watch_attempts(db.url.clone());
    produce(&db.client().await, &js, 3_000).await.expect("seed");
    let t0 = relay.ok_ticks().await;
    let failed0 = relay.count("sweep tick failed");
    wait_until("ticks meet the cluster down", Duration::from_secs(60), || async {
        relay.ok_ticks().await + (relay.count("sweep tick failed") - failed0) as f64 >= t0 + 4.0
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        3_000,
        "nothing delivered"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert!(relay.is_running());

    cluster.revive(dead).await;
    wait_drained(&db, Duration::from_secs(120)).await;
    watcher.abort();
    assert_eq!(max_attempts.load(Ordering::Relaxed), 0, "no attempt counted");
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!((report.delivered, report.dead_lettered), (3_000, 0));
    relay.stop().await;
}

#[tokio::test]
async fn a_dead_node_defers_only_its_own_entries() {
    // No replicas: the node's slots stay unserved until it comes back.
    let mut cluster = RedisCluster::start(3, 0).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(60);
    let env = cluster_env(
        &db,
        &cluster,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let masters = cluster.masters().expect("cluster topology");
    let dead = masters[0].clone();
    cluster.kill(dead.port);
    let (max_attempts, watcher) = watch_attempts(db.url.clone());

    produce(&db.client().await, &js, 6_000).await.expect("seed");
    let on_dead: i64 = {
        let c = db.client().await;
        let rows = c.query("SELECT job_id::text FROM produced", &[]).await.expect("ledger");
        rows.iter()
            .filter(|r| dead.owns(key_slot(&format!("{}sched:{}", &*prefix, r.get::<_, String>(0)))))
            .count() as i64
    };
    assert!(
        on_dead > 0 && on_dead < 6_000,
        "the dead node owns some of the jobs ({on_dead})"
    );

    // Everything for the live nodes is delivered while the node is down;
    // exactly its rows wait in the outbox, not failed, not dead-lettered.
    wait_until("rows for live nodes delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == on_dead
    })
    .await;
    wait_until("unreachable entries counted", Duration::from_secs(30), || async {
        let text = scrape(&relay).await;
        metric_value(&text, "outbox_relay_redis_unreachable_entries_total", &[]).is_some_and(|v| v >= on_dead as f64)
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, on_dead);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(
        max_attempts.load(Ordering::Relaxed),
        0,
        "no attempt counted for an unreachable node"
    );
    assert!(
        relay.count("redis cluster node unreachable") >= 1,
        "the operator is told"
    );

    // The node comes back (empty, same slots): the rest drains.
    cluster.revive(dead.port).await;
    wait_drained(&db, Duration::from_secs(120)).await;
    watcher.abort();
    assert_eq!(max_attempts.load(Ordering::Relaxed), 0);
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered, 6_000);
    relay.stop().await;
}

/// For each lost task: its job's key, that key's slot, and whether the
/// killed master owned the slot (a failure message that says where to look).
async fn lost_whereabouts(
    db: &TestDb,
    prefix: &str,
    lost: &[String],
    victim: &common::cluster::Master,
) -> Vec<(String, String, u16, bool)> {
    let client = db.client().await;
    let mut out = Vec::new();
    for task in lost {
        let job: Option<uuid::Uuid> = client
            .query_opt("SELECT job_id FROM produced WHERE task_id::text = $1", &[task])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        let key = job.map(|j| format!("{prefix}sched:{j}")).unwrap_or_default();
        let slot = key_slot(&key);
        out.push((task.clone(), key, slot, victim.owns(slot)));
    }
    out
}

#[tokio::test]
async fn a_master_killed_mid_drain_fails_over_without_dead_letters_or_loss() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(200);
    // Replication is asynchronous: without WAIT, a ZADD the master
    // acknowledged just before dying may never reach the replica that
    // replaces it. `wait_replicas = 1` is what makes "nothing lost" hold.
    let env = cluster_env(
        &db,
        &cluster,
        &prefix,
        &[
            ("OUTBOX_RELAY_REDIS__WAIT_REPLICAS", "1"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let (max_attempts, watcher) = watch_attempts(db.url.clone());
    let producer = Producer::start(db.url.clone(), js.clone(), 100, Duration::from_millis(20));

    wait_until("drain under way", Duration::from_secs(60), || async {
        delivered_so_far(&db).await >= 3_000
    })
    .await;

    let victim = cluster.masters().expect("cluster topology")[0].clone();
    cluster.kill(victim.port);
    // Its replica takes over its slots (node timeout 1s).
    wait_until("replica promoted", Duration::from_secs(60), || async {
        cluster.masters().is_some_and(|m| {
            m.len() == 3
                && m.iter().all(|m| m.port != victim.port)
                && m.iter()
                    .any(|m| m.port == victim.replicas[0] && m.owns(victim.ranges[0].0))
        })
    })
    .await;
    // The other masters' rows keep flowing meanwhile.
    let after_failover = delivered_so_far(&db).await;
    wait_until(
        "drain continues after the failover",
        Duration::from_secs(60),
        || async { delivered_so_far(&db).await >= after_failover + 2_000 },
    )
    .await;
    // The old master comes back as the new master's replica, so WAIT can be
    // satisfied for those slots again.
    cluster.revive(victim.port).await;
    let produced = producer.stop().await;
    wait_drained(&db, Duration::from_secs(120)).await;
    watcher.abort();

    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(
        max_attempts.load(Ordering::Relaxed),
        0,
        "the failover counted no attempt"
    );
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    if !report.holds() {
        let whereabouts = lost_whereabouts(&db, &prefix, &report.lost, &victim).await;
        let lines = relay.lines();
        let log = std::env::temp_dir().join(format!("outbox-relay-failover-{}.log", uuid::Uuid::new_v4().simple()));
        let saved = std::fs::write(&log, lines.join("\n"));
        let on_victim = whereabouts.iter().filter(|w| w.3).count();
        panic!(
            "invariant violated: {} of {} rows lost, {on_victim} of them in the killed master's slots \
             (victim {victim:?}), {} corrupted, {} with a wrong score; first lost (task, key, slot, victim's): \
             {:#?}\nrelay log: {} ({saved:?})",
            report.lost.len(),
            report.produced,
            report.corrupted.len(),
            report.wrong_score.len(),
            &whereabouts[..whereabouts.len().min(10)],
            log.display(),
        );
    }
    assert_eq!(report.produced as u64, produced);
    assert_eq!(report.delivered as u64, produced);
    relay.stop().await;
}

#[tokio::test]
async fn resharding_mid_drain_is_followed_without_loss() {
    let cluster = RedisCluster::start(3, 0).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let js = new_jobs(200);
    let env = cluster_env(&db, &cluster, &prefix, &[("OUTBOX_RELAY_LOG__LEVEL", "info")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let (max_attempts, watcher) = watch_attempts(db.url.clone());
    let producer = Producer::start(db.url.clone(), js.clone(), 100, Duration::from_millis(20));
    wait_until("drain under way", Duration::from_secs(60), || async {
        delivered_so_far(&db).await >= 2_000
    })
    .await;

    // Move 3000 slots (keys and all) from one master to another while rows
    // flow: the relay meets ASK during the migration and MOVED after it.
    let masters = cluster.masters().expect("cluster topology");
    let id = |port: u16| {
        common::cluster::cli(port, &["CLUSTER", "MYID"])
            .map(|s| s.trim().to_string())
            .expect("node id")
    };
    let (from, to) = (id(masters[0].port), id(masters[1].port));
    let status = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{}", masters[0].port)])
        .args(["--cluster-from", &from, "--cluster-to", &to, "--cluster-slots", "3000"])
        .args(["--cluster-yes", "--cluster-pipeline", "100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run redis-cli --cluster reshard");
    assert!(status.success(), "reshard failed");
    let owned = |m: &common::cluster::Master| -> u32 { m.ranges.iter().map(|&(a, b)| u32::from(b - a) + 1).sum() };
    let moved = cluster.masters().expect("cluster topology");
    let target = moved.iter().find(|m| m.port == masters[1].port).expect("target master");
    assert_eq!(owned(target), owned(&masters[1]) + 3000, "slots moved: {moved:?}");
    let after = delivered_so_far(&db).await;
    wait_until(
        "drain continues after the resharding",
        Duration::from_secs(60),
        || async { delivered_so_far(&db).await >= after + 2_000 },
    )
    .await;
    let produced = producer.stop().await;
    wait_drained(&db, Duration::from_secs(120)).await;
    watcher.abort();

    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(max_attempts.load(Ordering::Relaxed), 0, "redirects counted no attempt");
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered as u64, produced);
    relay.stop().await;
}
