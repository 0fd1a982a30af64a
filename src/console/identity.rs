//! Who is asking: a session cookie, HTTP Basic on the API, or anyone on an
//! anonymous (users-less, loopback-only) console; the client's address
//! behind trusted proxies; the same-origin check of state-changing
//! requests; and the sign-in check with its limits.
//!
//! Failures are answers, not errors: a page visitor without a session is
//! sent to sign in, an API caller gets 401 or 429.

use std::time::Instant;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use slog::warn;

use super::auth::{self, Role, Session};
use super::state::Console;

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

/// The session cookie's name; with `secure_cookie` the `__Host-` prefix,
/// which browsers accept only from HTTPS, for the whole host, and never
/// from a sibling domain.
pub fn session_cookie(secure: bool) -> &'static str {
    if secure {
        "__Host-outbox_relay_session"
    } else {
        "outbox_relay_session"
    }
}

/// The login form's double-submit cookie's name.
pub fn login_cookie(secure: bool) -> &'static str {
    if secure {
        "__Host-outbox_relay_login"
    } else {
        "outbox_relay_login"
    }
}

pub(crate) fn cookie<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(crate) fn session_of(st: &Console, req: &HttpRequest) -> Option<(String, Session)> {
    let token = cookie(req, session_cookie(st.secure_cookie))?;
    st.sessions.get(token).map(|s| (token.to_string(), s))
}

/// The client's address, for limits and logs: the peer, or behind a
/// trusted proxy the address it forwarded (`crate::netaddr`).
pub(crate) fn client_key(st: &Console, req: &HttpRequest) -> String {
    // Bytes a header cannot hold as text still name a hop (lossily): a
    // header that does not parse must never make the proxy the client.
    let forwarded: Vec<String> = req
        .headers()
        .get_all("x-forwarded-for")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let forwarded: Vec<&str> = forwarded.iter().map(String::as_str).collect();
    crate::netaddr::client_key(req.peer_addr().map(|a| a.ip()), &forwarded, &st.trusted_proxies)
}

/// A value from outside (a user name, a filter) made safe for one log
/// field: control characters escaped (a newline cannot start a forged
/// line in the text format), at most 200 characters.
pub fn loggable(s: &str) -> String {
    let mut out = one_line(&s.chars().take(200).collect::<String>());
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`), whole: for
/// messages that quote outside values (a job id in an action's result).
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// A page's visitor: a session, or anyone when there are no users.
pub(crate) fn page_visitor(st: &Console, req: &HttpRequest) -> Option<Who> {
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
/// the failed-login limits; remembered briefly once right), or anyone
/// when there are no users.
pub(crate) async fn api_caller(st: &Console, req: &HttpRequest) -> Result<Who, HttpResponse> {
    if let Some(who) = page_visitor(st, req) {
        return Ok(who);
    }
    let unauthorized = || {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"outbox-relay\""))
            .json(serde_json::json!({ "error": "sign in: HTTP Basic with a console user, or a session" }))
    };
    let Some(credential) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Err(unauthorized());
    };
    let as_who = |user: auth::User| Who {
        name: user.name,
        role: user.role,
        csrf: None,
        session: false,
    };
    if let Some(user) = st.credentials.get(credential, Instant::now()) {
        return Ok(as_who(user));
    }
    let Some(basic) = credential.strip_prefix("Basic ") else {
        return Err(unauthorized());
    };
    let decoded = base64_decode(basic.trim()).and_then(|b| String::from_utf8(b).ok());
    let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        return Err(unauthorized());
    };
    match check_password(st, req, name, password, Some(credential)).await {
        Ok(user) => {
            st.credentials.put(credential, &user, Instant::now());
            Ok(as_who(user))
        }
        Err(Refusal::Limited) => Err(HttpResponse::TooManyRequests()
            .insert_header((header::RETRY_AFTER, auth::FAILURE_WINDOW.as_secs().to_string()))
            .json(serde_json::json!({ "error": "too many failed sign-ins from this address; wait a minute" }))),
        Err(Refusal::Busy) => Err(HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "5"))
            .json(serde_json::json!({ "error": "too many sign-ins at once; try again in a few seconds" }))),
        Err(Refusal::Wrong) => Err(unauthorized()),
    }
}

pub(crate) enum Refusal {
    Wrong,
    Limited,
    /// No password check could start in time (a burst of sign-ins).
    Busy,
}

/// Check a name and password, one at a time per client address: refused
/// outright past the failed-login limit of the address; slowed, never
/// refused, for a name that many attempts guessed at; the hash checked
/// off the request thread. `credential` (an API caller's `Authorization`)
/// is looked up again once it is this attempt's turn: a script's calls
/// sent at once cost one check. Every outcome is counted and logged.
pub(crate) async fn check_password(
    st: &Console,
    req: &HttpRequest,
    name: &str,
    password: &str,
    credential: Option<&str>,
) -> Result<auth::User, Refusal> {
    let client = client_key(st, req);
    let (by_addr, by_name) = (format!("addr:{client}"), format!("user:{name}"));
    let Some(_turn) = st.limiter.turn(&by_addr).await else {
        st.metrics.logins.with_label_values(&["busy"]).inc();
        warn!(st.log, "console sign-in refused: too many sign-ins at once from this address";
            "user" => loggable(name), "client" => &client);
        return Err(Refusal::Busy);
    };
    if let Some(user) = credential.and_then(|c| st.credentials.get(c, Instant::now())) {
        return Ok(user);
    }
    let now = Instant::now();
    if !st.limiter.allows(&by_addr, now) {
        st.metrics.logins.with_label_values(&["limited"]).inc();
        warn!(st.log, "console sign-in refused: too many failures from this address";
            "user" => loggable(name), "client" => &client);
        return Err(Refusal::Limited);
    }
    let delay = st.limiter.name_delay(&by_name, now);
    if !delay.is_zero() {
        st.metrics.login_delays.inc();
        tokio::time::sleep(delay).await;
    }
    // An unknown name costs a hash check too, so timing does not tell
    // which names exist.
    const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$T6I1kGJ3s3bj3gkuUq7l2LwO8yNnV0KZ7q1fKZb6nYc";
    let user = st.users.iter().find(|u| u.name == name);
    let Some(ok) = st
        .hasher
        .verify(user.map_or(DECOY, |u| u.hash.as_str()), password)
        .await
    else {
        st.metrics.logins.with_label_values(&["busy"]).inc();
        warn!(st.log, "console sign-in refused: too many sign-ins at once"; "user" => loggable(name), "client" => &client);
        return Err(Refusal::Busy);
    };
    match user {
        Some(u) if ok => {
            st.limiter.succeeded(&by_name);
            st.metrics.logins.with_label_values(&["ok"]).inc();
            Ok(u.clone())
        }
        _ => {
            let now = Instant::now();
            st.limiter.failed(&by_addr, now);
            st.limiter.failed(&by_name, now);
            st.metrics.logins.with_label_values(&["failed"]).inc();
            warn!(st.log, "console sign-in failed"; "user" => loggable(name), "client" => &client);
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
pub(crate) fn same_origin(req: &HttpRequest) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_or_without_padding() {
        assert_eq!(base64_decode("YWxpY2U6cHc=").as_deref(), Some(&b"alice:pw"[..]));
        assert_eq!(base64_decode("YWxpY2U6cHc").as_deref(), Some(&b"alice:pw"[..]));
        assert_eq!(base64_decode("!!!!"), None);
    }

    #[test]
    fn a_logged_value_cannot_start_a_line() {
        let forged = "alice\nts=now level=INFO msg=\"console sign-in\" user=root";
        let l = loggable(forged);
        assert!(!l.contains('\n'), "{l}");
        assert!(l.starts_with("alice\\n"), "{l}");
        assert_eq!(loggable(&"x".repeat(500)).chars().count(), 201);
        assert_eq!(
            loggable("job \"ü\""),
            "job \"ü\"",
            "only control characters are escaped"
        );
        assert_eq!(one_line("a\u{1b}[31mb"), "a\\u{1b}[31mb");
    }
}
