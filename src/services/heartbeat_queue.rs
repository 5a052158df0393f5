//! What concurrent heartbeats wait with to share one statement and one commit
//! (`heartbeats::heartbeat`, over [`SharedCommit`]), as `create_queue.rs` is for creations.

use serde_json::Value;

use crate::services::droplet_row::Droplet;
use crate::services::shared_commit::SharedCommit;
use crate::services::status::DropletStatus;

/// A heartbeat waiting to share a statement with others (one per droplet in a batch).
#[derive(Debug, Clone)]
pub struct BeatRow {
    pub droplet_id: i32,
    /// The droplet's status after it (unless an admin holds it).
    pub new_status: String,
    /// The status the droplet reported, for its `heartbeats` row.
    pub reported: String,
    pub metrics: Option<Value>,
    /// The id form its envelope showed, if any.
    pub id_form: Option<String>,
}

/// The droplet after its heartbeat, and its status before.
#[derive(Debug)]
pub struct Beat {
    pub droplet: Droplet,
    pub previous_status: DropletStatus,
}

/// The heartbeat's answer: the droplet after it, or `None` when there is no such droplet.
pub type Beaten = Result<Option<Beat>, sqlx::Error>;
/// Heartbeats waiting to share a statement.
pub type HeartbeatQueue = SharedCommit<BeatRow, Beaten>;
