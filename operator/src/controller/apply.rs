//! Step 4, apply: server-side apply of the children the plan asks for, with the operator's one field
//! manager (forced: the operator owns these fields). Only ever called for children the pipeline controls
//! (or that do not exist), and only while this replica leads.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use tracing::debug;

use super::plan::Writes;
use crate::build::{self, ValidatedPipeline};
use crate::status::Problem;

/// Apply the ConfigMap, then the Deployment with `replicas`, as `writes` asks. `Ok(())` when every
/// requested write succeeded; otherwise [`Problem::ChildApplyFailed`] naming the object and the
/// apiserver's answer (denied by admission, a quota, a webhook...), retried at the next poll.
pub async fn apply(
    client: &Client,
    field_manager: &str,
    v: &ValidatedPipeline,
    writes: Writes,
    replicas: i32,
) -> Result<(), Problem> {
    let ns = v.namespace.as_str();
    let child = build::child_name(&v.name);
    let pp = PatchParams::apply(field_manager).force();
    let failed = |kind: &'static str, e: kube::Error| Problem::ChildApplyFailed {
        message: format!("applying {kind} {ns}/{child}: {e}"),
    };
    if writes.config_map {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        api.patch(&child, &pp, &Patch::Apply(build::config_map(v))).await.map_err(|e| failed("ConfigMap", e))?;
        debug!("applied ConfigMap");
    }
    if writes.deployment {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        api.patch(&child, &pp, &Patch::Apply(build::deployment(v, replicas)))
            .await
            .map_err(|e| failed("Deployment", e))?;
        debug!(replicas, "applied Deployment");
    }
    Ok(())
}
