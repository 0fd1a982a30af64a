//! The console's routes. Job actions take the job in the body (pages) or
//! as one percent-encoded path segment (API); no page builds a path from
//! data (`paths`).

use actix_web::{web, HttpResponse};

use super::paths;
use super::respond::not_found;
use super::{api, pages, signin};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/static/console.css", web::get().to(css))
        .route("/login", web::get().to(signin::login_form))
        .route("/login", web::post().to(signin::login))
        .route("/logout", web::post().to(signin::logout))
        .route("/", web::get().to(pages::overview))
        .route("/jobs", web::get().to(pages::jobs))
        .route(paths::JOB_SCHEDULE, web::get().to(pages::schedule))
        .route(paths::JOB_CANCEL_CONFIRM, web::get().to(pages::cancel_confirm))
        .route("/jobs/{action}", web::post().to(pages::job_action))
        .route(paths::DEAD_LETTERS, web::get().to(pages::dead_letters))
        .route(paths::DEAD_LETTERS_CONFIRM, web::get().to(pages::dead_letters_confirm))
        .route("/dead-letters/{action}", web::post().to(pages::dead_letters_action))
        .route("/dead-letters/{id}", web::get().to(pages::dead_letter))
        .route(paths::SET_ASIDE, web::get().to(pages::set_aside))
        .route(paths::SET_ASIDE_REQUEUE, web::post().to(pages::set_aside_action))
        .route("/api/v1/overview", web::get().to(api::overview))
        .route("/api/v1/fleet", web::get().to(api::fleet))
        .route("/api/v1/minutes", web::get().to(api::minutes))
        .route("/api/v1/jobs", web::get().to(api::jobs))
        .route("/api/v1/jobs/{job}/schedule", web::get().to(api::schedule))
        .route("/api/v1/jobs/{job}/{action}", web::post().to(api::job_action))
        .route("/api/v1/dead-letters", web::get().to(api::dead_letters))
        .route("/api/v1/dead-letters/confirm", web::get().to(api::dead_letters_confirm))
        .route(
            "/api/v1/dead-letters/{action}",
            web::post().to(api::dead_letters_action),
        )
        .route("/api/v1/dead-letters/{id}", web::get().to(api::dead_letter))
        .route("/api/v1/set-aside", web::get().to(api::set_aside))
        .route("/api/v1/set-aside/requeue", web::post().to(api::set_aside_action))
        .default_service(web::to(not_found));
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header(("Cache-Control", "public, max-age=3600"))
        .body(include_str!("console.css"))
}
