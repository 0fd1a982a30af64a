//! Who may do what in the console (#30): a session for every page (303 to
//! the sign-in), a user for the API (HTTP Basic, 401); roles, CSRF tokens
//! and origin checks on every action, the security headers, and the audit
//! lines naming the user and action; the API's JSON-only writes, its
//! limiter, and its overview of the fleet's backlog.

use crate::common;

use std::time::Duration;

use super::web::{base64, relay_with_console, users_file, Web};
use common::*;

async fn paused_jobs(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM outbox_relay_pause WHERE scope <> '*'")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_roles_csrf_origin_and_job_actions() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-roles");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let mut anon = Web::new(c.port);

    // Nothing without signing in; every answer carries the headers.
    let r = anon.get("/").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login?next=/"));
    let login = anon.get("/login").await;
    assert_eq!(login.status, 200);
    let csp = login.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(login.header("x-content-type-options"), Some("nosniff"));
    assert!(!login.body.contains("<script"), "no script: {}", login.body);
    let api = anon.get("/api/v1/overview").await;
    assert_eq!(api.status, 401, "{}", api.body);

    // A wrong password, then the right one.
    let mut alice = Web::new(c.port);
    assert_eq!(alice.sign_in("alice", "wrong").await.status, 401);
    let ok = alice.sign_in("alice", "alice's password").await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let cookie = ok.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let page = alice.get("/").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Overview") && page.body.contains("alice · operator"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("alice's password"));

    // Rows of two jobs; job A is paused from the console before they come.
    let jobs = new_jobs(2);
    let (a, b) = (jobs[0], jobs[1]);
    running_job(&db, &a).await;
    running_job(&db, &b).await;
    let csrf = alice.csrf().await;

    // The viewer sees no action and cannot forge one.
    let mut bob = Web::new(c.port);
    assert_eq!(bob.sign_in("bob", "bob's password").await.status, 303);
    let bob_csrf = bob.csrf().await;
    seed_for(&db, 10, &[b]).await;
    wait_until("job B's rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    let jobs_page = bob.get("/jobs").await;
    assert!(jobs_page.body.contains(&b.to_string()), "{}", jobs_page.body);
    assert!(
        !jobs_page.body.contains(">Pause<") && !jobs_page.body.contains("Cancel…"),
        "{}",
        jobs_page.body
    );
    let forged = bob
        .post_form("/jobs/pause", &[("csrf", &bob_csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert_eq!(paused_jobs(&db).await, 0);

    // The operator without the token, or from another origin: refused.
    let no_token = alice.post_form("/jobs/pause", &[("job", &a.to_string())]).await;
    assert_eq!(no_token.status, 403, "{}", no_token.body);
    assert!(no_token.body.contains("CSRF"), "{}", no_token.body);
    alice.origin = Some("http://evil.example".into());
    let cross = alice
        .post_form("/jobs/pause", &[("csrf", &csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(cross.status, 403, "{}", cross.body);
    alice.origin = None;
    let no_origin = alice
        .post_form("/jobs/pause", &[("csrf", &csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(no_origin.status, 403, "neither Origin nor Referer: {}", no_origin.body);
    alice.origin = Some(format!("http://127.0.0.1:{}", c.port));
    assert_eq!(paused_jobs(&db).await, 0);

    // Pause A: its rows wait while B's are delivered; resume: delivered.
    let paused = alice
        .post_form("/jobs/pause", &[("csrf", &csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert!(paused.body.contains("paused job"), "{}", paused.body);
    assert_eq!(paused_jobs(&db).await, 1);
    seed_for(&db, 40, &[a]).await;
    seed_for(&db, 40, &[b]).await;
    wait_until("job B's new rows delivered", Duration::from_secs(60), || async {
        db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{b}'"))
            .await
            == 0
    })
    .await;
    // Two more sweep intervals: A's rows are still there.
    let ticks = c.relay.ok_ticks().await;
    wait_until("two more ticks", Duration::from_secs(30), || async {
        c.relay.ok_ticks().await >= ticks + 2.0
    })
    .await;
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{a}'"))
            .await,
        40
    );
    let jobs_page = alice.get("/jobs").await;
    assert!(jobs_page.body.contains("Resume"), "{}", jobs_page.body);
    let resumed = alice
        .post_form("/jobs/resume", &[("csrf", &csrf), ("job", &a.to_string())])
        .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    wait_until(
        "job A's rows delivered after resume",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    let members = schedule_members(&shared_redis_url(), &prefix).await;
    assert_eq!(members.len(), 90);

    // The schedule page shows A's entries in score order, read-only.
    let sched = alice.get(&format!("/jobs/schedule?job={a}")).await;
    assert_eq!(sched.status, 200);
    assert!(sched.body.contains("40 entries"), "{}", sched.body);

    // Cancel B: the confirmation states its counts, then the result line.
    seed_for(&db, 5, &[b]).await;
    let confirm = alice.get(&format!("/jobs/cancel?job={b}")).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(confirm.body.contains("Dead letters (kept)"), "{}", confirm.body);
    let cancelled = alice
        .post_form("/jobs/cancel", &[("csrf", &csrf), ("job", &b.to_string())])
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert!(cancelled.body.contains("cancelled job"), "{}", cancelled.body);
    // B's 50 entries went with its schedule key; A's 40 stay.
    assert_eq!(schedule_members(&shared_redis_url(), &prefix).await.len(), 40);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM jobs WHERE id = '{b}' AND status = 'cancelled'"
        ))
        .await,
        1
    );

    // Audit lines and counters.
    let audits = c.relay.records("console action");
    let did: Vec<(String, String)> = audits
        .iter()
        .filter(|r| r["msg"] == "console action")
        .map(|r| {
            (
                r["user"].as_str().unwrap_or("").to_string(),
                r["action"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for action in ["pause", "resume", "cancel"] {
        assert!(did.contains(&("alice".into(), action.into())), "{did:?}");
    }
    let refused = c.relay.records("console action refused");
    assert!(refused.iter().any(|r| r["user"] == "bob"), "{refused:?}");
    let m = c.relay.http_get("/metrics").await.expect("metrics").1;
    assert_eq!(
        metric_value(
            &m,
            "outbox_relay_console_actions_total",
            &[("action", "pause"), ("result", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outbox_relay_console_actions_total",
            &[("action", "pause"), ("result", "forbidden")]
        ),
        Some(4.0)
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_console_logins_total", &[("result", "failed")]),
        Some(1.0)
    );

    // Signing out ends the session.
    let out = alice.post_form("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(alice.get("/").await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_basic_auth_with_json_and_the_same_roles() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-api");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let job = new_jobs(1)[0];
    let mut web = Web::new(c.port);
    web.origin = None;
    let basic = |u: &str, p: &str| format!("Basic {}", base64(format!("{u}:{p}").as_bytes()));
    let (alice, bob) = (basic("alice", "alice's password"), basic("bob", "bob's password"));

    let r = web
        .request("GET", "/api/v1/overview", &[("Authorization", &bob)], None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let o = r.json();
    assert_eq!(o["overview"]["due"]["count"], 0);
    assert!(o["relays_live"].as_u64().is_some(), "{o}");
    let fleet = web
        .request("GET", "/api/v1/fleet", &[("Authorization", &bob)], None)
        .await
        .json();
    let me = &fleet["live"][0];
    assert_eq!(me["settings"]["batch_size"], 1000, "shipped batch: {fleet}");
    assert_eq!(me["settings"]["key_prefix"], prefix.0.as_str());

    // The overview's backlog is the relay's own probe, carried by its
    // heartbeat: exact past the console's 10,000 cap. One row is due at
    // `-infinity` and was created then (Postgres cannot subtract either
    // from now(): the probe's oldest-due read once failed on it, and with
    // it every gauge); the 10,501st row, seeded after it, proves a probe
    // saw it and succeeded.
    cli(&db, &["pause", "--reason", "api test"]);
    seed_for(&db, 10_500, &[job]).await;
    db.set_first_row("run_at = '-infinity', created_at = '-infinity'").await;
    seed_for(&db, 1, &[job]).await;
    wait_until(
        "the overview shows the relay's exact count",
        Duration::from_secs(60),
        || {
            let (port, bob) = (c.port, bob.clone());
            async move {
                let o = Web::api(port).get_as("/api/v1/overview", &bob).await.json();
                o["overview"]["source"]["kind"] == "relay"
                    && o["overview"]["due"]["count"] == 10_501
                    && o["overview"]["due"]["more"] == false
                    && o["overview"]["oldest_due_seconds"].as_f64().is_some_and(f64::is_finite)
            }
        },
    )
    .await;
    cli(&db, &["resume"]);
    wait_until("the rows delivered", Duration::from_secs(60), || async {
        outbox_rows_of(&db, &job).await == 0
    })
    .await;

    // A viewer may not act; an operator must send JSON.
    let pause = format!("/api/v1/jobs/{job}/pause");
    let r = web
        .request(
            "POST",
            &pause,
            &[("Authorization", &bob)],
            Some(("application/json", "{}".into())),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = web
        .request(
            "POST",
            &pause,
            &[("Authorization", &alice)],
            Some(("application/x-www-form-urlencoded", "x=1".into())),
        )
        .await;
    assert_eq!(
        r.status, 403,
        "a form with cached Basic credentials is what a cross-site page can send: {}",
        r.body
    );
    assert_eq!(paused_jobs(&db).await, 0);
    let r = web
        .request(
            "POST",
            &pause,
            &[("Authorization", &alice)],
            Some(("application/json", "{}".into())),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ok"], true);
    assert_eq!(paused_jobs(&db).await, 1);
    let jobs = web
        .request("GET", "/api/v1/jobs", &[("Authorization", &alice)], None)
        .await
        .json();
    assert!(
        jobs["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["job_id"] == job.to_string() && j["paused"] == true)),
        "{jobs}"
    );

    // Five wrong passwords, then even the right one waits.
    for _ in 0..5 {
        let r = web
            .request(
                "GET",
                "/api/v1/overview",
                &[("Authorization", &basic("alice", "nope"))],
                None,
            )
            .await;
        assert_eq!(r.status, 401);
    }
    let r = web
        .request(
            "GET",
            "/api/v1/overview",
            &[("Authorization", &basic("alice", "nope"))],
            None,
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    // Credentials checked a moment ago are remembered (no argon2 per
    // call, #37): the script that polls with them goes on.
    let r = web
        .request("GET", "/api/v1/overview", &[("Authorization", &alice)], None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = c.relay.http_get("/metrics").await.expect("metrics").1;
    assert_eq!(
        metric_value(&m, "outbox_relay_console_logins_total", &[("result", "limited")]),
        Some(1.0)
    );
}
