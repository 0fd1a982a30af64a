//! `/api/v1/`: every page's data as JSON, and the same actions, with the
//! same roles. A caller is a session (with `X-CSRF-Token` on actions) or
//! HTTP Basic with a JSON body (`identity::api_caller`). Bodies and query
//! strings are parsed strictly: an unknown field is a 400 naming it.
//!
//! A bulk action is two calls: `GET …/confirm` (or `GET /api/v1/set-aside`)
//! gives the exact count, highest id and fingerprint of what matches, and
//! the action carries all three as `expect_rows`, `max_id` and
//! `fingerprint` (docs/console.md).

use actix_web::{web, HttpRequest, HttpResponse};

use super::actions::{self, BulkForm, NoFields, SetAsideForm};
use super::error::ConsoleError;
use super::identity::api_caller;
use super::load::{self, FilterForm, PageQuery, SetAsideQuery};
use super::respond::{api_error, not_found};
use super::state::Console;
use super::{body, data};

type St = web::Data<Console>;

macro_rules! caller {
    ($st:expr, $req:expr) => {
        match api_caller(&$st, &$req).await {
            Ok(w) => w,
            Err(resp) => return resp,
        }
    };
}

macro_rules! query {
    ($req:expr) => {
        match body::query($req.query_string()) {
            Ok(q) => q,
            Err(e) => return api_error(&e),
        }
    };
}

macro_rules! json_body {
    ($payload:expr) => {
        match body::read($payload).await {
            Ok(bytes) => match body::json(&bytes) {
                Ok(f) => f,
                Err(e) => return api_error(&e),
            },
            Err(e) => return api_error(&ConsoleError::BadRequest(e.to_string())),
        }
    };
}

pub(crate) async fn overview(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load::load_overview(&st).await {
        Ok(o) => HttpResponse::Ok().json(o),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn fleet(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    let stale_after = st.stale_after;
    match st.read(async |c| Ok(data::fleet(c, stale_after).await?)).await {
        Ok(f) => HttpResponse::Ok().json(f),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn minutes(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load::load_minutes(&st).await {
        Ok(m) => HttpResponse::Ok().json(m),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn jobs(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load::load_jobs(&st).await {
        Ok((jobs, redis_error)) => HttpResponse::Ok().json(serde_json::json!({
            "jobs": jobs,
            "sample_rows": data::CAP,
            "redis_error": redis_error,
        })),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn schedule(st: St, req: HttpRequest, job: web::Path<String>) -> HttpResponse {
    let _who = caller!(st, req);
    let q: PageQuery = query!(req);
    match load::load_schedule(&st, &job, q.offset).await {
        Ok(s) => HttpResponse::Ok().json(s),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn job_action(
    st: St,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> HttpResponse {
    let who = caller!(st, req);
    let (job, action) = path.into_inner();
    let Some(action) = actions::job_action_name(&action) else {
        return not_found(req).await;
    };
    if let Some(why) = actions::refuse_action(&st, &who, &req, None, true) {
        return actions::forbidden(&st, &who, action, &why, true);
    }
    let _: NoFields = json_body!(payload);
    actions::api_action(actions::job_action(st.clone(), who, job, action).await)
}

pub(crate) async fn dead_letters(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    let f: FilterForm = query!(req);
    match load::load_dead_letters(&st, &f).await {
        Ok(d) => HttpResponse::Ok().json(d),
        Err(e) => api_error(&e),
    }
}

/// The exact count and highest id of what a filter matches: what a bulk
/// action must carry.
pub(crate) async fn dead_letters_confirm(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    let f: FilterForm = query!(req);
    match load::dead_letters_extent(&st, &f).await {
        Ok(e) => HttpResponse::Ok().json(serde_json::json!({
            "filter": f.describe(),
            "all": f.is_empty(),
            "expect_rows": e.rows,
            "max_id": e.max_id,
            "fingerprint": e.fingerprint,
        })),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn dead_letter(st: St, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    let _who = caller!(st, req);
    let Ok(id) = id.parse::<i64>() else {
        return not_found(req).await;
    };
    match st.read(async |c| Ok(data::dead_letter(c, id).await?)).await {
        Ok(Some(cols)) => {
            let map: serde_json::Map<String, serde_json::Value> = cols
                .into_iter()
                .map(|(k, v)| (k, v.map_or(serde_json::Value::Null, serde_json::Value::String)))
                .collect();
            HttpResponse::Ok().json(map)
        }
        Ok(None) => api_error(&ConsoleError::NotFound(format!("no dead letter with id {id}"))),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn dead_letters_action(
    st: St,
    req: HttpRequest,
    action: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let who = caller!(st, req);
    let Some(action) = actions::bulk_action_name(&action) else {
        return not_found(req).await;
    };
    if let Some(why) = actions::refuse_action(&st, &who, &req, None, true) {
        return actions::forbidden(&st, &who, action, &why, true);
    }
    let form: BulkForm = json_body!(payload);
    actions::api_action(actions::dead_letters_action(st.clone(), who, action, form).await)
}

pub(crate) async fn set_aside(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    let q: SetAsideQuery = query!(req);
    match load::load_set_aside(&st, &q).await {
        Ok(d) => HttpResponse::Ok().json(serde_json::json!({
            "count": data::Capped::exact(d.extent.rows),
            "expect_rows": d.extent.rows,
            "max_id": d.extent.max_id,
            "fingerprint": d.extent.fingerprint,
            "rows": d.rows,
        })),
        Err(e) => api_error(&e),
    }
}

pub(crate) async fn set_aside_action(st: St, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let who = caller!(st, req);
    if let Some(why) = actions::refuse_action(&st, &who, &req, None, true) {
        return actions::forbidden(&st, &who, "requeue_set_aside", &why, true);
    }
    let form: SetAsideForm = json_body!(payload);
    actions::api_action(actions::set_aside_action(st.clone(), who, form).await)
}
