//! Kafka-aware tools: `kpf kafka plan` (the broker listener lines, the kpf config and the cloud
//! console values for a cluster) and `kpf kafka verify` (proof, through the gateway, that every
//! advertised port reaches its own broker).

pub mod client;
pub mod plan;
pub mod verify;
