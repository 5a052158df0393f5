//! Concurrent writes share a transaction: a write waits here with its item, and one of a few
//! leaders takes every item waiting and writes them in one statement and one commit. Each
//! write still answers only after its own item is committed. Creations (`tasks::insert`) and
//! heartbeats (`heartbeats::heartbeat`) go this way.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Most items one shared write takes.
pub const MAX_BATCH: usize = 256;

/// An item waiting, and where its answer goes.
pub struct Waiting<T, R> {
    pub item: T,
    pub reply: oneshot::Sender<R>,
}

pub struct SharedCommit<T, R> {
    waiting: Mutex<Vec<Waiting<T, R>>>,
    leaders: Arc<Semaphore>,
}

impl<T, R> SharedCommit<T, R> {
    /// `leaders`: how many shared writes may run at once.
    pub fn new(leaders: usize) -> SharedCommit<T, R> {
        SharedCommit {
            waiting: Mutex::new(Vec::new()),
            leaders: Arc::new(Semaphore::new(leaders.max(1))),
        }
    }

    pub fn push(&self, item: T) -> oneshot::Receiver<R> {
        let (reply, answer) = oneshot::channel();
        self.lock().push(Waiting { item, reply });
        answer
    }

    /// Up to [`MAX_BATCH`] items, oldest first.
    pub fn take(&self) -> Vec<Waiting<T, R>> {
        let mut waiting = self.lock();
        let n = waiting.len().min(MAX_BATCH);
        waiting.drain(..n).collect()
    }

    /// Up to [`MAX_BATCH`] items, oldest first, at most one per key (the others wait for the
    /// next batch, in their order).
    pub fn take_distinct<K: Hash + Eq>(&self, key: impl Fn(&T) -> K) -> Vec<Waiting<T, R>> {
        let mut waiting = self.lock();
        let mut seen = std::collections::HashSet::new();
        let mut taken = Vec::new();
        let mut left = Vec::new();
        for w in waiting.drain(..) {
            if taken.len() < MAX_BATCH && seen.insert(key(&w.item)) {
                taken.push(w);
            } else {
                left.push(w);
            }
        }
        *waiting = left;
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A leader's place, when one is free.
    pub fn try_lead(&self) -> Option<OwnedSemaphorePermit> {
        self.leaders.clone().try_acquire_owned().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting<T, R>>> {
        match self.waiting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Becomes a leader of `queue` when a place is free: writes what waits (`take` a batch,
/// `write` it), batch after batch, until nothing does. A leader runs on its own task, so a
/// client that goes away cancels nobody else's write.
/// `C` is what the writes need (the service's handle, e.g. `task_parts::Tasks`), holding the
/// queue.
pub fn lead<C, T, R, Q, B, W, Fut>(core: &C, queue: Q, take: B, write: W)
where
    C: Clone + Send + Sync + 'static,
    T: Send + 'static,
    R: Send + 'static,
    Q: Fn(&C) -> &SharedCommit<T, R> + Send + 'static,
    B: Fn(&SharedCommit<T, R>) -> Vec<Waiting<T, R>> + Send + 'static,
    W: Fn(C, Vec<Waiting<T, R>>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let Some(permit) = queue(core).try_lead() else {
        // The leaders at work take this item with their next batch.
        return;
    };
    let core = core.clone();
    tokio::spawn(async move {
        let mut permit = Some(permit);
        while permit.is_some() {
            loop {
                let batch = take(queue(&core));
                if batch.is_empty() {
                    break;
                }
                write(core.clone(), batch).await;
            }
            drop(permit.take());
            // An item may have come while this leader let go, when no place was free for it.
            if !queue(&core).is_empty() {
                permit = queue(&core).try_lead();
            }
        }
    });
}

/// [`lead`] in the form every queue here takes: a batch holds one item per `key` (a second
/// waits for the next batch), written by [`write_each`]. Creations go by trace id,
/// heartbeats by droplet, PATCHes by task.
pub fn lead_each<C, T, K, V>(
    core: &C,
    queue: fn(&C) -> &SharedCommit<T, Answer<V>>,
    key: fn(&T) -> K,
    write: for<'a> fn(&'a C, &'a [&'a T]) -> Written<'a, K, V>,
) where
    C: Clone + Send + Sync + 'static,
    T: Send + Sync + 'static,
    K: Hash + Eq + Send + 'static,
    V: Send + 'static,
{
    lead(
        core,
        queue,
        move |q| q.take_distinct(key),
        move |core, batch| async move { write_each(&core, batch, key, write).await },
    );
}

/// An item's answer from [`write_each`]: its result (`None` when the write gave it none), or
/// the database's error.
pub type Answer<V> = Result<Option<V>, sqlx::Error>;

/// What a shared write returns: the written items' results by key (an item missing from it
/// is answered `None`).
pub type Written<'a, K, V> =
    Pin<Box<dyn Future<Output = Result<HashMap<K, V>, sqlx::Error>> + Send + 'a>>;

/// Writes a batch in one go and answers each item; should that fail (one item the database
/// refuses, say, or a deadlock), each item is written alone, so one bad item never fails its
/// neighbours.
pub async fn write_each<C, T, K, V>(
    core: &C,
    batch: Vec<Waiting<T, Answer<V>>>,
    key: fn(&T) -> K,
    write: for<'a> fn(&'a C, &'a [&'a T]) -> Written<'a, K, V>,
) where
    K: Hash + Eq,
{
    let items: Vec<&T> = batch.iter().map(|w| &w.item).collect();
    let together = write(core, &items).await;
    drop(items);
    match together {
        Ok(mut written) => {
            for w in batch {
                let _ = w.reply.send(Ok(written.remove(&key(&w.item))));
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some(w) = batch.into_iter().next() {
                let _ = w.reply.send(Err(e));
            }
        }
        Err(_) => {
            for w in batch {
                let alone = write(core, &[&w.item])
                    .await
                    .map(|mut m| m.remove(&key(&w.item)));
                let _ = w.reply.send(alone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_distinct_leaves_a_second_item_of_a_key_for_the_next_batch() {
        let q: SharedCommit<(i32, &str), ()> = SharedCommit::new(1);
        for item in [(1, "a"), (2, "b"), (1, "c"), (3, "d"), (2, "e")] {
            drop(q.push(item));
        }
        let first: Vec<_> = q
            .take_distinct(|i| i.0)
            .into_iter()
            .map(|w| w.item.1)
            .collect();
        assert_eq!(first, ["a", "b", "d"]);
        let second: Vec<_> = q
            .take_distinct(|i| i.0)
            .into_iter()
            .map(|w| w.item.1)
            .collect();
        assert_eq!(second, ["c", "e"]);
        assert!(q.is_empty());
    }
}
