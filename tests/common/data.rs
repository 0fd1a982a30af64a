//! Rows for the tests: seeds, jobs, the ledger, what must be in Redis.

use super::*;

/// Seed `rows` due rows spread over `jobs` jobs; returns the job ids.
/// Field values vary (priority, task_type, lighthouse_run_id, source_url)
/// so the encoding is exercised, not just one shape.
pub async fn seed(db: &TestDb, rows: i64, jobs: i64) -> Vec<uuid::Uuid> {
    let job_ids: Vec<uuid::Uuid> = (0..jobs).map(|_| uuid::Uuid::new_v4()).collect();
    seed_for(db, rows, &job_ids).await;
    job_ids
}

/// A `jobs` row for `job`, status `running` (what `cancel-job` needs).
pub async fn running_job(db: &TestDb, job: &uuid::Uuid) {
    db.client()
        .await
        .batch_execute(&format!("INSERT INTO jobs (id, status) VALUES ('{job}', 'running')"))
        .await
        .expect("a running job");
}

/// The job's schedule key made a string: every ZADD of its rows fails with
/// WRONGTYPE, so those rows stay (retried) and a delete claim puts them back.
/// A maintenance guard on `task_outbox_dead`: every INSERT raises
/// `task_outbox_dead is under maintenance` (the trigger function
/// `maintenance()` can guard other tables too).
pub async fn guard_dead_table(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'task_outbox_dead is under maintenance'; END $$;
             CREATE TRIGGER maintenance BEFORE INSERT ON task_outbox_dead
                FOR EACH ROW EXECUTE FUNCTION maintenance();",
        )
        .await
        .expect("the dead table's maintenance guard");
}

pub async fn poison_job(redis_url: &str, prefix: &str, job: &uuid::Uuid) {
    let mut conn = redis_conn(redis_url).await;
    let _: () = conn
        .set(format!("{prefix}sched:{job}"), "not a sorted set")
        .await
        .expect("SET");
}

/// [`seed`] for jobs chosen beforehand: a test that poisons a job's
/// schedule while a relay runs poisons it first, or the relay may deliver
/// the job's rows before the poison lands.
pub async fn seed_for(db: &TestDb, rows: i64, job_ids: &[uuid::Uuid]) {
    // Our schema takes any task_type and run id, so the seed covers the
    // encoder's cases (empty task_type, a crawl row with a run id). The Go
    // schema checks task_type (crawl | lighthouse) and routing (lighthouse
    // rows need a run in lighthouse_runs, crawl rows none): runs 1..1000
    // exist there (see `create_go_schema`).
    let (task_type, run_id) = if db.go {
        (
            "CASE WHEN i % 11 = 0 THEN 'lighthouse' ELSE 'crawl' END",
            "CASE WHEN i % 11 = 0 THEN 1 + i % 1000 END",
        )
    } else {
        (
            "CASE WHEN i % 5 = 0 THEN '' ELSE 'crawl' END",
            "CASE WHEN i % 11 = 0 THEN i * 1000 END",
        )
    };
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count,
                                          source_type, source_url, run_at, task_type, lighthouse_run_id)
                 SELECT gen_random_uuid(), ($1::uuid[])[1 + (i % array_length($1::uuid[], 1))], i::int,
                        'host' || (i % 7) || '.example.com', '/page/' || i, (i % 1000) / 7.0, (i % 4)::int,
                        CASE WHEN i % 2 = 0 THEN 'sitemap' ELSE 'link' END,
                        CASE WHEN i % 3 = 0 THEN '' ELSE 'https://example.com/src/' || i END,
                        now() - (i % 5000) * interval '1 millisecond',
                        {task_type}, {run_id}
                   FROM generate_series(1, $2::int8) AS i"
            ),
            &[&job_ids, &rows],
        )
        .await
        .expect("seed outbox rows");
}

/// The member and score every outbox row should end up as, computed here
/// independently of the relay's encoder: task_id → (key suffix job_id, member, score).
pub async fn expected_members(db: &TestDb) -> HashMap<String, (String, String, f64)> {
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT task_id::text, job_id::text, page_id, host, path, priority, retry_count, source_type,
                    source_url, task_type, lighthouse_run_id,
                    floor(extract(epoch FROM run_at) * 1000)::float8
               FROM task_outbox",
            &[],
        )
        .await
        .expect("read outbox");
    rows.iter()
        .map(|r| {
            let task_id: String = r.get(0);
            let job_id: String = r.get(1);
            let task_type: String = r.get(9);
            let member = format!(
                "{}|{}|{}|{}|{}|{:.4}|{}|{}|{}|{}|{}",
                task_id,
                job_id,
                r.get::<_, i32>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, f64>(5),
                r.get::<_, i32>(6),
                r.get::<_, String>(7),
                r.get::<_, String>(8),
                if task_type.is_empty() {
                    "crawl".to_string()
                } else {
                    task_type
                },
                r.get::<_, Option<i64>>(10).unwrap_or(0),
            );
            (task_id, (job_id, member, r.get::<_, f64>(11)))
        })
        .collect()
}

/// Assert every expected member is present in `{prefix}sched:{job_id}` with its score.
pub async fn assert_all_delivered(redis_url: &str, prefix: &str, expected: &HashMap<String, (String, String, f64)>) {
    let mut conn = redis_conn(redis_url).await;
    let mut by_job: HashMap<&str, Vec<(&str, f64)>> = HashMap::new();
    for (job, member, score) in expected.values() {
        by_job.entry(job.as_str()).or_default().push((member.as_str(), *score));
    }
    for (job, want) in by_job {
        let key = format!("{prefix}sched:{job}");
        let have: HashMap<String, f64> = conn
            .zrange_withscores::<_, Vec<(String, f64)>>(&key, 0, -1)
            .await
            .expect("ZRANGE")
            .into_iter()
            .collect();
        for (member, score) in want {
            match have.get(member) {
                Some(s) => assert_eq!(*s, score, "score of {member} in {key}"),
                None => panic!("member missing from {key}: {member}"),
            }
        }
    }
}

/// `n` fresh job ids.
pub fn new_jobs(n: usize) -> Vec<uuid::Uuid> {
    (0..n).map(|_| uuid::Uuid::new_v4()).collect()
}

/// Rows of the ledger no longer in the outbox (delivered or dead-lettered).
pub async fn delivered_so_far(db: &TestDb) -> i64 {
    db.count("SELECT (SELECT count(*) FROM produced) - (SELECT count(*) FROM task_outbox)")
        .await
}

/// The ledger of produced rows (`produced`): the same columns as the outbox,
/// written by [`produce`] in the same statement as the outbox rows.
pub async fn create_ledger(db: &TestDb) {
    db.client()
        .await
        .batch_execute("CREATE TABLE produced AS SELECT * FROM task_outbox WITH NO DATA")
        .await
        .expect("create ledger");
}

/// Produce `rows` due rows over `jobs`, into the outbox and the ledger at
/// once (one statement, so both or neither), like a real producer would.
pub async fn produce(
    client: &tokio_postgres::Client,
    jobs: &[uuid::Uuid],
    rows: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH r AS (
                 SELECT gen_random_uuid() AS task_id, ($1::uuid[])[1 + (i % array_length($1::uuid[], 1))] AS job_id,
                        i::int AS page_id, 'host' || (i % 7) || '.example.com' AS host, '/p/' || i AS path,
                        (i % 100) / 3.0 AS priority, (i % 3)::int AS retry_count, 'sitemap' AS source_type,
                        'https://example.com/s' AS source_url, now() AS run_at,
                        CASE WHEN i % 4 = 0 THEN 'lighthouse' ELSE 'crawl' END AS task_type,
                        -- Runs 1..1000 exist in the Go schema's lighthouse_runs (see TestDb::new_on).
                        CASE WHEN i % 4 = 0 THEN 1 + i::int8 % 1000 END AS lighthouse_run_id
                   FROM generate_series(1, $2::int8) AS i
             ), o AS (
                 INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                                          source_url, run_at, task_type, lighthouse_run_id)
                 SELECT task_id, job_id, page_id, host, path, priority, retry_count, source_type, source_url, run_at,
                        task_type, lighthouse_run_id FROM r
             )
             INSERT INTO produced (task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                                   source_url, run_at, attempts, created_at, task_type, lighthouse_run_id)
             SELECT task_id, job_id, page_id, host, path, priority, retry_count, source_type, source_url, run_at, 0,
                    now(), task_type, lighthouse_run_id FROM r",
            &[&jobs, &rows],
        )
        .await
        .map(|_| ())
}

/// A producer inserting `batch` rows every `every` until stopped; it rides
/// out database restarts by reconnecting.
pub struct Producer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<u64>,
}

impl Producer {
    pub fn start(url: String, jobs: Vec<uuid::Uuid>, batch: i64, every: Duration) -> Producer {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut committed = 0u64;
            let mut client: Option<tokio_postgres::Client> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&url, NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                if let Some(c) = &client {
                    if produce(c, &jobs, batch).await.is_ok() {
                        committed += batch as u64;
                    }
                }
                tokio::time::sleep(every).await;
            }
            committed
        });
        Producer { stop, handle }
    }

    /// Stop producing; returns the rows committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await.expect("producer task")
    }
}

/// Check the invariant over the ledger.
pub async fn verify_ledger(db: &TestDb, redis_url: &str, prefix: &str) -> outbox_relay::verify::VerifyReport {
    let mut conn = redis_conn(redis_url).await;
    verify_ledger_on(db, &mut conn, prefix).await
}

/// Check the invariant over the ledger through any Redis connection (a cluster one too).
pub async fn verify_ledger_on<C: redis::aio::ConnectionLike + Send>(
    db: &TestDb,
    conn: &mut C,
    prefix: &str,
) -> outbox_relay::verify::VerifyReport {
    let client = db.client().await;
    let produced = outbox_relay::verify::ledger_rows(&client, "produced", None)
        .await
        .expect("ledger rows");
    outbox_relay::verify::verify(&client, conn, prefix, &produced)
        .await
        .expect("verify")
}

/// Resident set size of a process, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Rows of `job` still in the outbox.
pub async fn outbox_rows_of(db: &TestDb, job: &uuid::Uuid) -> i64 {
    db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{job}'"))
        .await
}
