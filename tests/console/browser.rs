//! A real browser for the console's tests: Debian's Chromium, headless,
//! driven through its ChromeDriver with the W3C WebDriver protocol (plain
//! JSON over HTTP, sent with [`super::web::Web`]). `scripts/services.sh`
//! installs both (`chromium`, `chromium-driver`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::web::Web;
use crate::common::{free_port, wait_until};

/// The key under which WebDriver returns an element's id.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running ChromeDriver.
pub struct Driver {
    child: Child,
    port: u16,
    /// The browsers' profile directories: a browser left behind by a failed
    /// test (ChromeDriver's children outlive it) is found by its profile.
    profiles: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

impl Driver {
    pub async fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/services.sh installs it)");
        let d = Driver {
            child,
            port,
            profiles: std::sync::Mutex::new(Vec::new()),
        };
        wait_until("chromedriver answers", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        d
    }

    /// A new headless browser with an empty profile.
    pub async fn browser(&self) -> Browser {
        let profile = crate::common::scratch_dir("chromium-profile");
        self.profiles.lock().expect("profiles").push(profile.clone());
        let mut web = Web::new(self.port);
        web.origin = None;
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    // This machine's network is closed: without these,
                    // Chromium's own background connections fail at every
                    // start (../shared/PITFALLS.md, env notes).
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--window-size=1280,1000",
                             format!("--user-data-dir={}", profile.display())]
                }
            }}
        });
        let r = web
            .request("POST", "/session", &[], Some(("application/json", caps.to_string())))
            .await;
        assert_eq!(r.status, 200, "new WebDriver session: {}", r.body);
        let id = r.json()["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        Browser { web, id }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in self.profiles.lock().map(|p| p.clone()).unwrap_or_default() {
            // `--` first: the pattern itself starts with dashes.
            let _ = Command::new("pkill")
                .args(["-f", "--"])
                .arg(format!("--user-data-dir={}", p.display()))
                .status();
        }
    }
}

/// One browser session.
pub struct Browser {
    web: Web,
    id: String,
}

impl Browser {
    async fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        if std::env::var_os("OUTBOX_TEST_ECHO").is_some() {
            eprintln!("webdriver: {method} {path}");
        }
        let r = self
            .web
            .request(method, &path, &[], body.map(|b| ("application/json", b.to_string())))
            .await;
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {}", r.body);
        r.json()["value"].clone()
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn url(&mut self) -> String {
        self.call("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's HTML now.
    pub async fn source(&mut self) -> String {
        self.call("GET", "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page once it contains `needle` (a click's navigation may still be
    /// loading when the click returns); panics with the page after 30 s.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let page = self.source().await;
            if page.contains(needle) {
                return page;
            }
            if std::time::Instant::now() > deadline {
                panic!("{needle:?} never appeared on {}: {page}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every element matching a CSS selector.
    pub async fn all(&mut self, css: &str) -> Vec<String> {
        let v = self
            .call(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The one element matching `css` (panics with the page when absent).
    pub async fn find(&mut self, css: &str) -> String {
        match self.all(css).await.into_iter().next() {
            Some(e) => e,
            None => {
                let page = self.source().await;
                panic!("no element {css} on {}: {page}", self.url().await)
            }
        }
    }

    pub async fn click(&mut self, css: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/click"), Some(json!({}))).await;
    }

    pub async fn type_into(&mut self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({}))).await;
        self.call("POST", &format!("/element/{e}/value"), Some(json!({ "text": text })))
            .await;
    }

    /// The browser's cookies, name → value.
    pub async fn cookies(&mut self) -> Vec<(String, String)> {
        let v = self.call("GET", "/cookie", None).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["value"].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Save a PNG of the viewport to `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        let v = self.call("GET", "/screenshot", None).await;
        let png = base64_decode(v.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    pub async fn close(mut self) {
        let path = format!("/session/{}", self.id);
        let _ = self.web.request("DELETE", &path, &[], None).await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|b| !b"=\r\n".contains(b)).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c) << (18 - 6 * i);
        }
        let n = chunk.len().saturating_sub(1);
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    out
}
