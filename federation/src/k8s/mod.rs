//! The Kubernetes side of the controller: the Multi-Cluster Services API types, the source that
//! watches this cluster's Services, EndpointSlices and ServiceExports, and the writer of
//! ServiceImports. It reads and writes only its own cluster's API server.

pub mod crd;
mod imports;
pub mod inject;
pub mod objects;
mod source;

pub use imports::ImportWriter;
pub use objects::KubeObjects;
pub use source::KubeSource;

/// Field manager for everything the controller writes (server-side apply).
pub const FIELD_MANAGER: &str = "strait-federation";
/// Label on objects the controller owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "strait");
