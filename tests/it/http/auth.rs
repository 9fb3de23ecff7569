//! Access over a real socket: a server bound to every interface needs a token (or refuses to
//! start), the read token and read-only mode change nothing, probes are closed off loopback
//! unless opened, and no answer carries a secret.

use std::process::Command;

use imagegen::http::auth::{AuthArgs, AuthError};
use imagegen::http::{self, HttpError};
use secrecy::SecretString;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::Server;
use crate::helpers::pool;

const FULL: &str = "full-token-for-tests-0123456789";
const READ: &str = "read-token-for-tests-0123456789";

fn tokens() -> AuthArgs {
    AuthArgs {
        token: Some(SecretString::from(FULL.to_owned())),
        read_token: Some(SecretString::from(READ.to_owned())),
        ..AuthArgs::default()
    }
}

#[tokio::test]
async fn a_public_address_without_a_token_is_refused_at_start_up() {
    let err = http::bind("0.0.0.0:0".parse().unwrap(), &AuthArgs::default())
        .await
        .expect_err("refused");
    assert!(matches!(
        err,
        HttpError::Auth(AuthError::Unprotected { .. })
    ));

    // The binary says why and exits non-zero, before touching the database.
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env_remove("IMAGEGEN_HTTP_TOKEN")
        .env_remove("IMAGEGEN_HTTP_READ_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("IMAGEGEN_HTTP_TOKEN"), "{stderr}");
    assert!(stderr.contains("--no-auth"), "{stderr}");
    assert!(!stderr.contains("cannot reach the database"), "{stderr}");
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn off_loopback_every_request_needs_a_token(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 5).await;
    let s = Server::start_with(&db, "0.0.0.0:0", tokens()).await;
    let job = json!({"prompt": "guarded"});

    let res = s.client.get(s.url("/api/v1/jobs")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        res.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let res = s
        .client
        .get(s.url("/api/v1/jobs"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Probes are closed too off loopback (no --open-metrics).
    for probe in ["/metrics", "/healthz", "/readyz"] {
        let res = s.client.get(s.url(probe)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{probe}");
        let res = s
            .client
            .get(s.url(probe))
            .bearer_auth(READ)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{probe}");
    }

    // The read token reads, and changes nothing.
    let res = s
        .client
        .get(s.url("/api/v1/jobs"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = s
        .client
        .post(s.url("/api/v1/jobs"))
        .bearer_auth(READ)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body = res.text().await.unwrap();
    assert!(body.contains("urn:imagegen:problem:read-only"), "{body}");
    // The full token changes.
    let res = s
        .client
        .post(s.url("/api/v1/jobs"))
        .bearer_auth(FULL)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the full token's submission landed");

    // No answer, header or error carries a token.
    for (token, path) in [
        (None, "/api/v1/jobs"),
        (Some("nope-nope-nope-nope"), "/api/v1/stats"),
        (Some(READ), "/api/v1/jobs/1"),
        (Some(FULL), "/metrics"),
        (Some(FULL), "/api/v1/openapi.json"),
    ] {
        let mut req = s.client.get(s.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let headers = format!("{:?}", res.headers());
        let body = res.text().await.unwrap();
        for secret in [FULL, READ] {
            assert!(
                !body.contains(secret) && !headers.contains(secret),
                "{path} leaks a token"
            );
        }
    }
    s.stop().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn open_metrics_and_no_auth_open_what_they_say(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 5).await;
    let args = AuthArgs {
        open_metrics: true,
        ..tokens()
    };
    let s = Server::start_with(&db, "0.0.0.0:0", args).await;
    assert_eq!(
        s.client
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.client
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.client
            .get(s.url("/api/v1/jobs"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    s.stop().await;

    let args = AuthArgs {
        no_auth: true,
        ..AuthArgs::default()
    };
    let s = Server::start_with(&db, "0.0.0.0:0", args).await;
    assert_eq!(
        s.post("/api/v1/jobs", &json!({"prompt": "open"})).await.0,
        201
    );
    s.stop().await;

    // On loopback the server is open by default.
    let s = Server::start(&db).await;
    assert_eq!(s.get("/api/v1/jobs").await.0, 200);
    assert_eq!(s.get("/metrics").await.0, 200);
    s.stop().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn read_only_mode_refuses_every_change(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 5).await;
    sqlx::query("INSERT INTO imagegen.jobs (prompt, batch) VALUES ('existing', 'b')")
        .execute(&db)
        .await
        .unwrap();
    let args = AuthArgs {
        read_only: true,
        ..tokens()
    };
    let s = Server::start_with(&db, "0.0.0.0:0", args).await;
    let changes = [
        ("POST", "/api/v1/jobs", Some(json!({"prompt": "no"}))),
        ("POST", "/api/v1/jobs/1/cancel", None),
        ("POST", "/api/v1/jobs/1/retry", None),
        (
            "PUT",
            "/api/v1/batches/b/budget",
            Some(json!({"budget_usd": "1"})),
        ),
        ("POST", "/api/v1/batches/b/cancel-pending", None),
        ("POST", "/api/v1/batches/b/retry-failed", None),
        (
            "PUT",
            "/api/v1/budget/daily",
            Some(json!({"budget_usd": "1"})),
        ),
    ];
    for (method, path, body) in changes {
        let mut req = s
            .client
            .request(method.parse().unwrap(), s.url(path))
            .bearer_auth(FULL);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 403, "{method} {path}");
    }
    let res = s
        .client
        .get(s.url("/api/v1/jobs/1"))
        .bearer_auth(FULL)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let state: String = sqlx::query_scalar("SELECT state FROM imagegen.jobs WHERE id = 1")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(state, "pending");
    let budgets: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.batch_budgets")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(budgets, 0);
    s.stop().await;
}
