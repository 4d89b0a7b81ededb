//! The task queue (issue 8), landing in steps. This step: a task's life as a pure state
//! machine. The store (SQLite, then PostgreSQL), the workers and the CLI come next; until
//! they use it, only the tests do.

pub mod lifecycle;
pub mod store;
