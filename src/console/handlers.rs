//! The console's routes: pages (HTML forms, no script) and `/api/v1/`.

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use slog::{info, warn};

use super::auth::{self, Role, Session};
use super::data::{self, Overview};
use super::views;
use super::{Console, ConsoleError};
use crate::db::dead_letter::{self as dl, Filter};
use crate::db::{fleet, pause};
use crate::telemetry::metrics::LAG_BUCKETS;

type St = web::Data<Console>;

/// The session cookie's name.
pub const COOKIE: &str = "outbox_relay_session";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "outbox_relay_login";
/// Rows per batch of a filtered requeue or purge.
const ACTION_BATCH: i64 = 500;
/// Schedule entries per page.
const SCHEDULE_PAGE: isize = 50;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/static/console.css", web::get().to(css))
        .route("/login", web::get().to(login_form))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout))
        .route("/", web::get().to(overview_page))
        .route("/jobs", web::get().to(jobs_page))
        .route("/jobs/{job}/schedule", web::get().to(schedule_page))
        .route("/jobs/{job}/cancel", web::get().to(cancel_confirm))
        .route("/jobs/{job}/{action}", web::post().to(job_action_form))
        .route("/dead-letters", web::get().to(dead_letters_page))
        .route("/dead-letters/confirm", web::get().to(dead_letters_confirm))
        .route("/dead-letters/{action}", web::post().to(dead_letters_action_form))
        .route("/dead-letters/{id}", web::get().to(dead_letter_page))
        .route("/set-aside", web::get().to(set_aside_page))
        .route("/set-aside/requeue", web::post().to(set_aside_action_form))
        .route("/api/v1/overview", web::get().to(api_overview))
        .route("/api/v1/fleet", web::get().to(api_fleet))
        .route("/api/v1/minutes", web::get().to(api_minutes))
        .route("/api/v1/jobs", web::get().to(api_jobs))
        .route("/api/v1/jobs/{job}/schedule", web::get().to(api_schedule))
        .route("/api/v1/jobs/{job}/{action}", web::post().to(api_job_action))
        .route("/api/v1/dead-letters", web::get().to(api_dead_letters))
        .route("/api/v1/dead-letters/{action}", web::post().to(api_dead_letters_action))
        .route("/api/v1/dead-letters/{id}", web::get().to(api_dead_letter))
        .route("/api/v1/set-aside", web::get().to(api_set_aside))
        .route("/api/v1/set-aside/requeue", web::post().to(api_set_aside_action))
        .default_service(web::to(not_found));
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header(("Cache-Control", "public, max-age=3600"))
        .body(include_str!("console.css"))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    if req.path().starts_with("/api/") {
        HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
    } else {
        HttpResponse::NotFound()
            .content_type("text/html; charset=utf-8")
            .body(views::message("Not found", "There is no such page.", None).into_string())
    }
}

// ---------------------------------------------------------------- who

/// Who is asking.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    pub name: String,
    pub role: Role,
    /// The session's CSRF token (None: Basic auth or anonymous).
    pub csrf: Option<String>,
    /// Signed in through a session cookie.
    pub session: bool,
}

fn cookie<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn session_of(st: &Console, req: &HttpRequest) -> Option<(String, Session)> {
    let token = cookie(req, COOKIE)?;
    st.sessions.get(token).map(|s| (token.to_string(), s))
}

fn client_key(req: &HttpRequest) -> String {
    req.peer_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string())
}

/// A page's visitor: a session, or anyone when there are no users.
fn page_visitor(st: &Console, req: &HttpRequest) -> Option<Who> {
    if st.anonymous() {
        return Some(Who {
            name: "anonymous".into(),
            role: Role::Viewer,
            csrf: None,
            session: false,
        });
    }
    session_of(st, req).map(|(_, s)| Who {
        name: s.user,
        role: s.role,
        csrf: Some(s.csrf),
        session: true,
    })
}

/// An API caller: a session, HTTP Basic (checked against the users, under
/// the failed-login limit), or anyone when there are no users.
fn api_caller(st: &Console, req: &HttpRequest) -> Result<Who, Box<HttpResponse>> {
    if let Some(who) = page_visitor(st, req) {
        return Ok(who);
    }
    let unauthorized = || {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"outbox-relay\""))
            .json(serde_json::json!({ "error": "sign in: HTTP Basic with a console user, or a session" }))
    };
    let Some(basic) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return Err(Box::new(unauthorized()));
    };
    let decoded = base64_decode(basic.trim()).and_then(|b| String::from_utf8(b).ok());
    let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        return Err(Box::new(unauthorized()));
    };
    match check_password(st, req, name, password) {
        Ok(user) => Ok(Who {
            name: user.name,
            role: user.role,
            csrf: None,
            session: false,
        }),
        Err(Refusal::Limited) => Err(Box::new(
            HttpResponse::TooManyRequests()
                .json(serde_json::json!({ "error": "too many failed sign-ins; wait a minute" })),
        )),
        Err(Refusal::Wrong) => Err(Box::new(unauthorized())),
    }
}

enum Refusal {
    Wrong,
    Limited,
}

/// Check a name and password under the failed-login limit (per client
/// address and per name); every outcome is counted and logged.
fn check_password(st: &Console, req: &HttpRequest, name: &str, password: &str) -> Result<auth::User, Refusal> {
    let now = Instant::now();
    let (by_addr, by_name) = (format!("addr:{}", client_key(req)), format!("user:{name}"));
    if !st.limiter.allows(&by_addr, now) || !st.limiter.allows(&by_name, now) {
        st.metrics.logins.with_label_values(&["limited"]).inc();
        warn!(st.log, "console sign-in refused: too many failures"; "user" => name, "client" => client_key(req));
        return Err(Refusal::Limited);
    }
    // An unknown name costs a hash check too, so timing does not tell
    // which names exist.
    const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$T6I1kGJ3s3bj3gkuUq7l2LwO8yNnV0KZ7q1fKZb6nYc";
    let user = st.users.iter().find(|u| u.name == name);
    let ok = auth::verify_password(user.map_or(DECOY, |u| u.hash.as_str()), password);
    match user {
        Some(u) if ok => {
            st.limiter.succeeded(&by_name);
            st.metrics.logins.with_label_values(&["ok"]).inc();
            Ok(u.clone())
        }
        _ => {
            st.limiter.failed(&by_addr, now);
            st.limiter.failed(&by_name, now);
            st.metrics.logins.with_label_values(&["failed"]).inc();
            warn!(st.log, "console sign-in failed"; "user" => name, "client" => client_key(req));
            Err(Refusal::Wrong)
        }
    }
}

/// Standard base64 (RFC 4648, padding optional).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// Whether the request comes from this console's own origin: `Origin`
/// when the browser sent one, else `Referer`; neither is refused.
fn same_origin(req: &HttpRequest) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let origin_host = |v: &str| {
        v.split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default().to_string())
    };
    if let Some(o) = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        return origin_host(o).as_deref() == Some(host);
    }
    if let Some(r) = req.headers().get(header::REFERER).and_then(|v| v.to_str().ok()) {
        return origin_host(r).as_deref() == Some(host);
    }
    false
}

fn redirect(to: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((header::LOCATION, to)).finish()
}

fn to_login(req: &HttpRequest) -> HttpResponse {
    let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
    redirect(&format!("/login?next={}", url_encode(next)))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn html(status: actix_web::http::StatusCode, body: maud::Markup) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body.into_string())
}

fn page_error(who: &Who, e: &ConsoleError) -> HttpResponse {
    use actix_web::http::StatusCode;
    let status = match e {
        ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    html(
        status,
        views::message("Cannot show this page", &e.to_string(), Some(who)),
    )
}

fn api_error(e: &ConsoleError) -> HttpResponse {
    let body = serde_json::json!({ "error": e.to_string() });
    match e {
        ConsoleError::BadRequest(_) => HttpResponse::BadRequest().json(body),
        ConsoleError::NotFound(_) => HttpResponse::NotFound().json(body),
        _ => HttpResponse::ServiceUnavailable().json(body),
    }
}

// ---------------------------------------------------------------- sign-in

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only a local path may follow a sign-in (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

fn cookie_header(st: &Console, name: &str, value: &str, max_age: Option<u64>) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if st.secure_cookie {
        c.push_str("; Secure");
    }
    c
}

async fn login_form(st: St, q: web::Query<NextQuery>) -> HttpResponse {
    if st.anonymous() {
        return redirect("/");
    }
    let token = auth::token();
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::SET_COOKIE, cookie_header(&st, LOGIN_COOKIE, &token, Some(600))))
        .body(views::login(&token, &safe_next(q.next.as_deref()), None, st.read_only).into_string())
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    token: String,
    next: Option<String>,
}

async fn login(st: St, req: HttpRequest, form: web::Form<LoginForm>) -> HttpResponse {
    let next = safe_next(form.next.as_deref());
    let fresh = auth::token();
    let again = |status: actix_web::http::StatusCode, why: &str| {
        HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .insert_header((header::SET_COOKIE, cookie_header(&st, LOGIN_COOKIE, &fresh, Some(600))))
            .body(views::login(&fresh, &next, Some(why), st.read_only).into_string())
    };
    let double_submit = cookie(&req, LOGIN_COOKIE).is_some_and(|c| auth::same_token(c, &form.token));
    if !double_submit || !same_origin(&req) {
        return again(
            actix_web::http::StatusCode::FORBIDDEN,
            "The sign-in form expired or came from another site; try again.",
        );
    }
    match check_password(&st, &req, &form.name, &form.password) {
        Ok(user) => {
            let (token, _) = st.sessions.start(&user);
            info!(st.log, "console sign-in"; "user" => &user.name, "role" => user.role.as_str(), "client" => client_key(&req));
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, next))
                .insert_header((header::SET_COOKIE, cookie_header(&st, COOKIE, &token, None)))
                .finish()
        }
        Err(Refusal::Limited) => again(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins; wait a minute.",
        ),
        Err(Refusal::Wrong) => again(actix_web::http::StatusCode::UNAUTHORIZED, "Wrong name or password."),
    }
}

/// A form's CSRF field; a form without one is refused by the check (403),
/// not by the parser.
#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(st: St, req: HttpRequest, form: web::Form<CsrfForm>) -> HttpResponse {
    if let Some((token, s)) = session_of(&st, &req) {
        if auth::same_token(&s.csrf, &form.csrf) && same_origin(&req) {
            st.sessions.end(&token);
            info!(st.log, "console sign-out"; "user" => s.user);
        }
    }
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .insert_header((header::SET_COOKIE, cookie_header(&st, COOKIE, "", Some(0))))
        .finish()
}

// ---------------------------------------------------------------- guards

/// Why an action is refused, before it runs.
fn refuse_action(st: &Console, who: &Who, req: &HttpRequest, csrf: Option<&str>, api: bool) -> Option<String> {
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

fn forbidden(st: &Console, who: &Who, action: &str, why: &str, api: bool) -> HttpResponse {
    st.metrics.actions.with_label_values(&[action, "forbidden"]).inc();
    warn!(st.log, "console action refused"; "user" => &who.name, "action" => action, "why" => why);
    if api {
        HttpResponse::Forbidden().json(serde_json::json!({ "error": why }))
    } else {
        html(
            actix_web::http::StatusCode::FORBIDDEN,
            views::message("Refused", why, Some(who)),
        )
    }
}

// ---------------------------------------------------------------- data loads

#[derive(Serialize)]
struct OverviewData {
    overview: Overview,
    /// used_memory / maxmemory (the fullest master in a cluster); None
    /// without a limit or when Redis did not answer.
    redis_memory_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_error: Option<String>,
    relays_live: usize,
    relays_stale: usize,
    /// The relays themselves, for the page (the API has `/api/v1/fleet`).
    #[serde(skip)]
    fleet: data::Fleet,
}

async fn load_overview(st: &Console) -> Result<OverviewData, ConsoleError> {
    let stale_after = st.stale_after;
    let (overview, fleet) = st
        .read(async |c| {
            let fleet = data::fleet(c, stale_after).await?;
            // A relay's probe of a big outbox rests up to a minute between
            // counts (`probe_spacing`): still the freshest exact figures,
            // and the page names their age.
            let probe_max_age = stale_after + crate::telemetry::metrics::PROBE_SPACING_MAX;
            let overview = match data::overview_from_fleet(c, &fleet, probe_max_age).await? {
                Some(o) => o,
                None => data::overview(c).await?,
            };
            Ok((overview, fleet))
        })
        .await?;
    let (redis_memory_ratio, redis_error) = match redis_memory(st).await {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(OverviewData {
        overview,
        redis_memory_ratio,
        redis_error,
        relays_live: fleet.live.len(),
        relays_stale: fleet.stale.len(),
        fleet,
    })
}

async fn redis_memory(st: &Console) -> Result<Option<f64>, ConsoleError> {
    use crate::redis::memory::{info_on_masters, Memory};
    let conn = st.redis().await?;
    let deadline = crate::deadline::Deadline::after(st.timeout);
    let texts: Vec<String> = match &conn {
        crate::redis::DirectConn::Standalone(c) => {
            let mut c = c.clone();
            let cmd = ::redis::cmd("INFO").arg("memory").to_owned();
            let reply: Result<String, _> = match deadline.run("redis INFO", cmd.query_async(&mut c)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match reply {
                Ok(t) => vec![t],
                Err(e) => {
                    st.redis_failed().await;
                    return Err(ConsoleError::Redis(e));
                }
            }
        }
        crate::redis::DirectConn::Cluster(c) => match info_on_masters(c, "memory", deadline).await {
            Ok(all) => all.into_iter().filter_map(|(_, t)| t.ok()).collect(),
            Err(e) => {
                st.redis_failed().await;
                return Err(ConsoleError::Redis(e.to_string()));
            }
        },
    };
    Ok(texts
        .iter()
        .filter_map(|t| Memory::parse(t)?.ratio())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r)))))
}

/// The fleet's minutes of the last `span` minutes, folded into points of
/// `step` minutes (a day: 10-minute points).
#[derive(Serialize)]
pub(crate) struct Point {
    pub minute: i64,
    pub delivered: i64,
    pub retried: i64,
    pub dead_lettered: i64,
    pub lag_p50_seconds: Option<f64>,
    pub lag_p99_seconds: Option<f64>,
}

fn points(minutes: &[fleet::Minute], now_minute: i64, span: i64, step: i64) -> Vec<Point> {
    let start = now_minute - (span - 1) * 60;
    let n = (span / step) as usize;
    let mut sums: Vec<(i64, i64, i64, Vec<i64>)> = vec![(0, 0, 0, vec![0; LAG_BUCKETS.len() + 1]); n];
    let mut seen = vec![false; n];
    for m in minutes {
        if m.minute < start || m.minute > now_minute {
            continue;
        }
        let i = (((m.minute - start) / 60) / step) as usize;
        if let Some(s) = sums.get_mut(i) {
            seen[i] = true;
            s.0 += m.delivered;
            s.1 += m.retried;
            s.2 += m.dead_lettered;
            for (a, b) in s.3.iter_mut().zip(&m.lag_buckets) {
                *a += b;
            }
        }
    }
    sums.into_iter()
        .enumerate()
        .map(|(i, (d, r, x, lag))| Point {
            minute: start + i as i64 * step * 60,
            delivered: d,
            retried: r,
            dead_lettered: x,
            lag_p50_seconds: if seen[i] {
                fleet::quantile(&lag, LAG_BUCKETS, 0.5)
            } else {
                None
            },
            lag_p99_seconds: if seen[i] {
                fleet::quantile(&lag, LAG_BUCKETS, 0.99)
            } else {
                None
            },
        })
        .collect()
}

#[derive(Serialize)]
struct Minutes {
    hour: Vec<Point>,
    day: Vec<Point>,
}

async fn load_minutes(st: &Console) -> Result<Minutes, ConsoleError> {
    let (minutes, now) = st
        .read(async |c| {
            let now: i64 = c
                .query_one("SELECT extract(epoch FROM date_trunc('minute', now()))::int8", &[])
                .await
                .map_err(|e| ConsoleError::Postgres(crate::db::pg_error_text(&e)))?
                .get(0);
            Ok((fleet::minutes(c, 24 * 60).await?, now))
        })
        .await?;
    Ok(Minutes {
        hour: points(&minutes, now, 60, 1),
        day: points(&minutes, now, 24 * 60, 10),
    })
}

async fn load_jobs(st: &Console) -> Result<(Vec<data::Job>, Option<String>), ConsoleError> {
    let mut jobs = st.read(async |c| Ok(data::jobs(c).await?)).await?;
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| crate::domain::schedule_key(&st.redis_cfg.key_prefix, &j.job_id))
        .collect();
    let mut redis_error = None;
    match st.redis().await {
        Ok(conn) => {
            let sizes =
                tokio::time::timeout(st.timeout, crate::redis::keys::per_key::<i64>(&conn, "ZCARD", &keys)).await;
            match sizes {
                Ok(sizes) => {
                    for (j, s) in jobs.iter_mut().zip(sizes) {
                        match s {
                            Ok(n) => j.schedule_size = Some(n),
                            Err(e) => redis_error = Some(e.to_string()),
                        }
                    }
                }
                Err(_) => redis_error = Some(format!("ZCARD took longer than {:?}", st.timeout)),
            }
        }
        Err(e) => redis_error = Some(e.to_string()),
    }
    if redis_error.is_some() {
        st.redis_failed().await;
    }
    Ok((jobs, redis_error))
}

#[derive(Deserialize)]
struct PageQuery {
    offset: Option<isize>,
}

/// One schedule entry: its score as a time, and the member's fields.
#[derive(Serialize)]
pub(crate) struct Entry {
    pub score_ms: f64,
    pub at: String,
    pub member: String,
}

#[derive(Serialize)]
pub(crate) struct ScheduleData {
    pub job_id: String,
    pub key: String,
    pub size: i64,
    pub offset: isize,
    pub entries: Vec<Entry>,
}

/// RFC 3339 (UTC, milliseconds) of unix milliseconds.
fn rfc3339_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return format!("{ms}");
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

async fn load_schedule(st: &Console, job: &str, offset: isize) -> Result<ScheduleData, ConsoleError> {
    let key = crate::domain::schedule_key(&st.redis_cfg.key_prefix, job);
    let offset = offset.max(0);
    let mut conn = st.redis().await?;
    let read = async {
        let size: i64 = ::redis::cmd("ZCARD").arg(&key).query_async(&mut conn).await?;
        let page: Vec<(String, f64)> = ::redis::cmd("ZRANGE")
            .arg(&key)
            .arg(offset)
            .arg(offset + SCHEDULE_PAGE - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        Ok::<_, ::redis::RedisError>((size, page))
    };
    let (size, page) = match tokio::time::timeout(st.timeout, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            st.redis_failed().await;
            return Err(ConsoleError::Redis(format!("{key}: {e}")));
        }
        Err(_) => {
            st.redis_failed().await;
            return Err(ConsoleError::Redis(format!("{key}: no answer within {:?}", st.timeout)));
        }
    };
    Ok(ScheduleData {
        job_id: job.to_string(),
        key,
        size,
        offset,
        entries: page
            .into_iter()
            .map(|(member, score)| Entry {
                score_ms: score,
                at: rfc3339_ms(score),
                member,
            })
            .collect(),
    })
}

/// The dead-letter filter as forms and query strings spell it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct FilterForm {
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub error: String,
    /// Dead-lettered within this long (`1h`, `7d`); empty: any age.
    #[serde(default)]
    pub within: String,
}

impl FilterForm {
    fn filter(&self) -> Result<Filter, ConsoleError> {
        let some = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        let since = match some(&self.within) {
            Some(w) => Some(
                crate::config::parse_duration(&w)
                    .map_err(|e| ConsoleError::BadRequest(format!("within {w:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Filter {
            job: some(&self.job),
            since,
            error: some(&self.error),
        })
    }

    /// "job = …, error contains …" for audit lines and confirmations.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.job.trim().is_empty() {
            parts.push(format!("job {}", self.job.trim()));
        }
        if !self.error.trim().is_empty() {
            parts.push(format!("error contains {:?}", self.error.trim()));
        }
        if !self.within.trim().is_empty() {
            parts.push(format!("dead-lettered within {}", self.within.trim()));
        }
        if parts.is_empty() {
            "every dead letter".into()
        } else {
            parts.join(", ")
        }
    }

    pub fn query(&self) -> String {
        format!(
            "job={}&error={}&within={}",
            url_encode(self.job.trim()),
            url_encode(self.error.trim()),
            url_encode(self.within.trim())
        )
    }
}

#[derive(Serialize)]
pub(crate) struct DeadLettersData {
    pub matching: data::Capped,
    pub rows: Vec<dl::DeadRow>,
}

async fn load_dead_letters(st: &Console, f: &FilterForm) -> Result<DeadLettersData, ConsoleError> {
    let filter = f.filter()?;
    let schema = st.schema.clone();
    st.read(async |c| {
        Ok(DeadLettersData {
            matching: data::dead_letters_matching(c, &filter).await?,
            rows: dl::list(c, &schema, &filter, 100).await?,
        })
    })
    .await
}

// ---------------------------------------------------------------- actions

/// What an action did: one line for the page, the audit log and the API.
#[derive(Serialize)]
struct ActionResult {
    action: &'static str,
    ok: bool,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
}

fn audit(st: &Console, who: &Who, action: &'static str, target: &str, r: &ActionResult) {
    st.metrics
        .actions
        .with_label_values(&[action, if r.ok { "ok" } else { "error" }])
        .inc();
    if r.ok {
        info!(st.log, "console action";
            "user" => &who.name, "action" => action, "target" => target,
            "rows" => r.rows, "result" => &r.message);
    } else {
        warn!(st.log, "console action failed";
            "user" => &who.name, "action" => action, "target" => target, "error" => &r.message);
    }
}

fn action_name(action: &str) -> Option<&'static str> {
    match action {
        "pause" => Some("pause"),
        "resume" => Some("resume"),
        "cancel" => Some("cancel"),
        "requeue" => Some("requeue"),
        "purge" => Some("purge"),
        _ => None,
    }
}

async fn job_action(st: &Console, who: &Who, job: &str, action: &'static str) -> ActionResult {
    let scope = match st.schema.outbox_job_id.stored_form(job) {
        Some(s) => s,
        None => {
            return ActionResult {
                action,
                ok: false,
                message: format!(
                    "job id {job:?} cannot name a job (task_outbox.job_id is {})",
                    st.schema.outbox_job_id
                ),
                rows: None,
            }
        }
    };
    let outcome: Result<(String, Option<u64>), String> = match action {
        "pause" | "resume" => {
            let reason = format!("console: {}", who.name);
            let run = st
                .read(async |c| {
                    let changed = if action == "pause" {
                        pause::pause(c, &scope, &reason).await?
                    } else {
                        pause::resume(c, &scope).await?
                    };
                    Ok(changed)
                })
                .await;
            run.map(|changed| {
                let msg = match (action, changed) {
                    ("pause", true) => {
                        format!("paused job {scope}: its rows are not claimed from each relay's next tick")
                    }
                    ("pause", false) => format!("job {scope} was already paused"),
                    (_, true) => format!("resumed job {scope}: its rows are claimed again"),
                    (_, false) => format!("job {scope} was not paused"),
                };
                (msg, None)
            })
            .map_err(|e| e.to_string())
        }
        "cancel" => crate::cancel::cancel_everywhere(&st.pg_url, &st.redis_cfg, scope.clone())
            .await
            .map(|o| {
                (
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
                )
            })
            .map_err(|e| e.to_string()),
        _ => Err(format!("no action {action} on a job")),
    };
    let r = match outcome {
        Ok((message, rows)) => ActionResult {
            action,
            ok: true,
            message,
            rows,
        },
        Err(message) => ActionResult {
            action,
            ok: false,
            message,
            rows: None,
        },
    };
    audit(st, who, action, &format!("job {scope}"), &r);
    r
}

async fn dead_letters_action(st: &Console, who: &Who, action: &'static str, f: &FilterForm) -> ActionResult {
    let target = f.describe();
    let run = async {
        let filter = f.filter()?;
        let mut client = st.action_client().await?;
        let log = st.log.clone();
        let progress = |r: &dl::BatchReport| {
            if r.batches % 20 == 0 {
                info!(log, "console action progress"; "action" => action, "batches" => r.batches, "done" => r.done);
            }
        };
        let report = if action == "requeue" {
            dl::requeue_matching(&mut client, &st.schema, &filter, ACTION_BATCH, progress).await?
        } else {
            dl::purge_matching(&client, &st.schema, &filter, ACTION_BATCH, progress).await?
        };
        Ok::<_, ConsoleError>(report)
    };
    let r = match run.await {
        Ok(rep) => ActionResult {
            action,
            ok: true,
            message: if action == "requeue" {
                format!(
                    "requeued {} of {} dead letters matching {target} ({} left in place: their task is in the outbox already, or its run is gone)",
                    rep.done, rep.matched, rep.skipped
                )
            } else {
                format!("purged {} of {} dead letters matching {target}", rep.done, rep.matched)
            },
            rows: Some(rep.done),
        },
        Err(e) => ActionResult {
            action,
            ok: false,
            message: e.to_string(),
            rows: None,
        },
    };
    audit(st, who, action, &target, &r);
    r
}

#[derive(Debug, Default, Deserialize)]
struct SetAsideForm {
    #[serde(default)]
    job: String,
    #[serde(default)]
    csrf: String,
}

async fn set_aside_action(st: &Console, who: &Who, job: &str) -> ActionResult {
    let job = (!job.trim().is_empty()).then(|| job.trim().to_string());
    let target = job
        .as_deref()
        .map_or_else(|| "every set-aside row".to_string(), |j| format!("job {j}"));
    let run = async {
        let client = st.action_client().await?;
        let mut total = 0;
        loop {
            let n = data::requeue_set_aside(&client, job.as_deref(), ACTION_BATCH).await?;
            total += n;
            if n == 0 {
                break;
            }
        }
        Ok::<_, ConsoleError>(total)
    };
    let r = match run.await {
        Ok(n) => ActionResult {
            action: "requeue_set_aside",
            ok: true,
            message: format!("made {n} set-aside rows due again ({target}), attempts reset"),
            rows: Some(n),
        },
        Err(e) => ActionResult {
            action: "requeue_set_aside",
            ok: false,
            message: e.to_string(),
            rows: None,
        },
    };
    audit(st, who, "requeue_set_aside", &target, &r);
    r
}

fn action_page(who: &Who, r: &ActionResult, back: &str) -> HttpResponse {
    let status = if r.ok {
        actix_web::http::StatusCode::OK
    } else {
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE
    };
    html(status, views::result(who, r.ok, &r.message, back))
}

fn api_action(r: ActionResult) -> HttpResponse {
    if r.ok {
        HttpResponse::Ok().json(r)
    } else {
        HttpResponse::ServiceUnavailable().json(r)
    }
}

// ---------------------------------------------------------------- pages

macro_rules! visitor {
    ($st:expr, $req:expr) => {
        match page_visitor(&$st, &$req) {
            Some(w) => w,
            None => return to_login(&$req),
        }
    };
}

macro_rules! caller {
    ($st:expr, $req:expr) => {
        match api_caller(&$st, &$req) {
            Ok(w) => w,
            Err(resp) => return *resp,
        }
    };
}

fn can_act(st: &Console, who: &Who) -> bool {
    !st.read_only && who.role == Role::Operator && who.session
}

async fn overview_page(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    let (o, m) = tokio::join!(load_overview(&st), load_minutes(&st));
    match (o, m) {
        (Ok(o), Ok(m)) => html(
            actix_web::http::StatusCode::OK,
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

async fn jobs_page(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    match load_jobs(&st).await {
        Ok((jobs, redis_error)) => html(
            actix_web::http::StatusCode::OK,
            views::jobs(&who, &jobs, redis_error.as_deref(), can_act(&st, &who)),
        ),
        Err(e) => page_error(&who, &e),
    }
}

async fn schedule_page(st: St, req: HttpRequest, job: web::Path<String>, q: web::Query<PageQuery>) -> HttpResponse {
    let who = visitor!(st, req);
    match load_schedule(&st, &job, q.offset.unwrap_or(0)).await {
        Ok(s) => html(
            actix_web::http::StatusCode::OK,
            views::schedule(&who, &s, SCHEDULE_PAGE),
        ),
        Err(e) => page_error(&who, &e),
    }
}

async fn cancel_confirm(st: St, req: HttpRequest, job: web::Path<String>) -> HttpResponse {
    let who = visitor!(st, req);
    if !can_act(&st, &who) {
        return forbidden(
            &st,
            &who,
            "cancel",
            "actions need a signed-in operator on a console that is not read-only",
            false,
        );
    }
    let job = job.into_inner();
    let j = job.clone();
    match st.read(async |c| Ok(data::job_counts(c, &j).await?)).await {
        Ok(counts) => html(
            actix_web::http::StatusCode::OK,
            views::cancel_confirm(&who, &job, &counts),
        ),
        Err(e) => page_error(&who, &e),
    }
}

async fn job_action_form(
    st: St,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    form: web::Form<CsrfForm>,
) -> HttpResponse {
    let who = visitor!(st, req);
    let (job, action) = path.into_inner();
    let Some(action) = action_name(&action).filter(|a| matches!(*a, "pause" | "resume" | "cancel")) else {
        return not_found(req).await;
    };
    if let Some(why) = refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return forbidden(&st, &who, action, &why, false);
    }
    let r = job_action(&st, &who, &job, action).await;
    action_page(&who, &r, "/jobs")
}

async fn dead_letters_page(st: St, req: HttpRequest, f: web::Query<FilterForm>) -> HttpResponse {
    let who = visitor!(st, req);
    match load_dead_letters(&st, &f).await {
        Ok(d) => html(
            actix_web::http::StatusCode::OK,
            views::dead_letters(&who, &f, &d, can_act(&st, &who)),
        ),
        Err(e) => page_error(&who, &e),
    }
}

#[derive(Deserialize)]
struct ConfirmQuery {
    action: String,
    #[serde(flatten)]
    filter: FilterForm,
}

async fn dead_letters_confirm(st: St, req: HttpRequest, q: web::Query<ConfirmQuery>) -> HttpResponse {
    let who = visitor!(st, req);
    let Some(action) = action_name(&q.action).filter(|a| matches!(*a, "requeue" | "purge")) else {
        return page_error(&who, &ConsoleError::BadRequest(format!("no action {:?}", q.action)));
    };
    if !can_act(&st, &who) {
        return forbidden(
            &st,
            &who,
            action,
            "actions need a signed-in operator on a console that is not read-only",
            false,
        );
    }
    let filter = match q.filter.filter() {
        Ok(f) => f,
        Err(e) => return page_error(&who, &e),
    };
    match st
        .read(async |c| Ok(data::dead_letters_matching(c, &filter).await?))
        .await
    {
        Ok(n) => html(
            actix_web::http::StatusCode::OK,
            views::batch_confirm(&who, action, &q.filter, &n),
        ),
        Err(e) => page_error(&who, &e),
    }
}

#[derive(Deserialize)]
struct FilterActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    filter: FilterForm,
}

async fn dead_letters_action_form(
    st: St,
    req: HttpRequest,
    action: web::Path<String>,
    form: web::Form<FilterActionForm>,
) -> HttpResponse {
    let who = visitor!(st, req);
    let Some(action) = action_name(&action).filter(|a| matches!(*a, "requeue" | "purge")) else {
        return not_found(req).await;
    };
    if let Some(why) = refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return forbidden(&st, &who, action, &why, false);
    }
    let r = dead_letters_action(&st, &who, action, &form.filter).await;
    action_page(&who, &r, &format!("/dead-letters?{}", form.filter.query()))
}

async fn dead_letter_page(st: St, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    let who = visitor!(st, req);
    let Ok(id) = id.parse::<i64>() else {
        return not_found(req).await;
    };
    match st.read(async |c| Ok(data::dead_letter(c, id).await?)).await {
        Ok(Some(cols)) => html(actix_web::http::StatusCode::OK, views::dead_letter(&who, id, &cols)),
        Ok(None) => page_error(&who, &ConsoleError::NotFound(format!("no dead letter with id {id}"))),
        Err(e) => page_error(&who, &e),
    }
}

async fn set_aside_page(st: St, req: HttpRequest) -> HttpResponse {
    let who = visitor!(st, req);
    match st
        .read(async |c| Ok((data::set_aside(c).await?, data::set_aside_count(c).await?)))
        .await
    {
        Ok((rows, count)) => html(
            actix_web::http::StatusCode::OK,
            views::set_aside(&who, &rows, &count, can_act(&st, &who)),
        ),
        Err(e) => page_error(&who, &e),
    }
}

async fn set_aside_action_form(st: St, req: HttpRequest, form: web::Form<SetAsideForm>) -> HttpResponse {
    let who = visitor!(st, req);
    if let Some(why) = refuse_action(&st, &who, &req, Some(&form.csrf), false) {
        return forbidden(&st, &who, "requeue_set_aside", &why, false);
    }
    let r = set_aside_action(&st, &who, &form.job).await;
    action_page(&who, &r, "/set-aside")
}

// ---------------------------------------------------------------- API

async fn api_overview(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load_overview(&st).await {
        Ok(o) => HttpResponse::Ok().json(o),
        Err(e) => api_error(&e),
    }
}

async fn api_fleet(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    let stale_after = st.stale_after;
    match st.read(async |c| Ok(data::fleet(c, stale_after).await?)).await {
        Ok(f) => HttpResponse::Ok().json(f),
        Err(e) => api_error(&e),
    }
}

async fn api_minutes(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load_minutes(&st).await {
        Ok(m) => HttpResponse::Ok().json(m),
        Err(e) => api_error(&e),
    }
}

async fn api_jobs(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match load_jobs(&st).await {
        Ok((jobs, redis_error)) => HttpResponse::Ok().json(serde_json::json!({
            "jobs": jobs,
            "sample_rows": data::CAP,
            "redis_error": redis_error,
        })),
        Err(e) => api_error(&e),
    }
}

async fn api_schedule(st: St, req: HttpRequest, job: web::Path<String>, q: web::Query<PageQuery>) -> HttpResponse {
    let _who = caller!(st, req);
    match load_schedule(&st, &job, q.offset.unwrap_or(0)).await {
        Ok(s) => HttpResponse::Ok().json(s),
        Err(e) => api_error(&e),
    }
}

async fn api_job_action(st: St, req: HttpRequest, path: web::Path<(String, String)>) -> HttpResponse {
    let who = caller!(st, req);
    let (job, action) = path.into_inner();
    let Some(action) = action_name(&action).filter(|a| matches!(*a, "pause" | "resume" | "cancel")) else {
        return not_found(req).await;
    };
    if let Some(why) = refuse_action(&st, &who, &req, None, true) {
        return forbidden(&st, &who, action, &why, true);
    }
    api_action(job_action(&st, &who, &job, action).await)
}

async fn api_dead_letters(st: St, req: HttpRequest, f: web::Query<FilterForm>) -> HttpResponse {
    let _who = caller!(st, req);
    match load_dead_letters(&st, &f).await {
        Ok(d) => HttpResponse::Ok().json(d),
        Err(e) => api_error(&e),
    }
}

async fn api_dead_letter(st: St, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
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

async fn api_dead_letters_action(
    st: St,
    req: HttpRequest,
    action: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let who = caller!(st, req);
    let Some(action) = action_name(&action).filter(|a| matches!(*a, "requeue" | "purge")) else {
        return not_found(req).await;
    };
    if let Some(why) = refuse_action(&st, &who, &req, None, true) {
        return forbidden(&st, &who, action, &why, true);
    }
    let f: FilterForm = if body.is_empty() {
        FilterForm::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(f) => f,
            Err(e) => return api_error(&ConsoleError::BadRequest(format!("the body is not a filter: {e}"))),
        }
    };
    api_action(dead_letters_action(&st, &who, action, &f).await)
}

async fn api_set_aside(st: St, req: HttpRequest) -> HttpResponse {
    let _who = caller!(st, req);
    match st
        .read(async |c| Ok((data::set_aside(c).await?, data::set_aside_count(c).await?)))
        .await
    {
        Ok((rows, count)) => HttpResponse::Ok().json(serde_json::json!({ "count": count, "rows": rows })),
        Err(e) => api_error(&e),
    }
}

async fn api_set_aside_action(st: St, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let who = caller!(st, req);
    if let Some(why) = refuse_action(&st, &who, &req, None, true) {
        return forbidden(&st, &who, "requeue_set_aside", &why, true);
    }
    let f: SetAsideForm = if body.is_empty() {
        SetAsideForm::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(f) => f,
            Err(e) => {
                return api_error(&ConsoleError::BadRequest(format!(
                    "the body is not {{\"job\": …}}: {e}"
                )))
            }
        }
    };
    api_action(set_aside_action(&st, &who, &f.job).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_next_paths() {
        assert_eq!(base64_decode("YWxpY2U6cHc=").as_deref(), Some(&b"alice:pw"[..]));
        assert_eq!(base64_decode("YWxpY2U6cHc").as_deref(), Some(&b"alice:pw"[..]));
        assert_eq!(base64_decode("!!!!"), None);
        assert_eq!(safe_next(Some("/jobs?x=1")), "/jobs?x=1");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn minutes_fold_into_points_with_gaps() {
        let m = |minute, delivered| fleet::Minute {
            minute,
            delivered,
            retried: 0,
            dead_lettered: 0,
            lag_buckets: vec![delivered; LAG_BUCKETS.len() + 1],
        };
        let now = 600 * 60;
        let p = points(&[m(now - 120, 5), m(now, 7)], now, 60, 1);
        assert_eq!(p.len(), 60);
        assert_eq!(p[59].minute, now);
        assert_eq!(p[59].delivered, 7);
        assert_eq!(p[57].delivered, 5);
        assert_eq!(p[58].lag_p50_seconds, None, "no relay beat: a gap");
        assert!(p[59].lag_p50_seconds.is_some());
        let day = points(&[m(now - 120, 5), m(now, 7)], now, 24 * 60, 10);
        assert_eq!(day.len(), 144);
        assert_eq!(day[143].delivered, 12, "the last ten minutes hold both");
    }
}
