//! The console in a real browser (#30 item 7): Debian's Chromium, headless,
//! through ChromeDriver. An operator signs in, watches the backlog fall
//! during a drain, pauses a job and sees its rows wait, resumes it,
//! requeues filtered dead letters and sees them delivered, and cancels a
//! job; a viewer sees no action and a forged POST is refused, as is a POST
//! without the CSRF token. Every page is saved as a screenshot in
//! `target/console-screenshots/` (docs/console.md shows two of them).

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use super::browser::Driver;
use super::web::{relay_with_console, users_file, Web};
use common::*;

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_and_a_viewer_use_the_console_in_chromium() {
    // The scenario's future is large in a debug build: on the heap, not on
    // the test thread's stack.
    Box::pin(operator_and_viewer()).await;
}

async fn operator_and_viewer() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-browser");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let base = format!("http://127.0.0.1:{}", c.port);
    let driver = Driver::start().await;
    let mut op = driver.browser().await;

    // A backlog built while everything is paused.
    cli(&db, &["pause", "--reason", "browser test"]);
    let jobs = new_jobs(4);
    let (a, b, dead_job, doomed) = (jobs[0], jobs[1], jobs[2], jobs[3]);
    running_job(&db, &a).await;
    running_job(&db, &b).await;
    seed_for(&db, 30_000, &[b]).await;

    // Sign in: the console sends an unsigned visitor to the login form.
    op.goto(&format!("{base}/")).await;
    assert!(op.url().await.contains("/login"), "{}", op.url().await);
    op.type_into("input[name=name]", "alice").await;
    op.type_into("input[name=password]", "alice's password").await;
    op.click("form.login button[type=submit]").await;
    let page = op.wait_for("alice · operator").await;
    assert!(page.contains("Everything is paused"), "{page}");
    // The backlog as the relay's own probe counted it (exact), once a
    // heartbeat has carried a probe that saw the rows.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p = op.source().await;
        if due_now(&p) == Some(30_000) {
            assert!(p.contains("(its outbox probe, exact)"), "{p}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overview never showed 30,000 due: {p}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        op.goto(&format!("{base}/")).await;
    }
    op.screenshot(&shots().join("overview-backlog.png")).await;

    // Resume: the backlog falls from 30,000 to nothing, seen on the page.
    // The figures are the relay's probe (every metrics.probe_interval,
    // carried by the next heartbeat), so a drain shorter than those may go
    // from 30,000 to 0 between two of them: a figure in between is noted,
    // not required.
    cli(&db, &["resume"]);
    let mut seen_between = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        op.goto(&format!("{base}/")).await;
        let p = op.source().await;
        if due_now(&p).is_some_and(|n| n > 0 && n < 30_000) {
            seen_between = due_now(&p);
        }
        // The drain is over and this relay's heartbeat is listed.
        if due_now(&p) == Some(0) && p.contains(" ago</td>") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overview never showed the drain done: {p}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("due seen during the drain, between 30,000 and 0: {seen_between:?}");
    op.screenshot(&shots().join("overview.png")).await;

    // Pause job A from the jobs page; its rows wait while B's go.
    seed_for(&db, 1, &[a]).await;
    wait_until("A's first row delivered", Duration::from_secs(60), || async {
        outbox_rows_of(&db, &a).await == 0
    })
    .await;
    op.goto(&format!("{base}/jobs")).await;
    op.screenshot(&shots().join("jobs.png")).await;
    op.click(&format!(
        "form[action=\"/jobs/pause\"]:has(input[name=\"job\"][value=\"{a}\"]) button"
    ))
    .await;
    op.wait_for(&format!("paused job {a}")).await;
    seed_for(&db, 25, &[a]).await;
    seed_for(&db, 25, &[b]).await;
    wait_until("B's rows delivered", Duration::from_secs(60), || async {
        outbox_rows_of(&db, &b).await == 0
    })
    .await;
    let ticks = c.relay.ok_ticks().await;
    wait_until("two more ticks", Duration::from_secs(30), || async {
        c.relay.ok_ticks().await >= ticks + 2.0
    })
    .await;
    assert_eq!(outbox_rows_of(&db, &a).await, 25, "a paused job's rows wait");
    op.goto(&format!("{base}/jobs")).await;
    op.click(&format!(
        "form[action=\"/jobs/resume\"]:has(input[name=\"job\"][value=\"{a}\"]) button"
    ))
    .await;
    op.wait_for(&format!("resumed job {a}")).await;
    wait_until("A's rows delivered after resume", Duration::from_secs(60), || async {
        outbox_rows_of(&db, &a).await == 0
    })
    .await;
    op.goto(&format!("{base}/jobs/schedule?job={a}")).await;
    op.wait_for("26 entries").await;
    op.screenshot(&shots().join("schedule.png")).await;

    // Dead letters: filter, requeue everything matching, see them delivered.
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                           source_type, run_at, attempts, last_error)
             SELECT i, gen_random_uuid(), $1, i::int, 'example.com', '/dead/' || i, 0.5, 'sitemap', now(), 5,
                    CASE WHEN i <= 300 THEN 'WRONGTYPE Operation against a key holding the wrong kind of value'
                         ELSE 'field path holds ''|'' and cannot be encoded' END
               FROM generate_series(1, 310) AS i",
            &[&dead_job],
        )
        .await
        .expect("dead letters");
    op.goto(&format!("{base}/dead-letters")).await;
    op.type_into("form.filter input[name=error]", "WRONGTYPE").await;
    op.click("form.filter button").await;
    op.wait_for("300 dead letters match").await;
    op.screenshot(&shots().join("dead-letters.png")).await;
    op.click("table a[href^=\"/dead-letters/\"]").await;
    op.wait_for("last_error").await;
    op.screenshot(&shots().join("dead-letter.png")).await;
    op.goto(&format!("{base}/dead-letters?job=&error=WRONGTYPE&within="))
        .await;
    op.click("form[action=\"/dead-letters/confirm\"] input[value=requeue] ~ button")
        .await;
    op.wait_for("Requeue <strong>300</strong> dead letters").await;
    op.screenshot(&shots().join("requeue-confirm.png")).await;
    op.click("form[action=\"/dead-letters/requeue\"] button").await;
    op.wait_for("requeued 300 of 300").await;
    wait_until("requeued rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 10);
    let members = schedule_members(&shared_redis_url(), &prefix).await;
    assert_eq!(members.len(), 30_000 + 26 + 25 + 300);

    // Cancel a job, after reading its counts.
    running_job(&db, &doomed).await;
    cli(&db, &["pause", "--job", &doomed.to_string()]);
    seed_for(&db, 7, &[doomed]).await;
    op.goto(&format!("{base}/jobs/cancel?job={doomed}")).await;
    op.wait_for("Due rows among the next 10,000").await;
    op.screenshot(&shots().join("cancel-confirm.png")).await;
    op.click(&format!(
        "form[action=\"/jobs/cancel\"]:has(input[name=\"job\"][value=\"{doomed}\"]) button"
    ))
    .await;
    op.wait_for("7 outbox rows deleted").await;
    assert_eq!(outbox_rows_of(&db, &doomed).await, 0);
    op.goto(&format!("{base}/set-aside")).await;
    op.screenshot(&shots().join("set-aside.png")).await;
    // The overview once a heartbeat has counted the drain (every
    // health.interval): docs/console.md's picture.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        op.goto(&format!("{base}/")).await;
        if !op.source().await.contains("max 0 rows") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat counted the drain");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    op.screenshot(&shots().join("overview-after.png")).await;

    // A crafted link (#37): once it rendered a cancel form whose action
    // Chromium resolved to /dead-letters/purge. No page builds a URL from
    // the job id now: neither link offers any form that reaches another
    // route, and the dead letters are all still there.
    for crafted in [
        "/jobs/..%2Fdead-letters%2Fpurge%3F/cancel",
        "/jobs/cancel?job=..%2Fdead-letters%2Fpurge%3F",
    ] {
        op.goto(&format!("{base}{crafted}")).await;
        assert!(
            op.all("form[method=post]:not([action=\"/logout\"]):not([action=\"/jobs/cancel\"])")
                .await
                .is_empty(),
            "{crafted}: {}",
            op.source().await
        );
        assert!(
            op.all("form[action=\"/jobs/cancel\"]").await.is_empty(),
            "{crafted}: a cancel form for a job id that cannot name a job"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 10);

    // A POST without the CSRF token, with the operator's own session: refused.
    let mut forger = Web::new(c.port);
    forger.cookies.extend(op.cookies().await);
    let r = forger.post_form("/jobs/pause", &[("job", &a.to_string())]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    op.close().await;

    // A viewer sees every page and no action; a forged POST is refused.
    let mut viewer = driver.browser().await;
    viewer.goto(&format!("{base}/login")).await;
    viewer.type_into("input[name=name]", "bob").await;
    viewer.type_into("input[name=password]", "bob's password").await;
    viewer.click("form.login button[type=submit]").await;
    viewer.wait_for("bob · viewer").await;
    viewer.goto(&format!("{base}/jobs")).await;
    let page = viewer.source().await;
    assert!(page.contains("bob · viewer") && page.contains(&a.to_string()), "{page}");
    assert!(
        viewer
            .all("form[action$=\"/pause\"], form[action$=\"/resume\"], a.danger")
            .await
            .is_empty(),
        "{page}"
    );
    viewer.goto(&format!("{base}/dead-letters")).await;
    assert!(viewer.all("form[action=\"/dead-letters/confirm\"]").await.is_empty());
    let mut forged = Web::new(c.port);
    forged.cookies.extend(viewer.cookies().await);
    let csrf = forged.csrf().await;
    let r = forged
        .post_form("/jobs/pause", &[("csrf", &csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM outbox_relay_pause WHERE scope = '{a}'"))
            .await,
        0,
        "the forged pause did nothing"
    );
    viewer.close().await;
}

/// The overview's "Due now" figure ("30,000" → 30000); None when the page
/// shows none or a capped count ("more than 10,000").
fn due_now(page: &str) -> Option<i64> {
    let at = page.find("Due now</h2><p class=\"big\">")? + "Due now</h2><p class=\"big\">".len();
    let text = &page[at..at + page[at..].find('<')?];
    text.replace(',', "").parse().ok()
}
