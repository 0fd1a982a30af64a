//! A tiny Redis proxy for tests: forwards every command to the server, one
//! at a time and in order (pipelined commands are read and answered in
//! turn), and can stand in for a misbehaving network or middlebox:
//! - `refuse`: answer write commands (ZADD, EVAL) itself with
//!   `-ERR proxy refused`, as a proxy with errors of its own may;
//! - `hold_when(needle)`: a command whose bytes contain `needle` is held
//!   back, with everything after it on that connection (a black-holed
//!   network, a stalled server), until `release`; the held command then
//!   reaches the server even if its client has given up on it meanwhile;
//! - `delay_when(needle, by)`: the same, released after `by`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Rules {
    refuse: AtomicBool,
    /// (needle, None = until released | Some(delay))
    hold: Mutex<Option<(Vec<u8>, Option<Duration>)>>,
    released: tokio::sync::Notify,
    /// Commands that matched a hold and are waiting.
    held: AtomicU64,
    /// Held commands that reached the server and were answered by it.
    held_answered: AtomicU64,
}

pub struct RespProxy {
    pub port: u16,
    rules: Arc<Rules>,
    task: tokio::task::JoinHandle<()>,
}

impl RespProxy {
    pub async fn start(upstream: u16) -> RespProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let rules = Arc::new(Rules::default());
        let r = rules.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rules = r.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = relay_connection(client, server, rules).await;
                    }
                });
            }
        });
        RespProxy { port, rules, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn refuse(&self, on: bool) {
        self.rules.refuse.store(on, Ordering::SeqCst);
    }

    pub fn hold_when(&self, needle: &str) {
        *self.rules.hold.lock().expect("rules") = Some((needle.as_bytes().to_vec(), None));
    }

    pub fn delay_when(&self, needle: &str, by: Duration) {
        *self.rules.hold.lock().expect("rules") = Some((needle.as_bytes().to_vec(), Some(by)));
    }

    /// Let held commands through and hold nothing more.
    pub fn release(&self) {
        *self.rules.hold.lock().expect("rules") = None;
        self.rules.released.notify_waiters();
    }

    pub fn held(&self) -> u64 {
        self.rules.held.load(Ordering::SeqCst)
    }

    pub fn held_answered(&self) -> u64 {
        self.rules.held_answered.load(Ordering::SeqCst)
    }
}

impl Drop for RespProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// One client connection, command by command.
async fn relay_connection(client: TcpStream, server: TcpStream, rules: Arc<Rules>) -> std::io::Result<()> {
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let (mut cr, mut sr) = (BufReader::new(cr), BufReader::new(sr));
    loop {
        let mut raw = Vec::new();
        read_value(&mut cr, &mut raw).await?;
        let name = command_name(&raw);
        let write = name.eq_ignore_ascii_case("zadd") || name.to_ascii_lowercase().starts_with("eval");
        if rules.refuse.load(Ordering::SeqCst) && write {
            cw.write_all(b"-ERR proxy refused\r\n").await?;
            continue;
        }
        let hold = rules
            .hold
            .lock()
            .expect("rules")
            .as_ref()
            .filter(|(needle, _)| contains(&raw, needle))
            .map(|(_, delay)| *delay);
        let held = hold.is_some();
        match hold {
            None => {}
            Some(Some(by)) => {
                rules.held.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(by).await;
            }
            Some(None) => {
                rules.held.fetch_add(1, Ordering::SeqCst);
                loop {
                    let released = rules.released.notified();
                    if rules.hold.lock().expect("rules").is_none() {
                        break;
                    }
                    released.await;
                }
            }
        }
        sw.write_all(&raw).await?;
        let mut reply = Vec::new();
        read_value(&mut sr, &mut reply).await?;
        if held {
            rules.held_answered.fetch_add(1, Ordering::SeqCst);
        }
        // The client may have given up on a held command: the server ran
        // it anyway, which is the point.
        if cw.write_all(&reply).await.is_err() && held {
            return Ok(());
        }
    }
}

/// The first word of a RESP command array (`*3\r\n$4\r\nZADD\r\n…`).
fn command_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split("\r\n")
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

/// Read one complete RESP2 value into `out`, bytes as they came.
async fn read_value<R: AsyncRead + Unpin>(r: &mut BufReader<R>, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut pending = 1i64;
    while pending > 0 {
        pending -= 1;
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.extend_from_slice(&line);
        let n: i64 = std::str::from_utf8(&line[1..])
            .ok()
            .and_then(|t| t.trim_end().parse().ok())
            .unwrap_or(0);
        match line.first() {
            Some(b'$') if n >= 0 => {
                let mut body = vec![0u8; n as usize + 2];
                r.read_exact(&mut body).await?;
                out.extend_from_slice(&body);
            }
            Some(b'*') if n > 0 => pending += n,
            _ => {}
        }
    }
    Ok(())
}
