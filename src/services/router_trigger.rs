//! The routing loop's trigger: wakes it, pauses it, says whether a pass is running, keeps
//! the room the last pass saw (for `estimated_assignment_seconds`), and lets one pass of
//! this replica run at a time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use tokio::sync::{Mutex, MutexGuard, Notify};

/// Wakes the routing loop; many triggers during a pass make one more pass.
pub struct RouterTrigger {
    pub(crate) notify: Notify,
    paused: AtomicBool,
    /// True while the loop is in a pass (set before it checks `paused`, so once routing is
    /// paused and this reads false, no pass of the loop is running or will start).
    pub(crate) passing: AtomicBool,
    room: RwLock<Room>,
    /// Held through each pass of this replica, the loop's and the `task_router` job's.
    one_pass: Mutex<()>,
}

/// Which capabilities had room at the last pass (for `estimated_assignment_seconds`).
#[derive(Default, Clone)]
pub(crate) struct Room {
    pub(crate) any: bool,
    pub(crate) capabilities: HashSet<String>,
}

impl RouterTrigger {
    pub fn new() -> Self {
        RouterTrigger {
            notify: Notify::new(),
            paused: AtomicBool::new(false),
            passing: AtomicBool::new(false),
            room: RwLock::new(Room::default()),
            one_pass: Mutex::new(()),
        }
    }

    /// Waits for this replica's pass in progress, if any, and holds off the next one until
    /// dropped. Two passes of one replica at once would each lock part of the droplets (the
    /// advisory lock per droplet that keeps replicas apart) and route on that part alone: a
    /// task could go to a busier or staler droplet than the one the other pass held.
    pub(crate) async fn one_pass(&self) -> MutexGuard<'_, ()> {
        self.one_pass.lock().await
    }

    pub fn trigger(&self) {
        self.notify.notify_one();
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.trigger();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Whether the routing loop is in a pass right now (tests wait for a paused router to
    /// be still).
    pub fn is_passing(&self) -> bool {
        self.passing.load(Ordering::SeqCst)
    }

    /// Whether a droplet able to take a task with this capability had room at the last pass.
    pub fn has_room_for(&self, capability: Option<&str>) -> bool {
        let Ok(room) = self.room.read() else {
            return false;
        };
        match capability {
            None => room.any,
            Some(c) => room.capabilities.contains(c),
        }
    }

    pub(crate) fn set_room(&self, room: Room) {
        if let Ok(mut r) = self.room.write() {
            *r = room;
        }
    }

    /// Forgets the room snapshot (`/management/cache/clear`); the next pass rebuilds it.
    pub fn clear_room(&self) -> bool {
        let had = self
            .room
            .read()
            .map(|r| r.any || !r.capabilities.is_empty())
            .unwrap_or(false);
        self.set_room(Room::default());
        had
    }
}

impl Default for RouterTrigger {
    fn default() -> Self {
        Self::new()
    }
}
