//! The browser console: the fleet, the backlog, the lag and the dead
//! letters, and the actions an on-call operator takes on them
//! (docs/console.md, SECURITY.md).
//!
//! Served by `run` when `console.listen` is set, or alone by `outbox-relay
//! console`. Pages are rendered on the server (maud, checked at compile
//! time) and work with JavaScript off; there is no script at all, and the
//! one stylesheet is embedded in the binary. Every page's data is also a
//! JSON endpoint under `/api/v1/` with the same roles.
//!
//! Safety:
//! - No action without a signed-in operator (`auth`); viewers see every
//!   page and no action, and get 403 on a forged one. `console.read_only`
//!   hides and refuses every action. Without users the console only
//!   listens on a loopback address, read-only (config validation).
//! - A state-changing form must carry the session's CSRF token and come
//!   from the same origin (`Origin`, else `Referer`); the API takes a
//!   session with `X-CSRF-Token`, or HTTP Basic with a JSON body (which a
//!   cross-site form cannot send).
//! - Headers on every answer: a CSP without inline script,
//!   `frame-ancestors 'none'`, `nosniff`, referrers only to itself, no
//!   caching, and HSTS with `secure_cookie`. An anonymous console answers
//!   only requests whose `Host` is a loopback name (DNS rebinding).
//! - No link or form action is built from data (`paths`); bodies are read
//!   under a deadline and parsed strictly (`body`); bulk actions carry
//!   what was confirmed, and every action is audited before and after it
//!   runs (`actions`). SECURITY.md has the threat table.
//!
//! Layout: `routes` → `pages`, `api`, `signin` → `actions` → `respond` →
//! `views` → `load`, `identity`, `body` → `state` → `error` → `chart`,
//! `data`, `paths`, `auth`; each file imports only from those after it,
//! and this one (the server) from `routes`, `state` and `error`.
//! - Its own small Postgres pool; every read under
//!   `console.statement_timeout` (cancelled on the server when it passes);
//!   no read scans `task_outbox` (`data`).

mod actions;
mod api;
pub mod auth;
mod body;
pub mod chart;
pub mod data;
mod error;
mod identity;
mod load;
mod pages;
pub mod paths;
mod reconcile;
mod respond;
mod routes;
mod signin;
mod state;
mod views;

use std::sync::Arc;

use actix_web::{middleware::DefaultHeaders, web, App, HttpServer};
use slog::info;

pub use error::{ConsoleError, ConsoleSetupError};
pub use state::{build, Console, ConsoleMetrics};

/// The headers every answer carries; HSTS when the console is served
/// over TLS (`secure_cookie`).
fn security_headers(secure: bool) -> DefaultHeaders {
    let headers = if secure {
        DefaultHeaders::new().add(("Strict-Transport-Security", "max-age=31536000"))
    } else {
        DefaultHeaders::new()
    };
    headers
        .add((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        // Not `no-referrer`: with it a browser sends `Origin: null` on a
        // form POST, and the same-origin check could not tell.
        .add(("Referrer-Policy", "same-origin"))
        .add(("Cache-Control", "no-store"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
}

/// An anonymous console (no users, loopback only) answers a request only
/// when its `Host` names a loopback address or `localhost`: a web page
/// whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding) sends its
/// own name, and is refused before any page is read.
fn host_refused(anonymous: bool, req: &actix_web::dev::ServiceRequest) -> bool {
    anonymous
        && !req
            .headers()
            .get(actix_web::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(crate::netaddr::loopback_host)
}

/// Serve the console on `listen` in the background; the handle stops it.
pub fn start(listen: &str, console: Arc<Console>) -> Result<actix_web::dev::ServerHandle, ConsoleSetupError> {
    use actix_web::dev::Service;
    use futures_util::future::{ready, Either, FutureExt};
    let log = console.log.clone();
    let (anonymous, secure) = (console.anonymous(), console.secure_cookie);
    let data = web::Data::from(console);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(security_headers(secure))
            .wrap_fn(move |req, srv| {
                if host_refused(anonymous, &req) {
                    let refused = actix_web::HttpResponse::MisdirectedRequest()
                        .content_type("text/plain; charset=utf-8")
                        .body(
                            "this console without users answers only to a loopback Host (localhost, 127.0.0.1, [::1])",
                        );
                    Either::Left(ready(Ok(req.into_response(refused).map_into_right_body())))
                } else {
                    Either::Right(srv.call(req).map(|r| r.map(|r| r.map_into_left_body())))
                }
            })
            .configure(routes::routes)
    });
    let handle = crate::http::serve(server, listen, 256).map_err(|source| ConsoleSetupError::Listen {
        listen: listen.to_string(),
        source,
    })?;
    info!(log, "console listening"; "listen" => listen);
    Ok(handle)
}
