//! The lab: runs an app under each scheduling mode in turn, drives it with
//! a built-in load generator, and reports throughput, latency and fairness.

pub mod load;
pub mod report;
