//! The one path of a change of tasks' states: it begins the transaction, applies the moves
//! through the state machine (with their history rows and events), commits, and then does
//! what follows a commit: dispatch new assignments, tell droplets about work taken from
//! them, count outcomes, and wake the router when room or work appeared. Creation, PATCH,
//! cancel, routing, recovery, refusals, retries, deadlines and timeouts all go through it.

use crate::services::events::RelayWake;
use std::sync::Arc;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::instruments::Metrics;
use crate::services::core::{EmergencyStop, Settings};
use crate::services::dispatch::{self, Dispatcher};
use crate::services::drain_state;
use crate::services::router_trigger::RouterTrigger;
use crate::services::state_machine::{self, Applied, Mode, Move, MoveError, Status};
use crate::services::table_statistics::{self, Growth};
use crate::services::task_store::Task;
use crate::services::Core;

/// What a change of tasks uses of the shared parts: the pool it begins in, and what follows
/// its commit (the delivery queue and its holds, with the emergency stop and the settings'
/// assignment timeout; the router's trigger; the counters; the young tables' growth). Each
/// part is shared, so a clone is cheap and may go where a spawned task needs it.
#[derive(Clone)]
pub struct Changes {
    pub db: PgPool,
    pub settings: Settings,
    pub dispatch: Arc<Dispatcher>,
    pub router: Arc<RouterTrigger>,
    pub relay: RelayWake,
    pub metrics: Arc<Metrics>,
    pub growth: Arc<Growth>,
    pub stop: EmergencyStop,
}

impl Core {
    /// The parts a change of tasks uses ([`Transition::begin`]).
    pub fn changes(&self) -> Changes {
        Changes {
            db: self.db.clone(),
            settings: self.settings.clone(),
            dispatch: self.dispatch.clone(),
            router: self.router.clone(),
            relay: self.relay.clone(),
            metrics: self.metrics.clone(),
            growth: self.growth.clone(),
            stop: self.emergency_stop.clone(),
        }
    }
}

/// A change of tasks in progress: one transaction. The caller may read and lock rows in it
/// (`conn`) before it decides the moves; nothing follows until `commit`.
pub struct Transition<'a> {
    core: &'a Changes,
    tx: Transaction<'static, Postgres>,
    applied: Vec<Applied>,
    created: usize,
    wake_router: bool,
}

impl<'a> Transition<'a> {
    pub async fn begin(core: &'a Changes) -> Result<Transition<'a>, sqlx::Error> {
        Ok(Transition {
            core,
            tx: core.db.begin().await?,
            applied: Vec::new(),
            created: 0,
            wake_router: false,
        })
    }

    /// The transaction, for the reads, locks and other writes that belong to this change.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Applies moves through the state machine in this transaction. In `Strict` mode the
    /// first move that may not happen fails the call (drop or roll back the transition).
    pub async fn apply(&mut self, moves: &[Move], mode: Mode) -> Result<&[Applied], MoveError> {
        let start = self.applied.len();
        let applied = state_machine::apply(&mut self.tx, moves, mode).await?;
        self.applied.extend(applied);
        Ok(&self.applied[start..])
    }

    /// Applies every move that may happen in this transaction and says of each move, in
    /// their order, why it was not applied (`None`: applied; `commit` returns it).
    pub async fn apply_each(
        &mut self,
        moves: &[&Move],
    ) -> Result<Vec<Option<MoveError>>, sqlx::Error> {
        let outcomes = state_machine::apply_each(&mut self.tx, moves).await?;
        Ok(outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(applied) => {
                    self.applied.push(applied);
                    None
                }
                Err(e) => Some(e),
            })
            .collect())
    }

    /// Records that this transaction inserted a new task (its row, history and event).
    pub fn created(&mut self, _task: &Task) {
        self.created += 1;
    }

    /// Asks for a routing pass after the commit (room appeared that no move shows, e.g. a
    /// droplet was activated).
    pub fn wake_router(&mut self) {
        self.wake_router = true;
    }

    /// Ends the change without effects.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }

    /// Commits, then does what follows the committed moves. Returns them.
    pub async fn commit(self) -> Result<Vec<Applied>, sqlx::Error> {
        let Transition {
            core,
            mut tx,
            applied,
            created,
            wake_router,
        } = self;
        if core.dispatch.holds.any_draining() {
            finish_drains(&mut tx, &applied).await?;
        }
        tx.commit().await?;
        // Every transition that commits recorded events (its moves', a creation's, a
        // drain's).
        core.relay.committed();
        after_commit(core, &applied, created);
        if wake_router {
            core.router.trigger();
        }
        Ok(applied)
    }
}

/// Applies moves in a transaction of their own and commits them.
pub async fn run(core: &Changes, moves: &[Move], mode: Mode) -> Result<Vec<Applied>, MoveError> {
    let mut t = Transition::begin(core).await?;
    t.apply(moves, mode).await?;
    Ok(t.commit().await?)
}

/// A droplet being drained whose last task these moves ended is drained, in this
/// transaction (the event with it). Only while this replica knows of a drain; the
/// `task_router` job's round finishes any other.
async fn finish_drains(
    tx: &mut Transaction<'static, Postgres>,
    applied: &[Applied],
) -> Result<(), sqlx::Error> {
    let in_flight = |s: Status| matches!(s, Status::Assigned | Status::InProgress);
    let mut ended: Vec<i32> = applied
        .iter()
        .filter(|a| in_flight(a.from) && !in_flight(a.to))
        .filter_map(|a| a.held_droplet)
        .collect();
    if ended.is_empty() {
        return Ok(());
    }
    ended.sort_unstable();
    ended.dedup();
    drain_state::finish_drains(tx, Some(&ended)).await?;
    Ok(())
}

/// What follows committed moves: dispatch new assignments, tell droplets about work taken
/// from them, route again when room or work appeared, count outcomes.
fn after_commit(core: &Changes, applied: &[Applied], created: usize) {
    let mut route_again = created > 0;
    if created > 0 {
        core.metrics.tasks_created.inc_by(created as u64);
        if core.growth.created(created as u64) {
            table_statistics::analyze_in_background(core.db.clone());
        }
    }
    let mut assigned = 0u64;
    for a in applied {
        match a.to {
            Status::Assigned => {
                assigned += 1;
                dispatch::execute(&core.dispatch, &core.stop, &core.settings, &a.task);
            }
            Status::Pending => route_again = true,
            Status::InProgress => {}
            finished @ (Status::Completed | Status::Failed | Status::Cancelled) => {
                core.metrics
                    .task_outcomes
                    .with_label_values(&[finished.as_str()])
                    .inc();
                route_again = true;
            }
        }
        if let Some(droplet) = a.previous_droplet {
            dispatch::cancel(&core.dispatch, droplet, &a.task);
        }
    }
    if assigned > 0 {
        core.metrics.assignments.inc_by(assigned);
    }
    if route_again {
        core.router.trigger();
    }
}
