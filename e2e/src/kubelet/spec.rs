//! Turning a pod spec into something runnable: environment (incl. `valueFrom`), volumes materialised into the
//! pod folder, `$(VAR)` expansion, and the per-container launcher script that bind-mounts volumes at their
//! `mountPath` inside the pod's private mount namespace.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, ObjectFieldSelector, Pod, Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

use super::KubeletError;

/// Facts about the running pod that the downward API exposes.
#[derive(Debug, Clone)]
pub struct PodFacts {
    /// Pod IP.
    pub pod_ip: String,
    /// Node (host) IP.
    pub host_ip: String,
}

type Data = BTreeMap<String, Vec<u8>>;

fn cfg_err(msg: impl Into<String>) -> KubeletError {
    KubeletError::PodConfig(msg.into())
}

fn io_err(path: &Path, source: std::io::Error) -> KubeletError {
    KubeletError::Io { path: path.to_path_buf(), source }
}

async fn configmap_data(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<Data>, KubeletError> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(cm) => {
            let mut out: Data = cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            out.extend(cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            Ok(Some(out))
        }
        None if optional => Ok(None),
        None => Err(cfg_err(format!("configmap \"{name}\" not found"))),
    }
}

async fn secret_data(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<Data>, KubeletError> {
    match Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(s) => {
            let mut out: Data = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            out.extend(s.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())));
            Ok(Some(out))
        }
        None if optional => Ok(None),
        None => Err(cfg_err(format!("secret \"{name}\" not found"))),
    }
}

/// Value of a downward-API field path.
pub fn field_value(pod: &Pod, sel: &ObjectFieldSelector, facts: &PodFacts) -> Result<String, KubeletError> {
    let md = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = sel.field_path.as_str();
    let label_like = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    let v = match path {
        "metadata.name" => md.name.clone().unwrap_or_default(),
        "metadata.namespace" => md.namespace.clone().unwrap_or_default(),
        "metadata.uid" => md.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        "metadata.labels" => fmt_map(&md.labels),
        "metadata.annotations" => fmt_map(&md.annotations),
        _ => label_like("metadata.labels['", &md.labels)
            .or_else(|| label_like("metadata.annotations['", &md.annotations))
            .ok_or_else(|| cfg_err(format!("unsupported fieldRef {path}")))?,
    };
    Ok(v)
}

fn fmt_map(m: &Option<BTreeMap<String, String>>) -> String {
    m.iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

/// Expands `$(NAME)` references (and `$$` escapes) like the kubelet does; unknown references stay verbatim.
pub fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Resolves a container's environment in declaration order (`envFrom` first, then `env`).
pub async fn resolve_env(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
) -> Result<Vec<(String, String)>, KubeletError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut map: HashMap<String, String> = HashMap::new();
    let set = |vars: &mut Vec<(String, String)>, map: &mut HashMap<String, String>, k: String, v: String| {
        map.insert(k.clone(), v.clone());
        vars.retain(|(n, _)| n != &k);
        vars.push((k, v));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            configmap_data(client, &ns, &r.name, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &from.secret_ref {
            secret_data(client, &ns, &r.name, r.optional.unwrap_or(false)).await?
        } else {
            None
        };
        for (k, v) in data.unwrap_or_default() {
            set(&mut vars, &mut map, format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
        }
    }
    for e in container.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match configmap_data(client, &ns, &r.name, optional).await?.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if optional => continue,
                    None => return Err(cfg_err(format!("key \"{}\" not found in configmap \"{}\"", r.key, r.name))),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match secret_data(client, &ns, &r.name, optional).await?.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if optional => continue,
                    None => return Err(cfg_err(format!("key \"{}\" not found in secret \"{}\"", r.key, r.name))),
                }
            } else if let Some(f) = &from.field_ref {
                field_value(pod, f, facts)?
            } else if let Some(r) = &from.resource_field_ref {
                let res = container.resources.as_ref();
                let q = match r.resource.split_once('.') {
                    Some(("limits", name)) => res.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)),
                    Some(("requests", name)) => res.and_then(|r| r.requests.as_ref()).and_then(|m| m.get(name)),
                    _ => None,
                };
                q.map(|q| q.0.clone()).unwrap_or_else(|| "0".to_string())
            } else {
                return Err(cfg_err(format!("env {}: unsupported valueFrom", e.name)));
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &map)
        };
        set(&mut vars, &mut map, e.name.clone(), value);
    }
    Ok(vars)
}

fn write_file(path: &Path, bytes: &[u8], mode: i32) -> Result<(), KubeletError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))?;
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o7777;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io_err(path, e))
}

fn safe_rel(p: &str) -> Result<&str, KubeletError> {
    if p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(cfg_err(format!("volume item path {p:?} must be relative without '..'")));
    }
    Ok(p)
}

fn write_keys(
    dir: &Path,
    data: &Data,
    items: &Option<Vec<KeyToPath>>,
    mode: i32,
    optional: bool,
) -> Result<(), KubeletError> {
    match items {
        Some(items) => {
            for it in items {
                match data.get(&it.key) {
                    Some(v) => write_file(&dir.join(safe_rel(&it.path)?), v, it.mode.unwrap_or(mode))?,
                    None if optional => {}
                    None => return Err(cfg_err(format!("volume item key \"{}\" not found", it.key))),
                }
            }
        }
        None => {
            for (k, v) in data {
                write_file(&dir.join(safe_rel(k)?), v, mode)?;
            }
        }
    }
    Ok(())
}

/// Requests a pod-bound token for the pod's service account.
pub async fn service_account_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<String>,
    expiration_seconds: i64,
) -> Result<String, KubeletError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".to_string());
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let out = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &tr)
        .await?;
    out.status
        .map(|s| s.token)
        .ok_or_else(|| cfg_err(format!("token request for service account {ns}/{sa} returned no token")))
}

/// Materialises every supported volume of the pod under `<pod_dir>/volumes/<name>`; returns name → folder.
pub async fn materialize_volumes(
    client: &kube::Client,
    pod: &Pod,
    pod_dir: &Path,
    facts: &PodFacts,
) -> Result<HashMap<String, PathBuf>, KubeletError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = HashMap::new();
    let vols = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    for v in vols {
        let dir = pod_dir.join("volumes").join(&v.name);
        if v.empty_dir.is_some() {
            // emptyDir survives container restarts: create once, never wipe here.
            std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            out.insert(v.name.clone(), dir);
            continue;
        }
        // Data volumes are re-materialised from scratch for every pod start.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        if let Some(cm) = &v.config_map {
            let optional = cm.optional.unwrap_or(false);
            let data = configmap_data(client, &ns, &cm.name, optional).await?.unwrap_or_default();
            write_keys(&dir, &data, &cm.items, cm.default_mode.unwrap_or(0o644), optional)?;
        } else if let Some(s) = &v.secret {
            let optional = s.optional.unwrap_or(false);
            let name = s.secret_name.clone().unwrap_or_default();
            let data = secret_data(client, &ns, &name, optional).await?.unwrap_or_default();
            write_keys(&dir, &data, &s.items, s.default_mode.unwrap_or(0o644), optional)?;
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644);
            for src in p.sources.iter().flatten() {
                if let Some(cm) = &src.config_map {
                    let optional = cm.optional.unwrap_or(false);
                    let data = configmap_data(client, &ns, &cm.name, optional).await?.unwrap_or_default();
                    write_keys(&dir, &data, &cm.items, mode, optional)?;
                } else if let Some(s) = &src.secret {
                    let optional = s.optional.unwrap_or(false);
                    let data = secret_data(client, &ns, &s.name, optional).await?.unwrap_or_default();
                    write_keys(&dir, &data, &s.items, mode, optional)?;
                } else if let Some(t) = &src.service_account_token {
                    let token =
                        service_account_token(client, pod, t.audience.clone(), t.expiration_seconds.unwrap_or(3607))
                            .await?;
                    write_file(&dir.join(safe_rel(&t.path)?), token.as_bytes(), mode)?;
                } else if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            let val = field_value(pod, f, facts)?;
                            write_file(&dir.join(safe_rel(&item.path)?), val.as_bytes(), item.mode.unwrap_or(mode))?;
                        }
                    }
                }
            }
        } else if let Some(d) = &v.downward_api {
            for item in d.items.iter().flatten() {
                if let Some(f) = &item.field_ref {
                    let val = field_value(pod, f, facts)?;
                    write_file(&dir.join(safe_rel(&item.path)?), val.as_bytes(), item.mode.unwrap_or(0o644))?;
                }
            }
        } else {
            return Err(cfg_err(format!(
                "volume \"{}\": only emptyDir, configMap, secret, projected and downwardAPI are supported by the process kubelet",
                v.name
            )));
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

/// Quotes a string for POSIX sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The launcher script for one container: bind-mounts its volumeMounts (inside the private mount namespace that
/// `ip netns exec` creates), then `exec "$@"`.
/// `hosts` (the Service names file) is bind-mounted at `/etc/hosts` first, when given.
pub fn launcher_script(
    container: &Container,
    volumes: &HashMap<String, PathBuf>,
    hosts: Option<&Path>,
) -> Result<String, KubeletError> {
    let mut s = String::from("#!/bin/sh\n# generated by kpipe-kubelet\nset -e\n");
    if let Some(h) = hosts {
        s.push_str(&format!("mount --bind {} /etc/hosts\n", sh_quote(&h.to_string_lossy())));
    }
    for m in container.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&m.name)
            .ok_or_else(|| cfg_err(format!("volumeMount {} refers to an unknown volume", m.name)))?;
        let src = match m.sub_path.as_deref().filter(|p| !p.is_empty()) {
            Some(sub) => base.join(safe_rel(sub)?),
            None => base.clone(),
        };
        let src_q = sh_quote(&src.to_string_lossy());
        let dst_q = sh_quote(&m.mount_path);
        if src.is_file() {
            s.push_str(&format!("mkdir -p \"$(dirname {dst_q})\"\n[ -e {dst_q} ] || : > {dst_q}\n"));
        } else {
            s.push_str(&format!("mkdir -p {src_q} {dst_q}\n"));
        }
        s.push_str(&format!("mount --bind {src_q} {dst_q}\n"));
        if m.read_only.unwrap_or(false) {
            s.push_str(&format!("mount -o remount,bind,ro {dst_q}\n"));
        }
    }
    s.push_str("exec \"$@\"\n");
    Ok(s)
}

/// Writes a kubeconfig that authenticates as the pod's service account with `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca_file: &Path, token: &str) -> Result<(), KubeletError> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kpipe-testbed\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: pod\n  user:\n    token: {token}\ncontexts:\n- name: pod\n  context: {{cluster: kpipe-testbed, user: pod}}\ncurrent-context: pod\n",
        ca_file.display()
    );
    write_file(path, text.as_bytes(), 0o600)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expands_references() {
        let env: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost $5", &env), "cost $5");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn field_paths() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("n".into());
        pod.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        let facts = PodFacts { pod_ip: "10.244.0.2".into(), host_ip: "10.244.0.1".into() };
        let sel = |p: &str| ObjectFieldSelector { field_path: p.into(), api_version: None };
        assert_eq!(field_value(&pod, &sel("metadata.name"), &facts).unwrap(), "p");
        assert_eq!(field_value(&pod, &sel("status.podIP"), &facts).unwrap(), "10.244.0.2");
        assert_eq!(field_value(&pod, &sel("metadata.labels['app']"), &facts).unwrap(), "x");
        assert!(field_value(&pod, &sel("spec.bogus"), &facts).is_err());
    }
}
