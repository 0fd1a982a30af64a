//! A relay started the way Kubernetes starts it from `deploy/kubernetes/`:
//! the environment a pod of that Deployment gets (the image's `ENV`, the
//! container's `env` with the Secret's keys filled in, the service-link
//! variables of the `outbox-relay` Service and of `kubernetes`), and the
//! ConfigMap's TOML as its config file. The migrate Job runs first as the
//! tables' owner (`outbox_migrator`, its own Secret) and grants the relay's
//! role; the pod then drains as `outbox_relay`, answers the probes the
//! Deployment declares, and stops cleanly on SIGTERM.
//!
//! The console's Deployment (`console.yaml`) then serves the fleet as
//! `outbox_triage`: its readiness path answers, an operator from the users
//! Secret signs in with a `Secure` cookie, the relay's heartbeat (written as
//! `outbox_relay`) is listed, and a pause and resume go through.
//!
//! The liberties taken: the config file and the users file live in a
//! temporary directory instead of the Deployments' mount paths (the
//! variables naming them are pointed there), and the console's two ports
//! are moved to free ones, since here its pod shares one host with the
//! relay's. The Secrets' values are this test's database and a private
//! Redis (the ConfigMap's `hover:` prefix then touches nobody else's keys).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::console::web::{base64, bound, hash, Web};
use common::*;
use serde_yaml::Value;

fn manifests() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("deploy/kubernetes").flatten().collect();
    files.sort_by_key(|e| e.path());
    for f in files {
        let text = std::fs::read_to_string(f.path()).expect("read manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde::Deserialize::deserialize(doc).expect("manifest YAML"));
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes"))
}

/// The entry of `v[list]` (volumes, volumeMounts, ports) named `name`.
fn named<'a>(v: &'a Value, list: &str, name: &str) -> &'a Value {
    v[list]
        .as_sequence()
        .unwrap_or_else(|| panic!("no {list}"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

/// `ENV` lines of the Dockerfile's last stage (what the image sets).
fn image_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).expect("Dockerfile");
    let last_stage = text.rsplit("\nFROM ").next().expect("a FROM line");
    last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV K=V");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// What kubelet injects for a Service (docker-link style variables).
fn service_links(name: &str, ip: &str, ports: &[(Option<&str>, i64)]) -> Vec<(String, String)> {
    let n = name.to_ascii_uppercase().replace('-', "_");
    let mut env = vec![(format!("{n}_SERVICE_HOST"), ip.to_string())];
    if let Some((_, first)) = ports.first() {
        env.push((format!("{n}_SERVICE_PORT"), first.to_string()));
        env.push((format!("{n}_PORT"), format!("tcp://{ip}:{first}")));
    }
    for (port_name, port) in ports {
        if let Some(pn) = port_name {
            env.push((
                format!("{n}_SERVICE_PORT_{}", pn.to_ascii_uppercase().replace('-', "_")),
                port.to_string(),
            ));
        }
        let p = format!("{n}_PORT_{port}_TCP");
        env.push((p.clone(), format!("tcp://{ip}:{port}")));
        env.push((format!("{p}_PROTO"), "tcp".into()));
        env.push((format!("{p}_PORT"), port.to_string()));
        env.push((format!("{p}_ADDR"), ip.to_string()));
    }
    env
}

#[tokio::test]
async fn a_pod_of_the_deployment_migrates_drains_answers_its_probes_and_stops() {
    let docs = manifests();
    let deployment = find(&docs, "Deployment", "outbox-relay");
    let service = find(&docs, "Service", "outbox-relay");
    let config_map = find(&docs, "ConfigMap", "outbox-relay-config");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // The ConfigMap's key, at the path the Deployment mounts it.
    let mount = named(container, "volumeMounts", "config");
    let (key, toml_text) = config_map["data"]
        .as_mapping()
        .expect("ConfigMap data")
        .iter()
        .next()
        .map(|(k, v)| (s(k).to_string(), s(v).to_string()))
        .expect("one key");
    let mounted_at = format!("{}/{key}", s(&mount["mountPath"]));
    let dir = scratch_dir("k8s-config");
    let config_file = dir.join(&key);
    std::fs::write(&config_file, &toml_text).expect("write config");

    // The roles a DBA creates once (secret.yaml says how), and the
    // Secrets' values: the migrator's and the relay's own credentials.
    let db = TestDb::empty().await;
    for role in ["outbox_migrator", "outbox_relay", "outbox_triage"] {
        db.ensure_role(role).await;
    }
    db.client()
        .await
        .batch_execute("GRANT CREATE, USAGE ON SCHEMA public TO outbox_migrator")
        .await
        .expect("grant the migrator CREATE");
    let redis = RedisServer::start().await;
    let secret = |name: &str, key: &str| -> String {
        let declared = find(&docs, "Secret", name);
        assert!(
            declared["stringData"][key].is_string(),
            "Secret {name} declares no {key}"
        );
        match (name, key) {
            ("outbox-relay-migrator", "DATABASE_URL") => db.role_url("outbox_migrator"),
            ("outbox-relay", "DATABASE_URL") => db.role_url("outbox_relay"),
            ("outbox-relay", "REDIS_URL") => redis.url(),
            ("outbox-relay-console", "DATABASE_URL") => db.role_url("outbox_triage"),
            ("outbox-relay-console", "REDIS_URL") => redis.url(),
            other => panic!("the test does not know Secret key {other:?}"),
        }
    };
    // A container's environment, in kubelet's order (later wins in ours too).
    let container_env = |container: &Value| -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = image_env().into_iter().collect();
        for e in container["env"].as_sequence().expect("container env") {
            let name = s(&e["name"]).to_string();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    secret(s(&r["name"]), s(&r["key"]))
                }
            };
            env.insert(name, value);
        }
        env
    };

    // The migrate Job, as the tables' owner: migrate, then grant.
    let job = &find(&docs, "Job", "outbox-relay-migrate")["spec"]["template"]["spec"]["containers"][0];
    let mut job_env = container_env(job);
    job_env.insert("OUTBOX_RELAY_CONFIG".into(), config_file.display().to_string());
    let job_env: Vec<(String, String)> = job_env.into_iter().collect();
    let args: Vec<&str> = job["args"].as_sequence().expect("Job args").iter().map(s).collect();
    let migrate = relay_command(&args, &job_env).output().expect("run the Job");
    assert!(
        migrate.status.success(),
        "the migrate Job ({args:?}) failed: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'task_outbox' AND tableowner = 'outbox_migrator'")
            .await,
        1,
        "the migrator owns the tables"
    );

    // The pod of the Deployment, as outbox_relay.
    let mut env = container_env(container);
    assert_eq!(s(&service["spec"]["ports"][0]["targetPort"]), "metrics");
    // Every Service of the namespace injects its variables into every pod.
    let links = {
        let mut links = Vec::new();
        for (i, svc) in docs.iter().filter(|d| d["kind"] == "Service").enumerate() {
            let ports: Vec<(Option<&str>, i64)> = svc["spec"]["ports"]
                .as_sequence()
                .expect("Service ports")
                .iter()
                .map(|p| (p["name"].as_str(), p["port"].as_i64().expect("port")))
                .collect();
            links.extend(service_links(
                s(&svc["metadata"]["name"]),
                &format!("10.96.12.{}", 34 + i),
                &ports,
            ));
        }
        links.extend(service_links("kubernetes", "10.96.0.1", &[(Some("https"), 443)]));
        links
    };
    assert!(
        links.iter().any(|(k, _)| k.starts_with("OUTBOX_RELAY_CONSOLE_")),
        "the console's Service is linked too"
    );
    env.extend(links.clone());
    env.insert("HOSTNAME".into(), "outbox-relay-6d9f7c5b8-x2x7q".into());
    assert_eq!(
        env.get("OUTBOX_RELAY_CONFIG").map(String::as_str),
        Some(mounted_at.as_str()),
        "OUTBOX_RELAY_CONFIG must name the mounted ConfigMap key"
    );
    env.insert("OUTBOX_RELAY_CONFIG".into(), config_file.display().to_string());
    let env: Vec<(String, String)> = env.into_iter().collect();

    // The listen address the relay will use is the one the probes target.
    let listen = env
        .iter()
        .find(|(k, _)| k == "OUTBOX_RELAY_HTTP__LISTEN")
        .map(|(_, v)| v.clone())
        .expect("the image sets OUTBOX_RELAY_HTTP__LISTEN");
    let port: i64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let container_port = container["ports"][0]["containerPort"].as_i64().expect("containerPort");
    assert_eq!(port, container_port, "the relay listens where the probes look");
    assert!(
        std::net::TcpListener::bind(("0.0.0.0", port as u16)).is_ok(),
        "port {port} is busy: stop whatever listens there (a demo relay?) and re-run"
    );

    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let start = relay.records("outbox-relay starting");
    assert!(
        start[0]["database"]
            .as_str()
            .is_some_and(|d| d.contains("outbox_relay@")),
        "the relay runs as outbox_relay: {}",
        start[0]
    );
    assert!(
        start[0]["schema"]
            .as_str()
            .is_some_and(|d| d.ends_with("claim: delete")),
        "the grants give the fast claim: {}",
        start[0]
    );
    seed(&db, 2_000, 5).await;
    let expected = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let cfg: toml::Table = toml_text.parse().expect("ConfigMap TOML");
    let prefix = cfg["redis"]["key_prefix"]
        .as_str()
        .expect("redis.key_prefix")
        .to_string();
    assert_all_delivered(&redis.url(), &prefix, &expected).await;

    for probe in ["readinessProbe", "livenessProbe"] {
        let path = s(&container[probe]["httpGet"]["path"]).to_string();
        assert_eq!(
            container[probe]["httpGet"]["port"].as_str(),
            container["ports"][0]["name"].as_str(),
            "{probe} targets the named metrics port"
        );
        wait_until(
            &format!("{probe} {path} answers 200"),
            Duration::from_secs(30),
            || async { relay.http_get(&path).await.is_some_and(|(code, _)| code == 200) },
        )
        .await;
    }
    let (_, metrics) = relay.http_get("/metrics").await.expect("/metrics answers");
    assert!(
        metrics.contains("environment=\"production\""),
        "metrics carry the ConfigMap's environment"
    );

    // The relay's heartbeat, written as outbox_relay (migrate --grant gave
    // it the fleet tables), for the console.
    wait_until(
        "the relay's heartbeat is in the fleet table",
        Duration::from_secs(30),
        || async { db.count("SELECT count(*) FROM outbox_relay_instances").await == 1 },
    )
    .await;
    assert!(
        relay.records("fleet heartbeat failed").is_empty(),
        "{:#?}",
        relay.lines()
    );
    console_pod(&docs, &container_env, &links, &config_file, &db).await;

    // The grace period covers a tick's deadline plus the commit grace.
    let tick = outbox_relay::config::parse_duration(cfg["sweep"]["tick_timeout"].as_str().expect("tick_timeout"))
        .expect("tick_timeout");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > tick + Duration::from_secs(1),
        "terminationGracePeriodSeconds {grace} must exceed tick_timeout + 1s"
    );
    let started = std::time::Instant::now();
    relay.signal("TERM");
    let status = relay.wait_exit(Duration::from_secs(grace)).await;
    assert!(status.success(), "SIGTERM: {status}; log: {:#?}", relay.lines());
    assert!(started.elapsed() < tick + Duration::from_secs(1));
}

/// The console's Deployment, started as kubelet would start its pod.
async fn console_pod(
    docs: &[Value],
    container_env: &dyn Fn(&Value) -> BTreeMap<String, String>,
    links: &[(String, String)],
    config_file: &std::path::Path,
    db: &TestDb,
) {
    let deployment = find(docs, "Deployment", "outbox-relay-console");
    assert_eq!(
        deployment["spec"]["replicas"].as_i64(),
        Some(1),
        "sessions live in memory: one console pod"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"].as_sequence().expect("args").iter().map(s).collect();
    assert_eq!(args, ["console"]);
    let port_of = |name: &str| {
        named(container, "ports", name)["containerPort"]
            .as_i64()
            .expect("containerPort")
    };

    // The users file: the Secret's key, at the path the pod mounts it,
    // holding a real hash in place of the example line.
    let secret = find(docs, "Secret", "outbox-relay-console");
    assert!(
        s(&secret["stringData"]["users"]).contains(":operator:$argon2id$"),
        "the Secret shows the users file's form"
    );
    let mount = named(container, "volumeMounts", "users");
    let item = named(pod, "volumes", "users");
    assert_eq!(s(&item["secret"]["secretName"]), "outbox-relay-console");
    let mounted = format!("{}/{}", s(&mount["mountPath"]), s(&item["secret"]["items"][0]["path"]));
    let users = scratch_dir("k8s-console").join("users");
    std::fs::write(&users, format!("alice:operator:{}\n", hash("alice's password"))).expect("users");

    let mut env = container_env(container);
    assert_eq!(env.get("OUTBOX_RELAY_CONSOLE__USERS_FILE"), Some(&mounted));
    env.insert("OUTBOX_RELAY_CONSOLE__USERS_FILE".into(), users.display().to_string());
    env.insert("OUTBOX_RELAY_CONFIG".into(), config_file.display().to_string());
    let listen = env
        .get("OUTBOX_RELAY_CONSOLE__LISTEN")
        .cloned()
        .expect("console.listen");
    assert_eq!(listen, format!("0.0.0.0:{}", port_of("console")));
    assert_eq!(
        image_env()
            .iter()
            .find(|(k, _)| k == "OUTBOX_RELAY_HTTP__LISTEN")
            .map(|(_, v)| v.clone()),
        Some(format!("0.0.0.0:{}", port_of("metrics")))
    );
    let (port, metrics_port) = (free_port(), free_port());
    env.insert("OUTBOX_RELAY_CONSOLE__LISTEN".into(), format!("0.0.0.0:{port}"));
    env.insert("OUTBOX_RELAY_HTTP__LISTEN".into(), format!("0.0.0.0:{metrics_port}"));
    env.extend(links.iter().cloned());
    env.insert("HOSTNAME".into(), "outbox-relay-console-5b7d9c-q8w2r".into());
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut child = relay_command(&["console"], &env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the console pod");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("the console pod exited ({status}): {err}");
        }
        assert!(std::time::Instant::now() < deadline, "the console never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _child = Kill(child);

    // Its probes.
    let mut web = Web::new(port);
    let ready = s(&container["readinessProbe"]["httpGet"]["path"]);
    assert_eq!(s(&container["readinessProbe"]["httpGet"]["port"]), "console");
    assert_eq!(web.get(ready).await.status, 200, "readiness {ready}");
    assert_eq!(s(&container["livenessProbe"]["httpGet"]["port"]), "metrics");
    let live = s(&container["livenessProbe"]["httpGet"]["path"]);
    assert_eq!(Web::new(metrics_port).get(live).await.status, 200, "liveness {live}");

    // An operator signs in: the session cookie is Secure.
    let r = web.sign_in("alice", "alice's password").await;
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = r.header("set-cookie").expect("a session cookie").to_string();
    assert!(cookie.contains("Secure") && cookie.contains("HttpOnly"), "{cookie}");

    // The fleet: the relay's heartbeat, read as outbox_triage; the backlog
    // from its probe.
    let mut api = Web::api(port);
    let alice = format!("Basic {}", base64(b"alice:alice's password"));
    wait_until(
        "the console lists the relay and its probe",
        Duration::from_secs(30),
        || {
            let alice = alice.clone();
            async move {
                let o = Web::api(port).get_as("/api/v1/overview", &alice).await.json();
                o["relays_live"] == 1 && o["overview"]["source"]["kind"] == "relay"
            }
        },
    )
    .await;

    // Actions as outbox_triage: pause and resume a job, requeue the (no)
    // dead letters.
    let job = uuid::Uuid::new_v4();
    for action in ["pause", "resume"] {
        let r = api
            .post_json_as(&format!("/api/v1/jobs/{job}/{action}"), &alice, "{}")
            .await;
        assert_eq!(r.status, 200, "{action}: {}", r.body);
        let paused = db
            .count(&format!(
                "SELECT count(*) FROM outbox_relay_pause WHERE scope = '{job}'"
            ))
            .await;
        assert_eq!(paused, i64::from(action == "pause"), "after {action}");
    }
    // A bulk action says `all` and carries what its confirmation counted.
    let seen = api.get_as("/api/v1/dead-letters/confirm", &alice).await.json();
    let body = bound(serde_json::json!({ "all": true }), &seen);
    let r = api.post_json_as("/api/v1/dead-letters/requeue", &alice, &body).await;
    assert_eq!(r.status, 200, "requeue: {}", r.body);
}

#[test]
fn the_pod_runs_locked_down_as_the_images_user() {
    let docs = manifests();
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).expect("Dockerfile");
    let image_user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the Dockerfile");
    for (kind, name) in [
        ("Deployment", "outbox-relay"),
        ("Deployment", "outbox-relay-console"),
        ("Job", "outbox-relay-migrate"),
    ] {
        let pod = &find(&docs, kind, name)["spec"]["template"]["spec"];
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{kind}: runAsNonRoot");
        assert_eq!(
            format!(
                "{}:{}",
                sc["runAsUser"].as_i64().unwrap_or(-1),
                sc["runAsGroup"].as_i64().unwrap_or(-1)
            ),
            image_user,
            "{kind}: the pod's user is the image's"
        );
        assert_eq!(
            sc["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{kind}: seccomp"
        );
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{kind}: no API token"
        );
        for c in pod["containers"].as_sequence().expect("containers") {
            let csc = &c["securityContext"];
            assert_eq!(
                csc["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{kind}: read-only root"
            );
            assert_eq!(
                csc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{kind}: no escalation"
            );
            assert_eq!(
                csc["capabilities"]["drop"][0].as_str(),
                Some("ALL"),
                "{kind}: no capabilities"
            );
            assert!(
                c["resources"]["requests"]["memory"].is_string(),
                "{kind}: memory request"
            );
            assert!(c["resources"]["limits"]["memory"].is_string(), "{kind}: memory limit");
        }
    }
    let pdb = find(&docs, "PodDisruptionBudget", "outbox-relay");
    let dep = find(&docs, "Deployment", "outbox-relay");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], dep["spec"]["selector"]["matchLabels"],
        "the PDB covers the Deployment's pods"
    );
}
