//! kpipe end-to-end test bed support.
//!
//! * [`kubelet`]: the process kubelet (`kpipe-kubelet` binary) that runs Pods as local processes.
//! * [`testbed`]: the test-support API ([`TestBed::connect`], temp namespaces, Kafka helpers, wait helpers).
//!
//! The bed itself (etcd, kube-apiserver, kube-controller-manager, Kafka, kubelet) is started by
//! `e2e/testbed/up.sh`; see `e2e/README.md`.

pub mod kubelet;
pub mod scenario;
pub mod testbed;

pub use testbed::{TempNamespace, TestBed, TestBedError};
