//! A bulk action acts on exactly what its confirmation showed (#37): a
//! body with a mistyped or missing filter is refused and changes nothing;
//! one count for the list, the confirmation and the action; a confirmation
//! the data has outgrown, or a set-aside row swapped for another, is
//! refused (409); a job id with spaces is that job and no other.

use crate::common;

use super::web::{base64, bound, post_forms, relay_with_console, resolve, users_file, Web};
use super::{dead_of, insert_dead};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_or_empty_bulk_filter_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-typo");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    cli(&db, &["pause", "--reason", "typos"]);
    let jobs = new_jobs(2);
    let (a, b) = (jobs[0].to_string(), jobs[1].to_string());
    insert_dead(&db, &a, 1200, "WRONGTYPE").await;
    insert_dead(&db, &b, 300, "WRONGTYPE").await;
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    for path in ["/api/v1/dead-letters/purge", "/api/v1/dead-letters/requeue"] {
        let r = api.post_json_as(path, &alice, &format!(r#"{{"job_id": "{a}"}}"#)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(r.body.contains("job_id"), "the answer names the field: {}", r.body);
        let r = api.post_json_as(path, &alice, "{}").await;
        assert_eq!(r.status, 400, "{path}: everything needs saying: {}", r.body);
        let r = api.post_json_as(path, &alice, "").await;
        assert_eq!(r.status, 400, "{path}: no body is not everything: {}", r.body);
    }
    let r = api
        .post_json_as("/api/v1/set-aside/requeue", &alice, &format!(r#"{{"jobid": "{a}"}}"#))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("jobid"), "{}", r.body);
    // The same through the forms.
    let mut web = Web::new(c.port);
    assert_eq!(web.sign_in("alice", "alice's password").await.status, 303);
    let csrf = web.csrf().await;
    let r = web
        .post_form("/dead-letters/purge", &[("csrf", &csrf), ("job_id", &a)])
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("job_id"), "{}", r.body);
    let r = web.post_form("/dead-letters/purge", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 1500);
}

/// The confirmation's count, the list and the action read one canonical
/// filter; the action carries what was confirmed and refuses a set that
/// has grown since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_touches_exactly_what_was_confirmed() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-confirmed");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    cli(&db, &["pause", "--reason", "confirmations"]);
    let jobs = new_jobs(2);
    let (a, b) = (jobs[0].to_string(), jobs[1].to_string());
    insert_dead(&db, &a, 10_050, "WRONGTYPE").await;
    insert_dead(&db, &b, 300, "WRONGTYPE").await;
    let upper = a.to_uppercase();
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    let list = api
        .get_as(&format!("/api/v1/dead-letters?job={upper}"), &alice)
        .await
        .json();
    let listed = list["rows"].as_array().map_or(0, Vec::len);
    assert_eq!(listed, 100, "{list}");
    assert!(
        list["matching"]["count"].as_i64().unwrap_or(0) > 0,
        "the count reads the same job id as the list: {list}"
    );

    let mut web = Web::new(c.port);
    assert_eq!(web.sign_in("alice", "alice's password").await.status, 303);
    let page = format!("/dead-letters/confirm?action=purge&job={upper}&error=&within=");
    let confirm = web.get(&page).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(
        confirm.body.contains("10,050"),
        "the exact count, past 10,000: {}",
        confirm.body
    );
    // More matching rows arrive between the confirmation and the click.
    insert_dead(&db, &a, 5, "WRONGTYPE").await;
    let forms = post_forms(&confirm.body);
    let (action, hidden) = forms
        .iter()
        .find(|(a, _)| a.contains("purge"))
        .cloned()
        .expect("the purge form");
    let fields: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stale = web.post_form(&resolve(c.port, &page, &action), &fields).await;
    assert_eq!(stale.status, 409, "the set grew: {}", stale.body);
    assert_eq!(dead_of(&db, &a).await, 10_055, "nothing purged on a 409");
    // Confirmed again, it purges exactly job A's rows.
    let confirm = web.get(&page).await;
    assert!(confirm.body.contains("10,055"), "{}", confirm.body);
    let forms = post_forms(&confirm.body);
    let (action, hidden) = forms
        .iter()
        .find(|(a, _)| a.contains("purge"))
        .cloned()
        .expect("the purge form");
    let fields: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let done = web.post_form(&resolve(c.port, &page, &action), &fields).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(dead_of(&db, &a).await, 0);
    assert_eq!(dead_of(&db, &b).await, 300, "the other job's rows are untouched");
}

/// The set-aside requeue is bound to the very rows shown: a row set aside
/// after the page, even with a lower id, and one that left meanwhile,
/// make it refuse (409) and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_aside_requeue_refuses_a_swapped_row() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-set-aside-swap");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    cli(&db, &["pause", "--reason", "set-aside swap"]);
    let job = new_jobs(1)[0];
    seed_for(&db, 10, &[job]).await;
    let client = db.client().await;
    let ids: Vec<i64> = client
        .query("SELECT id FROM task_outbox ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let set_aside = |id: i64, on: bool| {
        let sql = format!(
            "UPDATE task_outbox SET run_at = {} WHERE id = {id}",
            if on { "'infinity'" } else { "now()" }
        );
        let db = &db;
        async move { db.client().await.batch_execute(&sql).await.expect("set aside") }
    };
    set_aside(ids[5], true).await;
    set_aside(ids[9], true).await;
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    let seen = api.get_as("/api/v1/set-aside", &alice).await.json();
    assert_eq!(seen["expect_rows"], 2, "{seen}");
    // Row 5 leaves, row 2 (a lower id) comes: the same count and highest id.
    set_aside(ids[5], false).await;
    set_aside(ids[2], true).await;
    let body = bound(serde_json::json!({ "all": true }), &seen);
    let r = api.post_json_as("/api/v1/set-aside/requeue", &alice, &body).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE run_at = 'infinity'")
            .await,
        2,
        "nothing changed"
    );
}

/// A TEXT job id is taken exactly: one that begins with a space, or is
/// nothing but spaces, is its own job, not a trimmed other one and not
/// "every job".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_with_spaces_is_that_job_and_no_other() {
    let db = TestDb::go().await;
    let prefix = key_prefix();
    let users = users_file("console-spaces");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    cli(&db, &["pause", "--reason", "spaces"]);
    let client = db.client().await;
    for (job, n) in [("job-7", 3_i64), (" job-7", 2), ("  ", 1)] {
        client
            .execute(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 SELECT gen_random_uuid()::text, $1, i::int, 'example.com', '/p/' || i, 0.5, 'sitemap', 'infinity'
                   FROM generate_series(1, $2::int8) AS i",
                &[&job, &n],
            )
            .await
            .expect("rows set aside");
    }
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    let mut api = Web::api(c.port);
    for (q, want) in [("job-7", 3), ("%20job-7", 2), ("%20%20", 1), ("", 6)] {
        let seen = api.get_as(&format!("/api/v1/set-aside?job={q}"), &alice).await.json();
        assert_eq!(seen["expect_rows"], want, "job={q:?}: {seen}");
    }
    let seen = api.get_as("/api/v1/set-aside?job=%20job-7", &alice).await.json();
    let body = bound(serde_json::json!({ "job": " job-7" }), &seen);
    let r = api.post_json_as("/api/v1/set-aside/requeue", &alice, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["rows"], 2, "{}", r.body);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE run_at = 'infinity'")
            .await,
        4,
        "only the two rows of \" job-7\" are due again"
    );
}
