//! Every URL the console writes into a page, built in one place.
//!
//! A value that comes from data (a job id, a filter) never becomes a path
//! segment of a link or a form's `action`: job ids may hold `/ ? # % ..`
//! (TEXT ids, the Go schema), and a browser resolves `..` and `%2e%2e`
//! segments before it sends anything, so no encoding of a path segment
//! can carry every id (#37: a crafted id once turned "Cancel job" into
//! "purge every dead letter"). Values travel in the query string, encoded
//! here byte by byte, or in a form's hidden fields, which the markup
//! escapes. Form actions are constants of this file.
//!
//! The one path segment built from data is a dead letter's id, an
//! integer.

/// The POST targets of the job actions: the job travels in the body.
pub const JOB_PAUSE: &str = "/jobs/pause";
pub const JOB_RESUME: &str = "/jobs/resume";
pub const JOB_RECONCILE: &str = "/jobs/reconcile";
pub const JOB_CANCEL: &str = "/jobs/cancel";
/// The confirmation page of a job's cancel (GET, `?job=`).
pub const JOB_CANCEL_CONFIRM: &str = "/jobs/cancel";
/// A job's schedule (GET, `?job=&offset=`).
pub const JOB_SCHEDULE: &str = "/jobs/schedule";
pub const DEAD_LETTERS: &str = "/dead-letters";
pub const DEAD_LETTERS_CONFIRM: &str = "/dead-letters/confirm";
pub const DEAD_LETTERS_REQUEUE: &str = "/dead-letters/requeue";
pub const DEAD_LETTERS_PURGE: &str = "/dead-letters/purge";
pub const SET_ASIDE: &str = "/set-aside";
pub const SET_ASIDE_REQUEUE: &str = "/set-aside/requeue";

/// Percent-encode every byte but RFC 3986's unreserved ones: safe in a
/// query value and in a path segment alike (`/ ? # & = % +` and spaces
/// all become escapes).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `path?k=v&…` with every value encoded; pairs with an empty value are
/// kept (a form reads them back as empty).
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return path.to_string();
    }
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("{path}?{}", q.join("&"))
}

pub fn job_schedule(job: &str, offset: isize) -> String {
    if offset > 0 {
        with_query(JOB_SCHEDULE, &[("job", job), ("offset", &offset.to_string())])
    } else {
        with_query(JOB_SCHEDULE, &[("job", job)])
    }
}

pub fn job_cancel_confirm(job: &str) -> String {
    with_query(JOB_CANCEL_CONFIRM, &[("job", job)])
}

/// The dead-letters page for one job.
pub fn dead_letters_of_job(job: &str) -> String {
    with_query(DEAD_LETTERS, &[("job", job)])
}

/// One dead letter's page.
pub fn dead_letter(id: i64) -> String {
    format!("{DEAD_LETTERS}/{id}")
}

/// Where a sign-in may send the browser afterwards: a path of this
/// console, never another origin. Browsers drop tabs and newlines from
/// URLs and read `\` as `/`, so `/\t/evil.example` and `/\evil.example`
/// are `//evil.example` to them: those characters are refused before the
/// `//` check, as is anything that is not a plain absolute path.
pub fn safe_next(next: Option<&str>) -> String {
    let Some(n) = next else { return "/".into() };
    let clean: String = n.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
    let ok = clean.starts_with('/')
        && !clean.starts_with("//")
        && !clean.contains('\\')
        && !clean.chars().any(|c| c.is_control() || c.is_whitespace())
        && clean == n;
    if ok {
        n.to_string()
    } else {
        "/".into()
    }
}

/// A small deterministic generator (xorshift) of job ids drawn from the
/// characters that have broken URLs before (also used by `views`' tests).
#[cfg(test)]
pub(crate) fn hostile_ids(n: usize) -> Vec<String> {
    tests::hostile_ids(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn hostile_ids(n: usize) -> Vec<String> {
        const PARTS: &[&str] = &[
            "/", "?", "#", "%", "..", ".", "*", "{", "}", "|", " ", "\"", "'", "&", "=", "+", "\\", "%2F", "%2e%2e",
            "ü", "日本", "a", "job-7", "<", ">", ";", ":", "@", "\t",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .map(|_| {
                let len = 1 + (next() % 6) as usize;
                (0..len)
                    .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    fn job_param(u: &url::Url) -> Option<String> {
        u.query_pairs().find(|(k, _)| k == "job").map(|(_, v)| v.into_owned())
    }

    #[test]
    fn every_job_link_resolves_to_its_route_with_the_id_intact() {
        let base = url::Url::parse("http://console.example/jobs/some/page").expect("base");
        for id in hostile_ids(3000)
            .iter()
            .map(String::as_str)
            .chain(["..", ".", "%2e%2e", "*"])
        {
            for (link, path) in [
                (job_schedule(id, 0), JOB_SCHEDULE),
                (job_schedule(id, 50), JOB_SCHEDULE),
                (job_cancel_confirm(id), JOB_CANCEL_CONFIRM),
                (dead_letters_of_job(id), DEAD_LETTERS),
            ] {
                let u = base.join(&link).expect("a link resolves");
                assert_eq!(u.host_str(), Some("console.example"), "{id:?}: {link}");
                assert_eq!(u.path(), path, "{id:?}: {link}");
                assert_eq!(u.fragment(), None, "{id:?}: {link}");
                assert_eq!(job_param(&u).as_deref(), Some(id), "{id:?}: {link}");
            }
        }
    }

    #[test]
    fn next_is_a_local_path_only() {
        assert_eq!(safe_next(Some("/jobs?x=1")), "/jobs?x=1");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\t/evil.example",
            "/%09/evil.example".replace("%09", "\t").as_str(),
            "/\\evil.example",
            "\\\\evil.example",
            "/\n/evil.example",
            " /x",
            "",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
        // The escaped form stays a path: browsers do not decode %09.
        assert_eq!(safe_next(Some("/%09/evil.example")), "/%09/evil.example");
        let u = url::Url::parse("http://console.example/login")
            .expect("base")
            .join("/%09/evil.example")
            .expect("join");
        assert_eq!(u.host_str(), Some("console.example"));
    }
}
