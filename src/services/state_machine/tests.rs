use super::*;
use Actor::*;
use Status::*;

const ACTORS: [Actor; 5] = [System, AssignedDroplet, Creator, Admin, Other];
const CAUSES: [Cause; 9] = [
    Cause::Drained,
    Cause::Refused,
    Cause::RefusedCredentials,
    Cause::NeverStarted,
    Cause::Normal,
    Cause::Requeue,
    Cause::Retry,
    Cause::Deadline,
    Cause::DropletLost,
];

/// The contract's table, written out once more as the list of every allowed triple.
fn expected(from: Status, to: Status, actor: Actor, cause: Cause) -> bool {
    let allowed: &[(Status, Status, Actor, Cause)] = &[
        (Pending, Assigned, System, Cause::Normal),
        (Pending, Cancelled, Creator, Cause::Normal),
        (Pending, Cancelled, Admin, Cause::Normal),
        (Assigned, Cancelled, Creator, Cause::Normal),
        (Assigned, Cancelled, Admin, Cause::Normal),
        (Assigned, InProgress, AssignedDroplet, Cause::Normal),
        (Assigned, InProgress, Admin, Cause::Normal),
        (InProgress, Completed, AssignedDroplet, Cause::Normal),
        (InProgress, Completed, Admin, Cause::Normal),
        (InProgress, Failed, AssignedDroplet, Cause::Normal),
        (InProgress, Failed, Admin, Cause::Normal),
        (InProgress, Failed, System, Cause::DropletLost),
        (InProgress, Failed, System, Cause::Deadline),
        (Assigned, Pending, System, Cause::Requeue),
        (Failed, Pending, System, Cause::Retry),
        (Pending, Failed, System, Cause::Deadline),
        (Assigned, Failed, System, Cause::Deadline),
        (Assigned, Failed, System, Cause::Refused),
        (Assigned, Pending, System, Cause::Refused),
        (Assigned, Pending, System, Cause::RefusedCredentials),
        (Assigned, Failed, System, Cause::NeverStarted),
        (Assigned, Pending, System, Cause::Drained),
        (InProgress, Pending, System, Cause::Drained),
    ];
    // Cancelling is a user's act whatever cause the caller gave.
    allowed.contains(&(from, to, actor, cause))
        || (to == Cancelled
            && matches!(from, Pending | Assigned)
            && matches!(actor, Creator | Admin))
}

#[test]
fn every_pair_actor_and_cause_follows_the_table() {
    for from in ALL_STATUSES {
        for to in ALL_STATUSES {
            for actor in ACTORS {
                for cause in CAUSES {
                    assert_eq!(
                        allowed(from, to, actor, cause),
                        expected(from, to, actor, cause),
                        "{from:?} -> {to:?} by {actor:?} ({cause:?})"
                    );
                }
            }
        }
    }
}

#[test]
fn finished_tasks_never_move_except_a_retry() {
    for to in ALL_STATUSES {
        for actor in ACTORS {
            for cause in CAUSES {
                assert!(!allowed(Completed, to, actor, cause));
                assert!(!allowed(Cancelled, to, actor, cause));
                if to != Pending {
                    assert!(!allowed(Failed, to, actor, cause));
                }
            }
        }
    }
}

#[test]
fn a_running_task_cannot_be_cancelled() {
    for actor in ACTORS {
        assert!(!allowed(InProgress, Cancelled, actor, Cause::Normal));
    }
}

#[test]
fn events_are_named_as_the_contract_says() {
    assert_eq!(event_for(None, Pending).as_str(), "task_created");
    assert_eq!(event_for(Some(Assigned), Pending).as_str(), "task_requeued");
    assert_eq!(
        event_for(Some(InProgress), Pending).as_str(),
        "task_requeued"
    );
    assert_eq!(event_for(Some(Failed), Pending).as_str(), "task_retrying");
    assert_eq!(event_for(Some(Pending), Assigned).as_str(), "task_assigned");
    assert_eq!(
        event_for(Some(Assigned), InProgress).as_str(),
        "task_started"
    );
    assert_eq!(
        event_for(Some(InProgress), Completed).as_str(),
        "task_completed"
    );
    assert_eq!(event_for(Some(InProgress), Failed).as_str(), "task_failed");
    assert_eq!(
        event_for(Some(Pending), Cancelled).as_str(),
        "task_cancelled"
    );
}

#[test]
fn statuses_round_trip() {
    for s in ALL_STATUSES {
        assert_eq!(Status::parse(s.as_str()), Some(s));
    }
    assert_eq!(Status::parse("done"), None);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(ALL_STATUSES.to_vec())
    }
    fn actor() -> impl Strategy<Value = Actor> {
        proptest::sample::select(ACTORS.to_vec())
    }
    fn cause() -> impl Strategy<Value = Cause> {
        proptest::sample::select(CAUSES.to_vec())
    }

    proptest! {
        /// Random moves by random actors, applied only when `allowed` says so, never
        /// reach a state the contract forbids.
        #[test]
        fn random_moves_never_reach_a_forbidden_state(
            moves in proptest::collection::vec((status(), actor(), cause()), 0..60),
            max_retries in 0i32..4,
        ) {
            let mut current = Pending;
            let mut path = vec![Pending];
            let mut retries = 0;
            for (to, actor, cause) in moves {
                // The retry rule lives with the job: only while retries remain.
                let retry_left = !(current == Failed && to == Pending) || retries < max_retries;
                if !(allowed(current, to, actor, cause) && retry_left) {
                    continue;
                }
                prop_assert!(expected(current, to, actor, cause));
                prop_assert!(!matches!(current, Completed | Cancelled), "moved out of {current:?}");
                match to {
                    InProgress => prop_assert_eq!(current, Assigned),
                    Completed => prop_assert_eq!(current, InProgress),
                    Assigned => prop_assert_eq!(current, Pending),
                    Cancelled => prop_assert!(matches!(current, Pending | Assigned)),
                    Pending => prop_assert!(matches!(current, Assigned | InProgress | Failed)),
                    Failed => prop_assert!(matches!(current, Pending | Assigned | InProgress)),
                }
                // Only the system assigns, requeues, retries; a droplet's own moves are
                // start, complete and fail.
                if matches!(to, Assigned | Pending) {
                    prop_assert_eq!(actor, System);
                }
                if current == Failed {
                    retries += 1;
                }
                current = to;
                path.push(to);
            }
            prop_assert!(retries <= max_retries);
            prop_assert_eq!(path[0], Pending);
        }
    }
}
