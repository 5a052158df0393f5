//! The spec's services: business rules over the database. No HTTP types and no import of
//! the layers above (`api`, `auth`, `udc`, `error`, `state`, `jobs`). Their parts are kept
//! in one [`Core`]; each service takes a handle to the parts it uses, built from it.

pub mod analytics;
pub mod config_reload;
pub mod config_source;
pub mod contract_directory;
pub mod contracts;
pub mod core;
pub mod create_queue;
pub mod dispatch;
pub mod drain_state;
pub mod droplet_admin;
pub mod droplet_drain;
pub mod droplet_row;
pub mod droplets;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod explain;
pub mod fair_pending;
pub mod fair_share;
pub mod health_monitor;
pub mod heartbeat_queue;
pub mod heartbeats;
pub mod http_client;
pub mod key_limits;
pub mod locks;
pub mod messaging;
pub mod new_task;
pub mod registry_client;
pub mod registry_status;
pub mod router_trigger;
pub mod shared_commit;
pub mod sql_columns;
pub mod state_machine;
pub mod status;
pub mod system_status;
pub mod table_statistics;
pub mod task_listing;
pub mod task_parts;
pub mod task_recovery;
pub mod task_router;
pub mod task_store;
pub mod task_updates;
pub mod tasks;
pub mod transition;
pub mod update_queue;

pub use self::core::Core;
