//! Least privilege: the relay runs as a role holding only what
//! `deploy/postgres/roles.sql` grants it (the drain, dead-letter, counter
//! sync and cancel tests run that way), and a role missing a privilege is
//! told each one by name, by `check-config` and at `run`'s start.

mod common;

use common::*;

fn env_as(url: &str, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), url.to_string()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), shared_redis_url()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ]
}

#[tokio::test]
async fn the_shipped_relay_role_has_every_privilege_run_needs() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let url = db.url_as("outbox_relay").await;
    let o = relay_command(&["check-config"], &env_as(&url, &prefix))
        .output()
        .expect("check-config");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("# postgres: the role holds every privilege `run` needs"),
        "{out}"
    );
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
