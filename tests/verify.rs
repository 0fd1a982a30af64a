//! `outbox-relay verify`: the invariant checker an operator can run. It
//! passes after a clean drain and names lost and corrupted rows otherwise.

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

fn verify_cmd(db: &TestDb, redis_url: &str, prefix: &str) -> (Option<i32>, serde_json::Value, String) {
    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.to_string()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    let o = relay_command(&["verify", "--ledger", "produced", "--since", "1h", "--json"], &env)
        .output()
        .expect("verify");
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code(), v, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[tokio::test]
async fn verify_passes_after_a_drain_and_names_lost_and_corrupted_rows() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    produce(&db.client().await, &jobs, 600).await.expect("produce");

    // Before the relay ran: everything is still due, so verify fails.
    let (code, v, err) = verify_cmd(&db, &redis_url, &prefix);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(v["pending_due"], 600);
    assert!(err.contains("still due"), "{err}");

    let relay = RelayProcess::spawn(&relay_env(&db, &redis_url, &prefix, &[]));
    wait_drained(&db, Duration::from_secs(60)).await;
    relay.stop().await;
    let (code, v, err) = verify_cmd(&db, &redis_url, &prefix);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (v["produced"].as_u64(), v["delivered"].as_u64()),
        (Some(600), Some(600))
    );

    // Lose one member and corrupt another: verify must say so.
    let key = format!("{}sched:{}", &*prefix, jobs[0]);
    let mut conn = redis_conn(&redis_url).await;
    let members: Vec<String> = conn.zrange(&key, 0, 1).await.expect("ZRANGE");
    let _: () = conn.zrem(&key, &members[0]).await.expect("ZREM");
    let _: () = conn.zrem(&key, &members[1]).await.expect("ZREM");
    let corrupted = members[1].replacen("|sitemap|", "|SITEMAP|", 1);
    let _: () = conn.zadd(&key, &corrupted, 1).await.expect("ZADD");
    let (code, v, err) = verify_cmd(&db, &redis_url, &prefix);
    assert_eq!(code, Some(1));
    assert!(err.contains("invariant violated"), "{err}");
    let lost: Vec<&str> = v["lost"]
        .as_array()
        .expect("lost")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert_eq!(lost.len(), 2, "{v}");
    assert!(members[0].starts_with(lost[0]) || members[0].starts_with(lost[1]));
    assert_eq!(v["corrupted"].as_array().map(Vec::len), Some(1));
}

/// A ledger is the operator's table: a NULL where a member field belongs
/// is reported with the column, as an error exit, never a panic.
#[tokio::test]
async fn a_ledger_with_a_null_column_is_an_error_naming_it() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let client = db.client().await;
    produce(&client, &[uuid::Uuid::new_v4()], 3).await.expect("produce");
    client
        .batch_execute("ALTER TABLE produced ALTER COLUMN host DROP NOT NULL; UPDATE produced SET host = NULL")
        .await
        .expect("null host");
    let (code, _, err) = verify_cmd(&db, &redis_url, &prefix);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("error: ledger produced, column host: a Postgres value was `NULL`") && !err.contains("panicked"),
        "{err}"
    );
}
