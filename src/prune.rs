//! Deleting old jobs and, if asked, their objects: `imagegen prune` and `imagegen batch delete`
//! share this. Chunk by chunk (see `queue::prune`): each chunk's objects are deleted from storage
//! (originals, renditions, every generation) while its rows are locked, then the rows; a failure
//! stops the prune with the chunk untouched, and running it again picks up where it stopped.

use futures::{StreamExt, TryStreamExt};

use crate::queue::{PruneCount, PruneFilter, Queue, QueueError};
use crate::storage::{Storage, StorageError};

/// Jobs per chunk by default: a few thousand objects per transaction.
pub const DEFAULT_CHUNK: i64 = 1000;
/// Object deletes in flight at once.
const DELETES_IN_FLIGHT: usize = 16;

/// Why a prune stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("deleting object {key} failed (its job was kept; run again): {source}")]
    Storage {
        key: String,
        #[source]
        source: StorageError,
    },
}

/// What a prune did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub objects: u64,
    pub chunks: u64,
}

/// How many jobs and objects `filter` selects (nothing is changed).
pub async fn count(queue: &Queue, filter: &PruneFilter) -> Result<PruneCount, QueueError> {
    queue.prune_count(filter).await
}

/// Deletes every job `filter` selects, `chunk` at a time; with `storage`, their objects first.
/// `progress` is told the running totals after each chunk.
pub async fn prune(
    queue: &Queue,
    storage: Option<&Storage>,
    filter: &PruneFilter,
    chunk: i64,
    mut progress: impl FnMut(&Pruned),
) -> Result<Pruned, PruneError> {
    let mut done = Pruned::default();
    while let Some(c) = queue.prune_chunk(filter, chunk).await? {
        if let Some(storage) = storage {
            let deleted = futures::stream::iter(c.keys.iter())
                .map(|key| async move {
                    storage
                        .delete(key)
                        .await
                        .map_err(|source| PruneError::Storage {
                            key: key.clone(),
                            source,
                        })
                })
                .buffer_unordered(DELETES_IN_FLIGHT)
                .try_fold(0u64, |n, ()| async move { Ok(n + 1) })
                .await?;
            done.objects += deleted;
        }
        done.jobs += queue.prune_delete(c).await?;
        done.chunks += 1;
        progress(&done);
    }
    Ok(done)
}
