//! Integration tests: the real app over HTTP and WebSocket, a fresh PostgreSQL database each.

mod helpers;

mod smoke;

mod auth;
mod configuration;
mod database_faults;
mod droplets;
mod envelope;
mod public;
mod tasks;
mod dashboard;
mod cli;
mod openapi;
mod operations;
mod message;
mod metrics_api;
mod registry;
mod websocket;
mod routing;
mod recovery;
mod jobs;
mod management;
