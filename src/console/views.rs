//! The console's pages (maud: checked at compile time, escaped by default).
//! Plain HTML forms; no script anywhere. A view takes data and returns
//! markup; every URL in it comes from `paths` (no path is built from
//! data), and every form that changes something posts to a constant
//! action with its subject in hidden fields.

use maud::{html, Markup, DOCTYPE};

use super::chart::{Chart, Series};
use super::data::{self, seconds, thousands, Capped, Fleet, Job, JobCounts, Overview};
use super::identity::Who;
use super::load::{DeadLettersData, Extent, FilterForm, Point, ScheduleData, SetAsideData, SetAsideQuery};
use super::paths;

fn layout(title: &str, who: Option<&Who>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · outbox-relay" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header {
                    a.brand href="/" { "outbox-relay" }
                    @if who.is_some() {
                        nav {
                            a href="/" { "Overview" }
                            a href="/jobs" { "Jobs" }
                            a href="/dead-letters" { "Dead letters" }
                            a href="/set-aside" { "Set aside" }
                        }
                    }
                    @if let Some(w) = who {
                        div.who {
                            span { (w.name) " · " (w.role.as_str()) }
                            @if let Some(csrf) = &w.csrf {
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Sign out" }
                                }
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="everywhere" value="true";
                                    button type="submit" title="End every session of this user, on every browser" { "Sign out everywhere" }
                                }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

pub fn message(title: &str, text: &str, who: Option<&Who>) -> Markup {
    layout(title, who, html! { p.message { (text) } })
}

pub fn login(token: &str, next: &str, error: Option<&str>, read_only: bool) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(e) = error { p.error { (e) } }
            @if read_only { p { "This console is read-only." } }
            form.login method="post" action="/login" {
                input type="hidden" name="token" value=(token);
                input type="hidden" name="next" value=(next);
                label { "Name " input type="text" name="name" autocomplete="username" required; }
                label { "Password " input type="password" name="password" autocomplete="current-password" required; }
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn result(who: &Who, ok: bool, text: &str, back: &str) -> Markup {
    layout(
        if ok { "Done" } else { "Failed" },
        Some(who),
        html! {
            p.(if ok { "result ok" } else { "result error" }) { (text) }
            p { a href=(back) { "Back" } }
        },
    )
}

fn capped(c: &Capped) -> Markup {
    html! { (c.text()) @if c.more { abbr title="counted up to 10,000 along the claim index" { " *" } } }
}

#[allow(clippy::too_many_arguments)]
pub fn overview(
    who: &Who,
    o: &Overview,
    redis_ratio: Option<f64>,
    redis_error: Option<&str>,
    hour: &[Point],
    day: &[Point],
    fleet: &Fleet,
) -> Markup {
    let charts = |pts: &[Point], span: &str| {
        let minutes: Vec<i64> = pts.iter().map(|p| p.minute).collect();
        let val = |f: fn(&Point) -> i64| pts.iter().map(|p| Some(f(p) as f64)).collect::<Vec<_>>();
        html! {
            (Chart { title: &format!("Rows per point, last {span}"), unit: "rows", minutes: minutes.clone(), series: vec![
                Series { name: "delivered", class: "s1", values: val(|p| p.delivered) },
                Series { name: "retried", class: "s2", values: val(|p| p.retried) },
                Series { name: "dead-lettered", class: "s3", values: val(|p| p.dead_lettered) },
            ]}.render())
            (Chart { title: &format!("Delivery lag (created to ZADD), last {span}"), unit: "s", minutes, series: vec![
                Series { name: "p50", class: "s1", values: pts.iter().map(|p| p.lag_p50_seconds).collect() },
                Series { name: "p99", class: "s3", values: pts.iter().map(|p| p.lag_p99_seconds).collect() },
            ]}.render())
        }
    };
    layout(
        "Overview",
        Some(who),
        html! {
            @if o.paused_all { p.warning { "Everything is paused (outbox-relay pause): no relay claims a row." } }
            section.tiles {
                div.tile { h2 { "Due now" } p.big { (capped(&o.due)) } }
                div.tile { h2 { "Oldest due" } p.big { (o.oldest_due_seconds.map_or("none".to_string(), seconds)) } }
                div.tile { h2 { "Delayed" } p.big { (capped(&o.delayed)) } }
                div.tile { h2 { "Set aside" } p.big { a href="/set-aside" { (capped(&o.set_aside)) } } }
                div.tile { h2 { "Dead letters" } p.big { a href="/dead-letters" { (capped(&o.dead_letters)) } } }
                div.tile { h2 { "Redis memory" } p.big {
                    @match (redis_ratio, redis_error) {
                        (Some(r), _) => { (format!("{:.0} %", r * 100.0)) }
                        (None, Some(_)) => { "unreachable" }
                        (None, None) => { "no limit" }
                    }
                } }
                div.tile { h2 { "Relays up" } p.big { (fleet.live.len()) @if !fleet.stale.is_empty() { small { " (" (fleet.stale.len()) " stale)" } } } }
                div.tile { h2 { "Outbox rows" } p.big { "≈ " (thousands(o.outbox_rows_estimate)) } p.note { "planner estimate" } }
            }
            @if let Some(e) = redis_error { p.error { "Redis: " (e) } }
            @match &o.source {
                data::Source::Relay { instance_id, host, age_seconds } => {
                    p.note { "Backlog as counted by relay " code { (instance_id.get(..8).unwrap_or(instance_id)) } " on " (host)
                        ", " (seconds(*age_seconds)) " ago (its outbox probe, exact)." }
                }
                data::Source::Console => {
                    p.note { "No live relay reports its backlog: counted here up to 10,000 along the claim index; the console never scans task_outbox." }
                }
            }
            section.charts {
                (charts(hour, "hour"))
                (charts(day, "day (10-minute points)"))
            }
            h2 { "Fleet" }
            table {
                thead { tr { th { "Relay" } th { "Host" } th { "Version" } th { "Last seen" } th { "Settings" } th { "Delivered" } th { "Health" } th { "State" } } }
                tbody {
                    @for (m, stale) in fleet.live.iter().map(|m| (m, false)).chain(fleet.stale.iter().map(|m| (m, true))) {
                        tr.(if stale { "stale" } else { "live" }) {
                            td { code { (m.instance_id.get(..8).unwrap_or(&m.instance_id)) } }
                            td { (m.host) }
                            td { (m.version) }
                            td { (seconds(m.seen_seconds_ago)) " ago" @if stale { " (stale)" } }
                            td.small { "batch " (m.settings["batch_size"]) ", concurrency " (m.settings["concurrency"])
                                ", prefix " code { (m.settings["key_prefix"].as_str().unwrap_or("")) }
                                ", claim " (m.settings["claim"].as_str().unwrap_or("")) }
                            td { (m.counters["delivered"]) }
                            td.small {
                                @if let Some(h) = m.health.as_object() {
                                    @for (actor, status) in h {
                                        span.(if status == "healthy" { "ok" } else { "bad" }) { (actor) ": " (status.as_str().unwrap_or("")) } " "
                                    }
                                }
                            }
                            td.small { "paused: " (m.counters["paused"].as_str().unwrap_or("no"))
                                @if m.counters["held_back"] == true { ", held back (Redis memory)" } }
                        }
                    }
                    @if fleet.live.is_empty() && fleet.stale.is_empty() {
                        tr { td colspan="8" { "No relay has written a heartbeat in the last day (migration 7, outbox-relay 0.1 or later)." } }
                    }
                }
            }
        },
    )
}

pub fn jobs(who: &Who, jobs: &[Job], redis_error: Option<&str>, can_act: bool) -> Markup {
    layout(
        "Jobs",
        Some(who),
        html! {
            p.note { "Due and delayed rows are counted among the next " (thousands(data::CAP)) " of each, in claim order; dead letters exactly." }
            @if let Some(e) = redis_error { p.error { "Redis: " (e) } }
            table {
                thead { tr { th { "Job" } th { "Due" } th { "Delayed" } th { "Schedule (ZCARD)" } th { "Dead letters" } th { "Paused" } @if can_act { th { "Actions" } } } }
                tbody {
                    @for j in jobs {
                        tr {
                            td { a href=(paths::job_schedule(&j.job_id, 0)) { code { (j.job_id) } } }
                            td { (thousands(j.due_in_sample)) }
                            td { (thousands(j.delayed_in_sample)) }
                            td { (j.schedule_size.map_or("?".to_string(), thousands)) }
                            td { a href=(paths::dead_letters_of_job(&j.job_id)) { (thousands(j.dead_letters)) } }
                            td { @if j.paused { strong { "paused" } } @else { "no" } }
                            @if can_act {
                                td.actions {
                                    @let csrf = who.csrf.as_deref().unwrap_or("");
                                    @if j.paused {
                                        form method="post" action=(paths::JOB_RESUME) {
                                            input type="hidden" name="csrf" value=(csrf);
                                            input type="hidden" name="job" value=(j.job_id);
                                            button type="submit" { "Resume" }
                                        }
                                    } @else {
                                        form method="post" action=(paths::JOB_PAUSE) {
                                            input type="hidden" name="csrf" value=(csrf);
                                            input type="hidden" name="job" value=(j.job_id);
                                            button type="submit" { "Pause" }
                                        }
                                    }
                                    a.button.danger href=(paths::job_cancel_confirm(&j.job_id)) { "Cancel…" }
                                }
                            }
                        }
                    }
                    @if jobs.is_empty() { tr { td colspan="7" { "No job is active or has due or delayed rows, dead letters or a pause." } } }
                }
            }
        },
    )
}

pub fn cancel_confirm(who: &Who, job: &str, c: &JobCounts) -> Markup {
    layout(
        "Cancel a job",
        Some(who),
        html! {
            p.warning {
                "Cancel job " code { (job) } "? Its outbox rows are deleted unsent, its schedule key is removed, "
                "and a fence keeps any late write out. This cannot be undone."
            }
            ul {
                li { "Due rows among the next " (thousands(data::CAP)) ": " strong { (thousands(c.due_in_sample)) } }
                li { "Delayed rows among the next " (thousands(data::CAP)) ": " strong { (thousands(c.delayed_in_sample)) } }
                li { "Dead letters (kept): " strong { (c.dead_letters.text()) } }
            }
            form method="post" action=(paths::JOB_CANCEL) {
                input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or(""));
                input type="hidden" name="job" value=(job);
                button.danger type="submit" { "Cancel job " (job) }
                " " a href="/jobs" { "Back" }
            }
        },
    )
}

pub fn schedule(who: &Who, s: &ScheduleData, page: isize, can_act: bool) -> Markup {
    layout(
        "Schedule",
        Some(who),
        html! {
            p { code { (s.key) } ": " (thousands(s.size)) " entries, in score order (read-only)." }
            @if can_act {
                form.actions method="post" action=(paths::JOB_RECONCILE) {
                    input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or(""));
                    input type="hidden" name="job" value=(s.job_id);
                    button type="submit" title="Redis lost data: write this job's journaled entries that are missing from its schedule again (docs/journal.md)" { "Reconcile from the journal" }
                }
            }
            table {
                thead { tr { th { "#" } th { "Due (score)" } th { "Member" } } }
                tbody {
                    @for (i, e) in s.entries.iter().enumerate() {
                        tr { td { (s.offset + i as isize + 1) } td { (e.at) } td.member { code { (e.member) } } }
                    }
                    @if s.entries.is_empty() { tr { td colspan="3" { "No entries here." } } }
                }
            }
            p.pager {
                @if s.offset > 0 {
                    a href=(paths::job_schedule(&s.job_id, (s.offset - page).max(0))) { "← Earlier" } " "
                }
                @if (s.offset + page) < s.size as isize {
                    a href=(paths::job_schedule(&s.job_id, s.offset + page)) { "Later →" }
                }
            }
        },
    )
}

fn filter_fields(f: &FilterForm) -> Markup {
    html! {
        input type="hidden" name="job" value=(f.job);
        input type="hidden" name="error" value=(f.error);
        input type="hidden" name="within" value=(f.within);
    }
}

pub fn dead_letters(who: &Who, f: &FilterForm, d: &DeadLettersData, can_act: bool) -> Markup {
    layout(
        "Dead letters",
        Some(who),
        html! {
            form.filter method="get" action=(paths::DEAD_LETTERS) {
                label { "Job " input type="text" name="job" value=(f.job); }
                label { "Error contains " input type="text" name="error" value=(f.error); }
                label { "Dead-lettered within " input type="text" name="within" value=(f.within) placeholder="1h, 7d"; }
                button type="submit" { "Filter" }
            }
            p { (capped(&d.matching)) " dead letters match " (f.describe()) "; the newest 100 are listed." }
            @if can_act && d.matching.count > 0 {
                div.actions {
                    form method="get" action=(paths::DEAD_LETTERS_CONFIRM) {
                        input type="hidden" name="action" value="requeue";
                        (filter_fields(f))
                        button type="submit" { "Requeue all matching…" }
                    }
                    form method="get" action=(paths::DEAD_LETTERS_CONFIRM) {
                        input type="hidden" name="action" value="purge";
                        (filter_fields(f))
                        button.danger type="submit" { "Purge all matching…" }
                    }
                }
            }
            table {
                thead { tr { th { "Id" } th { "Job" } th { "Task" } th { "Attempts" } th { "Dead-lettered" } th { "Error" } } }
                tbody {
                    @for r in &d.rows {
                        tr {
                            td { a href=(paths::dead_letter(r.id)) { (r.id) } }
                            td { code { (r.job_id) } }
                            td { code { (r.task_id) } }
                            td { (r.attempts) }
                            td { (r.dead_lettered_at) }
                            td.error-text { (r.last_error) }
                        }
                    }
                    @if d.rows.is_empty() { tr { td colspan="6" { "None." } } }
                }
            }
        },
    )
}

/// The hidden fields that bind a bulk action to what its page showed:
/// `all` when nothing narrows it, the exact count, the highest id and the
/// fingerprint of the id set.
fn bound_fields(all: bool, e: &Extent) -> Markup {
    html! {
        @if all { input type="hidden" name="all" value="true"; }
        input type="hidden" name="expect_rows" value=(e.rows);
        input type="hidden" name="max_id" value=(e.max_id);
        input type="hidden" name="fingerprint" value=(e.fingerprint);
    }
}

pub fn batch_confirm(who: &Who, action: &str, f: &FilterForm, e: &Extent) -> Markup {
    let verb = if action == "requeue" { "Requeue" } else { "Purge" };
    let count = thousands(e.rows);
    layout(
        &format!("{verb} dead letters"),
        Some(who),
        html! {
            p.warning {
                (verb) " " strong { (count) } " dead letters matching " (f.describe()) "? "
                @if action == "requeue" {
                    "They go back into task_outbox as new rows due now, with their attempts reset; done in batches of 500."
                } @else {
                    "They are deleted for good, in batches of 500."
                }
                " If other rows match by the time you confirm, nothing is done and you are asked again."
            }
            @if e.rows > 0 {
                form method="post" action=(if action == "requeue" { paths::DEAD_LETTERS_REQUEUE } else { paths::DEAD_LETTERS_PURGE }) {
                    input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or(""));
                    (filter_fields(f))
                    (bound_fields(f.is_empty(), e))
                    button.(if action == "purge" { "danger" } else { "" }) type="submit" { (verb) " " (count) " dead letters" }
                    " " a href=(f.page()) { "Back" }
                }
            } @else {
                p { "Nothing to do. " a href=(f.page()) { "Back" } }
            }
        },
    )
}

pub fn dead_letter(who: &Who, id: i64, cols: &[(String, Option<String>)]) -> Markup {
    layout(
        &format!("Dead letter {id}"),
        Some(who),
        html! {
            table.detail {
                @for (k, v) in cols {
                    tr { th { (k) } td { @match v { Some(v) => { code { (v) } } None => { em { "NULL" } } } } }
                }
            }
            p { a href=(paths::DEAD_LETTERS) { "All dead letters" } }
        },
    )
}

pub fn set_aside(who: &Who, q: &SetAsideQuery, d: &SetAsideData, can_act: bool) -> Markup {
    let count = thousands(d.extent.rows);
    layout(
        "Set-aside rows",
        Some(who),
        html! {
            form.filter method="get" action=(paths::SET_ASIDE) {
                label { "Job (empty: all) " input type="text" name="job" value=(q.job); }
                button type="submit" { "Filter" }
            }
            p { (count) " rows are set aside (run_at = infinity)"
                @if !q.job.is_empty() { " for job " code { (q.job) } }
                ": bound for the dead table, whose id columns cannot hold them. The first 200 are listed." }
            @if can_act && d.extent.rows > 0 {
                form method="post" action=(paths::SET_ASIDE_REQUEUE) {
                    input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or(""));
                    input type="hidden" name="job" value=(q.job);
                    (bound_fields(q.job.is_empty(), &d.extent))
                    button type="submit" { "Make these " (count) " due again" }
                }
            }
            table {
                thead { tr { th { "Id" } th { "Job" } th { "Task" } th { "Attempts" } th { "Created" } } }
                tbody {
                    @for r in &d.rows {
                        tr { td { (r.id) } td { code { (r.job_id) } } td { code { (r.task_id) } } td { (r.attempts) } td { (r.created_at) } }
                    }
                    @if d.rows.is_empty() { tr { td colspan="5" { "None." } } }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::auth::Role;

    /// A form: its action and its hidden fields.
    type Form = (String, Vec<(String, String)>);

    /// Whether a form of the page posts to `action` naming exactly job `id`.
    fn posts_job(markup: &str, action: &str, id: &str) -> bool {
        let (_, forms) = urls(markup);
        forms
            .iter()
            .any(|(a, h)| a == action && h.iter().any(|(k, v)| k == "job" && v == id))
    }

    /// Every `href="…"` and `<form … action="…">` of a page, unescaped.
    fn urls(markup: &str) -> (Vec<String>, Vec<Form>) {
        let unescape = |s: &str| {
            s.replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        };
        let attr = |tag: &str, name: &str| {
            let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            let end = tag[at..].find('"')?;
            Some(unescape(&tag[at..at + end]))
        };
        let hrefs = markup
            .split(" href=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .map(unescape)
            .collect();
        let forms = markup
            .split("<form")
            .skip(1)
            .map(|f| {
                let f = f.split("</form>").next().unwrap_or_default();
                let head = f.split('>').next().unwrap_or_default();
                let hidden = f
                    .split("<input")
                    .skip(1)
                    .filter(|i| i.contains("type=\"hidden\""))
                    .filter_map(|i| Some((attr(i, "name")?, attr(i, "value").unwrap_or_default())))
                    .collect();
                (attr(head, "action").unwrap_or_default(), hidden)
            })
            .collect();
        (hrefs, forms)
    }

    /// The property of #37 item 1 over rendered pages: for thousands of
    /// generated job ids, every link and every form of the Jobs page and
    /// of each job's cancel and schedule pages, resolved by a browser's
    /// rules against the page's own URL, reaches one of the console's
    /// routes, and every job it names is exactly one of the ids.
    #[test]
    fn every_rendered_link_and_form_reaches_its_route_with_the_id_intact() {
        let who = Who {
            name: "alice".into(),
            role: Role::Operator,
            csrf: Some("c".repeat(64)),
            session: true,
        };
        let ids = crate::console::paths::hostile_ids(2000);
        let listed: Vec<Job> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Job {
                job_id: id.clone(),
                due_in_sample: 1,
                delayed_in_sample: 0,
                dead_letters: 1,
                paused: i % 2 == 0,
                schedule_size: Some(60),
            })
            .collect();
        let routes = [
            "/",
            "/jobs",
            "/dead-letters",
            "/set-aside",
            "/static/console.css",
            paths::JOB_SCHEDULE,
            paths::JOB_CANCEL_CONFIRM,
        ];
        let mut posts = vec![paths::JOB_PAUSE, paths::JOB_RESUME, paths::JOB_CANCEL, "/logout"];
        posts.push(paths::JOB_RECONCILE);
        let check = |page_url: &str, markup: &str, seen: &mut std::collections::HashSet<String>| {
            let base = url::Url::parse(page_url).expect("page URL");
            let (hrefs, forms) = urls(markup);
            for h in hrefs {
                let u = base.join(&h).expect("a link resolves");
                assert_eq!(u.host_str(), Some("console.example"), "{page_url}: {h}");
                assert!(routes.contains(&u.path()), "{page_url}: {h} reaches {}", u.path());
                if let Some((_, job)) = u.query_pairs().find(|(k, _)| k == "job") {
                    assert!(ids.contains(&job.to_string()), "{page_url}: {h} names {job:?}");
                    seen.insert(job.into_owned());
                }
            }
            for (action, hidden) in forms {
                let u = base.join(&action).expect("an action resolves");
                assert_eq!(u.query(), None, "{page_url}: {action}");
                assert!(posts.contains(&u.path()), "{page_url}: a form posts to {}", u.path());
                if let Some((_, job)) = hidden.iter().find(|(k, _)| k == "job") {
                    assert!(ids.contains(job), "{page_url}: a form names {job:?}");
                }
            }
        };
        let mut linked = std::collections::HashSet::new();
        check(
            "http://console.example/jobs",
            &jobs(&who, &listed, None, true).into_string(),
            &mut linked,
        );
        assert_eq!(linked.len(), ids.iter().collect::<std::collections::HashSet<_>>().len());
        for id in ids.iter().take(300) {
            let page = format!("http://console.example{}", paths::job_cancel_confirm(id));
            let counts = JobCounts {
                due_in_sample: 1,
                delayed_in_sample: 0,
                dead_letters: Capped::exact(0),
            };
            let markup = cancel_confirm(&who, id, &counts).into_string();
            check(&page, &markup, &mut linked);
            assert!(
                posts_job(&markup, paths::JOB_CANCEL, id),
                "{id:?}: the cancel form names the job"
            );
            let s = ScheduleData {
                job_id: id.clone(),
                key: format!("hover:sched:{id}"),
                size: 200,
                offset: 50,
                entries: Vec::new(),
            };
            let markup = schedule(&who, &s, 50, true).into_string();
            check(
                &format!("http://console.example{}", paths::job_schedule(id, 50)),
                &markup,
                &mut linked,
            );
            assert!(
                posts_job(&markup, paths::JOB_RECONCILE, id),
                "{id:?}: the reconcile form names the job"
            );
        }
    }
}
