//! The user's programs, hosted by the workflows: what a service is (`spec`), the life of
//! an instance (`machine`, pure), and the I/O around it — its process tree (`tree`), its
//! output (`output`), its probes (`probes`), its sd_notify socket (`notify_socket`), what
//! survives a workflow (`state`), and the host that ties them together in a workflow's
//! loop (`host`).

pub mod host;
pub mod identity;
pub mod keeper;
pub mod machine;
pub mod notify_socket;
pub mod output;
pub mod probes;
pub mod spec;
pub mod state;
pub mod tree;
