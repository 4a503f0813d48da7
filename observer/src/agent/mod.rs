//! `observer run`: the agent that wires probes, identity, correlation and export.
pub mod config;
