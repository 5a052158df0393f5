//! Probes of unreachable droplets (`task_recovery::unreachable` marks them): a cheap
//! `GET {endpoint}/health` with backoff (1 s, doubling, at most 60 s apart), on every
//! replica. Any HTTP answer, whatever its status, shows the droplet is there again: it is
//! made `active`, its counts start again, and it takes work. A registration brings it back
//! too; a heartbeat does not (it shows the droplet reaches us, not that we reach it).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::services::dispatch::Courier;
use crate::services::droplet_row::{droplet_of, droplet_record, Droplet};
use crate::services::endpoints;
use crate::services::events::{self, DropletEventKind, Event};

/// How often the list of unreachable droplets is read.
const TICK: Duration = Duration::from_secs(1);
/// The wait before a droplet's first probe, doubled after each that fails.
const FIRST_PROBE: Duration = Duration::from_secs(1);
/// The longest wait between two probes of one droplet.
const MAX_PROBE_GAP: Duration = Duration::from_secs(60);
/// Most droplets probed in one round.
const ROUND_LIMIT: i64 = 1000;

/// Probes unreachable droplets until shutdown.
pub async fn run(state: Courier, stop: CancellationToken) {
    // Per droplet (internal id): when it is probed next, and the gap after that.
    let mut due: HashMap<i32, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        // An emergency stop halts everything the orchestrator sends to droplets, probes too.
        if state.stop.is_on() {
            continue;
        }
        let rows: Vec<(i32, i32, String)> = match sqlx::query!(
            "SELECT id, droplet_id, endpoint FROM droplets WHERE unreachable_since IS NOT NULL
             ORDER BY id LIMIT $1",
            ROUND_LIMIT
        )
        .map(|r| (r.id, r.droplet_id, r.endpoint))
        .fetch_all(&state.db)
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the unreachable droplets; next round");
                continue;
            }
        };
        due.retain(|id, _| rows.iter().any(|r| r.0 == *id));
        let now = Instant::now();
        let mut probes = tokio::task::JoinSet::new();
        for (id, droplet_id, endpoint) in rows {
            let (at, gap) = due.entry(id).or_insert((now + FIRST_PROBE, FIRST_PROBE));
            if *at > now {
                continue;
            }
            *gap = (*gap * 2).min(MAX_PROBE_GAP);
            *at = now + *gap;
            let state = state.clone();
            probes.spawn(async move {
                if answers(&state, &endpoint).await {
                    if let Err(e) = reachable_again(&state, id).await {
                        tracing::warn!(droplet_id, error = %e, "could not bring an unreachable droplet back; probed again");
                    }
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { while probes.join_next().await.is_some() {} } => {}
        }
    }
}

/// Whether the endpoint gives any HTTP answer to `GET /health` within the dispatch timeout
/// (only to endpoints the orchestrator delivers to: their shape and every address).
async fn answers(state: &Courier, endpoint: &str) -> bool {
    if endpoints::check_delivery(endpoint, &state.policy).is_err() {
        return false;
    }
    let url = format!("{}/health", endpoint.trim_end_matches('/'));
    let timeout = Duration::from_secs(state.settings.current().dispatch_timeout_seconds);
    state
        .delivery
        .get(&url)
        .timeout(timeout)
        .send()
        .await
        .is_ok()
}

/// Ends a droplet's (internal id) unreachable mark: `active` again (unless an admin holds
/// it), its counts reset, with a `droplet_health_changed` event and a log line.
async fn reachable_again(state: &Courier, id: i32) -> Result<(), sqlx::Error> {
    struct Row {
        droplet: Droplet,
        previous_status: String,
    }
    let mut tx = state.db.begin().await?;
    let row: Option<Row> = droplet_record!(
        "WITH old AS (SELECT id AS old_id, status AS old_status FROM droplets WHERE id = $1 FOR NO KEY UPDATE),
         up AS (
            UPDATE droplets SET unreachable_since = NULL, failed_deliveries = 0,
                status = CASE WHEN droplets.status = 'error' AND NOT droplets.admin_deactivated
                              THEN 'active' ELSE droplets.status END,
                updated_at = NOW()
            FROM old WHERE droplets.id = old.old_id AND droplets.unreachable_since IS NOT NULL
            RETURNING droplets.*
         ) SELECT ",
        r#", old.old_status AS "previous_status!" FROM up JOIN old ON old.old_id = up.id"#,
        id
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| Row {
        previous_status: r.previous_status,
        droplet: droplet_of!(r),
    });
    let Some(row) = row else {
        // Brought back meanwhile (another replica's probe, a registration).
        return tx.rollback().await;
    };
    let reason = "answered a probe: reachable again, takes work";
    let event = Event::droplet(
        DropletEventKind::DropletHealthChanged,
        &row.droplet,
        Some(json!({ "previous_status": row.previous_status, "reason": reason })),
    );
    events::record(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.committed();
    tracing::info!(
        droplet_id = row.droplet.droplet_id,
        status = ?row.droplet.status,
        "unreachable droplet {reason}"
    );
    state.router.trigger();
    Ok(())
}
