//! RPC-aware routing of intercepted outbound connections.
//!
//! A connection whose original destination is a port of a `serviceEntries` address is
//! handled by that port's protocol ([`server`]): HTTP/1.1 and HTTP/2 (gRPC) requests and
//! Dubbo 2 requests are routed one by one by the `virtualServices` rules, TLS by the SNI of its ClientHello,
//! passed through untouched, TCP as opaque bytes; `AUTO` ports are inspected for a short
//! while (`--protocol-detection-timeout`, [`detect`]) and go opaque when the client says
//! nothing (server-first protocols). Every other destination is forwarded as opaque TCP
//! with no delay, exactly as without routing.
//!
//! The file is read at start (`--routes FILE`), again when it changes (checked every
//! second) and on `POST /routes/reload`. A file that does not parse or validate is refused
//! with an error naming the field, and the routes in force stay; requests in flight keep the
//! table they started with, and new requests on open connections use the new one.
//!
//! | file | what |
//! |---|---|
//! | `file.rs` | the YAML file's shape (Istio's ServiceEntry, VirtualService, DestinationRule) |
//! | `compile.rs` | file → [`Table`], or a [`CompileError`] naming the YAML path |
//! | `table.rs` | the compiled table: service ports, routes, matches, TLS rules |
//! | `balance.rs` | clusters and their endpoints: round robin, least-request, weights |
//! | `stats.rs` | route and cluster counters, kept by name across reloads |
//! | `reload.rs` | [`Routing`]: the table in force, reloaded on change; [`watch`] |
//! | `detect.rs` | what a client speaks, from its first bytes; the SNI of a ClientHello |
//! | `dubbo/` | Dubbo 2 frames and request bodies (`hessian.rs`: the Hessian 2 subset) |
//! | `server/` | [`RouteServer`]: serves a routed connection by protocol (`http.rs`, `dubbo.rs`, `tls.rs`, `tcp.rs`) |

pub mod balance;
pub mod compile;
pub mod detect;
pub mod dubbo;
pub mod file;
pub mod reload;
pub mod server;
pub mod stats;
pub mod table;

pub use balance::{pick_weighted, Cluster, Endpoint, WeightedCluster};
pub use compile::{compile, CompileError, Problem};
pub use file::{Lb, Protocol, RoutingFile};
pub use reload::{watch, RoutesError, RoutesProblem, Routing};
pub use server::http::HttpTimeouts;
pub use server::RouteServer;
pub use stats::{ClusterStats, RouteStats, RoutingStats};
pub use table::{is_service_address, HeaderOps, Match, Matcher, PortPlan, Route, Table, TlsRule};
