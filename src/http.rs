//! The HTTP side: `GET /healthz`, `GET /readyz` and `GET /metrics` on
//! `http.listen`.
//!
//! - `/healthz`: 200 when every actor is `healthy`, 503 otherwise; the body
//!   is JSON with each actor's health facts (the same as the health lines).
//! - `/readyz`: 200 while the relay can do its job: the schema was found at
//!   start-up (the relay does not start otherwise), and every actor that
//!   talks to a service has reached it and is `healthy` now; 503 before
//!   that and while Postgres or Redis is down or stalled (`waiting_for`
//!   names the actors that have not connected yet, `unhealthy` those that
//!   have but are failing now). A paused relay (`outbox-relay pause`) stays
//!   ready; `paused` in the body says `all`, `jobs` or `no`.
//! - `/metrics`: the Prometheus text exposition format (health gauges are
//!   refreshed at scrape time).
//!
//! Health is read from shared state, never through actor mailboxes, so a
//! busy or dead actor cannot make the endpoint hang.
//!
//! Nothing else is served: another method on those paths is 405 (`Allow:
//! GET`), any other path 404. `http.listen` is loopback by default. The
//! server holds at most [`MAX_CONNECTIONS`] connections; one that has not
//! sent a complete request head within [`REQUEST_HEAD_TIMEOUT`] is answered
//! 408 and closed, and an idle keep-alive connection is closed after
//! [`KEEP_ALIVE`], so sockets left open by a scanner or a slow client cannot
//! starve the probes.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde::Serialize;

use crate::telemetry::health::{ActorHealth, HealthSnapshot, Status};
use crate::telemetry::metrics::Metrics;

type Healths = Arc<Vec<Arc<ActorHealth>>>;

/// Connections served at once (one worker); more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// A connection must send its request head within this, or it is closed.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle keep-alive connection is closed after this.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on http.listen {listen}: {source}")]
pub struct HttpError {
    listen: String,
    source: std::io::Error,
}

#[derive(Serialize)]
struct HealthBody {
    status: &'static str,
    actors: Vec<HealthSnapshot>,
}

async fn healthz(health: web::Data<Healths>) -> HttpResponse {
    let actors: Vec<HealthSnapshot> = health.iter().map(|h| h.snapshot()).collect();
    let all_healthy = actors.iter().all(|a| a.status == Status::Healthy);
    let body = HealthBody {
        status: if all_healthy { "healthy" } else { "unhealthy" },
        actors,
    };
    if all_healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn readyz(health: web::Data<Healths>, metrics: web::Data<Metrics>) -> HttpResponse {
    let serving: Vec<&ActorHealth> = health.iter().filter(|h| h.needs_connection()).map(|h| &**h).collect();
    let waiting: Vec<&'static str> = serving.iter().filter(|h| !h.connected()).map(|h| h.name).collect();
    let unhealthy: Vec<&'static str> = serving
        .iter()
        .filter(|h| h.connected() && h.snapshot().status != Status::Healthy)
        .map(|h| h.name)
        .collect();
    let ready = waiting.is_empty() && unhealthy.is_empty();
    // A paused relay is ready: it is doing what it was told, and restarting
    // or unrouting it would not help. The body says so.
    let body = serde_json::json!({
        "ready": ready,
        "waiting_for": waiting,
        "unhealthy": unhealthy,
        "paused": metrics.paused_state(),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(health: web::Data<Healths>, metrics: web::Data<Metrics>) -> HttpResponse {
    metrics.observe_health(&health);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}

async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", "GET"))
        .finish()
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().finish()
}

/// Bind `listen` and serve in the background; the handle stops the server.
pub fn start(listen: &str, health: Healths, metrics_: Metrics) -> Result<actix_web::dev::ServerHandle, HttpError> {
    let data = web::Data::new(health);
    let metrics_data = web::Data::new(metrics_);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(metrics_data.clone())
            .service(
                web::resource("/healthz")
                    .route(web::get().to(healthz))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/readyz")
                    .route(web::get().to(readyz))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/metrics")
                    .route(web::get().to(metrics))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found))
    });
    serve(server, listen, MAX_CONNECTIONS).map_err(|source| HttpError {
        listen: listen.to_string(),
        source,
    })
}

/// `/metrics` of `registry` alone, for `outbox-relay console` (which runs
/// no actor): `/healthz` and `/readyz` answer 200 while it serves.
pub fn start_metrics_only(
    listen: &str,
    registry: prometheus::Registry,
) -> Result<actix_web::dev::ServerHandle, HttpError> {
    let registry = web::Data::new(registry);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(registry.clone())
            .route(
                "/metrics",
                web::get().to(|r: web::Data<prometheus::Registry>| async move {
                    let mut buf = Vec::new();
                    let _ = prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf);
                    HttpResponse::Ok()
                        .content_type("text/plain; version=0.0.4; charset=utf-8")
                        .body(buf)
                }),
            )
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().json(serde_json::json!({"status": "healthy"})) }),
            )
            .route(
                "/readyz",
                web::get().to(|| async { HttpResponse::Ok().json(serde_json::json!({"ready": true})) }),
            )
            .default_service(web::to(not_found))
    });
    serve(server, listen, MAX_CONNECTIONS).map_err(|source| HttpError {
        listen: listen.to_string(),
        source,
    })
}

/// Bind `server` to `listen` with what every HTTP endpoint of the process
/// shares (one worker, at most `max_connections`, a request head within
/// [`REQUEST_HEAD_TIMEOUT`], idle keep-alive closed after [`KEEP_ALIVE`], no
/// signal handling of its own) and run it in the background.
pub fn serve<F, I, S, B>(
    server: HttpServer<F, I, S, B>,
    listen: &str,
    max_connections: usize,
) -> std::io::Result<actix_web::dev::ServerHandle>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: actix_service::IntoServiceFactory<S, actix_http::Request>,
    S: actix_web::dev::ServiceFactory<actix_http::Request, Config = actix_web::dev::AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<actix_web::dev::Response<B>> + 'static,
    <S::Service as actix_web::dev::Service<actix_http::Request>>::Future: 'static,
    S::Service: 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let server = server
        .workers(1)
        .max_connections(max_connections)
        .client_request_timeout(REQUEST_HEAD_TIMEOUT)
        .client_disconnect_timeout(Duration::from_secs(1))
        .keep_alive(KEEP_ALIVE)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(listen)?
        .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(handle)
}
