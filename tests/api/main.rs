//! Integration tests: the real app over HTTP and WebSocket, a fresh PostgreSQL database each.

mod helpers;
#[path = "../common/proxy.rs"]
mod proxy;

mod smoke;

mod auth;
mod cli;
mod configuration;
mod contract_order;
mod contracts_cost;
mod contracts_explain;
mod create_cost;
mod dashboard;
mod database_faults;
mod dispatch;
mod drain;
mod droplets;
mod edge_security;
mod envelope;
mod event_log;
mod fairness;
mod fixture_droplet;
mod jobs;
mod layers;
mod listing;
mod management;
mod mesh_dispatch;
mod message;
mod metrics_api;
mod nul_text;
mod openapi;
mod operations;
mod own_identity;
mod own_tasks;
mod public;
mod pushback;
mod real_mesh;
mod recovery;
mod refusals_explained;
mod registry;
mod relay;
mod replay;
mod requeues;
mod rollups;
mod routing;
mod simulator;
mod task_updates;
mod tasks;
mod unreachable;
mod websocket;
