//! Every advisory lock the orchestrator takes, declared in one place so no two share an id.
//!
//! PostgreSQL keeps two lock spaces apart: one keyed by a single `bigint` (the singleton
//! rounds below) and one keyed by two `int`s (`DROPLET_FILL`, whose second key is a droplet).
//! A lock of one space never blocks a lock of the other.

use sqlx::PgConnection;

/// A round that must run on one replica at a time. Each is held for its transaction only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Singleton {
    /// Deadlines, assignment timeouts and due retries (`task_recovery::maintain`).
    Maintenance,
    /// The health monitor's round (`health_monitor::run_once`).
    HealthRound,
    /// The heartbeat cleanup job (`health_monitor::cleanup_old_heartbeats`).
    HeartbeatCleanup,
    /// A round of the event relay (`events::relay::publish_round`).
    EventRelay,
    /// Folding the tasks' rollup changes (`analytics::rollups::fold`).
    RollupFold,
}

impl Singleton {
    pub const ALL: [Singleton; 5] = [
        Singleton::Maintenance,
        Singleton::HealthRound,
        Singleton::HeartbeatCleanup,
        Singleton::EventRelay,
        Singleton::RollupFold,
    ];

    /// The lock's key in the single-`bigint` space.
    pub const fn id(self) -> i64 {
        match self {
            Singleton::Maintenance => 0x0A5C_0010,
            Singleton::HealthRound => 0x0A5C_0011,
            // The relay kept its id when the two were told apart (they had shared 0x0A5C_0012):
            // during a rolling upgrade old and new replicas still exclude each other's relay
            // rounds, while two cleanups at once only delete the same old rows.
            Singleton::EventRelay => 0x0A5C_0012,
            Singleton::HeartbeatCleanup => 0x0A5C_0013,
            Singleton::RollupFold => 0x0A5C_0014,
        }
    }

    /// Takes the lock for the caller's transaction if no one holds it; false when another
    /// replica does (the caller skips its round, never waits).
    pub async fn try_for_transaction(self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock($1) AS "locked!""#,
            self.id()
        )
        .fetch_one(conn)
        .await
    }
}

/// The first key of "a routing pass is filling this droplet" in the two-`int` space; the
/// second key is the droplet's internal id.
pub const DROPLET_FILL: i32 = 0x0A5C_0011;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_singleton_lock_has_its_own_id() {
        let mut ids: Vec<i64> = Singleton::ALL.iter().map(|l| l.id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            Singleton::ALL.len(),
            "two singleton locks share an id"
        );
    }

    #[test]
    fn all_lists_every_singleton() {
        // A new variant must be added to ALL, or the test above would not see it.
        for lock in Singleton::ALL {
            match lock {
                Singleton::Maintenance
                | Singleton::HealthRound
                | Singleton::HeartbeatCleanup
                | Singleton::EventRelay
                | Singleton::RollupFold => {}
            }
        }
        assert_eq!(Singleton::ALL.len(), 5);
    }
}
