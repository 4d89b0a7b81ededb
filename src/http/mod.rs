//! The HTTP API's pieces. So far its API keys: made, listed and revoked from the CLI, and
//! checked against a request's `Authorization` header; the daemon that serves the API is
//! built on them next.

pub mod keys;
