//! What the tasks service (`tasks.rs`: creation, PATCH, cancel) uses of the shared parts.

use std::ops::Deref;
use std::sync::Arc;

use crate::services::contract_directory::ContractDirectory;
use crate::services::contracts::Contracts;
use crate::services::create_queue::CreateQueue;
use crate::services::key_limits::Limits;
use crate::services::transition::Changes;
use crate::services::update_queue::UpdateQueue;
use crate::services::Core;

/// Those of a change of tasks (every creation, PATCH and cancel goes through
/// `transition::Transition`; the router's trigger and the settings are among them), the
/// creations' queue, the contracts a payload is checked against (the directory of the
/// registered droplets' and their compiled form), and the limits per key (`max_queued`).
/// Each part is shared, so a clone is cheap: a creation's leader takes one.
#[derive(Clone)]
pub struct Tasks {
    pub changes: Changes,
    pub creates: Arc<CreateQueue>,
    /// PATCHes waiting to share a transaction (`task_updates`).
    pub updates: Arc<UpdateQueue>,
    pub directory: Arc<ContractDirectory>,
    pub contracts: Arc<Contracts>,
    pub limits: Limits,
}

impl Core {
    /// The parts the tasks service uses.
    pub fn tasks(&self) -> Tasks {
        Tasks {
            changes: self.changes(),
            creates: self.creates.clone(),
            updates: self.updates.clone(),
            directory: self.directory.clone(),
            contracts: self.contracts.clone(),
            limits: self.key_limits(),
        }
    }
}

/// A creation, a PATCH or a cancel is a change of tasks: the transition's parts are theirs.
impl Deref for Tasks {
    type Target = Changes;
    fn deref(&self) -> &Changes {
        &self.changes
    }
}
