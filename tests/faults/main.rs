//! Fault injection: the real binary as child processes over fresh PostgreSQL databases,
//! driven by simulated droplets over real HTTP, with each fault injected and the task
//! invariants checked in the database afterwards. The scenarios are slow and load the
//! machine, so they are `#[ignore]`d; `.ci/run` runs them one at a time:
//! `cargo test --test faults -- --include-ignored --test-threads 1`.

#[path = "../api/helpers.rs"]
#[allow(unused_imports)]
mod helpers;

mod fleet;
mod harness;
mod invariants;
#[path = "../common/proxy.rs"]
mod proxy;

mod chaos;
mod database_cut;
mod freeze;
mod jitter;
mod kill;
mod replicas;
mod sigterm;
