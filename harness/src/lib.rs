//! The chaos harness.
