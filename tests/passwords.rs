//! Real credentials, in the URL shapes of `deploy/kubernetes/secret.yaml`:
//! Postgres with `scram-sha-256` over TLS (`?sslmode=require`, plaintext
//! refused for the role), a Redis with `requirepass` (`redis://:PASSWORD@…`),
//! and a Redis Cluster whose nodes all want the password, of which the
//! relay is given one seed (the others are found from it). Passwords hold
//! characters a URL must encode. Nothing prints a password; a wrong one is
//! one clear line.

use crate::common;

use std::time::Duration;

use common::cluster::RedisCluster;
use common::*;

/// A password with what URLs and shells make hard: encoded as `%40`,
/// `%3A`, `%2F`, `%25`, `%20` in the URL.
const PG_PASSWORD: &str = "p@ss:w/rd% 1";
const PG_PASSWORD_IN_URL: &str = "p%40ss%3Aw%2Frd%25%201";
const REDIS_PASSWORD: &str = "r3dis-secret-pw";

/// The relay's role with a SCRAM password, allowed in over TLS only.
async fn scram_over_tls(pg: &PrivatePostgres, db: &TestDb) -> String {
    db.url_as("outbox_relay").await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE outbox_relay PASSWORD '{PG_PASSWORD}'"
        ))
        .await
        .expect("password");
    pg.hba_first(
        "hostssl all outbox_relay 127.0.0.1/32 scram-sha-256\nhost all outbox_relay 127.0.0.1/32 reject",
        &admin,
    )
    .await;
    format!(
        "postgres://outbox_relay:{PG_PASSWORD_IN_URL}@127.0.0.1:{}/{}?sslmode=require",
        pg.port, db.name
    )
}

fn no_password_in(text: &str) {
    for secret in [PG_PASSWORD, PG_PASSWORD_IN_URL, REDIS_PASSWORD] {
        assert!(!text.contains(secret), "a password is printed: {text}");
    }
}

#[tokio::test]
async fn scram_over_tls_and_a_redis_password_drain_and_print_no_secret() {
    let pg = PrivatePostgres::start_with_tls().await;
    let db = TestDb::new_on(&pg.url()).await;
    let database_url = scram_over_tls(&pg, &db).await;
    let redis = RedisServer::start().await;
    let mut admin = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", REDIS_PASSWORD])
        .query_async(&mut admin)
        .await
        .expect("requirepass");
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", redis.port);
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), database_url.clone()),
        ("REDIS_URL".into(), redis_url.clone()),
    ];
    let o = relay_command(&["check-config"], &env).output().expect("check-config");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    no_password_in(&String::from_utf8_lossy(&o.stdout));

    seed(&db, 2_000, 5).await;
    let expected = expected_members(&db).await;
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, "hover:", &expected).await;
    let row = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'outbox_relay'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0 && encrypted == all, "{encrypted} of {all} sessions encrypted");
    let printed = relay_lines_text(&relay);
    relay.stop().await;
    no_password_in(&printed);

    // A wrong password: one line naming the service, exit 1, no secret.
    let wrong: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), database_url.replace(PG_PASSWORD_IN_URL, "nope")),
        ("REDIS_URL".into(), redis_url),
    ];
    let o = relay_command(&["check-config"], &wrong).output().expect("check-config");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Postgres") && err.contains("password authentication failed"),
        "{err}"
    );
    no_password_in(&err);
}

/// The lines a stopped relay printed, as one text.
fn relay_lines_text(relay: &RelayProcess) -> String {
    relay.lines().join("\n")
}

/// A cluster whose every node wants a password, given to the relay with
/// one seed: the nodes found from it are reached with the same password.
#[tokio::test]
async fn a_password_protected_cluster_from_one_seed() {
    let cluster = RedisCluster::start(3, 0).await;
    let masters = cluster.masters().expect("cluster topology");
    for n in &cluster.nodes {
        common::cluster::cli(n.port, &["CONFIG", "SET", "requirepass", REDIS_PASSWORD]).expect("requirepass");
    }
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let jobs = new_jobs(30);
    produce(&db.client().await, &jobs, 3_000).await.expect("seed");
    let seed_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", masters[0].port);
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__MODE".into(), "cluster".into()),
        ("OUTBOX_RELAY_REDIS__CLUSTER_URLS".into(), seed_url.clone()),
    ];
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let mut conn = redis::cluster::ClusterClient::new(vec![seed_url])
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("connect with the password");
    let report = verify_ledger_on(&db, &mut conn, "hover:").await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!((report.delivered, report.dead_lettered), (3_000, 0));
    let printed = relay_lines_text(&relay);
    relay.stop().await;
    no_password_in(&printed);
}
