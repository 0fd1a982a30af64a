//! The console against hostile input (#37): job ids that hold `/ ? # % ..`,
//! links crafted to turn one action into another, bulk-action bodies with
//! a mistyped field, a confirmation the data has outgrown, and actions
//! whose later batch fails or whose client goes away. Real Postgres, real
//! Redis, the relay as a subprocess serving the console; every form is
//! followed the way a browser follows it (its `action` resolved against
//! the page's URL by the WHATWG rules of the `url` crate).

use crate::common;

use std::time::Duration;

use common::web::{base64, bound, cli, relay_with_console, users_file, Answer, ConsoleRelay, Web};
use common::*;

/// Insert `n` dead letters of `job` with `error`.
async fn insert_dead(db: &TestDb, job: &str, n: i64, error: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                           source_type, run_at, attempts, last_error)
             SELECT i, gen_random_uuid(), $1::text::uuid, i::int, 'example.com', '/dead/' || i, 0.5, 'sitemap',
                    now(), 5, $3
               FROM generate_series(1, $2::int8) AS i",
            &[&job, &n, &error],
        )
        .await
        .expect("dead letters");
}

async fn dead_of(db: &TestDb, job: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM task_outbox_dead WHERE job_id::text = lower('{job}')"
    ))
    .await
}

/// Every `<form method="post">` of a page: its action and hidden fields.
fn post_forms(body: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for part in body.split("<form").skip(1) {
        let form = part.split("</form>").next().unwrap_or_default();
        let head = form.split('>').next().unwrap_or_default();
        if !head.contains("method=\"post\"") {
            continue;
        }
        let action = attr(head, "action").unwrap_or_default();
        let hidden = form
            .split("<input")
            .skip(1)
            .filter(|i| i.contains("type=\"hidden\""))
            .filter_map(|i| Some((attr(i, "name")?, attr(i, "value").unwrap_or_default())))
            .collect();
        out.push((action, hidden));
    }
    out
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[at..].find('"')?;
    Some(unescape(&tag[at..at + end]))
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Where a browser on `page` sends a form whose action is `action`.
fn resolve(port: u16, page: &str, action: &str) -> String {
    let base = url::Url::parse(&format!("http://127.0.0.1:{port}{page}")).expect("page URL");
    let to = base.join(action).expect("a resolvable action");
    match to.query() {
        Some(q) => format!("{}?{q}", to.path()),
        None => to.path().to_string(),
    }
}

/// Submit every POST form of `page` as a browser would: its action
/// resolved against the page, its hidden fields as they are.
async fn submit_every_form(web: &mut Web, port: u16, page: &str) -> Vec<(String, Answer)> {
    let shown = web.get(page).await;
    let mut answers = Vec::new();
    for (action, hidden) in post_forms(&shown.body) {
        if action == "/logout" {
            continue;
        }
        let to = resolve(port, page, &action);
        let fields: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let a = web.post_form(&to, &fields).await;
        answers.push((to, a));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_job_link_acts_on_that_job_id_and_nothing_else() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-crafted");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    // Nothing is claimed: every row stays where the test put it.
    cli(&db, &["pause", "--reason", "crafted links"]);
    let jobs = new_jobs(2);
    let (a, other) = (jobs[0].to_string(), jobs[1]);
    insert_dead(&db, &a, 1200, "WRONGTYPE Operation against a key").await;
    seed_for(&db, 20, &[other]).await;
    running_job(&db, &other).await;
    db.client()
        .await
        .batch_execute("UPDATE task_outbox SET run_at = 'infinity' WHERE id = (SELECT min(id) FROM task_outbox)")
        .await
        .expect("one row set aside");

    let mut alice = Web::new(c.port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let crafted = [
        "/jobs/..%2Fdead-letters%2Fpurge%3F/cancel".to_string(),
        "/jobs/..%2Fset-aside%2Frequeue%3F/cancel".to_string(),
        format!("/jobs/{other}%2Fcancel%3F/cancel"),
        format!("/jobs/{other}%2Fcancel%3F/schedule"),
        "/jobs/cancel?job=..%2Fdead-letters%2Fpurge%3F".to_string(),
        "/jobs/cancel?job=..%2F..%2Fdead-letters%2Fpurge%3Fx%3D".to_string(),
        format!("/jobs/cancel?job={other}%2Fcancel%3F"),
        format!("/jobs/schedule?job={other}%23%2F..%2Fcancel"),
    ];
    for page in &crafted {
        for (to, answer) in submit_every_form(&mut alice, c.port, page).await {
            assert!(
                ["/jobs/pause", "/jobs/resume", "/jobs/cancel"].contains(&to.as_str()),
                "{page}: a form posts to {to}, not to a job action's own route ({})",
                answer.status
            );
        }
    }
    assert_eq!(dead_of(&db, &a).await, 1200, "no dead letter purged");
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE run_at = 'infinity'")
            .await,
        1,
        "the set-aside row is still set aside"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{other}'"))
            .await,
        20,
        "the other job is not cancelled"
    );
    let audit = c.relay.records("console action");
    assert!(
        !audit
            .iter()
            .any(|r| r["action"] == "purge" || r["action"] == "requeue_set_aside"),
        "{audit:?}"
    );
}

/// A paused job per hostile TEXT id (the Go schema's `task_outbox.job_id`):
/// every link and form of the Jobs page, followed as a browser follows it,
/// reaches that job's own route and acts on exactly that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_job_ids_round_trip_through_every_link_and_form() {
    let db = TestDb::go().await;
    let prefix = key_prefix();
    let users = users_file("console-text-ids");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let ids = [
        "../dead-letters/purge?",
        "a/b",
        "x?y=1#frag",
        "100%25 sure %2F",
        "..",
        ".",
        "{job}|x",
        "with space and \"quotes\" 'too'",
        "ünïcødé/日本",
        "%2e%2e",
        "back\\slash",
    ];
    let mut alice = Web::new(c.port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let client = db.client().await;
    for id in ids {
        client
            .execute(
                "INSERT INTO outbox_relay_pause (scope, reason) VALUES ($1, 'hostile id')",
                &[&id],
            )
            .await
            .expect("pause a job with a hostile id");
    }
    let page = alice.get("/jobs").await;
    assert_eq!(page.status, 200, "{}", page.body);
    // Each Resume form resumes exactly its own job, one at a time.
    for (action, hidden) in post_forms(&page.body) {
        if action == "/logout" {
            continue;
        }
        let to = resolve(c.port, "/jobs", &action);
        let fields: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let before: Vec<String> = client
            .query("SELECT scope FROM outbox_relay_pause ORDER BY scope", &[])
            .await
            .expect("pauses")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let r = alice.post_form(&to, &fields).await;
        assert_eq!(r.status, 200, "{to}: {}", r.body);
        let after: Vec<String> = client
            .query("SELECT scope FROM outbox_relay_pause ORDER BY scope", &[])
            .await
            .expect("pauses")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let gone: Vec<&String> = before.iter().filter(|s| !after.contains(s)).collect();
        assert_eq!(gone.len(), 1, "{to} resumed {gone:?}");
        assert!(ids.contains(&gone[0].as_str()), "{to} resumed {gone:?}");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_relay_pause").await,
        0,
        "every hostile id resumed"
    );
    // `*` is the pause table's name for every job: a job id `*` is
    // refused, it does not pause everything.
    let csrf = alice.csrf().await;
    let r = alice.post_form("/jobs/pause", &[("csrf", &csrf), ("job", "*")]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = Web::api(c.port)
        .post_json_as(
            "/api/v1/jobs/%2A/pause",
            &format!("Basic {}", base64(b"alice:alice's password")),
            "{}",
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_relay_pause WHERE scope = '*'")
            .await,
        0,
        "the job id * did not pause every job"
    );
    // Links to schedules and dead letters carry the id intact.
    for id in ids {
        client
            .execute(
                "INSERT INTO outbox_relay_pause (scope, reason) VALUES ($1, 'hostile id')",
                &[&id],
            )
            .await
            .expect("pause again");
    }
    let page = alice.get("/jobs").await;
    let hrefs: Vec<url::Url> = page
        .body
        .split(" href=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(|h| {
            url::Url::parse(&format!("http://127.0.0.1:{}/jobs", c.port))
                .expect("base")
                .join(&unescape(h))
                .expect("a resolvable link")
        })
        .collect();
    let job_of = |u: &url::Url| u.query_pairs().find(|(k, _)| k == "job").map(|(_, v)| v.into_owned());
    for id in ids {
        for path in ["/jobs/schedule", "/dead-letters"] {
            let link = hrefs
                .iter()
                .find(|u| u.path() == path && job_of(u).as_deref() == Some(id))
                .unwrap_or_else(|| panic!("no {path} link for {id:?} among {hrefs:?}"));
            let s = alice
                .get(&format!("{}?{}", link.path(), link.query().unwrap_or_default()))
                .await;
            assert_eq!(s.status, 200, "{link}: {}", s.body);
            if path == "/jobs/schedule" {
                let key = format!("{}sched:{id}", prefix.0);
                assert!(
                    s.body.contains(&maud_escape(&key)),
                    "{link} shows the schedule of {id:?} ({key}): {}",
                    s.body
                );
            }
        }
    }
    // The API's routes take the id as one percent-encoded path segment
    // (what a script's URL library sends) and act on exactly it.
    let alice_basic = format!("Basic {}", base64(b"alice:alice's password"));
    for id in ids {
        let segment: String = id
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let r = Web::api(c.port)
            .post_json_as(&format!("/api/v1/jobs/{segment}/resume"), &alice_basic, "{}")
            .await;
        assert_eq!(r.status, 200, "{id:?}: {}", r.body);
        let left = client
            .query_one("SELECT count(*) FROM outbox_relay_pause WHERE scope = $1", &[&id])
            .await
            .expect("count")
            .get::<_, i64>(0);
        assert_eq!(left, 0, "{id:?} resumed through the API");
    }
    assert_eq!(db.count("SELECT count(*) FROM outbox_relay_pause").await, 0);
}

fn maud_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

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

/// Numbers from outside are taken as numbers, not trusted: a schedule
/// page at the largest or a negative offset is a page (empty, or the
/// first), not an arithmetic overflow in the console's one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_page_at_any_offset_is_a_page() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-offsets");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let job = new_jobs(1)[0];
    seed_for(&db, 60, &[job]).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let mut web = Web::new(c.port);
    assert_eq!(web.sign_in("alice", "alice's password").await.status, 303);
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    for offset in [
        i64::MAX.to_string(),
        "-9223372036854775808".to_string(),
        "59".to_string(),
    ] {
        let page = web.get(&format!("/jobs/schedule?job={job}&offset={offset}")).await;
        assert_eq!(page.status, 200, "offset {offset}: {}", page.body);
        let api = Web::api(c.port)
            .get_as(&format!("/api/v1/jobs/{job}/schedule?offset={offset}"), &alice)
            .await;
        assert_eq!(api.status, 200, "offset {offset}: {}", api.body);
        assert_eq!(api.json()["size"], 60);
    }
    // The console still answers after them.
    assert_eq!(web.get("/jobs").await.status, 200);
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
