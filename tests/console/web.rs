//! A small HTTP/1.1 client for the console's tests: keeps cookies like a
//! browser, sends forms and JSON, returns status, headers and body, and
//! follows a page's forms the way a browser does (each `action` resolved
//! against the page's URL by the WHATWG rules of the `url` crate). Also
//! the users file and a relay serving the console. (`browser` drives a
//! real Chromium; these check the protocol.)

use std::collections::HashMap;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{free_port, relay_command, scratch_dir, shared_redis_url, shipped_env, RelayProcess, TestDb};

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// The value of `<input … name="NAME" value="…">` in the body.
    pub fn input(&self, name: &str) -> Option<String> {
        let at = self.body.find(&format!("name=\"{name}\""))?;
        let rest = &self.body[at..];
        let v = rest.find("value=\"")? + "value=\"".len();
        let end = rest[v..].find('"')?;
        Some(rest[v..v + end].to_string())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A client of one console, with its cookie jar.
pub struct Web {
    pub port: u16,
    pub cookies: HashMap<String, String>,
    /// Sent as `Origin` on POSTs unless a request says otherwise.
    pub origin: Option<String>,
}

/// `application/x-www-form-urlencoded` of `fields`.
pub fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Standard base64 with padding (for HTTP Basic).
pub fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Web {
    pub fn new(port: u16) -> Web {
        Web {
            port,
            cookies: HashMap::new(),
            origin: Some(format!("http://127.0.0.1:{port}")),
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Answer {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap_or_else(|e| panic!("console on port {} does not answer: {e}", self.port));
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
            self.port
        );
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req.push_str(&format!("Cookie: {}\r\n", jar.join("; ")));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.map(|(ctype, b)| {
            req.push_str(&format!("Content-Type: {ctype}\r\nContent-Length: {}\r\n", b.len()));
            b
        });
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(&b);
        }
        s.write_all(req.as_bytes()).await.expect("send request");
        // Read the head, then as many bytes as Content-Length says (some
        // servers, ChromeDriver's among them, leave the connection open
        // after answering despite `Connection: close`); without a length,
        // to the end.
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let chunked = head.contains("transfer-encoding: chunked") || head.contains("transfer-encoding:chunked");
                let have = buf.len() - at - 4;
                match length {
                    Some(n) if have >= n => break,
                    None if chunked && buf.ends_with(b"0\r\n\r\n") => break,
                    _ => {}
                }
            }
            let n = s.read(&mut chunk).await.expect("read answer");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {text}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        for (k, v) in &headers {
            if k == "set-cookie" {
                let pair = v.split(';').next().unwrap_or_default();
                if let Some((name, value)) = pair.split_once('=') {
                    if value.is_empty() || v.contains("Max-Age=0") {
                        self.cookies.remove(name);
                    } else {
                        self.cookies.insert(name.to_string(), value.to_string());
                    }
                }
            }
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked { dechunk(body) } else { body.to_string() };
        Answer { status, headers, body }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.request("GET", path, &[], None).await
    }

    /// POST a form, with this client's `Origin`.
    pub async fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let origin = self.origin.clone();
        let headers: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", o.as_str())).collect();
        self.request(
            "POST",
            path,
            &headers,
            Some(("application/x-www-form-urlencoded", form(fields))),
        )
        .await
    }

    /// A client of the API, as a script is: no `Origin` header.
    pub fn api(port: u16) -> Web {
        let mut web = Web::new(port);
        web.origin = None;
        web
    }

    /// `GET path` with an `Authorization` header.
    pub async fn get_as(&mut self, path: &str, auth: &str) -> Answer {
        self.request("GET", path, &[("Authorization", auth)], None).await
    }

    /// `POST path` with an `Authorization` header and a JSON body.
    pub async fn post_json_as(&mut self, path: &str, auth: &str, json: &str) -> Answer {
        self.request(
            "POST",
            path,
            &[("Authorization", auth)],
            Some(("application/json", json.to_string())),
        )
        .await
    }

    /// Sign in through the form, as a browser does; the answer of the POST.
    pub async fn sign_in(&mut self, name: &str, password: &str) -> Answer {
        let page = self.get("/login").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let token = page.input("token").expect("the login form's token");
        self.post_form(
            "/login",
            &[("token", &token), ("next", "/"), ("name", name), ("password", password)],
        )
        .await
    }

    /// The CSRF token of this session, read from a page's sign-out form.
    pub async fn csrf(&mut self) -> String {
        let page = self.get("/jobs").await;
        assert_eq!(page.status, 200, "{}", page.body);
        page.input("csrf").expect("a CSRF token on the page")
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let (Some(chunk), Some(next)) = (after.get(..n), after.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        rest = next.trim_start_matches("\r\n");
    }
    out
}

/// A bulk action's JSON body: `filter` (an object: `job`, `error`,
/// `within`, or `all`) with what its confirmation (`GET
/// /api/v1/dead-letters/confirm` or `GET /api/v1/set-aside`) answered:
/// `expect_rows`, `max_id` and `fingerprint`.
pub fn bound(mut filter: serde_json::Value, seen: &serde_json::Value) -> String {
    for key in ["expect_rows", "max_id", "fingerprint"] {
        filter[key] = seen[key].clone();
    }
    filter.to_string()
}

/// `outbox-relay console hash-password` with `password` on stdin.
pub fn hash(password: &str) -> String {
    let mut child = relay_command(&["console", "hash-password"], &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("hash-password output");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(h.starts_with("$argon2id$"), "{h}");
    assert!(!h.contains(password), "the hash does not hold the password");
    h
}

/// A users file with operator `alice` and viewer `bob`.
pub fn users_file(stem: &str) -> std::path::PathBuf {
    let dir = scratch_dir(stem);
    let path = dir.join("users");
    std::fs::write(
        &path,
        format!(
            "# console users\nalice:operator:{}\nbob:viewer:{}\n",
            hash("alice's password"),
            hash("bob's password")
        ),
    )
    .expect("write users");
    path
}

/// A relay (`run`) serving the console.
pub struct ConsoleRelay {
    pub relay: RelayProcess,
    pub port: u16,
}

/// `run` at the shipped defaults with the console on a free port.
pub async fn relay_with_console(
    db: &TestDb,
    prefix: &str,
    users: Option<&std::path::Path>,
    extra: &[(&str, &str)],
) -> ConsoleRelay {
    let port = free_port();
    let mut env = shipped_env(&db.url, &shared_redis_url(), prefix);
    env.push(("OUTBOX_RELAY_CONSOLE__LISTEN".into(), format!("127.0.0.1:{port}")));
    env.push(("OUTBOX_RELAY_LOG__FORMAT".into(), "json".into()));
    if let Some(u) = users {
        env.push(("OUTBOX_RELAY_CONSOLE__USERS_FILE".into(), u.display().to_string()));
    }
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_console(port, &mut relay).await;
    ConsoleRelay { relay, port }
}

/// `outbox-relay console` alone (no sweeping) with `env`, once it
/// answers on `port`; the caller kills it.
pub async fn console_alone(env: &[(String, String)], port: u16) -> std::process::Child {
    let mut child = relay_command(&["console"], env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn console");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(child.try_wait().ok().flatten().is_none(), "console exited");
        assert!(std::time::Instant::now() < deadline, "console never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

pub async fn wait_console(port: u16, relay: &mut RelayProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        assert!(relay.is_running(), "relay exited: {:#?}", relay.lines());
        assert!(
            std::time::Instant::now() < deadline,
            "console never answered: {:#?}",
            relay.lines()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every `<form method="post">` of a page: its action and hidden fields.
pub fn post_forms(body: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for part in body.split("<form").skip(1) {
        let form = part.split("</form>").next().unwrap_or_default();
        let head = form.split('>').next().unwrap_or_default();
        if !head.contains("method=\"post\"") {
            continue;
        }
        let action = attr(head, "action").unwrap_or_default();
        let hidden = form
            .split("<input")
            .skip(1)
            .filter(|i| i.contains("type=\"hidden\""))
            .filter_map(|i| Some((attr(i, "name")?, attr(i, "value").unwrap_or_default())))
            .collect();
        out.push((action, hidden));
    }
    out
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[at..].find('"')?;
    Some(unescape(&tag[at..at + end]))
}

pub fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Where a browser on `page` sends a form whose action is `action`.
pub fn resolve(port: u16, page: &str, action: &str) -> String {
    let base = url::Url::parse(&format!("http://127.0.0.1:{port}{page}")).expect("page URL");
    let to = base.join(action).expect("a resolvable action");
    match to.query() {
        Some(q) => format!("{}?{q}", to.path()),
        None => to.path().to_string(),
    }
}

/// Submit every POST form of `page` as a browser would: its action
/// resolved against the page, its hidden fields as they are.
pub async fn submit_every_form(web: &mut Web, port: u16, page: &str) -> Vec<(String, Answer)> {
    let shown = web.get(page).await;
    let mut answers = Vec::new();
    for (action, hidden) in post_forms(&shown.body) {
        if action == "/logout" {
            continue;
        }
        let to = resolve(port, page, &action);
        let fields: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let a = web.post_form(&to, &fields).await;
        answers.push((to, a));
    }
    answers
}
