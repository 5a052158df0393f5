//! The task router: pending tasks to the least loaded capable active droplet, priority first
//! then oldest first, in batches applied through the state machine. Passes run at once when
//! work or room appears (coalesced, one at a time per process) and take their tasks with
//! `FOR UPDATE SKIP LOCKED`, so replicas never assign a task twice nor wait on each other.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::NaiveDateTime;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::services::contracts::{Contract, Contracts, Memo, Site};
use crate::services::fair_pending::{self, PendingTask};
use crate::services::fair_share::LimitCache;
use crate::services::key_limits;
use crate::services::locks::DROPLET_FILL;
use crate::services::state_machine::{Actor, Mode, Move, MoveError, Status};
use crate::services::task_recovery;
use crate::services::transition::{Changes, Transition};
use crate::services::Core;

/// Most tasks one pass assigns; a full pass runs again at once.
pub const BATCH: i64 = 5000;

/// How long the loop waits before passing again when droplets were locked elsewhere, and
/// how many times in a row (about two seconds in all; the `task_router` job covers the rest).
const CONTENDED_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
const CONTENDED_RETRIES: u32 = 40;

use crate::services::router_trigger::Room;
pub use crate::services::router_trigger::RouterTrigger;

/// What routing uses of the shared parts: those of a change of tasks (it assigns through
/// [`Transition`]; the router's trigger, the emergency stop and the settings are among
/// them), the compiled contracts, this replica's limits per key, and the shutdown (a
/// rate-limited key's wake-up ends with it).
#[derive(Clone)]
pub struct Routing {
    pub changes: Changes,
    pub contracts: Arc<Contracts>,
    pub limits: Arc<LimitCache>,
    pub shutdown: CancellationToken,
}

impl Core {
    /// The parts routing uses ([`run_loop`], [`run_once`], [`route_pass`]).
    pub fn routing(&self) -> Routing {
        Routing {
            changes: self.changes(),
            contracts: self.contracts.clone(),
            limits: self.limits.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// A pass is a change of tasks: the transition's parts are routing's own.
impl Deref for Routing {
    type Target = Changes;
    fn deref(&self) -> &Changes {
        &self.changes
    }
}

/// The loop behind immediate routing: one pass per wake-up, again while passes are full.
pub async fn run_loop(state: Routing, stop: CancellationToken) {
    // The first pass picks up whatever is pending at start-up.
    state.router.trigger();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = state.router.notify.notified() => {}
        }
        let mut contended_rounds = 0u32;
        loop {
            state.router.passing.store(true, Ordering::SeqCst);
            if state.router.is_paused() || state.stop.is_on() || stop.is_cancelled() {
                state.router.passing.store(false, Ordering::SeqCst);
                break;
            }
            let result = pass(&state).await;
            state.router.passing.store(false, Ordering::SeqCst);
            match result {
                Ok(p) if p.more => continue,
                // Another replica (or a heartbeat) held some droplets: the work this trigger
                // announced may still be waiting, and that replica's pass may have read its
                // tasks before this one arrived. Try again shortly rather than leave the task
                // to the safety-net job; the other pass is short.
                Ok(p) if p.contended && contended_rounds < CONTENDED_RETRIES => {
                    contended_rounds += 1;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(CONTENDED_PAUSE) => {}
                    }
                }
                Ok(_) => break,
                // A failed pass (a deadlock, a dropped connection) may have been the one this
                // trigger announced work to: try again shortly, as for contention, rather
                // than leave the work to the safety-net job.
                Err(e) if contended_rounds < CONTENDED_RETRIES => {
                    tracing::warn!(error = %e, "routing pass failed; trying again shortly");
                    contended_rounds += 1;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(CONTENDED_PAUSE) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "routing pass failed again; the next trigger or the task_router job retries");
                    break;
                }
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct Candidate {
    id: i32,
    droplet_id: i32,
    capabilities: serde_json::Value,
    max_concurrent_tasks: Option<i32>,
    last_heartbeat: Option<NaiveDateTime>,
    load: i64,
    capability_schemas: Option<serde_json::Value>,
    /// How many droplets were active, locked here or not (the same in every row).
    active: i64,
}

struct Slot {
    id: i32,
    droplet_id: i32,
    capabilities: HashSet<String>,
    max: Option<i64>,
    heartbeat: Option<NaiveDateTime>,
    load: i64,
    /// Per capability, the droplet's contract (JSON Schema) for task payloads.
    schemas: serde_json::Map<String, serde_json::Value>,
    /// The same compiled (off the async workers, in the pass's blocking step); `None` for a
    /// schema that no longer compiles: it accepts nothing.
    contracts: HashMap<String, Option<Contract>>,
}

/// What decides whether a droplet's contract accepts a task: the payloads of the tasks whose
/// capability has a contract somewhere, and the pass's verdicts (each contract evaluated once
/// per task, droplets sharing a schema text sharing the evaluation, within the budget).
struct Fit<'a> {
    payloads: &'a HashMap<i32, serde_json::Value>,
    memo: RefCell<Memo<'a, i32>>,
}

impl Slot {
    fn room(&self) -> i64 {
        match self.max {
            Some(m) => (m - self.load).max(0),
            None => BATCH,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    assigned: usize,
    /// It assigned tasks and read as many as its limits allowed: more may be waiting.
    more: bool,
    /// Some active droplets were locked by another transaction and left out of this pass.
    contended: bool,
}

/// One routing pass; returns how many tasks it assigned.
pub async fn route_pass(state: &Routing) -> Result<usize, sqlx::Error> {
    pass(state).await.map(|p| p.assigned)
}

async fn pass(state: &Routing) -> Result<Pass, sqlx::Error> {
    let _one = state.router.one_pass().await; // this replica's passes, one at a time
    let started = std::time::Instant::now();
    let mut t = Transition::begin(state).await?;
    // The limits per key, read each pass: in force on every replica without a restart.
    let limits = key_limits::refresh(&mut t, &state.limits).await?;
    let (mut slots, contended) = lock_droplets(&mut t).await?;
    let droplets_read = started.elapsed();
    let room = PassRoom::of(&slots);
    if room.total == 0 {
        // A pass that saw droplets locked elsewhere knows nothing about their room.
        if !contended {
            state.router.set_room(Room::default());
        }
        t.rollback().await?;
        return Ok(Pass {
            assigned: 0,
            more: false,
            contended,
        });
    }
    let mut read = fair_pending::read_pending(
        &mut t,
        &room.wanted(),
        &limits,
        state.settings.current().priority_aging_seconds,
        BATCH,
    )
    .await?;
    let (more, contended) = (read.more, contended || read.contended);
    let pending = std::mem::take(&mut read.tasks);
    let payloads = contracted_payloads(&mut t, &slots, &pending).await?;
    let tasks_read = started.elapsed();
    // Compiling and evaluating contracts is CPU work: off the async workers.
    let core = state.clone();
    let (slots, moves, per_key) = tokio::task::spawn_blocking(move || {
        for slot in &mut slots {
            slot.contracts = slot
                .schemas
                .iter()
                .map(|(c, schema)| (c.clone(), core.contracts.compile(schema).ok()))
                .collect();
        }
        let fit = Fit {
            payloads: &payloads,
            memo: RefCell::new(core.contracts.memo(Site::Routing)),
        };
        let moves = plan(&mut slots, &pending, &fit);
        let per_key = assigned_per_key(&moves, &pending);
        (slots, moves, per_key)
    })
    .await
    .map_err(|e| sqlx::Error::Protocol(format!("routing plan: {e}")))?;
    let planned = started.elapsed();
    // The room left after this pass's assignments answers `estimated_assignment_seconds`.
    state.router.set_room(room_left(&slots));
    // A key left waiting for its rate gets a pass when its next slot comes.
    if let Some(at) = fair_pending::due(&read, &per_key) {
        fair_pending::wake_at(&state.limits, &state.router, &state.shutdown, at);
    }
    // An emergency stop that came while this pass was reading wins: nothing it chose is
    // assigned.
    if moves.is_empty() || state.stop.is_on() {
        t.rollback().await?;
        return Ok(Pass {
            assigned: 0,
            more: false,
            contended,
        });
    }
    // A task another transaction holds now (another replica's pass, a cancel or a start in
    // flight) is left out, never waited for, as is one that is no longer pending; the loop
    // tries again shortly for them. (The update's statement locks them: `Mode::SkipHeld`.)
    let contended = match t.apply(&moves, Mode::SkipHeld).await {
        Ok(applied) => contended || applied.len() < moves.len(),
        Err(MoveError::Database(e)) => return Err(e),
        Err(e) => {
            // SkipHeld leaves bad moves out; should it report one, the pass assigns nothing.
            tracing::error!(error = %e, "a routing pass's transition reported an invalid move");
            t.rollback().await?;
            return Ok(Pass {
                assigned: 0,
                more: false,
                contended,
            });
        }
    };
    fair_pending::spend(&mut t, &read, &per_key).await?;
    let written = started.elapsed();
    let applied = t.commit().await?;
    let more = more && !applied.is_empty();
    // The profile of a pass, for `LOG_LEVEL=warn,orchestrator::services::task_router=debug`.
    tracing::debug!(
        assigned = applied.len(),
        droplets_ms = droplets_read.as_secs_f64() * 1e3,
        tasks_ms = (tasks_read - droplets_read).as_secs_f64() * 1e3,
        plan_ms = (planned - tasks_read).as_secs_f64() * 1e3,
        write_ms = (written - planned).as_secs_f64() * 1e3,
        commit_ms = (started.elapsed() - written).as_secs_f64() * 1e3,
        "routing pass"
    );
    Ok(Pass {
        assigned: applied.len(),
        more,
        contended,
    })
}

/// The active droplets this pass may fill, with their load: each locked for the pass
/// (advisory, per droplet), those another replica is filling left out. Also whether any was.
async fn lock_droplets(t: &mut Transition<'_>) -> Result<(Vec<Slot>, bool), sqlx::Error> {
    // Locking the droplets we fill keeps two replicas from overfilling one droplet; a droplet
    // another replica is filling right now is skipped, never waited for. The locks are
    // advisory (per droplet, until this transaction ends), not row locks: a heartbeat, a
    // registration or an admin's change of the droplet's row never waits for a pass.
    // A droplet that pushed back (until its `Retry-After` has passed) or is being drained
    // takes no new work; one whose allowance was halved has that as its room.
    // The number of active droplets is counted in the same read, before the locks: a
    // droplet left out was locked elsewhere. (It was a statement of its own.)
    let mut candidates: Vec<Candidate> = sqlx::query_as!(
        Candidate,
        r#"SELECT d.id AS "id!", d.droplet_id AS "droplet_id!",
                COALESCE(d.capabilities, '[]'::jsonb) AS "capabilities!",
                LEAST(d.max_concurrent_tasks, d.in_flight_allowance) AS "max_concurrent_tasks?",
                d.last_heartbeat AS "last_heartbeat?",
                d.capability_schemas AS "capability_schemas?",
                0::bigint AS "load!", d.active AS "active!"
         FROM (SELECT *, COUNT(*) OVER () AS active FROM droplets WHERE status = 'active'
                 AND (deferred_until IS NULL OR deferred_until <= NOW())
                 AND drain_requested_at IS NULL
               ORDER BY id) d
         WHERE pg_try_advisory_xact_lock($1, d.id)"#,
        DROPLET_FILL,
    )
    .fetch_all(t.conn())
    .await?;
    // Their loads in one grouped read of the live tasks, after the locks: its snapshot sees
    // what another replica's pass committed under a lock before releasing it. (A count per
    // droplet was one scan per droplet per pass: 1,200 scans a second at 300 tasks/s with 50
    // droplets, each of the whole table while its statistics were young; counted inside the
    // locking statement by a volatile function, made the pass slower than this second
    // statement.)
    let ids: Vec<i32> = candidates.iter().map(|c| c.id).collect();
    if !ids.is_empty() {
        let loads: HashMap<i32, i64> = sqlx::query!(
            r#"SELECT assigned_droplet_id AS "droplet!", COUNT(*) AS "load!" FROM tasks
             WHERE status IN ('assigned', 'in_progress') AND assigned_droplet_id = ANY($1)
             GROUP BY assigned_droplet_id"#,
            &ids,
        )
        .fetch_all(t.conn())
        .await?
        .into_iter()
        .map(|r| (r.droplet, r.load))
        .collect();
        for c in &mut candidates {
            c.load = loads.get(&c.id).copied().unwrap_or(0);
        }
    }
    // None locked here at all: either none is active, or every one was locked elsewhere.
    let contended = match candidates.first() {
        Some(c) => c.active > candidates.len() as i64,
        None => active_droplets(t).await? > 0,
    };
    let slots: Vec<Slot> = candidates
        .into_iter()
        .map(|c| Slot {
            id: c.id,
            droplet_id: c.droplet_id,
            capabilities: c
                .capabilities
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            max: c.max_concurrent_tasks.map(i64::from),
            heartbeat: c.last_heartbeat,
            load: c.load,
            contracts: HashMap::new(),
            schemas: match c.capability_schemas {
                Some(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            },
        })
        .collect();
    Ok((slots, contended))
}

/// How many droplets are active now (for a pass that locked none: were any locked elsewhere?).
async fn active_droplets(t: &mut Transition<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!" FROM droplets WHERE status = 'active'
             AND (deferred_until IS NULL OR deferred_until <= NOW())
             AND drain_requested_at IS NULL"#
    )
    .fetch_one(t.conn())
    .await
}

/// The room of the droplets a pass holds, in all and per capability.
struct PassRoom {
    total: i64,
    per_capability: HashMap<String, i64>,
}

impl PassRoom {
    /// What the pass reads: per capability with room its share of a pass ('' for the tasks
    /// needing none, which any droplet with room takes), so the rows read are about the
    /// rows assigned.
    fn wanted(&self) -> Vec<(String, i64)> {
        let per_capability = (BATCH / self.per_capability.len().max(1) as i64).max(200);
        let mut wanted: Vec<(String, i64)> = self
            .per_capability
            .iter()
            .map(|(c, room)| (c.clone(), (*room).min(per_capability)))
            .collect();
        wanted.push((String::new(), self.total.min(BATCH)));
        wanted
    }

    /// Only capabilities with room are read, so piles nobody can run cost nothing.
    fn of(slots: &[Slot]) -> PassRoom {
        let mut room_per_capability: HashMap<String, i64> = HashMap::new();
        let mut total_room = 0i64;
        for s in slots {
            let room = s.room();
            if room == 0 {
                continue;
            }
            total_room += room;
            for c in &s.capabilities {
                *room_per_capability.entry(c.clone()).or_insert(0) += room;
            }
        }
        PassRoom {
            total: total_room,
            per_capability: room_per_capability,
        }
    }
}

/// How many tasks each key was assigned in this pass.
fn assigned_per_key(moves: &[Move], pending: &[PendingTask]) -> HashMap<String, i64> {
    let keys: HashMap<i32, &str> = pending.iter().map(|p| (p.id, p.key.as_str())).collect();
    let mut n: HashMap<String, i64> = HashMap::new();
    for m in moves {
        if let Some(k) = keys.get(&m.task_id) {
            *n.entry((*k).to_string()).or_insert(0) += 1;
        }
    }
    n
}

/// Payloads only of the tasks whose capability some droplet here has a contract for.
async fn contracted_payloads(
    t: &mut Transition<'_>,
    slots: &[Slot],
    pending: &[PendingTask],
) -> Result<HashMap<i32, serde_json::Value>, sqlx::Error> {
    let contracted: HashSet<&str> = slots
        .iter()
        .flat_map(|s| s.schemas.keys().map(String::as_str))
        .collect();
    let need_payload: Vec<i32> = pending
        .iter()
        .filter(|t| {
            t.required_capability
                .as_deref()
                .is_some_and(|c| contracted.contains(c))
        })
        .map(|t| t.id)
        .collect();
    Ok(if need_payload.is_empty() {
        HashMap::new()
    } else {
        sqlx::query!(
            r#"SELECT id, COALESCE(payload, '{}'::jsonb) AS "payload!" FROM tasks WHERE id = ANY($1)"#,
            &need_payload,
        )
        .fetch_all(t.conn())
        .await?
        .into_iter()
        .map(|r| (r.id, r.payload))
        .collect()
    })
}

/// The moves of this pass: each task to the least loaded capable droplet (freshest
/// heartbeat on ties), with why it was chosen; the slots' loads follow the choices.
fn plan(slots: &mut [Slot], pending: &[PendingTask], fit: &Fit) -> Vec<Move> {
    // The slots of each capability, in slot order, found once per pass: a task looks only at
    // the droplets that have its capability (any droplet for a task that needs none).
    let mut by_capability: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, slot) in slots.iter().enumerate() {
        for c in &slot.capabilities {
            by_capability.entry(c.clone()).or_default().push(i);
        }
    }
    let every: Vec<usize> = (0..slots.len()).collect();
    let mut moves = Vec::with_capacity(pending.len());
    for task in pending {
        let capable: &[usize] = match &task.required_capability {
            Some(c) => by_capability.get(c).map_or(&[], Vec::as_slice),
            None => &every,
        };
        let Some(choice) = choose(slots, capable, task, fit) else {
            continue;
        };
        let considered: Vec<serde_json::Value> = capable
            .iter()
            .map(|&i| &slots[i])
            .filter(|s| fits(s, task, fit))
            .take(10)
            .map(|s| json!({ "droplet_id": s.droplet_id, "load": s.load, "max_concurrent_tasks": s.max }))
            .collect();
        let chosen = &mut slots[choice];
        // One value for the history row and the event, shared, not copied.
        let why = Arc::new(json!({
            "router": {
                "chosen": chosen.droplet_id,
                "load_before": chosen.load,
                "rule": "least loaded capable active droplet, freshest heartbeat on ties",
                "required_capability": task.required_capability,
                "candidates": considered,
                "avoided_previous_droplet": task.last_droplet_id.is_some() && task.last_droplet_id != Some(chosen.id),
            }
        }));
        chosen.load += 1;
        let mut m = Move::new(task.id, Status::Assigned, Actor::System, "task_router");
        m.assign_to = Some(chosen.id);
        m.reason = Some(format!("routed to droplet {}", chosen.droplet_id));
        m.metadata = Some(why.clone());
        m.event_extra = Some(why);
        m.expect_status = Some(Status::Pending);
        moves.push(m);
    }
    moves
}

fn room_left(slots: &[Slot]) -> Room {
    let open: Vec<&Slot> = slots.iter().filter(|s| s.room() > 0).collect();
    Room {
        any: !open.is_empty(),
        capabilities: open
            .iter()
            .flat_map(|s| s.capabilities.iter().cloned())
            .collect(),
    }
}

/// Whether a droplet that has the task's capability (if it needs one) can take it now: room,
/// and its contract for that capability accepts the payload.
fn fits(slot: &Slot, task: &PendingTask, fit: &Fit) -> bool {
    slot.room() > 0
        && task
            .required_capability
            .as_ref()
            .is_none_or(|c| accepts(slot, c, task.id, fit))
}

/// Whether the droplet's contract for the capability (if it has one) accepts the payload.
fn accepts(slot: &Slot, capability: &str, task: i32, fit: &Fit) -> bool {
    match slot.contracts.get(capability) {
        None => true,
        Some(None) => false,
        Some(Some(contract)) => fit
            .payloads
            .get(&task)
            .is_some_and(|p| fit.memo.borrow_mut().accepts(contract, task, p)),
    }
}

/// The least loaded of the `capable` droplets that can take the task, freshest heartbeat on
/// ties, and not the droplet it last ran on when another one can take it.
fn choose(slots: &[Slot], capable: &[usize], task: &PendingTask, fit: &Fit) -> Option<usize> {
    let best = |avoid: Option<i32>| {
        capable
            .iter()
            .map(|&i| (i, &slots[i]))
            .filter(|(_, s)| fits(s, task, fit) && Some(s.id) != avoid)
            .min_by(|(_, a), (_, b)| a.load.cmp(&b.load).then(b.heartbeat.cmp(&a.heartbeat)))
            .map(|(i, _)| i)
    };
    best(task.last_droplet_id).or_else(|| best(None))
}

/// What one round of the `task_router` job did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RouterRound {
    pub assigned: usize,
    pub maintenance: task_recovery::Maintenance,
}

/// One round of the `task_router` job: due retries, deadlines and assignment timeouts
/// first (so what they free is routed in the same round), then a pass unless routing is
/// paused or stopped.
pub async fn run_once(state: &Routing) -> Result<RouterRound, sqlx::Error> {
    // What other replicas learned of droplets pushing back or drained holds here too.
    crate::services::dispatch::pushback::refresh(&state.db, &state.dispatch.holds).await?;
    let maintenance = task_recovery::maintain(state).await?;
    let assigned = if is_active(state) {
        route_pass(state).await?
    } else {
        0
    };
    Ok(RouterRound {
        assigned,
        maintenance,
    })
}

/// Whether routing is running: not paused and not stopped.
pub fn is_active(state: &Routing) -> bool {
    !state.router.is_paused() && !state.stop.is_on()
}

#[cfg(test)]
mod tests;
