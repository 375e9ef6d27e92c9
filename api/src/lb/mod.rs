//! The locality-aware load balancer, shared by sidecars (which pick an endpoint anywhere in the
//! clusterset) and gateways (which pick among their cluster's endpoints). Pure logic: callers
//! pass in the endpoints, their health, the time and the random numbers.
//!
//! Semantics follow Envoy (and so Istio): endpoints fall into priority levels by distance from
//! the caller; each level's health, scaled by the overprovisioning factor (1.4), decides how
//! much traffic it keeps, and the rest spills to the next level.

mod outlier;
mod priority;

pub use outlier::{FailurePercentage, Outcome, OutlierConfig, OutlierDetector, ServiceOutlier, Target};
pub use priority::{choose_at, priorities, priority_load, Candidate, DistributeRule, LbPolicy};
