//! kpipe operator (placeholder until the operator issue lands).
