//! The documented Redis ACL, exactly as written: the `ACL SETUSER` lines of
//! docs/redis.md "Redis ACL" are read from that page itself and run against
//! private Redis servers (standalone, and every node of a cluster). With
//! those users and the shipped defaults otherwise (prefix `hover:`), the
//! relay delivers, syncs counters, checks cancel fences and reads memory,
//! `cancel-job` and `status` work, and every actor stays healthy over
//! several health intervals. A user without one of the commands is named
//! by `check-config`.
//!
//! Before, the README listed `+eval +zadd +exists +ping +wait +info`: counter
//! sync could not run `HGETALL`, `/healthz` answered 503 for good, and
//! the Deployment's liveness probe would have restarted every pod.

use crate::common;

use std::time::Duration;

use common::cluster::RedisCluster;
use common::*;
use redis::AsyncCommands;

const PASSWORD: &str = "acl-test-pw";
/// The shipped default prefix, which the documented lines name.
const PREFIX: &str = "hover:";

async fn create_users(port: u16) {
    let mut admin = redis_conn(&format!("redis://127.0.0.1:{port}/0")).await;
    for user in ["outbox-relay", "outbox-triage"] {
        let _: () = redis::cmd("ACL")
            .arg(readme_acl(user, PASSWORD))
            .query_async(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("docs/redis.md's ACL line for {user}: {e}"));
    }
}

fn as_user(user: &str, port: u16) -> String {
    format!("redis://{user}:{PASSWORD}@127.0.0.1:{port}/0")
}

/// Jobs rows for counter sync (`running`), on either schema.
async fn jobs(db: &TestDb, ids: &[uuid::Uuid]) {
    let c = db.client().await;
    for j in ids {
        c.batch_execute(&format!("INSERT INTO jobs (id, status) VALUES ('{j}', 'running')"))
            .await
            .expect("job");
    }
}

/// Every actor logged `lines` health lines, all of them healthy, and
/// `/healthz` says 200.
/// Every actor healthy over `lines` health lines, `/healthz` 200, and no
/// warning about a missing permission.
async fn healthy_for(relay: &RelayProcess, lines: usize) {
    actors_healthy_for(relay, lines).await;
    assert!(
        relay.records("missing a Redis permission").is_empty(),
        "{:#?}",
        relay.lines()
    );
    assert!(
        relay.records("cannot read redis INFO memory").is_empty(),
        "{:#?}",
        relay.lines()
    );
}

/// Every actor healthy over `lines` health lines, and `/healthz` 200.
async fn actors_healthy_for(relay: &RelayProcess, lines: usize) {
    let actors = [
        "SweepActor",
        "DispatchActor",
        "DeadLetterActor",
        "CounterSyncActor",
        "MetricsActor",
        "JournalActor",
    ];
    wait_until(
        "several health intervals",
        Duration::from_secs(30 + 10 * lines as u64),
        || async { actors.iter().all(|a| relay.health_lines(a).len() >= lines) },
    )
    .await;
    for a in actors {
        let unhealthy: Vec<_> = relay
            .health_lines(a)
            .into_iter()
            .filter(|l| l["status"] != "healthy")
            .collect();
        assert!(unhealthy.is_empty(), "{a}: {unhealthy:#?}");
    }
    assert_eq!(relay.http_get("/healthz").await.map(|(s, _)| s), Some(200));
}

fn check_config(env: &[(String, String)]) -> std::process::Output {
    relay_command(&["check-config"], env).output().expect("check-config")
}

#[tokio::test]
async fn readmes_acl_runs_everything_on_a_standalone_redis() {
    let server = RedisServer::start().await;
    create_users(server.port).await;
    let db = TestDb::new().await;
    let ids = seed(&db, 2_000, 4).await;
    jobs(&db, &ids).await;
    let expected = expected_members(&db).await;
    let mut admin = redis_conn(&server.url()).await;
    let _: () = admin
        .hset(format!("{PREFIX}running"), ids[0].to_string(), 3)
        .await
        .expect("HSET");

    let env = shipped_env(&db.url, &as_user("outbox-relay", server.port), PREFIX);
    let o = check_config(&env);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("# redis: the user may run every command `run` sends"),
        "{stdout}"
    );

    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&server.url(), PREFIX, &expected).await;
    wait_until("counter synced", Duration::from_secs(30), || async {
        db.count(&format!("SELECT running_tasks::int8 FROM jobs WHERE id = '{}'", ids[0]))
            .await
            == 3
    })
    .await;

    // The operator's user: cancel-job sets the fence, status reads the schedules.
    let triage = shipped_env(&db.url, &as_user("outbox-triage", server.port), PREFIX);
    let o = relay_command(&["cancel-job", &ids[1].to_string(), "--json"], &triage)
        .output()
        .expect("cancel-job");
    assert!(o.status.success(), "cancel-job: {}", String::from_utf8_lossy(&o.stderr));
    let o = relay_command(&["status", "--json"], &triage).output().expect("status");
    assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(st["schedules"].as_array().map(Vec::len), Some(3), "{st}");

    healthy_for(&relay, 3).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_user_without_a_command_is_named_by_check_config() {
    let server = RedisServer::start().await;
    create_users(server.port).await;
    let mut admin = redis_conn(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "outbox-relay", "-hgetall"])
        .query_async(&mut admin)
        .await
        .expect("ACL");
    let db = TestDb::new().await;
    let env = shipped_env(&db.url, &as_user("outbox-relay", server.port), PREFIX);
    let o = check_config(&env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("counter sync") && err.contains("+hgetall"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // Without +info only a warning: the relay runs.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "outbox-relay", "+hgetall", "-info"])
        .query_async(&mut admin)
        .await
        .expect("ACL");
    let o = check_config(&env);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("# redis: warning:") && stdout.contains("+info"),
        "{stdout}"
    );
    // An ACL from before the journal's watch (no +set), and no +info: the
    // watch cannot look, says so once, and the relay stays healthy and
    // ready (#40's review: it made every relay unhealthy).
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "outbox-relay", "-set"])
        .query_async(&mut admin)
        .await
        .expect("ACL");
    let mut env = env;
    env.push(("OUTBOX_RELAY_JOURNAL__WATCH_INTERVAL".into(), "1s".into()));
    env.push(("OUTBOX_RELAY_HEALTH__INTERVAL".into(), "1s".into()));
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the watch says it cannot look", Duration::from_secs(30), || async {
        !relay.records("the journal watch cannot look at redis").is_empty()
    })
    .await;
    actors_healthy_for(&relay, 3).await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    assert_eq!(relay.records("the journal watch cannot look at redis").len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn readmes_acl_runs_everything_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    for n in &cluster.nodes {
        create_users(n.port).await;
    }
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let ids = new_jobs(30);
    jobs(&db, &ids).await;
    produce(&db.client().await, &ids, 3_000).await.expect("seed");
    let seeds = cluster
        .nodes
        .iter()
        .map(|n| as_user("outbox-relay", n.port))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = shipped_env(&db.url, "redis://127.0.0.1:1/0", PREFIX);
    env.push(("OUTBOX_RELAY_REDIS__MODE".into(), "cluster".into()));
    env.push(("OUTBOX_RELAY_REDIS__CLUSTER_URLS".into(), seeds));
    let o = check_config(&env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut conn = cluster.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{PREFIX}running"))
        .arg(ids[0].to_string())
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let report = verify_ledger_on(&db, &mut conn, PREFIX).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!((report.delivered, report.dead_lettered), (3_000, 0));
    wait_until("counter synced", Duration::from_secs(30), || async {
        db.count(&format!("SELECT running_tasks::int8 FROM jobs WHERE id = '{}'", ids[0]))
            .await
            == 2
    })
    .await;
    healthy_for(&relay, 3).await;
    relay.stop().await;
}
