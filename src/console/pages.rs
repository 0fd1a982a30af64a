//! The console's HTML pages and their forms (no script): each handler
//! finds the visitor, loads (`load`), renders (`views`), or runs an action
//! (`actions`) and shows its result. Query strings and form bodies are
//! parsed strictly (`body`): an unknown parameter is a 400 naming it.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::actions::{self, BulkForm, JobForm, SetAsideForm};
use super::error::ConsoleError;
use super::identity::{page_visitor, Who};
use super::load::{self, FilterForm, ScheduleQuery, SetAsideQuery, SCHEDULE_PAGE};
use super::respond::{html, not_found, page_error, to_login};
use super::state::Console;
use super::{body, data, paths, views};

type St = web::Data<Console>;

macro_rules! visitor {
    ($st:expr, $req:expr) => {
        match page_visitor(&$st, &$req) {
            Some(w) => w,
            None => return to_login(&$req),
        }
    };
}

/// The query string as `T`, or the page's 400.
macro_rules! query {
    ($who:expr, $req:expr) => {
        match body::query($req.query_string()) {
            Ok(q) => q,
            Err(e) => return page_error(&$who, &e),
        }
    };
}

/// The form body as `T`, or the page's 400.
macro_rules! form {
    ($who:expr, $payload:expr) => {
        match body::read($payload).await {
            Ok(bytes) => match body::form(&bytes) {
                Ok(f) => f,
                Err(e) => return page_error(&$who, &e),
            },
            Err(e) => return page_error(&$who, &ConsoleError::BadRequest(e.to_string())),
        }
    };
}

fn can_act(st: &Console, who: &Who) -> bool {
    !st.read_only && who.role == crate::console::auth::Role::Operator && who.session
}

fn actions_refused(st: &Console, who: &Who, action: &str) -> HttpResponse {
    actions::forbidden(
        st,
        who,
        action,
        "actions need a signed-in operator on a console that is not read-only",
        false,
    )
}

pub(crate) async fn overview(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let (o, m) = tokio::join!(load::load_overview(&st), load::load_minutes(&st));
    match (o, m) {
        (Ok(o), Ok(m)) => html(
            StatusCode::OK,
            views::overview(
                &who,
                &o.overview,
                o.redis_memory_ratio,
                o.redis_error.as_deref(),
                &m.hour,
                &m.day,
                &o.fleet,
            ),
        ),
        (Err(e), _) | (_, Err(e)) => page_error(&who, &e),
    }
}

pub(crate) async fn jobs(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    match load::load_jobs(&st).await {
        Ok((jobs, redis_error)) => html(
            StatusCode::OK,
            views::jobs(&who, &jobs, redis_error.as_deref(), can_act(&st, &who)),
        ),
        Err(e) => page_error(&who, &e),
    }
}

pub(crate) async fn schedule(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let q: ScheduleQuery = query!(who, req);
    match load::load_schedule(&st, &q.job, q.offset).await {
        Ok(s) => html(
            StatusCode::OK,
            views::schedule(&who, &s, SCHEDULE_PAGE, can_act(&st, &who)),
        ),
        Err(e) => page_error(&who, &e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    job: String,
}

pub(crate) async fn cancel_confirm(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    if !can_act(&st, &who) {
        return actions_refused(&st, &who, "cancel");
    }
    let q: JobQuery = query!(who, req);
    let Some(job) = st.schema.outbox_job_id.stored_form(&q.job) else {
        return page_error(
            &who,
            &ConsoleError::BadRequest(format!(
                "job id {:?} cannot name a job (task_outbox.job_id is {})",
                q.job, st.schema.outbox_job_id
            )),
        );
    };
    let j = job.clone();
    match st.read(async |c| Ok(data::job_counts(c, &j).await?)).await {
        Ok(counts) => html(StatusCode::OK, views::cancel_confirm(&who, &job, &counts)),
        Err(e) => page_error(&who, &e),
    }
}

pub(crate) async fn job_action(
    st: St,
    req: HttpRequest,
    action: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let who = visitor!(st, req);
    let Some(action) = actions::job_action_name(&action) else {
        return not_found(req).await;
    };
    let form: JobForm = form!(who, payload);
    if let Some(why) = actions::refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return actions::forbidden(&st, &who, action, &why, false);
    }
    let r = actions::job_action(st.clone(), who.clone(), form.job, action).await;
    actions::action_page(&who, &r, "/jobs")
}

pub(crate) async fn dead_letters(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let f: FilterForm = query!(who, req);
    match load::load_dead_letters(&st, &f).await {
        Ok(d) => html(StatusCode::OK, views::dead_letters(&who, &f, &d, can_act(&st, &who))),
        Err(e) => page_error(&who, &e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmQuery {
    action: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    within: String,
}

pub(crate) async fn dead_letters_confirm(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let q: ConfirmQuery = query!(who, req);
    let Some(action) = actions::bulk_action_name(&q.action) else {
        return page_error(&who, &ConsoleError::BadRequest(format!("no action {:?}", q.action)));
    };
    if !can_act(&st, &who) {
        return actions_refused(&st, &who, action);
    }
    let f = FilterForm {
        job: q.job,
        error: q.error,
        within: q.within,
    };
    match load::dead_letters_extent(&st, &f).await {
        Ok(extent) => html(StatusCode::OK, views::batch_confirm(&who, action, &f, &extent)),
        Err(e) => page_error(&who, &e),
    }
}

pub(crate) async fn dead_letters_action(
    st: St,
    req: HttpRequest,
    action: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let who = visitor!(st, req);
    let Some(action) = actions::bulk_action_name(&action) else {
        return not_found(req).await;
    };
    let form: BulkForm = form!(who, payload);
    if let Some(why) = actions::refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return actions::forbidden(&st, &who, action, &why, false);
    }
    let back = form.filter_form().page();
    let r = actions::dead_letters_action(st.clone(), who.clone(), action, form).await;
    actions::action_page(&who, &r, &back)
}

pub(crate) async fn dead_letter(st: St, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    let who = visitor!(st, req);
    let Ok(id) = id.parse::<i64>() else {
        return not_found(req).await;
    };
    match st.read(async |c| Ok(data::dead_letter(c, id).await?)).await {
        Ok(Some(cols)) => html(StatusCode::OK, views::dead_letter(&who, id, &cols)),
        Ok(None) => page_error(&who, &ConsoleError::NotFound(format!("no dead letter with id {id}"))),
        Err(e) => page_error(&who, &e),
    }
}

pub(crate) async fn set_aside(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let q: SetAsideQuery = query!(who, req);
    match load::load_set_aside(&st, &q).await {
        Ok(d) => html(StatusCode::OK, views::set_aside(&who, &q, &d, can_act(&st, &who))),
        Err(e) => page_error(&who, &e),
    }
}

pub(crate) async fn set_aside_action(st: St, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let who = visitor!(st, req);
    let form: SetAsideForm = form!(who, payload);
    if let Some(why) = actions::refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return actions::forbidden(&st, &who, "requeue_set_aside", &why, false);
    }
    let back = paths::with_query(paths::SET_ASIDE, &[("job", &form.job)]);
    let r = actions::set_aside_action(st.clone(), who.clone(), form).await;
    actions::action_page(&who, &r, &back)
}
