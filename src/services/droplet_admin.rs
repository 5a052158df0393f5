//! An admin's hand on a droplet: activate (back into routing) or deactivate (held out of
//! routing until activated, its work taken away), each in one transaction with its events.

use serde::Serialize;

use crate::identity::Principal;
use crate::services::droplets::{self, Droplet};
use crate::services::error::Result;
use crate::services::status::DropletStatus;
use crate::services::task_recovery;
use crate::services::transition::{Changes, Transition};

/// What an activation or deactivation did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AdminChange {
    pub droplet_id: i32,
    pub status: DropletStatus,
    pub previous_status: DropletStatus,
    pub held_until_activated: bool,
    pub tasks_recovered: usize,
}

/// Activates or deactivates a droplet. Deactivating takes its tasks away (with
/// `ENABLE_AUTO_RECOVERY`) in the same transaction as the status change, so no pass can
/// find the droplet inactive with work still assigned to it; activating wakes the router.
pub async fn set_active(
    core: &Changes,
    caller: &Principal,
    droplet_id: i32,
    activate: bool,
) -> Result<AdminChange> {
    let mut t = Transition::begin(core).await?;
    let (droplet, previous): (Droplet, DropletStatus) =
        droplets::set_admin_status(t.conn(), caller, droplet_id, activate).await?;
    let mut recovered = 0;
    if activate {
        t.wake_router();
    } else if core.settings.current().enable_auto_recovery {
        recovered =
            task_recovery::recover_in(&mut t, droplet.internal_id, droplet.droplet_id, false)
                .await?;
    }
    t.commit().await?;
    Ok(AdminChange {
        droplet_id: droplet.droplet_id,
        status: droplet.status,
        previous_status: previous,
        held_until_activated: !activate,
        tasks_recovered: recovered,
    })
}
