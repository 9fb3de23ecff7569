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
    /// Through a pooler the worker does not migrate (the migrator's session lock cannot work
    /// there); it refuses to run on a schema older than its own.
    #[error(
        "the schema at {target} is behind this binary (missing migration {missing}); run \
         `imagegen migrate` with a DATABASE_URL that reaches Postgres directly, not through \
         the pooler"
    )]
    SchemaBehind { target: String, missing: String },
    #[error("cannot read the schema version at {target}")]
    SchemaUnreadable {
        target: String,
        #[source]
        source: sqlx::Error,
    },
}

impl Classify for DbError {
    fn class(&self) -> ErrorClass {
        match self {
            DbError::BadUrl(_) | DbError::Migrate(_) | DbError::SchemaBehind { .. } => {
                ErrorClass::Permanent
            }
            DbError::Connect { .. } | DbError::SchemaUnreadable { .. } => ErrorClass::RETRY,
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

/// Opens a pool for use through a transaction pooler (PgBouncer in `pool_mode = transaction`):
/// no statement cache (a named prepared statement outlives the transaction it was made in, and
/// the next transaction may run on another server connection), and no creating the database.
pub async fn connect_through_pooler(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(|e: sqlx::Error| DbError::BadUrl(e.to_string()))?
        .statement_cache_capacity(0);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect {
            target: describe(url),
            source,
        })
}

/// Checks that every migration of this binary has been applied, without migrating: for
/// processes that reach Postgres through a pooler. A schema newer than the binary is fine (a
/// rolling upgrade migrates first).
pub async fn check_schema(pool: &PgPool, url: &str) -> Result<(), DbError> {
    let target = describe(url);
    // Pinned and unnamed, as every statement through a pooler (see `queue::pooled`).
    let read = async {
        let mut tx = pool.begin().await?;
        let versions = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<Vec<i64>, sqlx::Error>(versions)
    };
    let applied: Vec<i64> = match read.await {
        Ok(v) => v,
        // No migrations table: nothing was ever applied.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(source) => return Err(DbError::SchemaUnreadable { target, source }),
    };
    let missing = crate::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .find(|m| applied.binary_search(&m.version).is_err());
    match missing {
        Some(m) => Err(DbError::SchemaBehind {
            target,
            missing: format!("{} {}", m.version, m.description),
        }),
        None => Ok(()),
    }
}
