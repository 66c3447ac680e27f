//! kpipe worker (placeholder until the worker issue lands).
