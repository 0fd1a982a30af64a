//! Who may use the console: users and roles (`crate::users`, from
//! `console.users_file`), sessions, CSRF tokens, the failed-login limiter,
//! and the password checks themselves.
//!
//! - A user is one line `name:role:hash` (role `viewer` or `operator`; the
//!   hash an argon2 PHC string from `outbox-relay console hash-password`).
//!   Only hashes are ever stored; the file comes from the Secret.
//! - A session is a random token in an `HttpOnly`, `SameSite=Strict`
//!   cookie, held in memory (a console restart signs everyone out), with
//!   its own CSRF token that every state-changing form must send back. It
//!   ends after `console.session_ttl` however busy, after
//!   `console.idle_timeout` unused, at sign-out, or when its user signs
//!   out everywhere.
//! - Failed logins are limited per client address: after
//!   [`FAILURES_ALLOWED`] in [`FAILURE_WINDOW`] that address is refused
//!   (429) until the window has passed. An address's attempts are checked
//!   one at a time ([`Limiter::turn`]), so a burst sent all at once is
//!   limited like the same attempts sent in turn. Per user name they only slow down
//!   ([`Limiter::name_delay`]): an attacker who guesses at one operator's
//!   name from many addresses must never lock that operator out during an
//!   incident.
//! - Argon2 runs on the blocking pool, [`HASHERS`] at a time, never on the
//!   console's one request thread ([`Hasher`]); an API caller's
//!   credentials, once checked, are remembered for [`CREDENTIAL_TTL`] under
//!   a keyed 128-bit digest, so a script polling every second costs one
//!   hash a minute, not one per call.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::users::{hash_password, read_users, verify_password, Role, User, UsersError};

/// Failed logins allowed per address, and per user name before its
/// attempts slow down, in a window.
pub const FAILURES_ALLOWED: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The longest a sign-in for a much-guessed name is held back.
pub const NAME_DELAY_MAX: Duration = Duration::from_secs(4);
/// Password checks (argon2, ~20 MiB and tens of ms each) at once: one, so
/// a burst of sign-ins cannot take the console pod past its memory limit
/// (`deploy/kubernetes/console.yaml`: 64 MiB).
pub const HASHERS: usize = 1;
/// A password check that cannot start within this is refused as busy.
pub const HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long checked API credentials are remembered.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(60);

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
    /// The absolute end (`console.session_ttl` after sign-in).
    expires: Instant,
    /// The last request that used it.
    used: Instant,
}

/// Sessions in memory, by token.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    idle: Duration,
    by_token: Mutex<HashMap<String, Session>>,
}

/// Sessions held at most; the oldest go first beyond it.
const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    pub fn new(ttl: Duration, idle: Duration) -> Self {
        Sessions {
            ttl,
            idle,
            by_token: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        s.expires > now && now.duration_since(s.used) < self.idle
    }

    /// Start a session; returns its token.
    pub fn start(&self, user: &User) -> (String, Session) {
        let now = Instant::now();
        let session = Session {
            user: user.name.clone(),
            role: user.role,
            csrf: token(),
            expires: now + self.ttl,
            used: now,
        };
        let t = token();
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now && now.duration_since(s.used) < self.idle);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(t.clone(), session.clone());
        (t, session)
    }

    /// The live session of `token`; using it resets its idle clock.
    pub fn get(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get_mut(token)?;
        if !self.live(s, now) {
            map.remove(token);
            return None;
        }
        s.used = now;
        Some(s.clone())
    }

    pub fn end(&self, token: &str) {
        self.by_token.lock().unwrap_or_else(|p| p.into_inner()).remove(token);
    }

    /// End every session of `user` (sign out everywhere); how many.
    pub fn end_all(&self, user: &str) -> usize {
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, s| s.user != user);
        before - map.len()
    }
}

/// Failed logins per key (a client address, a user name) in a window,
/// and each address's turn to be checked.
#[derive(Debug, Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    gates: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// An address's turn to have a sign-in checked; the next waits until it
/// is dropped.
pub struct Turn {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Limiter {
    /// Failures of `key` in the current window.
    fn failures(&self, key: &str, now: Instant) -> u32 {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((n, since)) if now.duration_since(*since) < FAILURE_WINDOW => *n,
            _ => 0,
        }
    }

    /// Whether `key` (a client address) may try again now.
    pub fn allows(&self, key: &str, now: Instant) -> bool {
        self.failures(key, now) < FAILURES_ALLOWED
    }

    /// How long an attempt for `key` (a user name) waits before its
    /// password is checked: nothing for the first [`FAILURES_ALLOWED`]
    /// failures of the window, then 250 ms doubling per failure up to
    /// [`NAME_DELAY_MAX`]. It slows guessing at one name from many
    /// addresses; it never refuses the right password.
    pub fn name_delay(&self, key: &str, now: Instant) -> Duration {
        let n = self.failures(key, now);
        if n < FAILURES_ALLOWED {
            return Duration::ZERO;
        }
        let doublings = (n - FAILURES_ALLOWED).min(8);
        (Duration::from_millis(250) * 2u32.pow(doublings)).min(NAME_DELAY_MAX)
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

    /// Wait for `key`'s turn (a client address): its sign-ins are checked
    /// one at a time, each seeing the failures of those before it, so a
    /// burst sent at once is limited like the same attempts sent in turn.
    /// None when the turn did not come within [`HASH_QUEUE_TIMEOUT`].
    pub async fn turn(&self, key: &str) -> Option<Turn> {
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            if gates.len() > 10_000 {
                gates.retain(|_, g| std::sync::Arc::strong_count(g) > 1);
            }
            gates.entry(key.to_string()).or_default().clone()
        };
        tokio::time::timeout(HASH_QUEUE_TIMEOUT, gate.lock_owned())
            .await
            .ok()
            .map(|guard| Turn { _guard: guard })
    }
}

/// Password checks off the request thread, a few at a time.
#[derive(Debug)]
pub struct Hasher {
    permits: tokio::sync::Semaphore,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            permits: tokio::sync::Semaphore::new(HASHERS),
        }
    }
}

impl Hasher {
    /// Whether `password` matches the argon2 `hash`, computed on the
    /// blocking pool once a permit is free (a burst of sign-ins queues
    /// here instead of stalling every page); None when no permit came
    /// within [`HASH_QUEUE_TIMEOUT`].
    pub async fn verify(&self, hash: &str, password: &str) -> Option<bool> {
        let permit = tokio::time::timeout(HASH_QUEUE_TIMEOUT, self.permits.acquire()).await;
        let Ok(Ok(_permit)) = permit else {
            return None;
        };
        let (hash, password) = (hash.to_string(), password.to_string());
        Some(
            tokio::task::spawn_blocking(move || verify_password(&hash, &password))
                .await
                .unwrap_or(false),
        )
    }
}

/// API credentials already checked: a keyed 128-bit digest of the
/// `Authorization` value (two SipHash keys drawn at start, never stored)
/// → the user, for [`CREDENTIAL_TTL`]. Neither the password nor a hash an
/// attacker could test offline is kept.
#[derive(Debug, Default)]
pub struct CredentialCache {
    keys: (RandomState, RandomState),
    by_digest: Mutex<HashMap<u128, (User, Instant)>>,
}

/// Credentials remembered at most (a flood of distinct ones evicts).
const MAX_CREDENTIALS: usize = 1_000;

impl CredentialCache {
    fn digest(&self, credential: &str) -> u128 {
        let a = self.keys.0.hash_one(credential);
        let b = self.keys.1.hash_one(credential);
        (u128::from(a) << 64) | u128::from(b)
    }

    /// The user these credentials were checked for, if recently.
    pub fn get(&self, credential: &str, now: Instant) -> Option<User> {
        let d = self.digest(credential);
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&d) {
            Some((u, at)) if now.duration_since(*at) < CREDENTIAL_TTL => Some(u.clone()),
            Some(_) => {
                map.remove(&d);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, credential: &str, user: &User, now: Instant) {
        let d = self.digest(credential);
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CREDENTIALS {
            map.retain(|_, (_, at)| now.duration_since(*at) < CREDENTIAL_TTL);
            if map.len() >= MAX_CREDENTIALS {
                map.clear();
            }
        }
        map.insert(d, (user.clone(), now));
    }

    /// Forget every credential of `user` (sign out everywhere).
    pub fn forget(&self, user: &str) {
        self.by_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (u, _)| u.name != user);
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
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let (t, session) = s.start(&user);
        assert_eq!(
            s.get(&t).map(|g| (g.user, g.csrf)),
            Some((session.user.clone(), session.csrf.clone()))
        );
        assert_eq!(session.csrf.len(), 64);
        assert_eq!(s.get("nope"), None);
        s.end(&t);
        assert_eq!(s.get(&t), None);
        let short = Sessions::new(Duration::ZERO, Duration::from_secs(60));
        let (t, _) = short.start(&user);
        assert_eq!(short.get(&t), None, "expired at once");
        let idle = Sessions::new(Duration::from_secs(60), Duration::ZERO);
        let (t, _) = idle.start(&user);
        assert_eq!(idle.get(&t), None, "idle at once");
    }

    #[test]
    fn signing_out_everywhere_ends_only_that_users_sessions() {
        let user = |name: &str| User {
            name: name.into(),
            role: Role::Operator,
            hash: String::new(),
        };
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let (a1, _) = s.start(&user("a"));
        let (a2, _) = s.start(&user("a"));
        let (b, _) = s.start(&user("b"));
        assert_eq!(s.end_all("a"), 2);
        assert_eq!((s.get(&a1), s.get(&a2)), (None, None));
        assert!(s.get(&b).is_some());
    }

    #[test]
    fn a_guessed_name_slows_down_and_is_never_refused() {
        let l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..FAILURES_ALLOWED {
            assert_eq!(l.name_delay("user:alice", t0), Duration::ZERO);
            l.failed("user:alice", t0);
        }
        assert_eq!(l.name_delay("user:alice", t0), Duration::from_millis(250));
        for _ in 0..100 {
            l.failed("user:alice", t0);
        }
        assert_eq!(l.name_delay("user:alice", t0), NAME_DELAY_MAX);
        assert_eq!(l.name_delay("user:alice", t0 + FAILURE_WINDOW), Duration::ZERO);
    }

    #[test]
    fn checked_credentials_are_remembered_briefly_and_forgotten_on_demand() {
        let c = CredentialCache::default();
        let alice = User {
            name: "alice".into(),
            role: Role::Operator,
            hash: String::new(),
        };
        let t0 = Instant::now();
        assert!(c.get("Basic abc", t0).is_none());
        c.put("Basic abc", &alice, t0);
        assert_eq!(c.get("Basic abc", t0).map(|u| u.name), Some("alice".into()));
        assert!(c.get("Basic abd", t0).is_none(), "another credential");
        assert!(c.get("Basic abc", t0 + CREDENTIAL_TTL).is_none(), "expired");
        c.put("Basic abc", &alice, t0);
        c.forget("alice");
        assert!(c.get("Basic abc", t0).is_none());
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
