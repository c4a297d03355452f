//! Group commit for the hot path: requests that arrive while the database is busy with the
//! previous batch are answered together by one statement (one round trip, one commit, one
//! fsync). Nothing waits on a timer: a request that finds the database idle is sent at once,
//! alone, so a quiet server answers as fast as before, and a busy one amortises each
//! statement's fixed cost over every request queued behind it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Requests queued for one batcher beyond the batch being run (back-pressure: callers wait
/// to enqueue once this many are waiting).
const QUEUE: usize = 4096;

/// What a batch statement failed with, given to every request in the batch.
pub type BatchError = Arc<sqlx::Error>;

type Waiter<Q, A> = (Q, oneshot::Sender<Result<A, BatchError>>);

/// A queue in front of one batch statement: [`Batcher::call`] enqueues a request and waits
/// for its answer.
pub struct Batcher<Q, A> {
    tx: mpsc::Sender<Waiter<Q, A>>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Start the task that runs batches of at most `max` requests, at most `parallel` at a
    /// time. `run` answers a batch in order (one answer per request); the task ends when the
    /// batcher is dropped. The batches run on the check-in workers (`lanes`).
    pub fn start<F, Fut>(max: usize, parallel: usize, run: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<A>, sqlx::Error>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Waiter<Q, A>>(QUEUE);
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        crate::lanes::spawn(async move {
            // A batch is taken only when it can run: requests queue meanwhile, and the next
            // batch is everything that arrived while the others ran.
            while let Ok(slot) = slots.clone().acquire_owned().await {
                let mut batch = Vec::with_capacity(max);
                if rx.recv_many(&mut batch, max.max(1)).await == 0 {
                    break;
                }
                let (queries, waiters): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
                let answers = run(queries);
                crate::lanes::spawn(async move {
                    answer(waiters, answers.await);
                    drop(slot);
                });
            }
        });
        Batcher { tx }
    }

    /// Enqueue `q` and wait for its answer.
    pub async fn call(&self, q: Q) -> Result<A, BatchError> {
        let (tx, rx) = oneshot::channel();
        let gone = || Arc::new(sqlx::Error::PoolClosed);
        self.tx.send((q, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn answer<A>(waiters: Vec<oneshot::Sender<Result<A, BatchError>>>, out: Result<Vec<A>, sqlx::Error>) {
    let n = waiters.len();
    let e = match out {
        Ok(answers) if answers.len() == n => {
            for (a, w) in answers.into_iter().zip(waiters) {
                let _ = w.send(Ok(a));
            }
            return;
        }
        Ok(answers) => sqlx::Error::Protocol(format!("a batch of {n} got {} answers", answers.len())),
        Err(e) => e,
    };
    let e = Arc::new(e);
    for w in waiters {
        let _ = w.send(Err(e.clone()));
    }
}

/// The connections a batcher's statements run on, kept out of the pool's rotation: a
/// pooled connection costs a round trip to the database each time it is taken (sqlx pings
/// it) and another when it is given back, as many as the batch statement itself. Held
/// connections are taken from the pool once (`PoolConnection::detach`, so the pool may
/// open others in their place) and reused; one whose work failed is closed, as it may be
/// broken or mid-transaction, and the next batch takes a new one.
pub struct Held {
    pool: sqlx::AnyPool,
    /// Whether connections are held; if not, each batch takes one from the pool and gives
    /// it back (SQLite's one writer: the pool is what queues its writers).
    hold: bool,
    idle: std::sync::Mutex<Vec<sqlx::AnyConnection>>,
}

/// A connection taken from [`Held`].
pub enum Lease {
    /// Held out of the pool.
    Held(sqlx::AnyConnection),
    /// The pool's, back to it when dropped.
    Pooled(sqlx::pool::PoolConnection<sqlx::Any>),
}

impl std::ops::Deref for Lease {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        match self {
            Lease::Held(c) => c,
            Lease::Pooled(c) => c,
        }
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        match self {
            Lease::Held(c) => c,
            Lease::Pooled(c) => c,
        }
    }
}

impl Held {
    /// Connections of `pool`, held out of it if `hold`.
    pub fn new(pool: sqlx::AnyPool, hold: bool) -> Held {
        Held {
            pool,
            hold,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Run `work` on a connection. A held connection that fails with an I/O error (the
    /// database closed it while it was idle, or restarted) is replaced and the work run
    /// once more on the new one: every batch statement is a read or a compare-and-swap,
    /// so running one again is safe.
    pub async fn run<T, F>(&self, work: F) -> Result<T, sqlx::Error>
    where
        F: for<'c> Fn(&'c mut sqlx::AnyConnection) -> futures_util::future::BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let (mut lease, reused) = self.take().await?;
            match work(&mut lease).await {
                Ok(out) => {
                    self.give_back(lease);
                    return Ok(out);
                }
                Err(e) if reused && tries == 1 && matches!(e, sqlx::Error::Io(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection, and whether it was held idle (rather than new from the pool).
    async fn take(&self) -> Result<(Lease, bool), sqlx::Error> {
        if !self.hold {
            return Ok((Lease::Pooled(self.pool.acquire().await?), false));
        }
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        Ok(match idle {
            Some(c) => (Lease::Held(c), true),
            None => (Lease::Held(self.pool.acquire().await?.detach()), false),
        })
    }

    fn give_back(&self, lease: Lease) {
        if let (Lease::Held(c), Ok(mut idle)) = (lease, self.idle.lock()) {
            idle.push(c);
        }
    }
}

/// How a statement's parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marks {
    /// `$1, $2, …` (PostgreSQL).
    Numbered,
    /// `?` each, bound in the order they appear (SQLite: sqlx finds a numbered parameter by
    /// its name, which SQLite looks up by a linear scan, so a batch of 2,560 numbered
    /// parameters cost millions of comparisons to bind).
    Anonymous,
}

impl From<crate::db::Backend> for Marks {
    fn from(backend: crate::db::Backend) -> Marks {
        match backend {
            crate::db::Backend::Sqlite => Marks::Anonymous,
            crate::db::Backend::Postgres => Marks::Numbered,
        }
    }
}

impl Marks {
    /// The marks for a connection whose backend is named `backend` (sqlx's name).
    pub fn of(backend: &str) -> Marks {
        if backend == "SQLite" {
            Marks::Anonymous
        } else {
            Marks::Numbered
        }
    }

    fn mark(self, n: usize) -> String {
        match self {
            Marks::Numbered => format!("${n}"),
            Marks::Anonymous => "?".to_owned(),
        }
    }
}

/// A column of a batch statement's `VALUES`: its parameters are cast to its type, so that
/// both engines know it (a row of NULLs pads a batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// TEXT.
    Text,
    /// BIGINT.
    Int,
}

/// `rows` rows of `(CAST(p AS type), …)`, comma-separated: what a batch statement's
/// `VALUES` lists. The parameters are numbered from 1 and are the statement's only ones.
pub fn values(marks: Marks, rows: usize, columns: &[Column]) -> String {
    let mut out = String::with_capacity(rows * columns.len() * 24);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (c, column) in columns.iter().enumerate() {
            if c > 0 {
                out.push_str(", ");
            }
            let ty = match column {
                Column::Text => "TEXT",
                Column::Int => "BIGINT",
            };
            out.push_str(&format!("CAST({} AS {ty})", marks.mark(r * columns.len() + c + 1)));
        }
        out.push(')');
    }
    out
}

/// Bind `rows` rows of NULLs of `columns`: the padding of a batch to its size, matching
/// no row.
pub fn bind_nulls<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rows: usize,
    columns: &[Column],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for _ in 0..rows {
        for column in columns {
            q = match column {
                Column::Int => q.bind(None::<i64>),
                Column::Text => q.bind(None::<String>),
            };
        }
    }
    q
}

/// `(p1, …, pn)`: an `IN` list of `n` parameters, the statement's only ones.
pub fn list(marks: Marks, n: usize) -> String {
    let marks: Vec<String> = (1..=n).map(|k| marks.mark(k)).collect();
    format!("({})", marks.join(", "))
}

/// The rounds a batch's items go in so that no key is twice in one round (an `UPDATE …
/// FROM (VALUES …)` joining one row to two would apply either): each round's indices, the
/// n-th repeat of a key in round n.
pub fn rounds<K: std::hash::Hash + Eq>(keys: impl Iterator<Item = K>) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut times: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    for (i, key) in keys.enumerate() {
        let n = times.entry(key).or_insert(0);
        if out.len() <= *n {
            out.push(Vec::new());
        }
        out[*n].push(i);
        *n += 1;
    }
    out
}

/// The smallest of 1, 2, 4, … 2^k that holds `n`: batches are padded to these sizes so that
/// each connection prepares a handful of statements, not one per batch size.
pub fn padded(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_lists_mark_their_parameters() {
        use Column::{Int, Text};
        assert_eq!(
            values(Marks::Numbered, 2, &[Text, Int]),
            "(CAST($1 AS TEXT), CAST($2 AS BIGINT)), (CAST($3 AS TEXT), CAST($4 AS BIGINT))"
        );
        assert_eq!(
            values(Marks::Anonymous, 1, &[Int, Text]),
            "(CAST(? AS BIGINT), CAST(? AS TEXT))"
        );
        assert_eq!(list(Marks::Numbered, 3), "($1, $2, $3)");
        assert_eq!(list(Marks::Anonymous, 2), "(?, ?)");
        assert_eq!(Marks::of("SQLite"), Marks::Anonymous);
        assert_eq!(Marks::of("PostgreSQL"), Marks::Numbered);
        assert_eq!(
            rounds(["a", "b", "a", "a"].into_iter()),
            vec![vec![0, 1], vec![2], vec![3]]
        );
        assert_eq!(
            (padded(0), padded(1), padded(3), padded(64), padded(65)),
            (1, 1, 4, 64, 128)
        );
    }

    #[tokio::test]
    async fn queued_requests_share_a_batch_and_get_their_own_answers() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b = Arc::new(Batcher::start(8, 1, move |qs: Vec<u32>| {
            seen.lock().unwrap().push(qs.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(qs.into_iter().map(|q| q * 10).collect())
            }
        }));
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
            })
            .collect();
        for c in calls {
            let (i, a) = c.await.unwrap();
            assert_eq!(a, i * 10);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(
            sizes.len() < 20,
            "requests queued behind a batch were not batched: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn held_connections_are_reused_and_a_failed_one_is_replaced() {
        use futures_util::FutureExt;
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let held = Held::new(pool.clone(), true);
        use futures_util::future::BoxFuture;
        type Conn = sqlx::AnyConnection;
        // A temporary table lives as long as its connection.
        fn make(conn: &mut Conn) -> BoxFuture<'_, Result<(), sqlx::Error>> {
            async move {
                sqlx::query("CREATE TEMP TABLE t (x INTEGER)")
                    .execute(conn)
                    .await
                    .map(|_| ())
            }
            .boxed()
        }
        fn count(conn: &mut Conn) -> BoxFuture<'_, Result<i64, sqlx::Error>> {
            async move {
                let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t").fetch_one(conn).await?;
                Ok(row.0)
            }
            .boxed()
        }
        fn fail(conn: &mut Conn) -> BoxFuture<'_, Result<(), sqlx::Error>> {
            async move { sqlx::query("SELECT * FROM absent").execute(conn).await.map(|_| ()) }.boxed()
        }
        held.run(make).await.unwrap();
        assert_eq!(held.run(count).await.unwrap(), 0, "the held connection was not reused");
        // Held out of the pool: the pool's one connection slot is free for others.
        let pooled = tokio::time::timeout(std::time::Duration::from_secs(5), pool.acquire()).await;
        assert!(pooled.is_ok(), "the held connection still counts against the pool");
        drop(pooled);
        assert!(held.run(fail).await.is_err());
        // The connection that failed was closed: the next one has no table `t`.
        assert!(
            held.run(count).await.is_err(),
            "a connection whose work failed was kept"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_requests() {
        let b = Batcher::start(4, 2, |_: Vec<u32>| async {
            Err::<Vec<u32>, _>(sqlx::Error::RowNotFound)
        });
        assert!(matches!(*b.call(1).await.unwrap_err(), sqlx::Error::RowNotFound));
        let short = Batcher::start(4, 2, |_: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(short.call(1).await.unwrap_err().to_string().contains("1 got 0 answers"));
    }
}
