//! The federation controller: the brain of one cluster.
//!
//! It reads only its own cluster (here: a catalog directory; see [`source`]), peers with the
//! controllers of the other clusters through their east-west gateways ([`peering`]), merges
//! its exports and theirs into one catalog with the MCS conflict rules ([`catalog`]), compiles
//! locality policy ([`policy`]), streams config to its proxies ([`xds`]) and runs the CA that
//! signs workload certificates ([`ca`]).

pub mod ca;
pub mod catalog;
pub mod clusterset;
pub mod config;
pub mod k8s;
pub mod objects;
pub mod peering;
pub mod peerlog;
pub mod policy;
pub mod policy_api;
pub mod rateshare;
pub mod resources;
mod run;
pub mod source;
pub mod xds;

pub use config::ControllerConfig;
pub use run::run;

/// The virtual port under which a controller's peering service is reached through its gateway.
pub const FEDERATION_PORT: u16 = 15012;
