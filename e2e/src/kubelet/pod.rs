//! One pod: network namespace, volumes, container processes, probes, restarts, status and termination.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodStatus, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::images::{Executable, ImageMap};
use super::net::PodNet;
use super::spec::{self, PodFacts};
use super::{KubeletError, Shared};

/// What the kubelet's watch loop tells a pod worker.
#[derive(Debug, Clone)]
pub struct PodUpdate {
    /// Latest object.
    pub pod: Pod,
    /// The object is gone from the API (deleted without us finishing it).
    pub gone: bool,
}

#[derive(Debug, Clone)]
struct Term {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started: Option<Timestamp>,
    finished: Timestamp,
}

#[derive(Debug, Clone)]
enum CState {
    Waiting { reason: String, message: Option<String> },
    Running { started: Timestamp, pid: u32 },
    Terminated(Term),
}

#[derive(Debug, Clone)]
struct CStatus {
    name: String,
    image: String,
    state: CState,
    last: Option<Term>,
    restarts: i32,
    ready: bool,
    started_ever: bool,
    /// Terminated and will not be restarted.
    done: bool,
    /// An init container.
    init: bool,
}

#[derive(Debug)]
struct PodState {
    /// Init containers first, then the regular containers.
    containers: Vec<CStatus>,
    /// All init containers succeeded.
    initialized: bool,
    start_time: Timestamp,
    pod_ip: Option<String>,
    host_ip: String,
    message: Option<String>,
    cond: HashMap<&'static str, (bool, Timestamp)>,
}

/// Everything a container runner needs about its pod.
struct PodCtx {
    shared: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    dir: PathBuf,
    net: PodNet,
    /// Volume folders and the pod kubeconfig, set once the sandbox is prepared.
    prepared: std::sync::OnceLock<(HashMap<String, PathBuf>, Option<PathBuf>)>,
    state: Mutex<PodState>,
    dirty: Notify,
}

impl PodCtx {
    fn lock(&self) -> MutexGuard<'_, PodState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
    fn update(&self, idx: usize, f: impl FnOnce(&mut CStatus)) {
        {
            let mut st = self.lock();
            if let Some(c) = st.containers.get_mut(idx) {
                f(c);
            }
        }
        self.dirty.notify_one();
    }
    fn facts(&self) -> PodFacts {
        PodFacts { pod_ip: self.net.ip.to_string(), host_ip: self.shared.cfg.bridge_ip.to_string() }
    }
}

fn pod_key(pod: &Pod) -> (String, String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default(),
    )
}

fn deletion_grace(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Final removal of the pod object (the kubelet's job once containers are gone).
pub async fn final_delete(client: &kube::Client, pod: &Pod) {
    let (ns, name, uid) = pod_key(pod);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), &ns).delete(&name, &dp).await {
        Ok(_) => info!(pod = %format!("{ns}/{name}"), "pod removed"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => warn!(pod = %format!("{ns}/{name}"), error = %e, "final delete failed"),
    }
}

/// Runs a pod until it is deleted (or the kubelet shuts down).
pub async fn run_pod(shared: Arc<Shared>, mut rx: watch::Receiver<PodUpdate>) {
    let pod = rx.borrow_and_update().pod.clone();
    let (ns, name, uid) = pod_key(&pod);
    let key = format!("{ns}/{name}");
    if pod.metadata.deletion_timestamp.is_some() {
        // Deleted before we ever ran it (e.g. while the kubelet was down): nothing to stop.
        final_delete(&shared.client, &pod).await;
        return;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.clone().unwrap_or_default();
    let containers: Vec<CStatus> = inits
        .iter()
        .map(|c| (c, true))
        .chain(spec.containers.iter().map(|c| (c, false)))
        .map(|(c, init)| CStatus {
            init,
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: CState::Waiting { reason: "ContainerCreating".into(), message: None },
            last: None,
            restarts: 0,
            ready: false,
            started_ever: false,
            done: false,
        })
        .collect();
    let host_network = spec.host_network == Some(true);
    let ip = if host_network {
        Some(shared.cfg.bridge_ip)
    } else {
        let mut ips = match shared.ips.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        ips.allocate()
    };
    let Some(ip) = ip else {
        warn!(pod = %key, "no free pod IP");
        wait_for_deletion(&shared, &mut rx).await;
        return;
    };
    let short_uid: String = uid.chars().take(8).collect();
    let ctx = Arc::new(PodCtx {
        shared: shared.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        dir: shared.cfg.run_dir.join("pods").join(format!("{ns}_{name}.{short_uid}")),
        net: if host_network { PodNet::host(&uid, ip) } else { PodNet::for_pod(&uid, ip) },
        prepared: std::sync::OnceLock::new(),
        state: Mutex::new(PodState {
            containers,
            initialized: false,
            start_time: Timestamp::now(),
            pod_ip: None,
            host_ip: shared.cfg.bridge_ip.to_string(),
            message: None,
            cond: HashMap::new(),
        }),
        dirty: Notify::new(),
    });
    info!(pod = %key, %ip, "starting pod");

    // Sandbox + volumes + credentials; retried until it works or the pod goes away.
    let mut retry = Duration::from_millis(100);
    let prepared = loop {
        match prepare(&ctx).await {
            Ok((volumes, kubeconfig)) => break Ok((volumes, kubeconfig)),
            Err(e) => {
                warn!(pod = %key, error = %e, "pod setup failed; retrying");
                {
                    let mut st = ctx.lock();
                    st.message = Some(e.to_string());
                    for c in &mut st.containers {
                        c.state = CState::Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: Some(e.to_string()),
                        };
                    }
                }
                patch_status(&ctx).await;
                // Missing ConfigMaps (e.g. kube-root-ca.crt right after a namespace is created) usually appear
                // within a second: retry quickly first, then every 2 s; stop as soon as the pod is deleted.
                let sleep = tokio::time::sleep(retry);
                tokio::pin!(sleep);
                retry = (retry * 2).min(Duration::from_secs(2));
                let stop = loop {
                    tokio::select! {
                        _ = &mut sleep => break None,
                        changed = rx.changed() => {
                            if changed.is_err() {
                                break Some(false); // kubelet shutdown: leave the Pod object alone
                            }
                            let u = rx.borrow().clone();
                            if u.gone || u.pod.metadata.deletion_timestamp.is_some() { break Some(true); }
                        }
                    }
                };
                if let Some(delete) = stop {
                    break Err(delete);
                }
            }
        }
    };
    let (volumes, kubeconfig) = match prepared {
        Ok(p) => p,
        Err(delete) => {
            let last = rx.borrow().clone();
            cleanup(&ctx, &last, delete).await;
            return;
        }
    };
    let _ = ctx.prepared.set((volumes, kubeconfig));
    {
        let mut st = ctx.lock();
        st.pod_ip = Some(ip.to_string());
        st.message = None;
        let has_init = st.containers.iter().any(|c| c.init);
        for c in &mut st.containers {
            let reason = if has_init && !c.init { "PodInitializing" } else { "ContainerCreating" };
            c.state = CState::Waiting { reason: reason.into(), message: None };
        }
    }
    patch_status(&ctx).await;

    // Containers: init containers one after the other (each must exit 0), then the regular ones side by side.
    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let supervisor = {
        let (ctx, stop_rx) = (ctx.clone(), stop_rx.clone());
        let main = spec.containers.clone();
        let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
        tokio::spawn(async move {
            let init_policy = if policy == "Never" { "Never" } else { "OnFailure" };
            for (idx, c) in inits.iter().enumerate() {
                run_container(ctx.clone(), idx, c.clone(), stop_rx.clone(), init_policy.to_string()).await;
                let ok = matches!(ctx.lock().containers.get(idx).map(|c| &c.state), Some(CState::Terminated(t)) if t.exit_code == 0);
                if !ok {
                    return; // stopped, or failed for good (restartPolicy Never): the pod is Failed
                }
            }
            ctx.lock().initialized = true;
            ctx.dirty.notify_one();
            let first = inits.len();
            let handles: Vec<_> = main
                .into_iter()
                .enumerate()
                .map(|(j, c)| tokio::spawn(run_container(ctx.clone(), first + j, c, stop_rx.clone(), policy.clone())))
                .collect();
            for h in handles {
                let _ = h.await;
            }
        })
    };

    // Status loop until deletion.
    let mut net_released = false;
    let (grace, gone, shutdown) = loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break (deletion_grace(&pod).min(Duration::from_secs(5)), true, true);
                }
                let u = rx.borrow().clone();
                if u.gone {
                    break (deletion_grace(&u.pod).min(Duration::from_secs(5)), true, false);
                }
                if u.pod.metadata.deletion_timestamp.is_some() {
                    break (deletion_grace(&u.pod), false, false);
                }
            }
            _ = ctx.dirty.notified() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                patch_status(&ctx).await;
                // A finished pod (Succeeded/Failed) gives its network sandbox and IP back, like a real kubelet.
                let finished = pod_finished(&ctx.lock());
                if finished && !net_released {
                    release_net(&ctx).await;
                    net_released = true;
                }
            }
        }
    };
    info!(pod = %key, grace_s = grace.as_secs(), "terminating pod");
    let _ = stop_tx.send(Some(grace));
    let _ = supervisor.await;
    if !gone {
        patch_status(&ctx).await;
    }
    let last = rx.borrow().clone();
    if net_released {
        final_cleanup(&ctx, &last, !gone && !shutdown).await;
    } else {
        cleanup(&ctx, &last, !gone && !shutdown).await;
    }
}

async fn wait_for_deletion(shared: &Shared, rx: &mut watch::Receiver<PodUpdate>) {
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let u = rx.borrow().clone();
        if u.gone {
            return;
        }
        if u.pod.metadata.deletion_timestamp.is_some() {
            final_delete(&shared.client, &u.pod).await;
            return;
        }
    }
}

async fn release_net(ctx: &PodCtx) {
    if ctx.net.host {
        return;
    }
    ctx.net.teardown().await;
    let mut ips = match ctx.shared.ips.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    ips.release(ctx.net.ip);
}

async fn cleanup(ctx: &PodCtx, last: &PodUpdate, delete: bool) {
    release_net(ctx).await;
    final_cleanup(ctx, last, delete).await;
}

/// Final delete of the API object (if asked) and removal of the pod folder; the network is already released.
async fn final_cleanup(ctx: &PodCtx, last: &PodUpdate, delete: bool) {
    if delete && !last.gone {
        final_delete(&ctx.shared.client, &last.pod).await;
    }
    if let Err(e) = tokio::fs::remove_dir_all(&ctx.dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %ctx.dir.display(), error = %e, "could not remove pod dir");
    }
}

async fn prepare(ctx: &PodCtx) -> Result<(HashMap<String, PathBuf>, Option<PathBuf>), KubeletError> {
    let cfg = &ctx.shared.cfg;
    tokio::fs::create_dir_all(&ctx.dir).await.map_err(|source| KubeletError::Io { path: ctx.dir.clone(), source })?;
    ctx.net.setup(&cfg.bridge, cfg.bridge_ip, cfg.prefix_len).await?;
    let volumes = spec::materialize_volumes(&ctx.shared.client, &ctx.pod, &ctx.dir, &ctx.facts()).await?;
    let automount = ctx.pod.spec.as_ref().and_then(|s| s.automount_service_account_token) != Some(false);
    let kubeconfig = if automount {
        let token = spec::service_account_token(&ctx.shared.client, &ctx.pod, None, 30 * 24 * 3600).await?;
        let path = ctx.dir.join("kubeconfig");
        spec::write_kubeconfig(&path, &cfg.pod_apiserver, &cfg.ca_file, &token)?;
        Some(path)
    } else {
        None
    };
    Ok((volumes, kubeconfig))
}

/// Builds the process command for one container start.
async fn build_command(ctx: &PodCtx, c: &Container) -> Result<(tokio::process::Command, PathBuf), (String, String)> {
    let cfg = &ctx.shared.cfg;
    let map = ImageMap::load(&cfg.images, &cfg.repo_root, &cfg.target_dir)
        .map_err(|e| ("InvalidImageMap".to_string(), e.to_string()))?;
    let image = c.image.clone().unwrap_or_default();
    let exe = map.resolve(&image).ok_or_else(|| {
        ("ErrImagePull".to_string(), format!("image {image:?} has no entry in {}", cfg.images.display()))
    })?;
    let env = spec::resolve_env(&ctx.shared.client, &ctx.pod, c, &ctx.facts())
        .await
        .map_err(|e| ("CreateContainerConfigError".to_string(), e.to_string()))?;
    let mut envmap: HashMap<String, String> = env.iter().cloned().collect();
    let port = cfg.pod_apiserver.rsplit(':').next().unwrap_or("443").to_string();
    let mut defaults: Vec<(String, String)> = vec![
        ("HOSTNAME".into(), ctx.name.clone()),
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("KUBERNETES_SERVICE_HOST".into(), cfg.bridge_ip.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port),
        ("KPIPE_POD_DIR".into(), ctx.dir.display().to_string()),
    ];
    let empty = (HashMap::new(), None);
    let (volumes, kubeconfig) = ctx.prepared.get().unwrap_or(&empty);
    if let Some(kc) = kubeconfig {
        defaults.push(("KUBECONFIG".into(), kc.display().to_string()));
    }
    let mut full_env = env.clone();
    for (k, v) in defaults {
        if !envmap.contains_key(&k) {
            envmap.insert(k.clone(), v.clone());
            full_env.push((k, v));
        }
    }
    let cmd: Vec<String> = c.command.iter().flatten().map(|s| spec::expand(s, &envmap)).collect();
    let args: Vec<String> = c.args.iter().flatten().map(|s| spec::expand(s, &envmap)).collect();
    let argv: Vec<String> = match exe {
        Executable::Binary(path) => {
            if !path.is_file() {
                return Err((
                    "ErrImagePull".into(),
                    format!("image {image:?} maps to {} which does not exist (build it first)", path.display()),
                ));
            }
            // Run a pod-local link (or copy) of the binary: the pod's own mounts (an emptyDir on /tmp, say) may
            // hide the folder the binary lives in, and a rebuild while the pod runs must not change it under us.
            let staged = stage_executable(&path, &ctx.dir).await.map_err(|e| ("RunContainerError".to_string(), e))?;
            std::iter::once(staged.display().to_string()).chain(cmd.into_iter().skip(1)).chain(args).collect()
        }
        Executable::Command => {
            if cmd.is_empty() {
                return Err((
                    "RunContainerError".into(),
                    format!("image {image:?} maps to @command but the container has no command"),
                ));
            }
            cmd.into_iter().chain(args).collect()
        }
    };
    let mut script = spec::launcher_script(c, volumes, (!ctx.net.host).then_some(cfg.run_dir.join("hosts")).as_deref())
        .map_err(|e| ("CreateContainerConfigError".to_string(), e.to_string()))?;
    if let Some(wd) = c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        script =
            script.replace("exec \"$@\"\n", &format!("mkdir -p {q}\ncd {q}\nexec \"$@\"\n", q = spec::sh_quote(wd)));
    }
    let script_path = ctx.dir.join(format!("launch-{}.sh", c.name));
    tokio::fs::write(&script_path, script)
        .await
        .map_err(|e| ("RunContainerError".to_string(), format!("{}: {e}", script_path.display())))?;
    let log_path = cfg.run_dir.join("pods").join(format!("{}_{}_{}.log", ctx.ns, ctx.name, c.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| ("RunContainerError".to_string(), format!("{}: {e}", log_path.display())))?;
    let log2 =
        log.try_clone().map_err(|e| ("RunContainerError".to_string(), format!("{}: {e}", log_path.display())))?;
    let enter = ctx.net.enter();
    let mut command = tokio::process::Command::new(&enter[0]);
    command
        .args(&enter[1..])
        .arg("/bin/sh")
        .arg(&script_path)
        .args(&argv)
        .env_clear()
        .envs(full_env)
        .current_dir(&ctx.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(true);
    Ok((command, log_path))
}

/// Hard-links (or, across filesystems, copies) `binary` into `<pod dir>/bin/` and returns the pod-local path.
async fn stage_executable(binary: &Path, pod_dir: &Path) -> Result<PathBuf, String> {
    let name = binary.file_name().ok_or_else(|| format!("{}: not a file path", binary.display()))?;
    let dir = pod_dir.join("bin");
    tokio::fs::create_dir_all(&dir).await.map_err(|e| format!("{}: {e}", dir.display()))?;
    let staged = dir.join(name);
    // A previous container of this pod may have left its copy; always stage the current build.
    let _ = tokio::fs::remove_file(&staged).await;
    if tokio::fs::hard_link(binary, &staged).await.is_err() {
        tokio::fs::copy(binary, &staged)
            .await
            .map_err(|e| format!("cannot stage {} into {}: {e}", binary.display(), staged.display()))?;
    }
    Ok(staged)
}

fn signal_group(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(raw), sig);
    }
}

/// SIGTERM the process group, wait up to `grace`, then SIGKILL.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(pid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            // Reap stragglers of the group as a real container runtime would.
            signal_group(pid, Signal::SIGKILL);
            status
        }
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            child.wait().await
        }
    }
}

/// Resolves with the grace period once a stop was requested.
async fn wait_stop(stop: &mut watch::Receiver<Option<Duration>>) -> Duration {
    match stop.wait_for(|v| v.is_some()).await {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => Duration::ZERO,
    }
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

async fn run_container(
    ctx: Arc<PodCtx>,
    idx: usize,
    c: Container,
    mut stop: watch::Receiver<Option<Duration>>,
    policy: String,
) {
    let cfg = &ctx.shared.cfg;
    let mut backoff = cfg.backoff_initial;
    let pid_file = ctx.dir.join(format!("{}.pid", c.name));
    let key = format!("{}/{}/{}", ctx.ns, ctx.name, c.name);
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let term = match build_command(&ctx, &c).await {
            Err((reason, message)) => {
                warn!(container = %key, %reason, %message, "cannot start container");
                ctx.update(idx, |s| s.state = CState::Waiting { reason, message: Some(message) });
                None
            }
            Ok((mut command, log_path)) => match command.spawn() {
                Err(e) => {
                    ctx.update(idx, |s| {
                        s.state = CState::Waiting { reason: "RunContainerError".into(), message: Some(e.to_string()) }
                    });
                    None
                }
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    let started = Timestamp::now();
                    let t0 = Instant::now();
                    let _ = tokio::fs::write(&pid_file, pid.to_string()).await;
                    info!(container = %key, pid, log = %log_path.display(), "container started");
                    let has_readiness = c.readiness_probe.is_some();
                    ctx.update(idx, |s| {
                        s.state = CState::Running { started, pid };
                        s.started_ever = true;
                        s.ready = !has_readiness;
                    });
                    let mut reason = None;
                    let status = tokio::select! {
                        st = child.wait() => st,
                        grace = wait_stop(&mut stop) => terminate(&mut child, pid, grace).await,
                        _ = probes(&ctx, idx, &c) => {
                            info!(container = %key, "liveness probe failed; restarting");
                            reason = Some("Unhealthy".to_string());
                            let grace = Duration::from_secs(
                                u64::try_from(ctx.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30)).unwrap_or(30));
                            terminate(&mut child, pid, grace).await
                        }
                    };
                    let _ = tokio::fs::remove_file(&pid_file).await;
                    let (exit_code, signal) = match &status {
                        Ok(s) => match (s.code(), s.signal()) {
                            (Some(code), _) => (code, None),
                            (None, Some(sig)) => (128 + sig, Some(sig)),
                            (None, None) => (255, None),
                        },
                        Err(_) => (255, None),
                    };
                    info!(container = %key, exit_code, ?signal, "container exited");
                    if t0.elapsed() > cfg.backoff_max * 2 {
                        backoff = cfg.backoff_initial;
                    }
                    Some(Term {
                        exit_code,
                        signal,
                        reason: reason
                            .unwrap_or_else(|| if exit_code == 0 { "Completed".into() } else { "Error".into() }),
                        message: None,
                        started: Some(started),
                        finished: Timestamp::now(),
                    })
                }
            },
        };
        let stopping = stop.borrow().is_some();
        let restart = match &term {
            Some(t) => !stopping && should_restart(&policy, t.exit_code),
            None => !stopping,
        };
        if let Some(t) = term.clone() {
            ctx.update(idx, |s| {
                s.ready = false;
                s.state = CState::Terminated(t);
                s.done = !restart;
            });
        }
        if !restart {
            return;
        }
        if let Some(t) = term {
            ctx.update(idx, |s| {
                s.restarts += 1;
                s.last = Some(t.clone());
                s.state = CState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!("back-off {}ms restarting failed container", backoff.as_millis())),
                };
            });
        }
        debug!(container = %key, backoff_ms = backoff.as_millis() as u64, "restart back-off");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_stop(&mut stop) => return,
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

/// Runs readiness (updating the Ready flag) and liveness probes; returns only when liveness fails.
async fn probes(ctx: &PodCtx, idx: usize, c: &Container) {
    let readiness = async {
        let Some(p) = &c.readiness_probe else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(secs(p.initial_delay_seconds, 0)).await;
        let (mut ok, mut bad) = (0, 0);
        loop {
            if probe_once(ctx, c, p).await {
                ok += 1;
                bad = 0;
                if ok >= p.success_threshold.unwrap_or(1) {
                    ctx.update(idx, |s| {
                        if !s.ready {
                            s.ready = true;
                        }
                    });
                }
            } else {
                bad += 1;
                ok = 0;
                if bad >= p.failure_threshold.unwrap_or(3) {
                    ctx.update(idx, |s| s.ready = false);
                }
            }
            tokio::time::sleep(secs(p.period_seconds, 10)).await;
        }
    };
    let liveness = async {
        let Some(p) = &c.liveness_probe else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(secs(p.initial_delay_seconds, 0)).await;
        let mut bad = 0;
        loop {
            if probe_once(ctx, c, p).await {
                bad = 0;
            } else {
                bad += 1;
                if bad >= p.failure_threshold.unwrap_or(3) {
                    return;
                }
            }
            tokio::time::sleep(secs(p.period_seconds, 10)).await;
        }
    };
    tokio::select! {
        _ = readiness => {}
        _ = liveness => {}
    }
}

fn resolve_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

async fn probe_once(ctx: &PodCtx, c: &Container, p: &Probe) -> bool {
    let timeout = secs(p.timeout_seconds, 1);
    let pod_ip = ctx.net.ip.to_string();
    if let Some(h) = &p.http_get {
        let Some(port) = resolve_port(c, &h.port) else {
            return false;
        };
        let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
        let host = h.host.clone().unwrap_or(pod_ip);
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let path = if path.starts_with('/') { path } else { format!("/{path}") };
        let mut req = ctx.shared.http.get(format!("{scheme}://{host}:{port}{path}")).timeout(timeout);
        for hdr in h.http_headers.iter().flatten() {
            req = req.header(hdr.name.as_str(), hdr.value.as_str());
        }
        return match req.send().await {
            Ok(r) => r.status().is_success() || r.status().is_redirection(),
            Err(_) => false,
        };
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = resolve_port(c, &t.port) else {
            return false;
        };
        let host = t.host.clone().unwrap_or(pod_ip);
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await,
            Ok(Ok(_))
        );
    }
    if let Some(e) = &p.exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return false;
        }
        let enter = ctx.net.enter();
        let fut = tokio::process::Command::new(&enter[0])
            .args(&enter[1..])
            .args(&cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        return matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(s)) if s.success());
    }
    // gRPC probes are not supported by the process kubelet: treat as passing.
    true
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn term_state(t: &Term, pid_hint: Option<u32>) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: pid_hint.map(|p| format!("process://{p}")),
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            message: t.message.clone(),
            started_at: t.started.map(time),
            finished_at: Some(time(t.finished)),
        }),
        ..ContainerState::default()
    }
}

/// Every container terminated for good (or an init container failed for good).
fn pod_finished(st: &PodState) -> bool {
    let init_failed =
        st.containers.iter().any(|c| c.init && c.done && matches!(&c.state, CState::Terminated(t) if t.exit_code != 0));
    let main: Vec<&CStatus> = st.containers.iter().filter(|c| !c.init).collect();
    init_failed || (!main.is_empty() && main.iter().all(|c| c.done))
}

fn container_status(c: &CStatus) -> ContainerStatus {
    let (state, cid) = match &c.state {
        CState::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting { reason: Some(reason.clone()), message: message.clone() }),
                ..ContainerState::default()
            },
            None,
        ),
        CState::Running { started, pid } => (
            ContainerState {
                running: Some(ContainerStateRunning { started_at: Some(time(*started)) }),
                ..ContainerState::default()
            },
            Some(format!("process://{pid}")),
        ),
        CState::Terminated(t) => (term_state(t, None), None),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("process://{}", c.image),
        container_id: cid,
        ready: c.ready,
        started: Some(matches!(c.state, CState::Running { .. })),
        restart_count: c.restarts,
        state: Some(state),
        last_state: c.last.as_ref().map(|t| term_state(t, None)),
        ..ContainerStatus::default()
    }
}

fn build_status(st: &mut PodState) -> PodStatus {
    let init_statuses: Vec<ContainerStatus> = st.containers.iter().filter(|c| c.init).map(container_status).collect();
    let main: Vec<&CStatus> = st.containers.iter().filter(|c| !c.init).collect();
    let statuses: Vec<ContainerStatus> = main.iter().map(|c| container_status(c)).collect();
    let phase = if pod_finished(st) {
        let ok = main.iter().all(|c| matches!(&c.state, CState::Terminated(t) if t.exit_code == 0));
        if ok && st.initialized { "Succeeded" } else { "Failed" }
    } else if st.initialized && main.iter().any(|c| c.started_ever) {
        "Running"
    } else {
        "Pending"
    };
    let ready = st.initialized && !main.is_empty() && main.iter().all(|c| c.ready);
    let initialized = st.initialized;
    let sandbox = st.pod_ip.is_some();
    let now = Timestamp::now();
    let mut cond = |ty: &'static str, status: bool| -> PodCondition {
        let entry = st.cond.entry(ty).or_insert((status, now));
        if entry.0 != status {
            *entry = (status, now);
        }
        PodCondition {
            type_: ty.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            last_transition_time: Some(time(entry.1)),
            reason: (!status && (ty == "Ready" || ty == "ContainersReady")).then(|| "ContainersNotReady".to_string()),
            ..PodCondition::default()
        }
    };
    let conditions = vec![
        cond("PodReadyToStartContainers", sandbox),
        cond("Initialized", initialized),
        cond("Ready", ready),
        cond("ContainersReady", ready),
        cond("PodScheduled", true),
    ];
    PodStatus {
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        container_statuses: Some(statuses),
        host_ip: Some(st.host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: st.host_ip.clone() }]),
        pod_ip: st.pod_ip.clone(),
        pod_ips: st.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: Some(time(st.start_time)),
        message: st.message.clone(),
        // qosClass is set by the apiserver at creation from the resources and is immutable: leave it alone.
        qos_class: None,
        ..PodStatus::default()
    }
}

async fn patch_status(ctx: &PodCtx) {
    let status = {
        let mut st = ctx.lock();
        build_status(&mut st)
    };
    let api = Api::<Pod>::namespaced(ctx.shared.client.clone(), &ctx.ns);
    let patch = serde_json::json!({ "status": status });
    match api.patch_status(&ctx.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => warn!(pod = %format!("{}/{}", ctx.ns, ctx.name), error = %e, "status update failed"),
    }
}

/// Kills process groups recorded in `<run_dir>/pods/*/*.pid` (leftovers of a previous kubelet).
pub fn kill_stale_processes(run_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(run_dir.join("pods")) else {
        return;
    };
    for d in dirs.flatten() {
        let path = d.path();
        if !path.is_dir() {
            continue;
        }
        if let Ok(files) = std::fs::read_dir(&path) {
            for f in files.flatten() {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "pid")
                    && let Ok(text) = std::fs::read_to_string(&p)
                    && let Ok(pid) = text.trim().parse::<u32>()
                {
                    signal_group(pid, Signal::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}
