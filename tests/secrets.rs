//! No secret in any output: every way a password can reach the relay
//! (URL userinfo, `?password=`, a libpq key/value string with a quoted
//! value, Redis `user:pass@`, a TOML syntax error on the line holding it)
//! × every surface (log lines in JSON and text at `trace`, error lines,
//! `check-config`, `status`, `/metrics`).

use crate::common;

use std::time::Duration;

use common::*;

const SECRET: &str = "Sup3r-s3cret Zebra7tail";
/// The same, as it must be written inside a URL.
const SECRET_IN_URL: &str = "Sup3r-s3cret%20Zebra7tail";

fn assert_clean(surface: &str, text: &str) {
    for needle in ["Sup3r-s3cret", "Zebra7tail"] {
        assert!(!text.contains(needle), "{surface} shows the password:\n{text}");
    }
}

/// The database part of TestDb's URL: (host, port, dbname).
fn db_parts(db: &TestDb) -> (String, u16, String) {
    let u = url::Url::parse(&db.url).expect("test db url");
    (
        u.host_str().unwrap_or("127.0.0.1").to_string(),
        u.port().unwrap_or(5432),
        u.path().trim_start_matches('/').to_string(),
    )
}

/// Every secret-bearing way to name the database and Redis.
fn inputs(db: &TestDb, redis_port: u16) -> Vec<(&'static str, String, String)> {
    let (host, port, name) = db_parts(db);
    let redis = format!("redis://127.0.0.1:{redis_port}/0");
    let redis_auth = format!("redis://default:{SECRET_IN_URL}@127.0.0.1:{redis_port}/0");
    vec![
        (
            "postgres URL userinfo",
            format!("postgres://root:{SECRET_IN_URL}@{host}:{port}/{name}"),
            redis.clone(),
        ),
        (
            "postgres ?password=",
            format!("postgres://root@{host}:{port}/{name}?password={SECRET_IN_URL}"),
            redis.clone(),
        ),
        (
            "libpq key/value, quoted",
            format!("host={host} port={port} user=root dbname={name} password='{SECRET}'"),
            redis.clone(),
        ),
        ("redis user:pass@", db.url.clone(), redis_auth),
    ]
}

fn env_for(db_url: &str, redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db_url.to_string()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.to_string()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
        ("OUTBOX_RELAY_LOG__LEVEL".to_string(), "trace".to_string()),
        ("OUTBOX_RELAY_HEALTH__INTERVAL".to_string(), "200ms".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn output(args: &[&str], env: &[(String, String)]) -> String {
    let o = relay_command(args, env).output().expect("run the relay");
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn no_password_reaches_any_output_whatever_its_form() {
    let db = TestDb::new().await;
    let redis = RedisServer::start().await;
    for (form, db_url, redis_url) in inputs(&db, redis.port) {
        let prefix = key_prefix();
        for format in ["json", "text"] {
            seed(&db, 50, 2).await;
            let env = env_for(&db_url, &redis_url, &prefix, &[("OUTBOX_RELAY_LOG__FORMAT", format)]);
            let mut relay = RelayProcess::spawn(&env);
            wait_until(&format!("{form}: drained"), Duration::from_secs(60), || async {
                db.count("SELECT count(*) FROM task_outbox").await == 0
            })
            .await;
            if format == "json" {
                relay.wait_http("/metrics", 200, Duration::from_secs(30)).await;
                let (_, scrape) = relay.http_get("/metrics").await.expect("scrape");
                assert_clean(&format!("{form}: /metrics"), &scrape);
                let (_, health) = relay.http_get("/healthz").await.expect("healthz");
                assert_clean(&format!("{form}: /healthz"), &health);
            }
            wait_until(
                &format!("{form}: a health line ({format})"),
                Duration::from_secs(30),
                || {
                    let logged = relay.lines().iter().any(|l| l.contains("actor health"));
                    async move { logged }
                },
            )
            .await;
            relay.signal("TERM");
            relay.wait_exit(Duration::from_secs(30)).await;
            assert!(relay.lines().len() > 10, "{form}: the relay logged at trace ({format})");
            assert_clean(&format!("{form}: {format} log at trace"), &relay.lines().join("\n"));
        }
        let env = env_for(&db_url, &redis_url, &prefix, &[]);
        let checked = output(&["check-config"], &env);
        assert!(checked.contains("# postgres: reachable"), "{form}: {checked}");
        assert_clean(&format!("{form}: check-config"), &checked);
        assert_clean(&format!("{form}: status"), &output(&["status"], &env));
        assert_clean(&format!("{form}: status --json"), &output(&["status", "--json"], &env));

        // Error lines: the same credentials, services that are not there.
        let dead_db = db_url
            .replace(&format!(":{}", db_parts(&db).1), ":1")
            .replace("port=5432", "port=1");
        let dead_redis = redis_url.replace(&format!(":{}", redis.port), ":1");
        for (what, env) in [
            ("postgres unreachable", env_for(&dead_db, &redis_url, &prefix, &[])),
            ("redis unreachable", env_for(&db_url, &dead_redis, &prefix, &[])),
        ] {
            for args in [
                &["check-config"][..],
                &["run"],
                &["status"],
                &["cancel-job", "00000000-0000-4000-8000-000000000001"],
            ] {
                let out = output(args, &env);
                assert!(
                    out.contains("error"),
                    "{form}, {what}, {args:?}: expected an error line: {out}"
                );
                assert_clean(&format!("{form}, {what}: {args:?}"), &out);
            }
        }
    }
}

#[test]
fn a_toml_syntax_error_does_not_echo_the_line_holding_the_password() {
    let dir = scratch_dir("secrets-toml");
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!("[database]\nurl = \"postgres://root:{SECRET_IN_URL}@127.0.0.1:5432/test\n[redis]\n"),
    )
    .expect("write config");
    let path = file.to_string_lossy().to_string();
    for args in [&["--config", &path, "check-config"][..], &["--config", &path, "run"]] {
        let o = relay_command(args, &[]).output().expect("relay");
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not valid TOML") && err.contains("line 2"), "{err}");
        assert_clean(&format!("{args:?}"), &err);
    }
    // A mistyped value that quotes a connection string.
    std::fs::write(
        &file,
        format!("[redis]\npool_size = \"redis://u:{SECRET_IN_URL}@h:1/0\"\n"),
    )
    .expect("write config");
    let o = relay_command(&["--config", &path, "check-config", "--no-connect"], &[])
        .output()
        .expect("relay");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("redis.pool_size"), "{err}");
    assert_clean("a mistyped value", &err);
}
