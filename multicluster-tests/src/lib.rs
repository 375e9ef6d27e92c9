//! End-to-end test support for Strait: the [`Mesh`] fixture starts N clusters on loopback
//! (`strait up --output json` as a real process tree) and hands back handles to every
//! component, plus clients that talk to the mesh the way an application would.
//!
//! Tests in `tests/` use only what is exported here; see `README.md` for the tiers.

mod client;
pub mod clusterset;
pub mod figures;
pub mod haproxy;
pub mod jaeger;
pub mod kube_bench;
pub mod load;
mod mesh;
mod metrics;
pub mod netem;
pub mod prometheus;

pub use client::{
    connect_tunnel, get_via, get_with, grpcurl_hello, request_with, tunnel_over, Answer, LoadReport, Outcome, Sample,
};
pub use mesh::{
    fresh_address_base, mcs_api, process_state, repo_dir, strait_bin, ClusterInfo, Mesh, MeshOptions, Scratch,
    WorkloadInfo,
};
pub use metrics::{metric_sum, scrape};
