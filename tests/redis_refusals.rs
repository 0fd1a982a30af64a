//! A misconfigured Redis must never dead-letter the outbox (SPEC §3): only
//! an error about the entry itself (WRONGTYPE) counts an attempt. Three
//! refusals that are not the rows' fault, each with `max_attempts = 2` and
//! a fast backoff, so that rows are refused many times over their budget:
//! - ZADD renamed away (`--rename-command`, common hardening): `ERR unknown command`;
//! - an ACL user without `zadd`: `NOPERM`;
//! - a proxy in front of Redis that answers ZADD with `-ERR proxy refused`.
//!
//! Each time: no dead letter, attempts unchanged, the refusals counted in
//! `outbox_relay_redis_refused_entries_total` and logged with the error's
//! text; once the cause is fixed, every row is delivered.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const ROWS: i64 = 300;

fn refused_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("outbox_relay_redis_refused_entries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Drive a relay against `relay_redis` until every row has been refused
/// several times its attempt budget, check nothing was charged, `fix`, and
/// check everything arrives in the schedules of the server at `server_url`.
async fn refused_until_fixed<F, Fut>(relay_redis: String, server_url: String, error_text: &str, fix: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let db = TestDb::new().await;
    let prefix = key_prefix();
    seed(&db, ROWS, 3).await;
    let expected = expected_members(&db).await;
    let mut relay = RelayProcess::spawn(&relay_env(
        &db,
        &relay_redis,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "50ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "200ms"),
        ],
    ));
    relay.wait_started().await;

    // Every row refused at least 5 times on average: 2 would have
    // dead-lettered all of them when refusals counted as attempts.
    wait_until("rows refused many times over", Duration::from_secs(60), || async {
        let dead = db.count("SELECT count(*) FROM task_outbox_dead").await;
        assert_eq!(
            dead, 0,
            "a refusal that is not the rows' fault dead-lettered {dead} rows"
        );
        match relay.http_get("/metrics").await {
            Some((200, body)) => refused_total(&body) >= (5 * ROWS) as f64,
            _ => false,
        }
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead").await,
        0,
        "no dead letters"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        ROWS,
        "every row waits"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no attempt was counted"
    );
    let warned = relay.records("redis refused writes");
    assert!(
        warned
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|e| e.contains(error_text))),
        "a warning names the error ({error_text}); got {warned:#?}"
    );
    assert!(
        warned.len() < 20,
        "the warning is rate-limited, not one per tick: {} lines",
        warned.len()
    );

    fix().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    // Every member arrived, each exactly once. A postponed row is re-sent
    // with its new run_at as the score (later than when it was produced).
    let members = schedule_members(&server_url, &prefix).await;
    assert_eq!(members.len(), expected.len(), "no extra or corrupted members");
    for (job, member, first_score) in expected.values() {
        let score = members
            .get(member)
            .unwrap_or_else(|| panic!("member of job {job} missing: {member}"));
        assert!(score >= first_score, "a postponed row is never scheduled earlier");
    }
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_renamed_zadd_postpones_rows_without_counting_attempts() {
    let mut server = RedisServer::start_with_args(&["--rename-command", "ZADD", "ZADD_hidden_7f3a"]).await;
    let url = server.url();
    refused_until_fixed(url.clone(), url, "unknown command", || async {
        // The fix: the same server without the rename.
        server.stop();
        server.extra_args.clear();
        server.resume().await;
    })
    .await;
}

#[tokio::test]
async fn an_acl_user_without_zadd_postpones_rows_without_counting_attempts() {
    let server = RedisServer::start().await;
    let mut admin = redis_conn(&server.url()).await;
    let user = "relay_nozadd";
    let acl = |rules: &[&str]| {
        let mut c = redis::cmd("ACL");
        c.arg("SETUSER").arg(user);
        for r in rules {
            c.arg(*r);
        }
        c
    };
    let _: () = acl(&["on", ">s3cret-pw", "~*", "&*", "+@all", "-zadd"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let relay_url = format!("redis://{user}:s3cret-pw@127.0.0.1:{}/0", server.port);
    refused_until_fixed(relay_url, server.url(), "NOPERM", || async {
        let _: () = acl(&["+zadd"]).query_async(&mut admin).await.expect("grant zadd");
    })
    .await;
}

#[tokio::test]
async fn a_proxys_own_error_postpones_rows_without_counting_attempts() {
    let server = RedisServer::start().await;
    let refuse = Arc::new(AtomicBool::new(true));
    let proxy = RespProxy::start(server.port, refuse.clone()).await;
    refused_until_fixed(proxy.url(), server.url(), "proxy refused", || async {
        refuse.store(false, Ordering::SeqCst);
    })
    .await;
}

/// A tiny Redis proxy: forwards every command to the server, except that
/// while `refuse` is set it answers ZADD itself with `-ERR proxy refused`
/// (as a proxy in front of Redis may, with errors of its own).
struct RespProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl RespProxy {
    async fn start(upstream: u16, refuse: Arc<AtomicBool>) -> RespProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refuse = refuse.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = relay_connection(client, server, refuse).await;
                    }
                });
            }
        });
        RespProxy { port, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RespProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client connection, command by command (pipelined commands are read
/// and answered in order).
async fn relay_connection(client: TcpStream, server: TcpStream, refuse: Arc<AtomicBool>) -> std::io::Result<()> {
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let (mut cr, mut sr) = (BufReader::new(cr), BufReader::new(sr));
    loop {
        let mut raw = Vec::new();
        read_value(&mut cr, &mut raw).await?;
        if refuse.load(Ordering::SeqCst) && command_name(&raw).eq_ignore_ascii_case("zadd") {
            cw.write_all(b"-ERR proxy refused\r\n").await?;
            continue;
        }
        sw.write_all(&raw).await?;
        let mut reply = Vec::new();
        read_value(&mut sr, &mut reply).await?;
        cw.write_all(&reply).await?;
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
