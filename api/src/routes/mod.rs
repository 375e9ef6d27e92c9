//! Routes as data: Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) for mesh (GAMMA).
//!
//! - [`spec`]: the upstream schema's fields Strait supports, as serde types (camelCase, the
//!   same YAML a user writes for any GAMMA implementation).
//! - [`compile`]: a route checked field by field and turned into match tables (regexes built,
//!   durations parsed, weights summed) once, when config arrives; every error names its field
//!   path and the fix, and says which Gateway API condition it sets (`Accepted` or
//!   `ResolvedRefs`).
//! - [`grpc`]: `GRPCRoute`, carried out as the equivalent HTTPRoute (a method match is a
//!   path match on `/<service>/<method>`).
//! - [`matching`]: which rule of which route a request takes, with Gateway API's precedence,
//!   and the weighted choice of a backend. Plain functions over plain data; the proxies only
//!   read what `compile` built.

pub mod compile;
pub mod grpc;
pub mod matching;
pub mod spec;

pub use compile::{
    compile_route, route_services, Backend, BackendLookup, CompiledRoute, CompiledRule, RouteError, RouteErrorKind,
};
pub use grpc::GrpcRouteSpec;
pub use matching::{pick_backend, RequestView, RouteTable};
pub use spec::HttpRouteSpec;
