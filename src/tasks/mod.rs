//! The task queue: a durable priority queue that the free workflows execute.
//!
//! - `lifecycle`: a task's life, a pure state machine; `scheduler`: who gets the next task,
//!   and why a task waits (pure); `cpu`: the CPU each worker's tasks use, which it weighs.
//! - `store`: SQLite (WAL) in the state directory; `postgres`: the same queue in PostgreSQL,
//!   shared by hosts; `pg_url`: what its `queue_url` asks for (TLS); `settings`: the
//!   config's task keys.
//! - `queue`: the owner of the queue, a thread of the master serving `tasks.sock`.
//! - `worker`: a free workflow running tasks; `cgroups`: the cgroup each of its running
//!   tasks has to itself; `wire`: the messages between them and the CLI; `view`: a task
//!   as JSON.

pub mod backend;
pub mod cgroups;
pub mod cpu;
pub mod lifecycle;
pub mod pg_url;
pub mod postgres;
pub mod queue;
pub mod scheduler;
pub mod settings;
pub mod store;
pub mod view;
pub mod wire;
pub mod worker;
