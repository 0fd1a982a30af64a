//! Least privilege: the relay runs as a role holding only what
//! `deploy/postgres/roles.sql` grants it (the drain, dead-letter, counter
//! sync and cancel tests run that way), and a role missing a privilege is
//! told each one by name, by `check-config` and at `run`'s start.

use crate::common;

use common::*;

fn env_as(url: &str, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), url.to_string()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), shared_redis_url()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ]
}

/// `check-config` as the role of `url` passes and says the role holds every
/// privilege `run` needs; returns its output.
fn assert_holds_every_run_privilege(url: &str, prefix: &str) -> String {
    let o = relay_command(&["check-config"], &env_as(url, prefix))
        .output()
        .expect("check-config");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("# postgres: the role holds every privilege `run` needs"),
        "{out}"
    );
    out
}

#[tokio::test]
async fn the_shipped_relay_role_has_every_privilege_run_needs() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let url = db.url_as("outbox_relay").await;
    let out = assert_holds_every_run_privilege(&url, &prefix);
    assert!(!out.contains("warning"), "{out}");
}

#[tokio::test]
async fn a_role_without_grants_is_told_each_missing_privilege() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let url = db.url_as("outbox_nobody").await;
    for args in [&["check-config"][..], &["run"]] {
        let o = relay_command(args, &env_as(&url, &prefix)).output().expect("relay");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for missing in [
            "role outbox_nobody lacks SELECT on task_outbox",
            "role outbox_nobody lacks UPDATE on task_outbox",
            "role outbox_nobody lacks DELETE on task_outbox",
            "role outbox_nobody lacks INSERT on task_outbox_dead",
            "role outbox_nobody lacks USAGE on the id sequence of task_outbox_dead",
            "role outbox_nobody lacks SELECT or USAGE on the id sequence of task_outbox",
            "role outbox_nobody lacks UPDATE on jobs (counter sync will fail)",
        ] {
            assert!(err.contains(missing), "{args:?}: no {missing:?} in\n{err}");
        }
    }

    // One privilege short: only that one is named.
    let relay = db.url_as("outbox_relay").await;
    db.client()
        .await
        .batch_execute("REVOKE DELETE ON task_outbox FROM outbox_relay")
        .await
        .expect("revoke");
    let o = relay_command(&["check-config"], &env_as(&relay, &prefix))
        .output()
        .expect("relay");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let named: Vec<&str> = err.lines().filter(|l| l.contains("lacks")).collect();
    assert_eq!(named.len(), 1, "{err}");
    assert!(
        named[0].contains("role outbox_relay lacks DELETE on task_outbox"),
        "{err}"
    );
}

/// The migrator needs no superuser: with `CREATE, USAGE ON SCHEMA public`
/// it applies every migration and owns the tables, then grants the other
/// two roles with the shipped `roles.sql` as their owner, and the relay role
/// drains. A role without CREATE on the schema is told so by `migrate`.
#[tokio::test]
async fn the_migrator_role_migrates_and_grants_without_superuser() {
    let db = TestDb::empty().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    for r in ["outbox_migrator", "outbox_relay", "outbox_triage", "outbox_nobody"] {
        db.ensure_role(r).await;
    }
    let su: bool = db
        .client()
        .await
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'outbox_migrator'", &[])
        .await
        .expect("rolsuper")
        .get(0);
    assert!(
        !su,
        "the migrator must not be a superuser for this test to mean anything"
    );

    // Without CREATE on the schema: one error line, exit 1, nothing applied.
    let nobody = db.role_url("outbox_nobody");
    let o = relay_command(&["migrate"], &env_as(&nobody, &prefix))
        .output()
        .expect("migrate");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied for schema public"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'task_outbox'")
            .await,
        0
    );

    db.client()
        .await
        .batch_execute("GRANT CREATE, USAGE ON SCHEMA public TO outbox_migrator")
        .await
        .expect("grant schema");
    let migrator = db.role_url("outbox_migrator");
    for round in 0..2 {
        let o = relay_command(&["migrate"], &env_as(&migrator, &prefix))
            .output()
            .expect("migrate");
        assert!(
            o.status.success(),
            "round {round}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_tables
              WHERE tablename IN ('task_outbox', 'task_outbox_dead', 'jobs', 'outbox_relay_migrations')
                AND tableowner = 'outbox_migrator'"
        )
        .await,
        4,
        "the migrator owns every table it created"
    );

    // The owner grants the other roles: no superuser anywhere.
    pg_connect(&migrator)
        .await
        .batch_execute(&roles_sql())
        .await
        .expect("roles.sql as the migrator");
    let relay_url = db.role_url("outbox_relay");
    assert_holds_every_run_privilege(&relay_url, &prefix);

    seed(&db, 200, 4).await;
    let expected = expected_members(&db).await;
    let mut relay = RelayProcess::spawn(&relay_env_as(&db, &relay_url, &redis_url, &prefix, &[]));
    relay.wait_started().await;
    wait_drained(&db, std::time::Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    relay.stop().await;
}
