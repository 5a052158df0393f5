//! The HTTP surface: one module per resource, each exporting `router()`.

pub mod droplets;
pub mod health;
pub mod middleware;
pub mod tasks;
pub mod token;
