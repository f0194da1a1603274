//! An in-memory [`Remote`] and a fault-injecting wrapper, for tests in every crate.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Expect, ObjectInfo, Remote, RemoteError};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    etag: String,
}

/// An in-memory object store with request counters.
#[derive(Debug)]
pub struct MockRemote {
    url: String,
    objects: Mutex<HashMap<String, Object>>,
    next_etag: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
    ranges: Mutex<Vec<(String, Range<u64>)>>,
}

impl MockRemote {
    pub fn new(url: impl Into<String>) -> Self {
        MockRemote {
            url: url.into(),
            objects: Mutex::new(HashMap::new()),
            next_etag: AtomicU64::new(1),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
        }
    }

    /// Store (or replace) an object; a replaced object gets a new ETag.
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> ObjectInfo {
        let data = data.into();
        let etag = format!(
            "\"mock-{}\"",
            self.next_etag.fetch_add(1, Ordering::Relaxed)
        );
        let info = ObjectInfo {
            key: key.to_string(),
            size: data.len() as u64,
            etag: Some(etag.clone()),
            version: None,
        };
        lock(&self.objects).insert(key.to_string(), Object { data, etag });
        info
    }

    pub fn remove(&self, key: &str) {
        lock(&self.objects).remove(key);
    }

    /// The [`Expect`] a stub populated now would carry.
    pub fn expect_for(&self, key: &str) -> Option<Expect> {
        lock(&self.objects).get(key).map(|o| Expect {
            etag: Some(o.etag.clone()),
            version: None,
            size: o.data.len() as u64,
        })
    }

    /// Ranged reads served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes served so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Every range served, in order.
    pub fn served_ranges(&self) -> Vec<(String, Range<u64>)> {
        lock(&self.ranges).clone()
    }
}

#[async_trait]
impl Remote for MockRemote {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError> {
        let obj = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| RemoteError::NotFound {
                url: self.url.clone(),
                key: key.to_string(),
            })?;
        if let Some(etag) = &expect.etag {
            if *etag != obj.etag {
                return Err(RemoteError::Changed {
                    url: self.url.clone(),
                    key: key.to_string(),
                    detail: format!("ETag is now {}, was {etag}", obj.etag),
                });
            }
        }
        let len = obj.data.len() as u64;
        if range.start > range.end || range.end > len {
            return Err(RemoteError::Failed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!("range {range:?} outside object of {len} bytes"),
            });
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(range.end - range.start, Ordering::Relaxed);
        lock(&self.ranges).push((key.to_string(), range.clone()));
        Ok(obj.data.slice(range.start as usize..range.end as usize))
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        let objects = lock(&self.objects);
        let obj = objects.get(key).ok_or_else(|| RemoteError::NotFound {
            url: self.url.clone(),
            key: key.to_string(),
        })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: obj.data.len() as u64,
            etag: Some(obj.etag.clone()),
            version: None,
        })
    }

    fn runs_inline(&self) -> bool {
        true
    }
}

/// A fault to inject into one ranged read.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail with this error.
    Error(RemoteError),
    /// Return one byte fewer than asked (a truncated body that slipped past the store).
    Truncate,
    /// Flip the first byte (only detectable with digests).
    Corrupt,
    /// Wait this long before answering.
    Delay(Duration),
}

/// Wraps a remote and injects faults into its ranged reads.
#[derive(Debug)]
pub struct FaultRemote<R> {
    inner: R,
    queue: Mutex<VecDeque<Fault>>,
    every: Mutex<Option<Fault>>,
    paused: tokio::sync::watch::Sender<bool>,
}

impl<R: Remote> FaultRemote<R> {
    pub fn new(inner: R) -> Self {
        FaultRemote {
            inner,
            queue: Mutex::new(VecDeque::new()),
            every: Mutex::new(None),
            paused: tokio::sync::watch::channel(false).0,
        }
    }

    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Apply `fault` to the next `n` reads.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut q = lock(&self.queue);
        for _ in 0..n {
            q.push_back(fault.clone());
        }
    }

    /// Apply `fault` to every read until cleared with `None`.
    pub fn set_every(&self, fault: Option<Fault>) {
        *lock(&self.every) = fault;
    }

    /// Hold every read until [`FaultRemote::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

#[async_trait]
impl<R: Remote> Remote for FaultRemote<R> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError> {
        let mut rx = self.paused.subscribe();
        // An error here means the sender is gone, which cannot happen while self lives.
        let _ = rx.wait_for(|paused| !paused).await;
        let fault = lock(&self.queue)
            .pop_front()
            .or_else(|| lock(&self.every).clone());
        match fault {
            None => self.inner.get_range(key, range, expect).await,
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.get_range(key, range, expect).await
            }
            Some(Fault::Truncate) => {
                let b = self.inner.get_range(key, range, expect).await?;
                Ok(b.slice(..b.len().saturating_sub(1)))
            }
            Some(Fault::Corrupt) => {
                let b = self.inner.get_range(key, range, expect).await?;
                let mut v = b.to_vec();
                if let Some(first) = v.first_mut() {
                    *first ^= 0xff;
                }
                Ok(Bytes::from(v))
            }
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        self.inner.head(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mock_counts_and_faults() {
        let m = MockRemote::new("mock://t");
        m.put("k", vec![1u8; 100]);
        let exp = m.expect_for("k").expect("present");
        let f = FaultRemote::new(m);
        f.fail_next(
            1,
            Fault::Error(RemoteError::Failed {
                url: "mock://t".into(),
                key: "k".into(),
                detail: "injected".into(),
            }),
        );
        assert!(f.get_range("k", 0..10, &exp).await.is_err());
        assert_eq!(f.get_range("k", 0..10, &exp).await.expect("ok").len(), 10);
        f.fail_next(1, Fault::Truncate);
        assert_eq!(f.get_range("k", 0..10, &exp).await.expect("short").len(), 9);
        assert_eq!(f.inner().requests(), 2);
        f.inner().put("k", vec![2u8; 100]);
        assert!(matches!(
            f.get_range("k", 0..10, &exp).await,
            Err(RemoteError::Changed { .. })
        ));
    }
}
