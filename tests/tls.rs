//! TLS to Postgres and to Redis, against private servers with certificates
//! from a CA each test makes. Postgres: with `sslmode=require` every
//! session the relay opens (pool, LISTEN, CLI) is encrypted and the drain
//! works as always; without `sslmode` nothing changes (plain TCP, even
//! where the server offers TLS); `require` against a server without TLS,
//! a certificate from another CA or for another name are one clear error
//! line each, not a hang. Redis: a `rediss://` URL with `redis.tls_ca_file`
//! delivers, to one server and to a TLS-only cluster; untrusted
//! certificates are one clear error line.

use crate::common;

use std::time::Duration;

use common::*;

/// (encrypted, all) sessions of the relay on the server behind `db`.
async fn relay_sessions(db: &TestDb) -> (i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'outbox-relay'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn sslmode_require_encrypts_every_relay_session() {
    let pg = PrivatePostgres::start_with_tls().await;
    let db = TestDb::new_on(&pg.url()).await;
    let url = format!("{}?sslmode=require", db.url);
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_DATABASE__URL", url.as_str()),
            ("OUTBOX_RELAY_DATABASE__LISTEN_URL", url.as_str()),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    seed(&db, 3_000, 10).await;
    let expected = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;

    // The sweep pool, the LISTEN connection and the probes: all encrypted.
    wait_until("the relay's sessions are up", Duration::from_secs(30), || async {
        relay_sessions(&db).await.1 >= 2
    })
    .await;
    let (encrypted, all) = relay_sessions(&db).await;
    assert_eq!(encrypted, all, "{encrypted} of {all} relay sessions use TLS");

    // The CLI goes the same way.
    let out = relay_command(&["status", "--json"], &env).output().expect("run status");
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    relay.stop().await;
}

#[tokio::test]
async fn without_sslmode_the_relay_stays_on_plain_tcp() {
    // The server offers TLS; a URL that does not ask for it keeps the
    // behaviour it had before the relay knew TLS.
    let pg = PrivatePostgres::start_with_tls().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let mut relay = RelayProcess::spawn(&relay_env(&db, &shared_redis_url(), &prefix, &[]));
    relay.wait_started().await;
    seed(&db, 500, 5).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    wait_until("the relay's sessions are up", Duration::from_secs(30), || async {
        relay_sessions(&db).await.1 >= 2
    })
    .await;
    assert_eq!(relay_sessions(&db).await.0, 0, "no relay session uses TLS");
    relay.stop().await;
}

/// Run `cmd` to its end; a command still running after `timeout` (a relay
/// that connected after all) is killed and fails the test.
async fn output_within(mut cmd: std::process::Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outbox-relay");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait for outbox-relay").is_none() {
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("outbox-relay output");
            panic!(
                "still running after {timeout:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.wait_with_output().expect("outbox-relay output")
}

#[tokio::test]
async fn sslmode_require_without_server_tls_is_one_clear_error() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let url = format!("{}?sslmode=require", db.url);
    let env = relay_env(
        &db,
        &shared_redis_url(),
        "unused:",
        &[("OUTBOX_RELAY_DATABASE__URL", url.as_str())],
    );
    for cmd in [&["run"][..], &["check-config"][..]] {
        let (code, _, errors) = error_lines(cmd, &env).await;
        assert_eq!(code, Some(1), "{cmd:?}: {errors:?}");
        assert!(
            errors.len() == 1 && errors[0].contains("Postgres") && errors[0].contains("TLS"),
            "{cmd:?}: one error line naming Postgres and TLS: {errors:?}"
        );
    }
}

/// A CA file with `sslmode=prefer` would connect in plaintext to a server
/// that refuses TLS (this one has none), certificate unchecked: refused by
/// the config check, before anything connects.
#[tokio::test]
async fn a_ca_file_with_a_url_that_permits_plaintext_is_refused() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ca-for-config-tests.pem");
    for mode in ["prefer", "disable"] {
        let url = format!("{}?sslmode={mode}", db.url);
        let env = relay_env(
            &db,
            &shared_redis_url(),
            "unused:",
            &[
                ("OUTBOX_RELAY_DATABASE__URL", url.as_str()),
                ("OUTBOX_RELAY_DATABASE__TLS_CA_FILE", ca),
            ],
        );
        for cmd in [&["run"][..], &["check-config"][..]] {
            let (code, _, errors) = error_lines(cmd, &env).await;
            assert_eq!(code, Some(2), "{mode} {cmd:?}: {errors:?}");
            assert!(
                errors.len() == 1 && errors[0].contains("database.url") && errors[0].contains("sslmode=require"),
                "{mode} {cmd:?}: one line naming the key and the fix: {errors:?}"
            );
        }
    }
}

/// `check-config` against `env`: (exit code, stdout, the stderr lines that
/// say "error").
async fn check_config(env: &[(String, String)]) -> (Option<i32>, String, Vec<String>) {
    error_lines(&["check-config"], env).await
}

/// The relay's `args` against `env`: (exit code, stdout, the stderr lines
/// that say "error"); it must never panic.
async fn error_lines(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String, Vec<String>) {
    let out = output_within(relay_command(args, env), Duration::from_secs(60)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr
            .lines()
            .filter(|l| l.contains("error"))
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test]
async fn tls_ca_file_checks_the_chain_and_the_host_name() {
    let pg = PrivatePostgres::start_with_tls().await;
    let db = TestDb::new_on(&pg.url()).await;
    let url = format!("{}?sslmode=require", db.url);
    let ca = pg.ca_file().display().to_string();
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let with = |url: &str, ca: &str| {
        relay_env(
            &db,
            &redis_url,
            &prefix,
            &[
                ("OUTBOX_RELAY_DATABASE__URL", url),
                ("OUTBOX_RELAY_DATABASE__LISTEN_URL", url),
                ("OUTBOX_RELAY_DATABASE__TLS_CA_FILE", ca),
            ],
        )
    };

    // The right CA and the name in the certificate: connected, and the
    // relay drains over verified, encrypted sessions.
    let env = with(&url, &ca);
    let (code, stdout, errors) = check_config(&env).await;
    assert_eq!(code, Some(0), "{errors:?}");
    assert!(stdout.contains("# postgres: reachable"), "{stdout}");
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    seed(&db, 500, 5).await;
    let expected = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    let (encrypted, all) = relay_sessions(&db).await;
    assert!(
        all >= 1 && encrypted == all,
        "{encrypted} of {all} relay sessions use TLS"
    );
    relay.stop().await;

    // A certificate from another CA: refused, in one line.
    let dir = scratch_dir("outbox-tls-other-ca");
    let other = make_ca(&dir, "other").display().to_string();
    let (code, _, errors) = check_config(&with(&url, &other)).await;
    assert_eq!(code, Some(1), "{errors:?}");
    assert!(
        errors.len() == 1 && errors[0].contains("Postgres") && errors[0].contains("certificate"),
        "{errors:?}"
    );

    // The right CA, but a host name the certificate does not carry (it names
    // 127.0.0.1 only; `hostaddr` still connects to 127.0.0.1).
    let by_name = format!(
        "postgres://root@localhost:{}/{}?sslmode=require&hostaddr=127.0.0.1",
        pg.port, db.name
    );
    let (code, _, errors) = check_config(&with(&by_name, &ca)).await;
    assert_eq!(code, Some(1), "{errors:?}");
    assert!(errors.len() == 1 && errors[0].contains("certificate"), "{errors:?}");

    // A CA file that is not there, or TLS not asked for: a config error
    // naming the key, before anything connects.
    let (code, _, errors) = check_config(&with(&url, "/nonexistent/ca.pem")).await;
    assert_eq!(code, Some(2), "{errors:?}");
    assert!(errors[0].contains("database.tls_ca_file"), "{errors:?}");
    let (code, _, errors) = check_config(&with(&db.url, &ca)).await;
    assert_eq!(code, Some(2), "{errors:?}");
    assert!(
        errors[0].contains("database.tls_ca_file") && errors[0].contains("sslmode"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn rediss_with_the_ca_file_delivers_and_untrusted_servers_are_refused() {
    let redis = RedisServer::start_with_tls().await;
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let ca = redis.ca_file().display().to_string();
    let with = |url: &str, ca: &str| relay_env(&db, url, &prefix, &[("OUTBOX_RELAY_REDIS__TLS_CA_FILE", ca)]);

    // The relay knows only the TLS port: what arrives came over TLS.
    let env = with(&redis.tls_url(), &ca);
    let (code, stdout, errors) = check_config(&env).await;
    assert_eq!(code, Some(0), "{errors:?}");
    assert!(stdout.contains("# redis: reachable"), "{stdout}");
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    seed(&db, 1_000, 10).await;
    let expected = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis.url(), &prefix, &expected).await;
    let out = relay_command(&["status", "--json"], &env).output().expect("run status");
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    relay.stop().await;

    // Not signed by a CA the relay trusts (the system's roots, another
    // CA): refused, in one line.
    let dir = scratch_dir("outbox-tls-other-ca");
    let other = make_ca(&dir, "other").display().to_string();
    for ca in ["", other.as_str()] {
        let (code, _, errors) = check_config(&with(&redis.tls_url(), ca)).await;
        assert_eq!(code, Some(1), "CA {ca:?}: {errors:?}");
        assert!(
            errors.len() == 1 && errors[0].contains("Redis") && errors[0].contains("certificate"),
            "CA {ca:?}: {errors:?}"
        );
    }
    // `#insecure` skips the check on purpose.
    let (code, _, errors) = check_config(&with(&format!("{}#insecure", redis.tls_url()), "")).await;
    assert_eq!(code, Some(0), "{errors:?}");

    // A CA file for a URL that is not rediss://: a config error naming the key.
    let (code, _, errors) = check_config(&with(&redis.url(), &ca)).await;
    assert_eq!(code, Some(2), "{errors:?}");
    assert!(errors[0].contains("redis.tls_ca_file"), "{errors:?}");
}

#[tokio::test]
async fn a_tls_only_cluster_is_drained_with_the_ca_file() {
    let cluster = common::cluster::TlsCluster::start(3).await;
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let seeds = cluster.seed_urls();
    let ca = cluster.ca_file().display().to_string();
    let env = relay_env(
        &db,
        "redis://127.0.0.1:1/0",
        &prefix,
        &[
            ("OUTBOX_RELAY_REDIS__MODE", "cluster"),
            ("OUTBOX_RELAY_REDIS__CLUSTER_URLS", seeds.as_str()),
            ("OUTBOX_RELAY_REDIS__TLS_CA_FILE", ca.as_str()),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    produce(&db.client().await, &new_jobs(30), 3_000).await.expect("seed");
    wait_drained(&db, Duration::from_secs(60)).await;
    let mut conn = cluster.connection().await;
    let report = verify_ledger_on(&db, &mut conn, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered, 3_000);
    // Every master took part: the relay followed the cluster's TLS ports.
    for &port in &cluster.ports {
        let keys = cluster.cli(port, &["--scan", "--pattern", &format!("{}sched:*", &*prefix)]);
        assert!(
            keys.is_some_and(|k| !k.trim().is_empty()),
            "master {port} holds schedules"
        );
    }
    relay.stop().await;
}
