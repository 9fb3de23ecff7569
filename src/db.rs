//! Connecting to Postgres: the pool every command uses, creating the database on first use.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::error::{Classify, ErrorClass};

/// The database used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/imagegen";

/// How long a query waits for a free pooled connection before failing (and being retried by
/// its caller): short, so an outage shows up in logs quickly instead of as a silent stall.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(String),
    #[error("cannot reach the database at {target}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Classify for DbError {
    fn class(&self) -> ErrorClass {
        match self {
            DbError::BadUrl(_) | DbError::Migrate(_) => ErrorClass::Permanent,
            DbError::Connect { .. } => ErrorClass::RETRY,
        }
    }
}

/// Where a URL points, without its password, for messages.
pub fn describe(url: &str) -> String {
    match url.parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "(unparsable DATABASE_URL)".to_owned(),
    }
}

/// Opens a pool on `url`, creating the database first if it does not exist.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        // sqlx's parse errors do not echo the URL, so no password leaks through them.
        DbError::BadUrl(e.to_string())
    })?;
    let target = describe(url);
    let exists = Postgres::database_exists(url)
        .await
        .map_err(|source| DbError::Connect {
            target: target.clone(),
            source,
        })?;
    if !exists {
        // Two processes may race here; the loser's "already exists" is fine.
        if let Err(e) = Postgres::create_database(url).await {
            let exists_now = Postgres::database_exists(url).await.unwrap_or(false);
            if !exists_now {
                return Err(DbError::Connect { target, source: e });
            }
        }
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect { target, source })
}

/// Runs the embedded migrations. Safe from several processes at once (sqlx holds an advisory
/// lock while migrating).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    crate::MIGRATOR.run(pool).await?;
    Ok(())
}
