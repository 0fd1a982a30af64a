//! The console against hostile ids (#37): job ids that hold `/ ? # % ..`,
//! links crafted to turn one action into another, offsets from
//! outside. Every form is followed the way a browser follows it
//! (`web::resolve`).

use crate::common;

use std::time::Duration;

use super::web::{base64, post_forms, relay_with_console, resolve, submit_every_form, unescape, users_file, Web};
use super::{dead_of, insert_dead};
use common::*;

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
                ["/jobs/pause", "/jobs/resume", "/jobs/cancel", "/jobs/reconcile"].contains(&to.as_str()),
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
