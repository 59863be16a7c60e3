//! Runtime metrics.
