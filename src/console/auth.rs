//! Who may use the console: users and roles (`crate::users`, from
//! `console.users_file`), sessions, CSRF tokens, and the failed-login
//! limiter.
//!
//! - A user is one line `name:role:hash` (role `viewer` or `operator`; the
//!   hash an argon2 PHC string from `outbox-relay console hash-password`).
//!   Only hashes are ever stored; the file comes from the Secret.
//! - A session is a random 128-bit token in an `HttpOnly`, `SameSite=Strict`
//!   cookie, held in memory (a console restart signs everyone out), with
//!   its own CSRF token that every state-changing form must send back.
//! - Failed logins are limited per client address and per user name: after
//!   [`FAILURES_ALLOWED`] in [`FAILURE_WINDOW`] further attempts are
//!   refused (429) until the window has passed, before any hash is checked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::users::{hash_password, read_users, verify_password, Role, User, UsersError};

/// Failed logins allowed per address, and per user name, in a window.
pub const FAILURES_ALLOWED: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// A random token: 64 hex digits (two v4 UUIDs, 244 random bits).
pub fn token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Compare two tokens in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A signed-in user's session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    expires: Instant,
}

/// Sessions in memory, by token.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    by_token: Mutex<HashMap<String, Session>>,
}

/// Sessions held at most; the oldest go first beyond it.
const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            ttl,
            by_token: Mutex::new(HashMap::new()),
        }
    }

    /// Start a session; returns its token.
    pub fn start(&self, user: &User) -> (String, Session) {
        let now = Instant::now();
        let session = Session {
            user: user.name.clone(),
            role: user.role,
            csrf: token(),
            expires: now + self.ttl,
        };
        let t = token();
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(t.clone(), session.clone());
        (t, session)
    }

    /// The live session of `token`.
    pub fn get(&self, token: &str) -> Option<Session> {
        let map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        map.get(token).filter(|s| s.expires > Instant::now()).cloned()
    }

    pub fn end(&self, token: &str) {
        self.by_token.lock().unwrap_or_else(|p| p.into_inner()).remove(token);
    }
}

/// Failed logins per key (a client address, a user name) in a window.
#[derive(Debug, Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    /// Whether `key` may try again now.
    pub fn allows(&self, key: &str, now: Instant) -> bool {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((n, since)) => *n < FAILURES_ALLOWED || now.duration_since(*since) >= FAILURE_WINDOW,
            None => true,
        }
    }

    /// Count a failure of `key`.
    pub fn failed(&self, key: &str, now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        let e = map.entry(key.to_string()).or_insert((0, now));
        if now.duration_since(e.1) >= FAILURE_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    }

    /// A success forgets `key`'s failures.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let user = User {
            name: "a".into(),
            role: Role::Viewer,
            hash: String::new(),
        };
        let s = Sessions::new(Duration::from_secs(60));
        let (t, session) = s.start(&user);
        assert_eq!(s.get(&t), Some(session.clone()));
        assert_eq!(session.csrf.len(), 64);
        assert_eq!(s.get("nope"), None);
        s.end(&t);
        assert_eq!(s.get(&t), None);
        let short = Sessions::new(Duration::ZERO);
        let (t, _) = short.start(&user);
        assert_eq!(short.get(&t), None, "expired at once");
    }

    #[test]
    fn the_limiter_refuses_after_five_failures_for_a_window() {
        let l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..FAILURES_ALLOWED {
            assert!(l.allows("1.2.3.4", t0));
            l.failed("1.2.3.4", t0);
        }
        assert!(!l.allows("1.2.3.4", t0));
        assert!(l.allows("5.6.7.8", t0), "per key");
        assert!(l.allows("1.2.3.4", t0 + FAILURE_WINDOW), "the window passes");
        l.succeeded("1.2.3.4");
        assert!(l.allows("1.2.3.4", t0));
    }

    #[test]
    fn tokens_compare_whole() {
        let t = token();
        assert!(same_token(&t, &t.clone()));
        assert!(!same_token(&t, &t[..63]));
        assert!(!same_token(&t, &format!("{}x", &t[..63])));
        assert_ne!(token(), token());
    }
}
