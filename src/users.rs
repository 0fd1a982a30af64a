//! Console users: the `console.users_file` format (`name:role:hash`, the
//! hash an argon2 PHC string) and the password hashes themselves. Read by
//! configuration validation (a bad line stops the start, naming its line)
//! and by the console (`console::auth`).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// What a signed-in user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees every page; no action.
    Viewer,
    /// Sees every page and acts: pause, resume, cancel, requeue, purge.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// One console user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// argon2 PHC string.
    pub hash: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UsersError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
}

/// Parse a users file: `name:role:hash` per line; blank lines and lines
/// starting with `#` are skipped. Every problem names its line (never the
/// hash).
pub fn parse_users(path: &str, text: &str) -> Result<Vec<User>, UsersError> {
    let mut users: Vec<User> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| UsersError::Line {
            path: path.to_string(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut parts = line.splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected name:role:hash"));
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) {
            return Err(bad("a user name is letters, digits and . _ - @"));
        }
        let role = match role {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            _ => return Err(bad("the role is viewer or operator")),
        };
        if PasswordHash::new(hash).map(|h| h.algorithm.as_str().starts_with("argon2")) != Ok(true) {
            return Err(bad(
                "the hash is not an argon2 PHC string (make one with `outbox-relay console hash-password`)",
            ));
        }
        if users.iter().any(|u| u.name == name) {
            return Err(bad("this user is named twice"));
        }
        users.push(User {
            name: name.to_string(),
            role,
            hash: hash.to_string(),
        });
    }
    Ok(users)
}

/// Read and parse `path` (`console.users_file`); an empty path is no user.
pub fn read_users(path: &str) -> Result<Vec<User>, UsersError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| UsersError::Read {
        path: path.to_string(),
        reason: e.to_string(),
    })?;
    parse_users(path, &text)
}

/// An argon2id PHC string for `password`, with a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&random_bytes()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches `hash` (argon2's check is constant-time).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// 16 bytes from the operating system's random source.
fn random_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct hors"));
        assert!(!verify_password("not a hash", "correct horse"));
        assert_ne!(h, hash_password("correct horse").expect("hash"), "salted");
    }

    #[test]
    fn users_file_lines_are_checked_and_named() {
        let h = hash_password("pw").expect("hash");
        let text = format!("# ops\n\nalice:operator:{h}\nbob:viewer:{h}\n");
        let users = parse_users("users", &text).expect("valid");
        assert_eq!(users.len(), 2);
        assert_eq!((users[0].name.as_str(), users[0].role), ("alice", Role::Operator));
        assert_eq!((users[1].name.as_str(), users[1].role), ("bob", Role::Viewer));
        for (bad, why) in [
            (format!("carol:admin:{h}"), "role"),
            ("carol:viewer:secret".to_string(), "argon2"),
            (format!("carol viewer {h}"), "name:role:hash"),
            (format!("ca rol:viewer:{h}"), "user name"),
            (format!("alice:viewer:{h}\nalice:viewer:{h}"), "twice"),
        ] {
            let e = parse_users("users", &bad).expect_err(&bad).to_string();
            assert!(e.contains(why) && e.starts_with("users line"), "{e}");
            assert!(!e.contains("$argon2"), "no hash in errors: {e}");
        }
    }
}
