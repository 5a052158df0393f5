//! What `POST /message` answers: one shape per command, query and message type, so the
//! description tells a client exactly what each request gets back.
//!
//! The answers are told apart by their fields: `command` or `query` (each answer's own
//! name, a one-value enum, so that exactly one shape of the `oneOf` fits), or `acknowledged`
//! (a heartbeat) and `message_type` (an event or response received).

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::api::droplets::HeartbeatAck;
use crate::jobs::JobInfo;
use crate::services::droplets::Droplet;
use crate::services::registry_status::RegistrySnapshot;
use crate::services::status::Status;
use crate::services::system_status::LiveCounts;
use crate::services::tasks::Task;
use crate::udc::MessageType;

/// The answer of `POST /message`, by what the message was.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageAnswer {
    TaskCreated(TaskCreated),
    TaskCancelled(TaskCancelled),
    TaskStatus(Box<TaskStatusAnswer>),
    DropletList(DropletListAnswer),
    SystemStatus(Box<SystemStatusAnswer>),
    Heartbeat(HeartbeatReceived),
    Received(Received),
}

/// A one-value enum: the name an answer carries in `command` or `query`. (`tt`, not
/// `literal`: utoipa reads a `rename` only from a plain token, and a `literal` fragment
/// reaches it wrapped, so the schema said `Name`.)
macro_rules! answer_name {
    ($type:ident, $text:tt) => {
        #[doc = concat!("`\"", $text, "\"`")]
        #[derive(Debug, Clone, Copy, Serialize, ToSchema)]
        pub enum $type {
            #[serde(rename = $text)]
            Name,
        }
    };
}

answer_name!(CreateTaskName, "create_task");
answer_name!(CancelTaskName, "cancel_task");
answer_name!(TaskStatusName, "task_status");
answer_name!(DropletListName, "droplet_list");
answer_name!(SystemStatusName, "system_status");

/// `{"command":"create_task"}`: the task (`created` false when its trace id already named one).
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCreated {
    pub command: CreateTaskName,
    pub created: bool,
    pub task_id: i32,
    pub trace_id: Uuid,
    pub status: Status,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// `{"command":"cancel_task"}`: the task after its cancellation.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCancelled {
    pub command: CancelTaskName,
    pub task_id: i32,
    pub status: Status,
    #[schema(format = DateTime)]
    pub cancelled_at: Option<String>,
}

/// `{"query":"task_status"}`: one task, by id or trace id.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskStatusAnswer {
    pub query: TaskStatusName,
    pub task_id: i32,
    pub trace_id: Uuid,
    pub status: Status,
    pub task: Task,
}

/// `{"query":"droplet_list"}`: the droplets, filtered by `status` and `capability`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DropletListAnswer {
    pub query: DropletListName,
    pub droplets: Vec<Droplet>,
    pub total: usize,
}

/// `{"query":"system_status"}`: the process, the live counts, the scheduler and the Registry.
#[derive(Debug, Serialize, ToSchema)]
pub struct SystemStatusAnswer {
    pub query: SystemStatusName,
    /// `maintenance` during an emergency stop, else `active`.
    #[schema(example = "active")]
    pub status: &'static str,
    pub cpu_percent: f32,
    pub memory_mb: f64,
    pub uptime_seconds: u64,
    pub custom_metrics: CustomMetrics,
    pub scheduler: SchedulerState,
    pub registry: RegistrySnapshot,
}

/// The live counts, and the WebSocket clients connected to this process.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomMetrics {
    #[serde(flatten)]
    pub counts: LiveCounts,
    pub websocket_connections: usize,
}

/// The scheduler of this process and its jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerState {
    pub running: bool,
    pub emergency_stopped: bool,
    pub jobs: Vec<JobInfo>,
}

/// A heartbeat sent as a message: `POST /droplets/{id}/heartbeat`'s answer, and `received`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatReceived {
    pub received: bool,
    #[serde(flatten)]
    pub ack: HeartbeatAck,
}

/// An event or a response: received, nothing else done.
#[derive(Debug, Serialize, ToSchema)]
pub struct Received {
    pub received: bool,
    pub message_type: MessageType,
}
