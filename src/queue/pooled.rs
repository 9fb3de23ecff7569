//! Running the queue's statements through a transaction pooler (PgBouncer in
//! `pool_mode = transaction`), where consecutive transactions of one client connection may run
//! on different server connections.
//!
//! sqlx prepares every statement it runs: a named one by default (`sqlx_s_N`, left on the
//! server: the next client on that server that counts to the same N gets "already exists"), and
//! even an unnamed one is parsed and executed in two round trips with a `Sync` in between,
//! where a pooler may hand the client another server (which lacks the statement, or holds
//! someone else's). PgBouncer 1.18 (Debian 12) tracks neither. So through a pooler each
//! statement runs as an *unnamed* statement inside its own explicit transaction, which pins one
//! server from `BEGIN` to `COMMIT`; the results are read whole before the commit, so a caller
//! never sees a row whose write could still roll back. Two extra round trips a statement, paid
//! only in this mode.
//!
//! Every statement of the queue goes through [`Db`] (`self.db()`), never `&self.pool` directly.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, PgPool, Postgres};

/// Where a statement runs: straight on the pool, or pinned and unnamed through a pooler.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Db<'a> {
    Direct(&'a PgPool),
    Pooled(&'a PgPool),
}

/// A statement that is never kept on the server.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(&self) -> &'q str {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement<'q>> {
        self.0.statement()
    }

    fn take_arguments(
        &mut self,
    ) -> Result<Option<sqlx::postgres::PgArguments>, sqlx::error::BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'a> Executor<'a> for Db<'a> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'a: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self {
            Db::Direct(pool) => pool.fetch_many(query),
            Db::Pooled(pool) => {
                let pool = pool.clone();
                futures::stream::once(async move {
                    let mut tx = pool.begin().await?;
                    let all: Vec<_> = (&mut *tx).fetch_many(Unnamed(query)).try_collect().await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(futures::stream::iter(all.into_iter().map(Ok)))
                })
                .try_flatten()
                .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'a: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self {
            Db::Direct(pool) => pool.fetch_optional(query),
            Db::Pooled(pool) => {
                let pool = pool.clone();
                Box::pin(async move {
                    let mut tx = pool.begin().await?;
                    let row = (&mut *tx).fetch_optional(Unnamed(query)).await?;
                    tx.commit().await?;
                    Ok(row)
                })
            }
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'a: 'e,
    {
        match self {
            Db::Direct(pool) | Db::Pooled(pool) => pool.prepare_with(sql, parameters),
        }
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'a: 'e,
    {
        match self {
            Db::Direct(pool) | Db::Pooled(pool) => pool.describe(sql),
        }
    }
}
