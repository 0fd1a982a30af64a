//! Secrets out of sight: passwords in connection strings become `***`
//! before anything is logged or printed, whatever form they came in.
//!
//! Three layers:
//! - [`redact_url`] for a value known to be a connection string: URLs
//!   (`postgres://`, `redis://`, `rediss://`) go through the `url` crate's
//!   parser, so userinfo and a `password` query parameter are found however
//!   they are written; libpq key=value strings go through a tokenizer that
//!   follows libpq's grammar (`key = value`, single-quoted values with `\'`
//!   and `\\` escapes), so `password='a b'` is hidden whole;
//! - [`redact_text`] for free text that may quote one (an error message):
//!   every URL-like token and every `password=` pair in it;
//! - [`remember`] and [`scrub`]: the passwords of the configuration are
//!   remembered at start, and every output surface (log lines, error lines,
//!   the panic hook, `check-config`) passes through `scrub`, which hides
//!   them wherever a library may have echoed them.

use std::borrow::Cow;
use std::sync::RwLock;

/// libpq keys whose values are secrets.
const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

/// Passwords shorter than this are not searched for in free text (a
/// one-letter password would turn every such letter into `***`); the
/// parsers still hide them wherever they appear in a connection string.
const MIN_REMEMBERED: usize = 4;

static REMEMBERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Hide the password of a URL (`scheme://user:secret@host` → `scheme://user:***@host`,
/// `?password=secret` → `?password=***`) or of a libpq key/value connection
/// string (`password='a b'` → `password=***`).
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        return match parse_url(url) {
            Some((parsed, None)) => redact_parsed(parsed),
            Some((parsed, Some(hosts))) => redact_parsed(parsed).replacen(HOSTS_PLACEHOLDER, &hosts, 1),
            // Not parseable, so not usable either (validation says so); show
            // nothing of it that could be a secret.
            None => match url.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***"),
                None => "***".into(),
            },
        };
    }
    match parse_key_values(url) {
        Some(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if is_secret_key(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={}", quote_value(v))
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Not a valid key/value string: nothing of it is shown after a
        // secret key, however it is spelled.
        None => match find_secret_key(url) {
            Some(at) => format!("{}***", &url[..at]),
            None => url.to_string(),
        },
    }
}

/// The passwords in a connection string (URL or key/value), for [`remember`].
pub fn passwords(conn: &str) -> Vec<String> {
    let mut found = Vec::new();
    if conn.contains("://") {
        if let Some((u, _)) = parse_url(conn) {
            if let Some(p) = u.password() {
                found.push(p.to_string());
                if let Ok(decoded) = urlencoding_decode(p) {
                    found.push(decoded);
                }
            }
            for (k, v) in u.query_pairs() {
                if is_secret_key(&k) {
                    found.push(v.into_owned());
                }
            }
        }
    } else if let Some(pairs) = parse_key_values(conn) {
        found.extend(pairs.into_iter().filter(|(k, _)| is_secret_key(k)).map(|(_, v)| v));
    }
    found.retain(|p| !p.is_empty());
    found
}

/// Remember `secrets` so that [`scrub`] hides them in any output.
pub fn remember<I: IntoIterator<Item = String>>(secrets: I) {
    if let Ok(mut list) = REMEMBERED.write() {
        for s in secrets {
            if s.chars().count() < MIN_REMEMBERED {
                continue;
            }
            // As written, and as a JSON string would escape it.
            let escaped = serde_json::to_string(&s)
                .map(|q| q[1..q.len() - 1].to_string())
                .unwrap_or_default();
            for form in [s, escaped] {
                if !form.is_empty() && !list.contains(&form) {
                    list.push(form);
                }
            }
        }
        // Longest first, so a secret containing another is hidden whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Free text with every URL's and `password=` pair's secret hidden, and
/// every remembered password replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out = redact_text(text);
    if let Ok(list) = REMEMBERED.read() {
        for secret in list.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), "***"));
            }
        }
    }
    out
}

/// Hide the secrets of the connection strings quoted in free text: every
/// token with `://` goes through [`redact_url`], every `password=…` (or
/// `sslpassword`) value, quoted or not, becomes `***`.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") && find_secret_key(text).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | ','))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&hide_key_values(&rest[..start]));
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(&hide_key_values(rest));
    Cow::Owned(out)
}

/// `password=x`, `password = 'a b'`, … in free text → `password=***`.
fn hide_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_secret_key(rest) {
        out.push_str(&rest[..at]);
        let value = rest[at..].trim_start_matches(|c: char| c.is_whitespace());
        let consumed = match value.strip_prefix('\'') {
            Some(quoted) => quoted_len(quoted).map_or(value.len(), |n| n + 1),
            None => value
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | ','))
                .unwrap_or(value.len()),
        };
        out.push_str("***");
        let skipped = rest.len() - value.len() + consumed;
        rest = &rest[skipped.min(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// Where the value after the first `password =` (or another secret key)
/// in `text` starts, if there is one.
fn find_secret_key(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    let mut best: Option<usize> = None;
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(i) = lower[from..].find(key) {
            let i = from + i;
            from = i + key.len();
            // A whole word: not `xpassword` (but `sslpassword` is its own key).
            if lower[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let after = lower[from..].trim_start();
            if let Some(eq) = after.strip_prefix('=') {
                let value_at = text.len() - eq.len();
                best = Some(best.map_or(value_at, |b| b.min(value_at)));
                break;
            }
        }
    }
    best
}

fn is_secret_key(k: &str) -> bool {
    SECRET_KEYS.iter().any(|s| k.eq_ignore_ascii_case(s))
}

/// libpq's key/value syntax: `key = value` pairs separated by whitespace;
/// a value is bare (up to whitespace, `\` escapes the next character) or
/// single-quoted (`\'` and `\\` inside). `None` when `text` is not that.
fn parse_key_values(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    (!pairs.is_empty()).then_some(pairs)
}

/// The length of a single-quoted value's body up to (and including) its
/// closing quote, `\` escapes honoured.
fn quoted_len(body: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match (c, escaped) {
            (_, true) => escaped = false,
            ('\\', false) => escaped = true,
            ('\'', false) => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// A key/value value as libpq reads it back.
fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn urlencoding_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    let bytes: Vec<u8> = url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    std::str::from_utf8(&bytes).map(str::to_string)
}

/// Stands for the host list of a libpq multi-host URL while the rest of
/// it goes through the `url` crate (which takes one host).
const HOSTS_PLACEHOLDER: &str = "outbox-relay-hosts.invalid";

/// A URL parsed, and for a libpq multi-host URL
/// (`postgres://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write`)
/// its host list, which the parsed URL holds as [`HOSTS_PLACEHOLDER`].
fn parse_url(url: &str) -> Option<(url::Url, Option<String>)> {
    if let Ok(u) = url::Url::parse(url) {
        return Some((u, None));
    }
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return None;
    }
    let single = format!("{scheme}://{userinfo}{HOSTS_PLACEHOLDER}{tail}");
    url::Url::parse(&single).ok().map(|u| (u, Some(hosts.to_string())))
}

fn redact_parsed(mut u: url::Url) -> String {
    if u.password().is_some() {
        // Only fails for URLs that cannot have credentials, which then have none.
        let _ = u.set_password(Some("***"));
    }
    if u.query_pairs().any(|(k, _)| is_secret_key(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_key(&k) {
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
    fn a_multi_host_url_shows_every_host_and_no_password() {
        let url = "postgres://relay:s3cret@pg-a:5432,pg-b:5433/outbox?target_session_attrs=read-write";
        assert_eq!(
            redact_url(url),
            "postgres://relay:***@pg-a:5432,pg-b:5433/outbox?target_session_attrs=read-write"
        );
        assert!(passwords(url).iter().all(|p| p == "s3cret") && !passwords(url).is_empty());
        let in_query = "postgresql://pg-a,pg-b/outbox?user=relay&password=s3cret";
        assert_eq!(
            redact_url(in_query),
            "postgresql://pg-a,pg-b/outbox?user=relay&password=***"
        );
        assert!(passwords(in_query).iter().all(|p| p == "s3cret") && !passwords(in_query).is_empty());
    }

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

    #[test]
    fn libpq_strings_are_tokenized_not_split() {
        assert_eq!(
            redact_url("host=db password='a b c' user=u"),
            "host=db password=*** user=u"
        );
        assert_eq!(
            redact_url("host = db password = 'it\\'s secret' dbname='my db'"),
            "host=db password=*** dbname='my db'"
        );
        assert_eq!(redact_url("password=x\\ y host=h"), "password=*** host=h");
        // Unterminated quote: not valid, still nothing after the key shown.
        assert_eq!(redact_url("host=h password='a b"), "host=h password=***");
        assert_eq!(redact_url("sslpassword=k3y host=h"), "sslpassword=*** host=h");
        assert_eq!(
            passwords("host=h password='a b' sslpassword=k"),
            vec!["a b".to_string(), "k".to_string()]
        );
        assert_eq!(
            passwords("postgres://u:p%40ss@h/db?password=q"),
            vec!["p%40ss", "p@ss", "q"]
        );
    }

    #[test]
    fn free_text_loses_every_quoted_secret() {
        let text = r#"cannot reach redis://u:topsecret@h:1/0, tried "postgres://r:pw2@db/x?password=pw3"; also password = 'a b' and host=h password=plain"#;
        let out = redact_text(text);
        for secret in ["topsecret", "pw2", "pw3", "a b", "plain"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(out.contains("redis://u:***@h:1/0") && out.contains("host=h"), "{out}");
        assert_eq!(redact_text("nothing to see"), "nothing to see");
        assert_eq!(redact_text("the xpassword=1 stays"), "the xpassword=1 stays");
    }

    #[test]
    fn remembered_secrets_are_scrubbed_in_any_form() {
        remember(["Zq-rem3mbered\"pw".to_string(), "abc".to_string()]);
        let json = serde_json::json!({ "error": "auth failed for Zq-rem3mbered\"pw" }).to_string();
        assert!(!scrub(&json).contains("rem3mbered"), "{}", scrub(&json));
        assert!(!scrub("raw Zq-rem3mbered\"pw here").contains("rem3mbered"));
        // Too short to search for in free text.
        assert_eq!(scrub("abc"), "abc");
    }
}
