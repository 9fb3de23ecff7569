//! The bounded pool for image work: decoding, resizing and encoding run on blocking threads,
//! at most `size` at once, so the async threads keep serving calls and 1,000 calls in flight never
//! mean 1,000 decoded images in memory. Waiting for a permit is async (a semaphore), so a queue of
//! waiting jobs costs no thread.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// A handle on the pool; cloning shares it.
#[derive(Debug, Clone)]
pub struct ImagePool {
    permits: Arc<Semaphore>,
    size: usize,
}

/// The pool ended before the work could run (the runtime is shutting down), or the work
/// panicked (a bug in a codec, reported instead of taking the worker down).
#[derive(Debug, thiserror::Error)]
#[error("image work did not complete: {0}")]
pub struct PoolError(String);

impl ImagePool {
    /// A pool running at most `size` (at least 1) jobs at once.
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        ImagePool {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// How many jobs may run at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` on a blocking thread once a permit is free; the permit is held until `f` returns,
    /// even if the caller stops waiting.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| PoolError(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| PoolError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn never_runs_more_than_its_size_at_once() {
        let pool = ImagePool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=2).contains(&peak), "{peak} at once");
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_crash() {
        let pool = ImagePool::new(1);
        let err = pool.run(|| panic!("codec bug")).await.unwrap_err();
        assert!(err.to_string().contains("did not complete"), "{err}");
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
