//! The binary as an operator meets it: `migrate` is idempotent, bad
//! configuration and unreachable services give one clear line naming the
//! key or the service and a non-zero exit, never a panic.

use crate::common;

use std::process::Output;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    relay_command(args, &env).output().expect("run outbox-relay")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_failure(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should name {n:?}: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "no panic: {err}"
    );
}

#[tokio::test]
async fn migrate_twice_is_a_no_op() {
    let db = TestDb::empty().await;
    let env = [("OUTBOX_RELAY_DATABASE__URL", db.url.as_str())];
    let first = run(&["migrate"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = run(&["migrate"], &env);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(String::from_utf8_lossy(&second.stdout).contains("\"applied\":\"[]\""));
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_relay_migrations").await,
        outbox_relay::db::migrate::MIGRATIONS.len() as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM information_schema.tables WHERE table_name IN ('task_outbox', 'task_outbox_dead', 'jobs', 'outbox_relay_pause')")
            .await,
        4
    );
}

/// docs/from-go.md suggests building the claim index `CONCURRENTLY` before
/// `migrate` on a busy outbox. A build that fails leaves an INVALID index
/// of that name, which `IF NOT EXISTS` takes as done: migration 3 would
/// then drop the old index and leave every claim without a usable one.
/// `migrate` refuses with one line saying what to do, and succeeds once
/// the index is dropped.
#[tokio::test]
async fn an_invalid_index_built_by_hand_is_not_taken_as_done() {
    let db = TestDb::empty().await;
    let c = db.client().await;
    c.batch_execute(include_str!("../migrations/0001_outbox.sql"))
        .await
        .expect("migration 1 by hand, as an older relay left it");
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/p', 1, 's', now() FROM generate_series(1, 200000) i",
    )
    .await
    .expect("rows");
    // The concurrent build runs out of time half-way, as one interrupted
    // by an operator or a deploy would.
    c.batch_execute("SET statement_timeout = '20ms'")
        .await
        .expect("timeout");
    let failed = c
        .batch_execute("CREATE INDEX CONCURRENTLY task_outbox_run_at_id_idx ON task_outbox (run_at, id)")
        .await;
    assert!(failed.is_err(), "the concurrent build was to fail");
    c.batch_execute("RESET statement_timeout").await.expect("reset");
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_index WHERE indexrelid = 'task_outbox_run_at_id_idx'::regclass AND NOT indisvalid"
        )
        .await,
        1,
        "an INVALID index is left"
    );

    let env = [("OUTBOX_RELAY_DATABASE__URL", db.url.as_str())];
    let o = run(&["migrate"], &env);
    assert_clean_failure(
        &o,
        1,
        &[
            "task_outbox_run_at_id_idx",
            "INVALID",
            "DROP INDEX CONCURRENTLY task_outbox_run_at_id_idx",
        ],
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1, "one line: {}", stderr(&o));
    assert_eq!(
        db.count("SELECT count(*) FROM pg_indexes WHERE indexname = 'task_outbox_run_at_idx'")
            .await,
        1,
        "the old claim index is still there"
    );

    c.batch_execute("DROP INDEX task_outbox_run_at_id_idx")
        .await
        .expect("drop");
    let o = run(&["migrate"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_index WHERE indexrelid = 'task_outbox_run_at_id_idx'::regclass AND indisvalid"
        )
        .await,
        1
    );
}

#[test]
fn bad_configs_name_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "0")], "sweep.batch_size"),
        (&[("OUTBOX_RELAY_SWEEP__INTERVAL", "-5s")], "sweep.interval"),
        (&[("OUTBOX_RELAY_SWEEP__INTERVAL", "soon")], "sweep.interval"),
        (
            &[
                ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "10m"),
                ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "1m"),
            ],
            "sweep.max_backoff",
        ),
        (
            &[("OUTBOX_RELAY_SWEEP__BATCHSIZE", "10")],
            "OUTBOX_RELAY_SWEEP__BATCHSIZE",
        ),
        (&[("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "many")], "sweep.max_attempts"),
        (&[("OUTBOX_RELAY_LOG__FORMAT", "xml")], "log.format"),
        (&[("DATABASE_URL", "mysql://nope")], "database.url"),
    ];
    for (env, key) in cases {
        for cmd in ["check-config", "run"] {
            let o = run(&[cmd, "--no-connect"][..if cmd == "run" { 1 } else { 2 }], env);
            assert_clean_failure(&o, 2, &[key]);
        }
    }
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let dir = std::env::temp_dir().join(format!("outbox-relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[sweep]\nbatch_size = 10\ntick_timout = \"1s\"\n").expect("write config");
    let o = run(
        &[
            "--config",
            file.to_str().expect("utf-8 path"),
            "check-config",
            "--no-connect",
        ],
        &[],
    );
    assert_clean_failure(&o, 2, &["tick_timout"]);
    let o = run(&["--config", "/nonexistent/outbox.toml", "check-config"], &[]);
    assert_clean_failure(&o, 2, &["/nonexistent/outbox.toml"]);
}

#[test]
fn check_config_redacts_passwords() {
    let o = run(
        &["check-config", "--no-connect"],
        &[
            ("DATABASE_URL", "postgres://app:hunter2@db.internal:5432/jobs"),
            ("REDIS_URL", "redis://:s3cr3t@cache:6379/0"),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("postgres://app:***@db.internal:5432/jobs"), "{out}");
    assert!(!out.contains("hunter2") && !out.contains("s3cr3t"), "{out}");
    let parsed: toml::Table = out.parse().expect("check-config prints valid TOML");
    assert_eq!(parsed["sweep"]["batch_size"].as_integer(), Some(1000));
}

#[tokio::test]
async fn unreachable_services_are_named() {
    let db = TestDb::new().await;
    let dead_port = free_port();
    let pg_down = format!("postgres://root@127.0.0.1:{dead_port}/test");
    let redis_down = format!("redis://127.0.0.1:{dead_port}/0");

    let o = run(&["run"], &[("OUTBOX_RELAY_DATABASE__URL", &pg_down)]);
    assert_clean_failure(&o, 1, &["cannot reach Postgres", &format!("127.0.0.1:{dead_port}")]);

    let o = run(
        &["run"],
        &[
            ("OUTBOX_RELAY_DATABASE__URL", &db.url),
            ("OUTBOX_RELAY_REDIS__URL", &redis_down),
        ],
    );
    assert_clean_failure(&o, 1, &["cannot reach Redis", &format!("127.0.0.1:{dead_port}")]);

    let o = run(
        &["check-config"],
        &[
            ("OUTBOX_RELAY_DATABASE__URL", &db.url),
            ("OUTBOX_RELAY_REDIS__URL", &redis_down),
        ],
    );
    assert_clean_failure(&o, 1, &["cannot reach Redis"]);

    let bare = TestDb::empty().await;
    let o = run(&["run"], &[("OUTBOX_RELAY_DATABASE__URL", &bare.url)]);
    assert_clean_failure(&o, 1, &["outbox-relay migrate"]);

    let o = run(
        &["run"],
        &[("OUTBOX_RELAY_DATABASE__URL", "postgres://root:pw123@127.0.0.1:1/x")],
    );
    assert!(!stderr(&o).contains("pw123"), "password leaked: {}", stderr(&o));
}
