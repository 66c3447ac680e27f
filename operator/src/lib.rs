//! kpipe operator: reconciles `ConsumerPipeline`s into worker ConfigMaps and Deployments and scales
//! the workers on consumer-group lag.
//!
//! Decisions are pure and tested on their own ([`scaler`], [`lag`], [`build`], [`status`]); I/O stays
//! at the edges ([`probe`], [`controller`]).

pub mod build;
pub mod cache_ready;
pub mod certificate;
pub mod controller;
pub mod deadletters;
pub mod group_offsets;
pub mod keepalive;
pub mod lag;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod probe;
pub mod rbac;
pub mod replay;
pub mod scaler;
pub mod secured_offsets;
pub mod sim;
pub mod stall;
pub mod status;
pub mod throughput;
pub mod topic_identity;
pub mod workers;
