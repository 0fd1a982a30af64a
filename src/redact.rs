//! Secrets out of sight: passwords in connection strings become `***`
//! before anything is logged or printed.
//!
//! URLs (`postgres://`, `redis://`, `rediss://`) go through the `url`
//! crate's parser, so userinfo and a `password` query parameter are found
//! however they are written. libpq's key=value strings have no parser to
//! re-serialize them (tokio-postgres parses them one way only), so those
//! are split by hand.

/// Hide the password of a URL (`scheme://user:secret@host` → `scheme://user:***@host`,
/// `?password=secret` → `?password=***`) or of a key/value connection string
/// (`password=secret` → `password=***`).
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        return match url::Url::parse(url) {
            Ok(parsed) => redact_parsed(parsed),
            // Not parseable, so not usable either (validation says so); show
            // nothing of it that could be a secret.
            Err(_) => match url.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***"),
                None => "***".into(),
            },
        };
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_parsed(mut u: url::Url) -> String {
    if u.password().is_some() {
        // Only fails for URLs that cannot have credentials, which then have none.
        let _ = u.set_password(Some("***"));
    }
    if u.query_pairs().any(|(k, _)| k.eq_ignore_ascii_case("password")) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact_url("postgres://user:s3cret@db:5432/x"),
            "postgres://user:***@db:5432/x"
        );
        assert_eq!(redact_url("redis://:pw@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("host=db user=u password=secret"),
            "host=db user=u password=***"
        );
        assert_eq!(
            redact_url("postgres://root@db/x?sslmode=require&password=s3cret"),
            "postgres://root@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("rediss://u:p%40ss@h:6380/0#insecure"),
            "rediss://u:***@h:6380/0#insecure"
        );
        assert!(!redact_url("postgres://u:secret@[bad").contains("secret"));
    }
}
