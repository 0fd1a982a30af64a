//! A console action's audit lines (#37): one before it acts, with the rows
//! it expects, and one when it ends, also when a later batch fails, its
//! client goes away mid-action, or Postgres hangs under it.

use crate::common;

use std::time::Duration;

use super::web::{base64, bound, relay_with_console, users_file, ConsoleRelay, Web};
use super::{dead_of, insert_dead};
use common::*;

/// The API's two steps of a bulk action: what `confirm` counted, then the
/// action bound to it.
async fn confirmed_body(api: &mut Web, auth: &str, job: &str) -> String {
    let seen = api
        .get_as(&format!("/api/v1/dead-letters/confirm?job={job}"), auth)
        .await
        .json();
    bound(serde_json::json!({ "job": job }), &seen)
}

/// A later batch that fails still leaves an audit trail: a line before
/// the first batch with the rows expected, and one after with the rows
/// actually purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_is_audited_before_it_acts_and_when_a_later_batch_fails() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-audit-fail");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let job = new_jobs(1)[0].to_string();
    insert_dead(&db, &job, 1200, "WRONGTYPE").await;
    let first = db.count("SELECT min(id) FROM task_outbox_dead").await;
    // The second batch of 500 holds a row the table refuses to give up.
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION keep_some() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'maintenance: row % is kept', OLD.id; END $$;
             CREATE TRIGGER keep_some BEFORE DELETE ON task_outbox_dead
                FOR EACH ROW WHEN (OLD.id > {}) EXECUTE FUNCTION keep_some();",
            first + 600
        ))
        .await
        .expect("the guard trigger");
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    let body = confirmed_body(&mut api, &alice, &job).await;
    let r = api.post_json_as("/api/v1/dead-letters/purge", &alice, &body).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["rows"], 500, "{}", r.body);
    assert_eq!(dead_of(&db, &job).await, 700);
    let started = c.relay.records("console action started");
    assert!(
        started
            .iter()
            .any(|l| l["action"] == "purge" && l["expected_rows"] == 1200 && l["user"] == "alice"),
        "{started:?}"
    );
    let failed = c.relay.records("console action failed");
    assert!(
        failed.iter().any(|l| l["action"] == "purge"
            && l["rows"] == 500
            && l["error"].as_str().is_some_and(|e| e.contains("maintenance"))),
        "{failed:?}"
    );
    // The start line came first.
    let lines = c.relay.lines();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle));
    assert!(at("console action started") < at("console action failed"), "{lines:#?}");
}

/// A console (users alice and bob) over 1,200 dead letters of one job,
/// whose deletes run `body` in a trigger `each` (row or statement): the
/// job, alice's credentials and the purge's confirmed body.
async fn slow_purge(db: &TestDb, label: &str, body: &str, each: &str) -> (ConsoleRelay, String, String, String) {
    let prefix = key_prefix();
    let users = users_file(label);
    let c = relay_with_console(db, &prefix, Some(&users), &[]).await;
    let job = new_jobs(1)[0].to_string();
    insert_dead(db, &job, 1200, "WRONGTYPE").await;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$;
             CREATE TRIGGER slow_delete BEFORE DELETE ON task_outbox_dead {each} EXECUTE FUNCTION slow_delete();"
        ))
        .await
        .expect("the slow trigger");
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    let confirmed = confirmed_body(&mut api, &alice, &job).await;
    (c, job, alice, confirmed)
}

/// A client that goes away mid-purge stops only its own wait: the purge
/// finishes, and its final audit line counts every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_action_leaves_a_complete_audit() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new().await;
    // Every delete takes 3 ms: the purge lasts about 4 s.
    let (c, job, alice, body) = slow_purge(
        &db,
        "console-audit-gone",
        "PERFORM pg_sleep(0.003); RETURN OLD;",
        "FOR EACH ROW",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.port))
        .await
        .expect("connect");
    let req = format!(
        "POST /api/v1/dead-letters/purge HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {alice}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        c.port,
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    wait_until("the purge has started", Duration::from_secs(30), || async {
        !c.relay.records("console action started").is_empty()
    })
    .await;
    drop(s);
    wait_until("the purge's final audit line", Duration::from_secs(60), || async {
        c.relay
            .records("console action")
            .iter()
            .any(|l| l["msg"] == "console action" && l["action"] == "purge" && l["rows"] == 1200)
    })
    .await;
    assert_eq!(dead_of(&db, &job).await, 0, "the purge ran to its end");
}

/// A purge under way when Postgres hangs (every process SIGSTOPped: no
/// answer, and no statement timeout enforced) ends as failed once no batch
/// was answered for 60 s, with its final audit line and the rows done
/// before; it once waited for good, its audit line open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_on_a_hung_postgres_ends_with_its_audit_line() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    // Each batch takes a moment, so the freeze lands mid-purge.
    let (c, _, alice, body) = slow_purge(
        &db,
        "console-hung",
        "PERFORM pg_sleep(0.3); RETURN NULL;",
        "FOR EACH STATEMENT",
    )
    .await;
    let port = c.port;
    let purge = tokio::spawn(async move {
        let mut api = Web::api(port);
        api.post_json_as("/api/v1/dead-letters/purge", &alice, &body).await
    });
    wait_until("the purge has started", Duration::from_secs(30), || async {
        !c.relay.records("console action started").is_empty()
    })
    .await;
    let frozen = pg.freeze();
    let r = tokio::time::timeout(Duration::from_secs(120), purge)
        .await
        .expect("the purge answers while Postgres hangs")
        .expect("the request task");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("hangs"), "{}", r.body);
    wait_until("the final audit line is written", Duration::from_secs(30), || async {
        c.relay
            .records("console action failed")
            .iter()
            .any(|l| l["action"] == "purge" && l["error"].as_str().is_some_and(|e| e.contains("hangs")))
    })
    .await;
    drop(frozen);
}
