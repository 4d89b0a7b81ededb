//! The roles. Each is one event loop over its own sources.

pub mod communicator;
pub mod http;
pub mod master;
pub mod master_watch;
pub mod watchdog;
pub mod workflow;
