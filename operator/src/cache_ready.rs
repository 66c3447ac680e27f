//! Readiness of a reflector cache ("has its first complete list") that any number of tasks can await.
//!
//! Why not `Store::wait_until_ready`: in kube-runtime 5.0 it wakes only the **last** of several concurrent
//! waiters. Its `DelayedInit` polls one `futures` oneshot receiver, which keeps a single waker, so each new waiter
//! replaces the previous one's; an earlier waiter sleeps until something else polls it (a timeout, an unrelated
//! event). Observed on the test bed: a new leader's two concurrent reconciles both waited for the Deployment
//! cache, one was woken, the other slept for its whole 30 s timeout, and a new pipeline got its Deployment 30 s late
//! (`operator/tests/leader_election_bed.rs`); [`tests::a_store_wakes_only_its_last_waiter`] pins that behaviour
//! so a kube-runtime upgrade that fixes it is noticed. The controller itself still awaits its primary store that
//! way, once, and nothing else in kpipe awaits a store's readiness.
//!
//! Instead, [`mark_ready`] taps the reflector's event stream: the reflector applies every event to its store
//! before passing it on, so when `InitDone` passes, the store holds the first complete list. A tokio `watch`
//! channel then wakes every waiter. A later relist (after a watch error) keeps the cache ready, as the store keeps
//! serving its previous state meanwhile.

use std::time::Duration;

use futures::{Stream, TryStreamExt};
use kube::runtime::watcher;
use tokio::sync::watch;

/// Whether one cache has its first complete list; cheap to clone, every clone sees the same state.
#[derive(Clone, Debug)]
pub struct CacheReady {
    name: &'static str,
    ready: watch::Receiver<bool>,
}

/// The cache's event stream was dropped before its first complete list (its controller stopped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the {0} cache stopped before its first complete list")]
pub struct CacheStopped(pub &'static str);

impl CacheReady {
    /// The cache's name in logs and problems (its kind, e.g. `Deployment`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// True once the cache has had its first complete list.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the cache has its first complete list.
    ///
    /// # Errors
    /// [`CacheStopped`] when the stream feeding the cache is dropped first.
    pub async fn wait(&self) -> Result<(), CacheStopped> {
        let mut ready = self.ready.clone();
        ready.wait_for(|r| *r).await.map(|_| ()).map_err(|_| CacheStopped(self.name))
    }
}

/// Passes `events` (a reflector's stream) through and returns the [`CacheReady`] it sets when `InitDone` passes.
pub fn mark_ready<K, S>(
    name: &'static str,
    events: S,
) -> (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K, S>, CacheReady)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let (tx, rx) = watch::channel(false);
    let events = events.inspect_ok(move |event| {
        if matches!(event, watcher::Event::InitDone) {
            tx.send_replace(true);
        }
    });
    (events, CacheReady { name, ready: rx })
}

/// Waits up to `timeout` for every cache in `caches`.
///
/// # Errors
/// The names of the caches without a complete first list when the time is up (or stopped).
pub async fn wait_all(caches: &[&CacheReady], timeout: Duration) -> Result<(), Vec<&'static str>> {
    let all = futures::future::join_all(caches.iter().map(|c| c.wait()));
    match tokio::time::timeout(timeout, all).await {
        Ok(results) if results.iter().all(Result::is_ok) => Ok(()),
        _ => Err(caches.iter().filter(|c| !c.is_ready()).map(|c| c.name()).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    /// kube-runtime 5.0's `Store::wait_until_ready` loses the wake-up of all but its last concurrent waiter (why
    /// this module exists). When this test fails, kube-runtime fixed it; the module can stay either way.
    #[tokio::test]
    async fn a_store_wakes_only_its_last_waiter() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let (first, second) = (store.clone(), store.clone());
        let first = tokio::spawn(async move { first.wait_until_ready().await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = tokio::spawn(async move { second.wait_until_ready().await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let second = tokio::time::timeout(Duration::from_secs(2), second).await;
        let first = tokio::time::timeout(Duration::from_secs(2), first).await;
        assert!(second.is_ok(), "the last waiter is woken");
        assert!(first.is_err(), "kube-runtime woke its first waiter too: Store::wait_until_ready is fixed");
    }

    /// Every waiter of a [`CacheReady`] wakes when `InitDone` passes, not before; late waiters return at once.
    #[tokio::test]
    async fn every_waiter_wakes_when_the_first_list_is_complete() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<watcher::Event<ConfigMap>, watcher::Error>>();
        let (store, writer) = reflector::store::<ConfigMap>();
        // As the controller does: the reflector first (it applies each event to the store), then the tap.
        let (events, ready) = mark_ready("ConfigMap", reflector::reflector(writer, tokio_stream_of(rx)));
        let driver = tokio::spawn(events.for_each(|_| async {}));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let r = ready.clone();
                tokio::spawn(async move { r.wait().await })
            })
            .collect();
        tx.send(Ok(watcher::Event::Init)).unwrap();
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("listed".into());
        tx.send(Ok(watcher::Event::InitApply(cm))).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!ready.is_ready() && waiters.iter().all(|w| !w.is_finished()), "not ready before InitDone");
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(2), w).await.expect("woken").unwrap().unwrap();
        }
        assert_eq!(store.state().len(), 1, "the store had the list when readiness was signalled");
        assert!(wait_all(&[&ready], Duration::from_millis(10)).await.is_ok());
        drop(tx);
        driver.await.unwrap();
    }

    /// A cache whose stream ends before its first list is reported by name, and `wait_all` names what is missing.
    #[tokio::test]
    async fn a_stopped_or_slow_cache_is_named() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<watcher::Event<ConfigMap>, watcher::Error>>();
        let (events, stopped) = mark_ready("Deployment", tokio_stream_of(rx));
        let (_tx2, rx2) = tokio::sync::mpsc::unbounded_channel::<Result<watcher::Event<ConfigMap>, watcher::Error>>();
        let (_events2, slow) = mark_ready("Pod", tokio_stream_of(rx2));
        drop((tx, events));
        assert_eq!(stopped.wait().await, Err(CacheStopped("Deployment")));
        assert_eq!(wait_all(&[&stopped, &slow], Duration::from_millis(20)).await, Err(vec!["Deployment", "Pod"]));
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
    ) -> impl Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
