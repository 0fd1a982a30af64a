//! Redis side of the relay: the connection pool, the member encoding and the
//! pipelined ZADD that reports its outcome per entry. `rediss://` URLs are
//! TLS (rustls), checked against the system's roots or `redis.tls_ca_file`.

pub mod durability;
pub mod keys;
pub mod memory;
pub mod node;
pub mod permissions;
pub mod pipeline;
pub mod sentinel;

mod conn;
mod connect;
mod reply;
mod slots;

pub use conn::{
    ClusterConn, ClusterManager, DirectConn, Discardable, Redis, RedisConn, RedisPool, StandaloneConn,
    StandaloneManager,
};
pub use connect::{check_permissions, connect_config, durability_risk, ping, pool, standalone_client, RedisSetupError};
pub use slots::{cluster_slots, parse_cluster_slots, SlotRange};
