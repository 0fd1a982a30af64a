//! The console's actions: pause, resume and cancel a job; requeue or purge
//! the dead letters a filter matches; make set-aside rows due again. The
//! page forms and the API reach the same functions here.
//!
//! Every action
//! - is refused before it starts unless an operator asks, from this
//!   console's origin, with the session's CSRF token ([`refuse_action`]);
//! - takes its input strictly: unknown fields are refused by name, an
//!   empty filter means nothing unless `all` says everything, and a bulk
//!   action carries what its operator confirmed ([`BulkForm`]: the exact
//!   count, the highest id, the fingerprint of the id set): it answers 409
//!   and changes nothing unless exactly those rows match when it starts,
//!   and never touches a row above that id;
//! - writes an audit line *before* it acts (who, what, the filter, the
//!   rows expected) and one after with the rows actually changed, also
//!   when a later batch fails, or when the task ends early ([`Audit`]);
//! - runs as a task of its own, so a client that goes away does not stop
//!   it half-way with nothing logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use slog::{info, warn};

use super::auth::{self, Role};
use super::data;
use super::error::ConsoleError;
use super::identity::{loggable, one_line, same_origin, Who};
use super::load::{Extent, FilterForm};
use super::respond::html;
use super::state::{Console, ACTION_STALL};
use super::views;
use crate::db::dead_letter as dl;
use crate::db::pause;

type St = web::Data<Console>;

/// Rows per batch of a filtered requeue or purge.
pub const ACTION_BATCH: i64 = 500;

/// What an action did: one line for the page, the audit log and the API.
#[derive(Debug, Serialize)]
pub(crate) struct ActionResult {
    pub action: &'static str,
    pub ok: bool,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip)]
    pub status: StatusCode,
}

impl ActionResult {
    fn done(action: &'static str, message: String, rows: Option<u64>) -> Self {
        ActionResult {
            action,
            ok: true,
            message,
            rows,
            status: StatusCode::OK,
        }
    }

    /// Failed while acting (`rows`: what was changed before).
    fn failed(action: &'static str, e: &ConsoleError, rows: Option<u64>) -> Self {
        ActionResult {
            action,
            ok: false,
            message: e.to_string(),
            rows,
            status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Refused before anything changed: bad input (400) or a set that
    /// outgrew its confirmation (409).
    fn refused(action: &'static str, e: &ConsoleError) -> Self {
        ActionResult {
            action,
            ok: false,
            message: e.to_string(),
            rows: Some(0),
            status: super::respond::status_of(e),
        }
    }
}

// ---------------------------------------------------------------- guards

/// Why an action is refused, before it runs.
pub(crate) fn refuse_action(
    st: &Console,
    who: &Who,
    req: &HttpRequest,
    csrf: Option<&str>,
    api: bool,
) -> Option<String> {
    if st.read_only {
        return Some("the console is read-only (console.read_only)".into());
    }
    if who.role != Role::Operator {
        return Some(format!("{} is a viewer; actions need an operator", who.name));
    }
    let origin_ok = if api && !who.session {
        // Basic auth: a cross-site form cannot send a JSON body, and a
        // browser that sent an Origin must have sent ours.
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        json && (req.headers().get(header::ORIGIN).is_none() || same_origin(req))
    } else {
        same_origin(req)
    };
    if !origin_ok {
        return Some(
            "the request did not come from this console (Origin/Referer, or a JSON body for Basic auth)".into(),
        );
    }
    if who.session {
        let sent = if api {
            req.headers().get("X-CSRF-Token").and_then(|v| v.to_str().ok())
        } else {
            csrf
        };
        if !sent.is_some_and(|t| who.csrf.as_deref().is_some_and(|c| auth::same_token(c, t))) {
            return Some("missing or wrong CSRF token; reload the page and try again".into());
        }
    }
    None
}

pub(crate) fn forbidden(st: &Console, who: &Who, action: &str, why: &str, api: bool) -> HttpResponse {
    st.metrics.actions.with_label_values(&[action, "forbidden"]).inc();
    warn!(st.log, "console action refused"; "user" => loggable(&who.name), "action" => action, "why" => why);
    if api {
        HttpResponse::Forbidden().json(serde_json::json!({ "error": why }))
    } else {
        html(StatusCode::FORBIDDEN, views::message("Refused", why, Some(who)))
    }
}

/// `pause`, `resume`, `cancel` or `reconcile`.
pub(crate) fn job_action_name(action: &str) -> Option<&'static str> {
    ["pause", "resume", "cancel", "reconcile"]
        .into_iter()
        .find(|a| *a == action)
}

/// `requeue` or `purge`.
pub(crate) fn bulk_action_name(action: &str) -> Option<&'static str> {
    ["requeue", "purge"].into_iter().find(|a| *a == action)
}

// ---------------------------------------------------------------- audit

/// An action's audit: a line when it starts, one when it ends, with the
/// rows changed so far kept in a counter the work updates batch by batch.
/// Dropped without [`Audit::finish`] (the task ended early), it still
/// writes the end line with what was done.
pub(crate) struct Audit {
    st: St,
    user: String,
    action: &'static str,
    target: String,
    done: Arc<AtomicU64>,
    finished: bool,
}

impl Audit {
    pub fn start(st: &St, who: &Who, action: &'static str, target: &str, expected: Option<i64>) -> Audit {
        info!(st.log, "console action started";
            "user" => loggable(&who.name), "action" => action, "target" => loggable(target),
            "expected_rows" => expected);
        Audit {
            st: st.clone(),
            user: who.name.clone(),
            action,
            target: target.to_string(),
            done: Arc::new(AtomicU64::new(0)),
            finished: false,
        }
    }

    /// The rows changed so far (the work stores into it).
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }

    pub fn finish(mut self, r: &ActionResult) {
        self.finished = true;
        let st = &self.st;
        st.metrics
            .actions
            .with_label_values(&[self.action, if r.ok { "ok" } else { "error" }])
            .inc();
        let (user, target) = (loggable(&self.user), loggable(&self.target));
        if r.ok {
            info!(st.log, "console action";
                "user" => user, "action" => self.action, "target" => target,
                "rows" => r.rows, "result" => one_line(&r.message));
        } else {
            warn!(st.log, "console action failed";
                "user" => user, "action" => self.action, "target" => target,
                "rows" => self.done.load(Ordering::Relaxed), "error" => one_line(&r.message));
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let st = &self.st;
        st.metrics.actions.with_label_values(&[self.action, "error"]).inc();
        warn!(st.log, "console action ended before it finished";
            "user" => loggable(&self.user), "action" => self.action, "target" => loggable(&self.target),
            "rows" => self.done.load(Ordering::Relaxed));
    }
}

/// An action's `work`, ended as failed when no batch is answered within
/// `limit` (`beats` counts the batches answered): a Postgres that hangs
/// (frozen, partitioned) enforces no statement timeout, and the action
/// would otherwise never end nor write its final audit line. Dropping the
/// work drops its connection.
async fn unless_stalled<T>(
    work: impl std::future::Future<Output = Result<T, ConsoleError>>,
    beats: &AtomicU64,
    limit: std::time::Duration,
) -> Result<T, ConsoleError> {
    let mut work = std::pin::pin!(work);
    let mut seen = beats.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(limit, &mut work).await {
            Ok(r) => return r,
            Err(_) => {
                let now = beats.load(Ordering::Relaxed);
                if now == seen {
                    return Err(ConsoleError::Postgres(format!(
                        "Postgres answered nothing for {}s: it hangs; the action was stopped, and the rows done before are counted",
                        limit.as_secs()
                    )));
                }
                seen = now;
            }
        }
    }
}

/// Run an action as a task of its own: a client that disconnects drops
/// only its wait, never the work.
async fn detached(
    action: &'static str,
    work: impl std::future::Future<Output = ActionResult> + 'static,
) -> ActionResult {
    match actix_web::rt::spawn(work).await {
        Ok(r) => r,
        Err(e) => ActionResult::failed(
            action,
            &ConsoleError::Postgres(format!("the action's task ended: {e}")),
            None,
        ),
    }
}

// ---------------------------------------------------------------- jobs

/// A job action's form: the job travels in the body, never in the path
/// (`paths`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub job: String,
}

/// The API's job action body: nothing (the job is in the path).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoFields {}

/// The job id as `task_outbox.job_id::text` gives it back, or why it
/// names no job.
fn job_scope(st: &Console, job: &str, action: &str) -> Result<String, ConsoleError> {
    if job.is_empty() {
        return Err(ConsoleError::BadRequest("no job id given".into()));
    }
    let scope = st.schema.outbox_job_id.stored_form(job).ok_or_else(|| {
        ConsoleError::BadRequest(format!(
            "job id {job:?} cannot name a job (task_outbox.job_id is {})",
            st.schema.outbox_job_id
        ))
    })?;
    if scope == pause::ALL && !matches!(action, "cancel" | "reconcile") {
        return Err(ConsoleError::BadRequest(format!(
            "job id {:?} is the pause table's name for every job: pause or resume everything with `outbox-relay pause` / `resume`",
            pause::ALL
        )));
    }
    Ok(scope)
}

pub(crate) async fn job_action(st: St, who: Who, job: String, action: &'static str) -> ActionResult {
    let scope = match job_scope(&st, &job, action) {
        Ok(s) => s,
        Err(e) => return ActionResult::refused(action, &e),
    };
    let audit = Audit::start(&st, &who, action, &format!("job {scope}"), None);
    detached(action, async move {
        let r = match run_job_action(&st, &who, &scope, action).await {
            Ok((message, rows)) => ActionResult::done(action, message, rows),
            Err(e) => ActionResult::failed(action, &e, None),
        };
        audit.finish(&r);
        r
    })
    .await
}

async fn run_job_action(
    st: &Console,
    who: &Who,
    scope: &str,
    action: &'static str,
) -> Result<(String, Option<u64>), ConsoleError> {
    if action == "cancel" {
        let o = crate::cancel::cancel_everywhere(&st.pg_url, &st.redis_cfg, scope.to_string())
            .await
            .map_err(|e| ConsoleError::Postgres(e.to_string()))?;
        return Ok((
            format!(
                "cancelled job {}: {} outbox rows deleted, schedule {} {}",
                o.job_id,
                o.outbox_rows_deleted,
                o.schedule_key,
                if o.schedule_entries_removed {
                    "removed"
                } else {
                    "was empty"
                }
            ),
            Some(o.outbox_rows_deleted),
        ));
    }
    if action == "reconcile" {
        return super::reconcile::reconcile_job(st, scope).await;
    }
    let reason = format!("console: {}", who.name);
    let changed = st
        .read(async |c| {
            Ok(if action == "pause" {
                pause::pause(c, scope, &reason).await?
            } else {
                pause::resume(c, scope).await?
            })
        })
        .await?;
    let msg = match (action, changed) {
        ("pause", true) => format!("paused job {scope}: its rows are not claimed from each relay's next tick"),
        ("pause", false) => format!("job {scope} was already paused"),
        (_, true) => format!("resumed job {scope}: its rows are claimed again"),
        (_, false) => format!("job {scope} was not paused"),
    };
    Ok((msg, None))
}

// ---------------------------------------------------------------- bulk

/// A bulk action's input, from a form or a JSON body: the filter, `all`
/// to mean every row, and what the operator confirmed. Unknown fields are
/// refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub within: String,
    /// Every row: required when the filter is empty, refused with one.
    #[serde(default)]
    pub all: bool,
    /// The exact count the confirmation showed.
    pub expect_rows: Option<i64>,
    /// The highest id the confirmation saw.
    pub max_id: Option<i64>,
    /// The fingerprint of the id set the confirmation saw.
    pub fingerprint: Option<String>,
}

impl BulkForm {
    pub fn filter_form(&self) -> FilterForm {
        FilterForm {
            job: self.job.clone(),
            error: self.error.clone(),
            within: self.within.clone(),
        }
    }

    /// What was confirmed, or why the input is refused.
    fn confirmed(&self, empty: bool, every: &str, extent_api: &str) -> Result<Extent, ConsoleError> {
        if empty && !self.all {
            return Err(ConsoleError::BadRequest(format!(
                "no filter given: to act on {every}, say so with all=true"
            )));
        }
        if !empty && self.all {
            return Err(ConsoleError::BadRequest(
                "all=true and a filter: send one or the other".into(),
            ));
        }
        match (self.expect_rows, self.max_id, &self.fingerprint) {
            (Some(rows), Some(max_id), Some(fingerprint)) => Ok(Extent {
                rows,
                max_id,
                fingerprint: fingerprint.clone(),
            }),
            _ => Err(ConsoleError::BadRequest(format!(
                "expect_rows, max_id and fingerprint are required: what was confirmed ({extent_api} gives all three)"
            ))),
        }
    }
}

/// 409 unless exactly the confirmed rows match now.
fn still_confirmed(now: &Extent, confirmed: &Extent, what: &str) -> Result<(), ConsoleError> {
    if now != confirmed {
        return Err(ConsoleError::Conflict(format!(
            "the {what} are not the ones confirmed: {} match now (highest id {}), {} were confirmed (highest id {}); nothing was changed: look again and confirm",
            now.rows, now.max_id, confirmed.rows, confirmed.max_id
        )));
    }
    Ok(())
}

pub(crate) async fn dead_letters_action(st: St, who: Who, action: &'static str, form: BulkForm) -> ActionResult {
    let f = form.filter_form();
    let target = f.describe();
    let bound = async {
        let confirmed = form.confirmed(f.is_empty(), "every dead letter", "GET /api/v1/dead-letters/confirm")?;
        let filter = f.filter(&st.schema)?;
        let now = super::load::dead_letters_extent(&st, &f).await?;
        still_confirmed(&now, &confirmed, &format!("dead letters matching {target}"))?;
        Ok::<_, ConsoleError>((filter, confirmed))
    };
    let (filter, confirmed) = match bound.await {
        Ok(b) => b,
        Err(e) => return ActionResult::refused(action, &e),
    };
    let audit = Audit::start(&st, &who, action, &target, Some(confirmed.rows));
    let done = audit.counter();
    detached(action, async move {
        let beats = AtomicU64::new(0);
        let run = async {
            // Dead letters get ids in commit order, so one dead-lettered
            // after the check has a higher id than any confirmed one.
            let mut client = st.action_client().await?;
            beats.fetch_add(1, Ordering::Relaxed);
            let log = st.log.clone();
            let progress = |r: &dl::BatchReport| {
                beats.fetch_add(1, Ordering::Relaxed);
                done.store(r.done, Ordering::Relaxed);
                if r.batches % 20 == 0 {
                    info!(log, "console action progress"; "action" => action, "batches" => r.batches, "done" => r.done);
                }
            };
            let (schema, upto) = (&st.schema, confirmed.max_id);
            Ok::<_, ConsoleError>(if action == "requeue" {
                dl::requeue_matching(&mut client, schema, &filter, upto, ACTION_BATCH, progress).await?
            } else {
                dl::purge_matching(&client, schema, &filter, upto, ACTION_BATCH, progress).await?
            })
        };
        let r = match unless_stalled(run, &beats, ACTION_STALL).await {
            Ok(rep) => ActionResult::done(
                action,
                if action == "requeue" {
                    format!(
                        "requeued {} of {} dead letters matching {target} ({} left in place: their task is in the outbox already, or its run is gone)",
                        rep.done, rep.matched, rep.skipped
                    )
                } else {
                    format!("purged {} of {} dead letters matching {target}", rep.done, rep.matched)
                },
                Some(rep.done),
            ),
            Err(e) => ActionResult::failed(action, &e, Some(done.load(Ordering::Relaxed))),
        };
        audit.finish(&r);
        r
    })
    .await
}

/// The set-aside requeue's input: a job (or `all`), and what was confirmed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetAsideForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub all: bool,
    pub expect_rows: Option<i64>,
    pub max_id: Option<i64>,
    pub fingerprint: Option<String>,
}

pub(crate) async fn set_aside_action(st: St, who: Who, form: SetAsideForm) -> ActionResult {
    const ACTION: &str = "requeue_set_aside";
    let q = super::load::SetAsideQuery { job: form.job.clone() };
    let job = q.job(&st.schema);
    let target = job.as_deref().map_or_else(
        || "every set-aside row".to_string(),
        |j| format!("set-aside rows of job {j:?}"),
    );
    let bulk = BulkForm {
        all: form.all,
        expect_rows: form.expect_rows,
        max_id: form.max_id,
        fingerprint: form.fingerprint.clone(),
        ..BulkForm::default()
    };
    let confirmed = match bulk.confirmed(job.is_none(), "every set-aside row", "GET /api/v1/set-aside") {
        Ok(c) => c,
        Err(e) => return ActionResult::refused(ACTION, &e),
    };
    let audit = Audit::start(&st, &who, ACTION, &target, Some(confirmed.rows));
    detached(ACTION, async move {
        let run = async {
            let mut client = st.action_client().await?;
            Ok::<_, ConsoleError>(data::requeue_set_aside(&mut client, job.as_deref(), &confirmed).await?)
        };
        // One transaction: nothing counts as progress until it ends.
        let r = match unless_stalled(run, &AtomicU64::new(0), ACTION_STALL).await {
            Ok(data::SetAsideRequeue::Done(n)) => {
                audit.counter().store(n, Ordering::Relaxed);
                ActionResult::done(
                    ACTION,
                    format!("made {n} set-aside rows due again ({target}), attempts reset"),
                    Some(n),
                )
            }
            Ok(data::SetAsideRequeue::Changed(now)) => {
                let e = still_confirmed(&now, &confirmed, &target)
                    .err()
                    .unwrap_or_else(|| ConsoleError::Conflict(format!("the {target} changed")));
                ActionResult::refused(ACTION, &e)
            }
            Err(e) => ActionResult::failed(ACTION, &e, Some(0)),
        };
        audit.finish(&r);
        r
    })
    .await
}

// ---------------------------------------------------------------- answers

pub(crate) fn action_page(who: &Who, r: &ActionResult, back: &str) -> HttpResponse {
    html(r.status, views::result(who, r.ok, &r.message, back))
}

pub(crate) fn api_action(r: ActionResult) -> HttpResponse {
    HttpResponse::build(r.status).json(r)
}
