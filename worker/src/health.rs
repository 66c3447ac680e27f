//! State behind `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct Health {
    /// Subscribed to the source topics after reaching the brokers.
    subscribed: AtomicBool,
    /// Why the brokers are unreachable, while they are.
    broker_error: Mutex<Option<String>>,
    /// Records stalled by the `block` failure policy: (topic, partition, offset) → last error.
    blocked: Mutex<BTreeMap<(String, i32, i64), String>>,
}

/// Readiness verdict and a human-readable detail.
pub struct Readiness {
    pub ready: bool,
    pub detail: String,
}

impl Health {
    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Relaxed);
    }

    pub fn set_broker_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.broker_error.lock() {
            *e = error;
        }
    }

    pub fn has_broker_error(&self) -> bool {
        self.broker_error.lock().map(|e| e.is_some()).unwrap_or(false)
    }

    pub fn block(&self, topic: &str, partition: i32, offset: i64, error: String) {
        if let Ok(mut b) = self.blocked.lock() {
            b.insert((topic.to_owned(), partition, offset), error);
        }
    }

    pub fn unblock(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut b) = self.blocked.lock() {
            b.remove(&(topic.to_owned(), partition, offset));
        }
    }

    /// Not ready until subscribed, or while the brokers are unreachable. Records stalled by the
    /// `block` policy keep the worker ready (restarting it would not help) but are listed.
    pub fn readiness(&self) -> Readiness {
        let mut lines = Vec::new();
        let mut ready = true;
        if !self.subscribed.load(Ordering::Relaxed) {
            ready = false;
            lines.push("not subscribed yet".to_owned());
        }
        if let Ok(e) = self.broker_error.lock()
            && let Some(e) = e.as_ref()
        {
            ready = false;
            lines.push(format!("brokers unreachable: {e}"));
        }
        if let Ok(b) = self.blocked.lock() {
            for ((t, p, o), e) in b.iter().take(20) {
                lines.push(format!("blocked: {t}/{p}@{o}: {e}"));
            }
            if b.len() > 20 {
                lines.push(format!("... and {} more blocked records", b.len() - 20));
            }
        }
        if lines.is_empty() {
            lines.push("ok".to_owned());
        }
        Readiness { ready, detail: lines.join("\n") + "\n" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_why() {
        let h = Health::default();
        assert!(!h.readiness().ready);
        h.set_subscribed();
        assert!(h.readiness().ready);
        h.set_broker_error(Some("all brokers down".into()));
        let r = h.readiness();
        assert!(!r.ready && r.detail.contains("all brokers down"));
        h.set_broker_error(None);
        h.block("t", 1, 5, "http_500".into());
        let r = h.readiness();
        assert!(r.ready && r.detail.contains("blocked: t/1@5"), "{}", r.detail);
        h.unblock("t", 1, 5);
        assert_eq!(h.readiness().detail, "ok\n");
    }
}
