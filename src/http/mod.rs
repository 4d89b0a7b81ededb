//! The HTTP API: its settings, keys and sessions, the checks on every request, the
//! server and its routes and handlers. It runs in the `http` daemon only (roles::http);
//! the CLI uses `keys` alone.

pub mod client;
pub mod control;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod holder;
pub mod keys;
pub mod ledger_feed;
pub mod routes;
pub mod server;
pub mod serving;
pub mod session;
pub mod settings;
pub mod tls;
pub mod views;
