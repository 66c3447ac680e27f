//! kpipe end-to-end test bed support.
//!
//! * [`kubelet`]: the process kubelet (`kpipe-kubelet` binary) that runs Pods as local processes.
//! * [`oidc`]: the bed's OpenID Connect issuer (`kpipe-test-oidc` binary) for the OAUTHBEARER listener.
//! * [`testbed`]: the test-support API ([`TestBed::connect`], temp namespaces, Kafka helpers, wait helpers).
//!
//! The bed itself (etcd, kube-apiserver, kube-controller-manager, Kafka, kubelet) is started by
//! `e2e/testbed/up.sh`; see `e2e/README.md`. The same suites run on a kind cluster (`make e2e-kind`,
//! `e2e/kind/run.sh`): every suite takes its cluster, Kafka addresses and images from one env file
//! (`$KPIPE_RUN/env`, [`testbed::default_env_file`]) through [`bed()`]; [`ClusterKind`] says which one it is.

pub mod kubelet;
pub mod lanes;
pub mod oidc;
pub mod scenario;
pub mod testbed;

pub use testbed::{ClusterKind, TempNamespace, TestBed, TestBedError, TestImage, bed, unique_name};
