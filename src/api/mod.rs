//! The HTTP surface: one module per resource, each exporting `router()`.

pub mod dashboard;
pub mod drain;
pub mod droplets;
pub mod health;
pub mod limits;
pub mod management;
pub mod message;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod prometheus;
pub mod ratelimit;
pub mod tasks;
pub mod token;
pub mod ws;
