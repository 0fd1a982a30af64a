//! Private Postgres clusters: started, stopped, frozen, with standbys.

use super::*;

/// A private PostgreSQL cluster (initdb + pg_ctl on a free port) that a test
/// may restart without disturbing the shared server. Runs as `postgres`
/// when the tests run as root (Postgres refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    /// `-c ssl=on`, with a certificate from [`server_cert`].
    tls: bool,
}

impl PrivatePostgres {
    fn pg_bin() -> std::path::PathBuf {
        let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql (Debian's postgresql package)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
    }

    fn as_owner(&self, program: &str) -> Command {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let path = self.bin.join(program);
        if is_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub async fn start() -> PrivatePostgres {
        Self::start_with(false).await
    }

    /// A private server that also accepts TLS, with a certificate for
    /// `127.0.0.1` (and no other name) signed by a CA of its own
    /// ([`PrivatePostgres::ca_file`]), made with the `openssl` command.
    pub async fn start_with_tls() -> PrivatePostgres {
        Self::start_with(true).await
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.crt")
    }

    async fn start_with(tls: bool) -> PrivatePostgres {
        let dir = scratch_dir("outbox-pg");
        let pg = PrivatePostgres {
            port: free_port(),
            dir,
            bin: Self::pg_bin(),
            tls,
        };
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&pg.dir)
            .status();
        let status = pg
            .as_owner("initdb")
            .args(["-D"])
            .arg(pg.dir.join("data"))
            .args(["-A", "trust", "-U", "root", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        if tls {
            let data = pg.dir.join("data");
            server_cert(&pg.dir, &data.join("server.key"), &data.join("server.crt"));
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.key"))
                .arg(data.join("server.crt"))
                .status();
            let _ = Command::new("chmod").arg("600").arg(data.join("server.key")).status();
        }
        pg.ctl(&["start"]);
        pg.wait_ready().await;
        pg
    }

    fn ctl(&self, action: &[&str]) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 -c ssl={}",
            self.port,
            self.dir.display(),
            if self.tls { "on" } else { "off" }
        );
        let status = self
            .as_owner("pg_ctl")
            .args(action)
            .args(["-m", "fast", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &opts])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action:?} failed");
    }

    async fn wait_ready(&self) {
        let url = self.url();
        wait_until("private postgres accepts connections", Duration::from_secs(60), || {
            let url = url.clone();
            async move { tokio_postgres::connect(&url, NoTls).await.is_ok() }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    /// Put `lines` first in `pg_hba.conf` and reload (through `admin`, a
    /// session that the new rules still let in).
    pub async fn hba_first(&self, lines: &str, admin: &tokio_postgres::Client) {
        let path = self.dir.join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{lines}\n{old}")).expect("write pg_hba.conf");
        admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    }

    /// `pg_ctl restart -m fast`: every session is cut, the server comes back.
    pub async fn restart(&self) {
        self.ctl(&["restart"]);
        self.wait_ready().await;
    }

    /// `pg_ctl stop -m fast`: every session is cut, nothing answers on the port.
    pub fn stop(&self) {
        self.ctl(&["stop"]);
    }

    /// SIGSTOP every process of the server (postmaster and backends): it
    /// is frozen, not stopped; no socket is closed, nothing answers, as
    /// with a paused VM or a network black hole. It thaws (SIGCONT) when
    /// the guard is dropped, also when the test fails meanwhile.
    pub fn freeze(&self) -> Frozen<'_> {
        self.signal_all("STOP");
        Frozen(self)
    }

    fn signal_all(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .expect("postmaster.pid");
        // The children first, so none is forked meanwhile by a running postmaster.
        let _ = Command::new("pkill").args([&format!("-{sig}"), "-P", &pid]).status();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// A streaming standby of this server (`pg_basebackup -R -X stream`)
    /// on a port of its own, started and accepting read-only sessions.
    pub async fn standby(&self) -> PrivatePostgres {
        let standby = PrivatePostgres {
            port: free_port(),
            dir: scratch_dir("outbox-pg-standby"),
            bin: self.bin.clone(),
            tls: self.tls,
        };
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&standby.dir)
            .status();
        let out = standby
            .as_owner("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "root", "-D"])
            .arg(standby.dir.join("data"))
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        standby.ctl(&["start"]);
        standby.wait_ready().await;
        standby
    }

    /// `pg_ctl promote -w`: a standby becomes a primary that takes writes.
    pub fn promote(&self) {
        let status = self
            .as_owner("pg_ctl")
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl promote");
        assert!(status.success(), "pg_ctl promote failed");
    }

    /// Start it again after [`PrivatePostgres::stop`].
    pub async fn start_again(&self) {
        self.ctl(&["start"]);
        self.wait_ready().await;
    }
}

/// A frozen [`PrivatePostgres`]; dropping it thaws the server.
pub struct Frozen<'a>(&'a PrivatePostgres);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal_all("CONT");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A test that failed while the server was frozen: thaw it, or the
        // clean-up (the test database's DROP, pg_ctl stop) waits forever.
        if let Some(pid) = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
        {
            let _ = Command::new("pkill").args(["-CONT", "-P", &pid]).status();
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        let _ = self
            .as_owner("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
