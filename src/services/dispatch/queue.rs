//! The queue of task deliveries: every `execute_task` waits here, per droplet, until one of
//! a fixed number of workers sends it. Memory stays flat however many tasks are assigned at
//! once: at most `DISPATCH_QUEUE_BODIES` waiting deliveries keep the task they were given; past
//! that, a delivery waits as its ids alone and is read back (many at once, one query per
//! droplet) when its turn comes, as is every retry. A delivery read back is sent only if its
//! task is still assigned to that droplet on the same attempt.
//!
//! Workers take droplets in turn and only a droplet with a free slot of its own
//! (`DISPATCH_PER_DROPLET_CONCURRENCY`), so a silent droplet holds its own slots and never a
//! worker that another droplet's delivery could use.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::{Duration, Instant};

use crate::services::task_store::Task;

/// Most deliveries read back from the database in one query.
pub const READ_BACK: usize = 256;

/// How a delivery is being tried: its next pause and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct Tries {
    pub backoff: Duration,
    pub give_up: Instant,
}

/// One delivery of `execute_task`: the task (its id and attempt, and its row while it is
/// kept) and the droplet it is assigned to (internal id).
#[derive(Debug)]
pub struct Waiting {
    pub task_id: i32,
    pub attempt: i32,
    pub droplet: i32,
    pub body: Option<Box<Task>>,
    pub tries: Tries,
}

#[derive(Default)]
struct Lanes {
    /// Most waiting deliveries that keep their task in memory (a task with a small payload
    /// is well under a kilobyte, so the default 8192 is a few megabytes).
    bodies_kept: usize,
    lanes: HashMap<i32, VecDeque<Waiting>>,
    /// Droplets with waiting deliveries, in turn.
    turn: VecDeque<i32>,
    bodies: usize,
    waiting: usize,
}

impl Lanes {
    /// Adds a delivery; at the back its body is dropped past the bound, at the front (read
    /// back just now, to be sent next) it is kept.
    fn push(&mut self, mut w: Waiting, front: bool) {
        if w.body.is_some() {
            if self.bodies >= self.bodies_kept && !front {
                w.body = None;
            } else {
                self.bodies += 1;
            }
        }
        self.waiting += 1;
        let droplet = w.droplet;
        let lane = self.lanes.entry(droplet).or_default();
        if lane.is_empty() {
            self.turn.push_back(droplet);
        }
        if front {
            lane.push_front(w);
        } else {
            lane.push_back(w);
        }
    }

    fn popped(&mut self, w: &Waiting) {
        self.waiting -= 1;
        if w.body.is_some() {
            self.bodies -= 1;
        }
    }
}

/// The waiting deliveries, and the wake-up of idle workers.
pub struct DeliveryQueue {
    lanes: Mutex<Lanes>,
    ready: Notify,
}

impl DeliveryQueue {
    pub fn new(bodies_kept: usize) -> DeliveryQueue {
        DeliveryQueue {
            lanes: Mutex::new(Lanes {
                bodies_kept,
                ..Lanes::default()
            }),
            ready: Notify::new(),
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        match self.lanes.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Adds a delivery at the end of its droplet's lane (its body dropped when too many are
    /// kept) and wakes a worker.
    pub fn push(&self, w: Waiting) {
        self.lanes().push(w, false);
        self.ready.notify_one();
    }

    /// Puts deliveries read back at the head of their droplet's lane, in the order given.
    pub fn push_front(&self, ws: Vec<Waiting>) {
        let n = ws.len();
        {
            let mut lanes = self.lanes();
            for w in ws.into_iter().rev() {
                lanes.push(w, true);
            }
        }
        for _ in 0..n.min(64) {
            self.ready.notify_one();
        }
    }

    /// The next delivery of the next droplet in turn that has a slot free (the slot comes
    /// with it), or None. `slot` tries a droplet's own slot without waiting.
    pub fn take(
        &self,
        mut slot: impl FnMut(i32) -> Option<OwnedSemaphorePermit>,
    ) -> Option<(Waiting, OwnedSemaphorePermit)> {
        let mut lanes = self.lanes();
        for _ in 0..lanes.turn.len() {
            let droplet = lanes.turn.pop_front()?;
            let Some(permit) = slot(droplet) else {
                lanes.turn.push_back(droplet);
                continue;
            };
            let Some(lane) = lanes.lanes.get_mut(&droplet) else {
                continue;
            };
            let Some(w) = lane.pop_front() else {
                lanes.lanes.remove(&droplet);
                continue;
            };
            if lane.is_empty() {
                lanes.lanes.remove(&droplet);
            } else {
                lanes.turn.push_back(droplet);
            }
            lanes.popped(&w);
            return Some((w, permit));
        }
        None
    }

    /// Up to `max` deliveries without a body from the head of a droplet's lane (to be read
    /// back together with one the caller holds).
    pub fn take_bodiless(&self, droplet: i32, max: usize) -> Vec<Waiting> {
        let mut lanes = self.lanes();
        let mut out = Vec::new();
        let Some(lane) = lanes.lanes.get_mut(&droplet) else {
            return out;
        };
        while out.len() < max && lane.front().is_some_and(|w| w.body.is_none()) {
            if let Some(w) = lane.pop_front() {
                out.push(w);
            }
        }
        if lane.is_empty() {
            lanes.lanes.remove(&droplet);
            lanes.turn.retain(|d| *d != droplet);
        }
        lanes.waiting -= out.len();
        out
    }

    /// Waits until a delivery may be ready: a push, a freed slot, or (while deliveries wait
    /// on busy droplets) a short tick, since slots freed by `/send` do not wake anyone.
    pub async fn ready(&self) {
        let waiting = self.lanes().waiting;
        if waiting > 0 {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.ready.notified()).await;
        } else {
            self.ready.notified().await;
        }
    }

    /// A slot was freed: another worker may find work.
    pub fn slot_freed(&self) {
        self.ready.notify_one();
    }

    /// How many deliveries wait, and how many of them keep their task.
    pub fn len(&self) -> (usize, usize) {
        let lanes = self.lanes();
        (lanes.waiting, lanes.bodies)
    }

    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn waiting(task_id: i32, droplet: i32) -> Waiting {
        Waiting {
            task_id,
            attempt: 1,
            droplet,
            body: None,
            tries: Tries {
                backoff: Duration::from_millis(250),
                give_up: Instant::now(),
            },
        }
    }

    #[tokio::test]
    async fn droplets_take_turns_and_a_busy_droplet_is_passed_over() {
        let q = DeliveryQueue::new(8);
        for t in 0..3 {
            q.push(waiting(t, 1));
        }
        q.push(waiting(10, 2));
        q.push(waiting(11, 2));
        let one = Arc::new(Semaphore::new(1));
        let two = Arc::new(Semaphore::new(5));
        let slot = |d: i32| {
            if d == 1 { &one } else { &two }
                .clone()
                .try_acquire_owned()
                .ok()
        };
        let (a, pa) = q.take(slot).unwrap();
        assert_eq!((a.task_id, a.droplet), (0, 1));
        let (b, _pb) = q.take(slot).unwrap();
        assert_eq!(b.task_id, 10);
        // Droplet 1 has no slot free: its deliveries wait, droplet 2's go on.
        let (c, _pc) = q.take(slot).unwrap();
        assert_eq!(c.task_id, 11);
        assert!(q.take(slot).is_none());
        assert_eq!(q.len().0, 2);
        drop(pa);
        let (d, _pd) = q.take(slot).unwrap();
        assert_eq!(d.task_id, 1);
    }

    #[tokio::test]
    async fn bodies_past_the_bound_are_dropped_and_read_back_in_order() {
        let q = DeliveryQueue::new(8);
        q.push(waiting(1, 7));
        q.push(waiting(2, 7));
        q.push(waiting(3, 7));
        let back = q.take_bodiless(7, 2);
        assert_eq!(back.iter().map(|w| w.task_id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(q.len().0, 1);
        q.push_front(back);
        let sem = Arc::new(Semaphore::new(10));
        let order: Vec<i32> =
            std::iter::from_fn(|| q.take(|_| sem.clone().try_acquire_owned().ok()))
                .map(|(w, _)| w.task_id)
                .collect();
        assert_eq!(order, [1, 2, 3]);
        assert!(q.is_empty());
    }
}
