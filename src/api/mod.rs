//! The HTTP surface: one module per resource, each exporting `router()`.

pub mod droplets;
pub mod health;
pub mod message;
pub mod metrics;
pub mod middleware;
pub mod tasks;
pub mod token;
pub mod openapi;
pub mod prometheus;
pub mod ratelimit;
pub mod dashboard;
pub mod ws;
pub mod management;
