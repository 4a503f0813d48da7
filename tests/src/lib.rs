//! The testbed (in progress).
