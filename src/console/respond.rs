//! The shapes of the console's answers: an HTML page, a page or API error
//! with its status, a redirect, the way to the sign-in form, 404.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse};

use super::error::ConsoleError;
use super::identity::Who;
use super::{paths, views};

pub(crate) fn html(status: StatusCode, body: maud::Markup) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body.into_string())
}

/// The status an error answers with, on a page, in the API and as an
/// action's refusal.
pub(crate) fn status_of(e: &ConsoleError) -> StatusCode {
    match e {
        ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
        ConsoleError::Conflict(_) => StatusCode::CONFLICT,
        ConsoleError::Postgres(_) | ConsoleError::Redis(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

pub(crate) fn page_error(who: &Who, e: &ConsoleError) -> HttpResponse {
    html(
        status_of(e),
        views::message("Cannot show this page", &e.to_string(), Some(who)),
    )
}

pub(crate) fn api_error(e: &ConsoleError) -> HttpResponse {
    HttpResponse::build(status_of(e)).json(serde_json::json!({ "error": e.to_string() }))
}

pub(crate) fn redirect(to: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((header::LOCATION, to)).finish()
}

pub(crate) fn to_login(req: &HttpRequest) -> HttpResponse {
    let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // `/` needs no escape in a query value, and keeps the address readable.
    redirect(&format!("/login?next={}", paths::encode(next).replace("%2F", "/")))
}

pub(crate) async fn not_found(req: HttpRequest) -> HttpResponse {
    if req.path().starts_with("/api/") {
        HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
    } else {
        html(
            StatusCode::NOT_FOUND,
            views::message("Not found", "There is no such page.", None),
        )
    }
}
