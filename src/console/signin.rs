//! Signing in and out: the login form (with its double-submit token), the
//! password check (`identity::check_password`: limited per address,
//! slowed per name, hashed off the request thread), the session cookie,
//! and sign-out of this session or of every session of the user.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use slog::info;

use super::auth;
use super::identity::{self, check_password, client_key, cookie, loggable, same_origin, session_of, Refusal};
use super::respond::redirect;
use super::state::Console;
use super::{body, paths, views};

type St = web::Data<Console>;

/// The login form's cookie lives this long (seconds).
const LOGIN_FORM_AGE: u64 = 600;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NextQuery {
    next: Option<String>,
}

/// The sign-in form with a fresh double-submit token (and its cookie),
/// `next` already made safe, and why the last attempt failed.
fn login_page(st: &Console, status: StatusCode, next: &str, why: Option<&str>) -> HttpResponse {
    let token = auth::token();
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((
            header::SET_COOKIE,
            cookie_header(
                st,
                identity::login_cookie(st.secure_cookie),
                &token,
                Some(LOGIN_FORM_AGE),
            ),
        ))
        .body(views::login(&token, next, why, st.read_only).into_string())
}

pub(crate) async fn login_form(st: St, req: HttpRequest) -> HttpResponse {
    if st.anonymous() {
        return redirect("/");
    }
    let next = body::query::<NextQuery>(req.query_string()).ok().and_then(|q| q.next);
    login_page(&st, StatusCode::OK, &paths::safe_next(next.as_deref()), None)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    token: String,
    next: Option<String>,
}

pub(crate) async fn login(st: St, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let again = |status: StatusCode, next: &str, why: &str| login_page(&st, status, next, Some(why));
    let form: LoginForm = match body::read(payload)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| body::form(&b).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => return again(StatusCode::BAD_REQUEST, "/", &e),
    };
    let next = paths::safe_next(form.next.as_deref());
    let double_submit =
        cookie(&req, identity::login_cookie(st.secure_cookie)).is_some_and(|c| auth::same_token(c, &form.token));
    if !double_submit || !same_origin(&req) {
        return again(
            StatusCode::FORBIDDEN,
            &next,
            "The sign-in form expired or came from another site; try again.",
        );
    }
    match check_password(&st, &req, &form.name, &form.password, None).await {
        Ok(user) => {
            let (token, _) = st.sessions.start(&user);
            info!(st.log, "console sign-in";
                "user" => loggable(&user.name), "role" => user.role.as_str(), "client" => client_key(&st, &req));
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, next))
                .insert_header((
                    header::SET_COOKIE,
                    cookie_header(&st, identity::session_cookie(st.secure_cookie), &token, None),
                ))
                .finish()
        }
        Err(Refusal::Limited) => again(
            StatusCode::TOO_MANY_REQUESTS,
            &next,
            "Too many failed sign-ins from this address; wait a minute.",
        ),
        Err(Refusal::Wrong) => again(StatusCode::UNAUTHORIZED, &next, "Wrong name or password."),
        Err(Refusal::Busy) => again(
            StatusCode::SERVICE_UNAVAILABLE,
            &next,
            "Too many sign-ins at once; try again in a few seconds.",
        ),
    }
}

/// The sign-out form: its CSRF token, and `everywhere` to end every
/// session of the user (and forget their API credentials).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    everywhere: bool,
}

pub(crate) async fn logout(st: St, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let form: Option<LogoutForm> = body::read(payload).await.ok().and_then(|b| body::form(&b).ok());
    let everywhere = form.as_ref().is_some_and(|f| f.everywhere);
    let session = session_of(&st, &req);
    let checked = match (&session, &form) {
        (Some((_, s)), Some(f)) => auth::same_token(&s.csrf, &f.csrf) && same_origin(&req),
        _ => false,
    };
    match session {
        Some((_, s)) if checked && everywhere => {
            let ended = st.sessions.end_all(&s.user);
            st.credentials.forget(&s.user);
            info!(st.log, "console sign-out everywhere"; "user" => loggable(&s.user), "sessions" => ended);
        }
        Some((token, s)) if checked => {
            st.sessions.end(&token);
            info!(st.log, "console sign-out"; "user" => loggable(&s.user));
        }
        // Signing out everywhere must not seem done when nothing ended:
        // the user would believe other browsers signed out.
        Some((_, s)) if everywhere => {
            let who = identity::Who {
                name: s.user,
                role: s.role,
                csrf: Some(s.csrf),
                session: true,
            };
            return super::respond::html(
                StatusCode::FORBIDDEN,
                views::message(
                    "Not signed out",
                    "Signing out everywhere was refused (the form expired or came from another site): no session ended. Reload the page and try again.",
                    Some(&who),
                ),
            );
        }
        _ => {}
    }
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .insert_header((
            header::SET_COOKIE,
            cookie_header(&st, identity::session_cookie(st.secure_cookie), "", Some(0)),
        ))
        .finish()
}
