//! Behind a real PgBouncer in transaction mode (the Debian package, started here on a free
//! loopback port with a config of its own): two `imagegen worker --no-listen` processes finish a
//! batch and deliver its webhooks, and a worker refuses a schema older than itself.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::queue::{NewJob, Queue};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Answer, KEY, Receiver, WAIT, signal, spawn_worker};
use crate::helpers::{pg_addr, pool as test_pool, wait_until};

/// A PgBouncer process in front of the test Postgres, stopped on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> PathBuf {
    for p in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("pgbouncer is not installed: scripts/test installs it (scripts/ensure-apt)");
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgBouncer {
    async fn start(opts: &PgConnectOptions) -> PgBouncer {
        let pg = pg_addr(opts).await;
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        // extra_float_digits: sqlx sets it at startup, and PgBouncer refuses unknown startup
        // parameters unless told to ignore them.
        let ini = format!(
            "[databases]\n* = host={} port={} user=postgres\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\npool_mode = transaction\n\
             max_client_conn = 500\ndefault_pool_size = 8\n\
             ignore_startup_parameters = extra_float_digits\n",
            pg.ip(),
            pg.port(),
            users.display()
        );
        let conf = dir.path().join("pgbouncer.ini");
        std::fs::write(&conf, ini).unwrap();
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).unwrap();
        let mut cmd = Command::new(pgbouncer_binary());
        if running_as_root() {
            // PgBouncer refuses to run as root.
            use std::os::unix::fs::PermissionsExt;
            for f in [dir.path().to_path_buf(), users.clone(), conf.clone()] {
                let mode = if f.is_dir() { 0o755 } else { 0o644 };
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer {
            child,
            port,
            _dir: dir,
        };
        let through = opts.clone().host("127.0.0.1").port(port);
        wait_until(
            Duration::from_secs(30),
            "pgbouncer to accept connections",
            || {
                let through = through.clone().statement_cache_capacity(0);
                async move { sqlx::ConnectOptions::connect(&through).await.is_ok() }
            },
        )
        .await;
        bouncer
    }

    fn url(&self, opts: &PgConnectOptions) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            opts.get_database().expect("test database name")
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn two_workers_finish_a_batch_through_pgbouncer(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = test_pool(&opts, 4).await;
    let bouncer = PgBouncer::start(&opts).await;
    let fake = FakeServer::start(FakeConfig {
        latency: Duration::from_millis(100),
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let n = 40;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob {
            prompt: format!("a pooled harbour {i} [fault:503x1]"),
            batch: Some("pooled".into()),
            callback_url: (i % 2 == 0).then(|| receiver.url()),
            ..NewJob::default()
        })
        .collect();
    Queue::new(db.clone()).enqueue_many(&jobs).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().to_str().unwrap();
    let url = bouncer.url(&opts);
    let flags = [
        "--no-listen",
        "--allow-private-callbacks",
        "--webhook-retry-base",
        "100ms",
    ];
    let mut workers: Vec<Child> = (0..2)
        .map(|_| spawn_worker(&url, &fake, storage, &flags, &[]))
        .collect();
    wait_until(WAIT, "every job and webhook to be done", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT NOT EXISTS (SELECT 1 FROM imagegen.jobs WHERE state IN ('pending', 'running')) \
             AND (SELECT count(*) FROM imagegen.deliveries WHERE state = 'delivered') = $1",
        )
        .bind(n / 2)
        .fetch_one(&db)
        .await
        .unwrap()
    })
    .await;
    for w in &workers {
        signal(w, "-TERM");
    }
    for w in &mut workers {
        let status = w.wait().unwrap();
        assert!(
            status.success(),
            "a worker exited with {status}; pgbouncer log:\n{}",
            bouncer.log()
        );
    }

    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM imagegen.jobs GROUP BY state")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(states, vec![("succeeded".to_owned(), n)]);
    // Each job's first call failed (503) and its retry succeeded: two calls, one billed image.
    assert_eq!(fake.successes(), n as usize);
    let workers_seen: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT worker_id) FROM imagegen.attempts")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(workers_seen, 2, "both workers took jobs");
    let got = receiver.received();
    let ids: HashSet<&str> = got
        .iter()
        .map(|r| r.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(
        ids.len() as i64,
        n / 2,
        "one webhook per job with a callback"
    );
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_worker_behind_a_pooler_refuses_an_old_schema(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = test_pool(&opts, 2).await;
    let bouncer = PgBouncer::start(&opts).await;
    // As if this binary's newest migration had not been run yet.
    let newest: i64 = imagegen::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(&db)
        .await
        .unwrap();
    let fake = FakeServer::start(FakeConfig::default()).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["worker", "--no-listen", "--exit-when-idle"])
        .env("DATABASE_URL", bouncer.url(&opts))
        .env("OPENROUTER_BASE_URL", fake.base_url())
        .env("OPENROUTER_API_KEY", KEY)
        .env("IMAGEGEN_STORAGE", tempfile::tempdir().unwrap().path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("behind this binary"), "{stderr}");
    assert!(stderr.contains(&newest.to_string()), "{stderr}");
    assert!(stderr.contains("imagegen migrate"), "{stderr}");
    // Nothing was migrated behind the pooler's back.
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version = $1")
            .bind(newest)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(applied, 0);
}
