//! An in-memory [`Remote`] and [`Store`], and a fault-injecting wrapper, for tests in every
//! crate.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    ByteStream, Expect, ListedObject, ObjectInfo, PutInfo, Remote, RemoteError, Store, Upload,
};

/// The chunk size a mock's streamed body arrives in.
const STREAM_CHUNK: usize = 256 << 10;

/// `data` as a stream of [`STREAM_CHUNK`]-sized chunks, ending with `end` if given.
fn chunked(data: Bytes, end: Option<RemoteError>) -> ByteStream {
    let mut items: Vec<Result<Bytes, RemoteError>> = (0..data.len())
        .step_by(STREAM_CHUNK)
        .map(|i| Ok(data.slice(i..(i + STREAM_CHUNK).min(data.len()))))
        .collect();
    items.extend(end.map(Err));
    Box::pin(futures::stream::iter(items))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    etag: String,
    modified: SystemTime,
}

/// The objects of a mock, shared with its multipart uploads.
#[derive(Debug)]
struct Objects {
    map: Mutex<HashMap<String, Object>>,
    next_etag: AtomicU64,
}

impl Objects {
    /// Store (or replace) an object; a replaced object gets a new ETag.
    fn insert(&self, key: &str, data: Bytes) -> ObjectInfo {
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
        let modified = SystemTime::now();
        lock(&self.map).insert(
            key.to_string(),
            Object {
                data,
                etag,
                modified,
            },
        );
        info
    }
}

/// An in-memory object store with request counters.
#[derive(Debug)]
pub struct MockRemote {
    url: String,
    objects: Arc<Objects>,
    can_list: std::sync::atomic::AtomicBool,
    requests: AtomicU64,
    bytes: AtomicU64,
    ranges: Mutex<Vec<(String, Range<u64>)>>,
}

impl MockRemote {
    pub fn new(url: impl Into<String>) -> Self {
        MockRemote {
            url: url.into(),
            objects: Arc::new(Objects {
                map: Mutex::new(HashMap::new()),
                next_etag: AtomicU64::new(1),
            }),
            can_list: std::sync::atomic::AtomicBool::new(true),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
        }
    }

    /// Store (or replace) an object; a replaced object gets a new ETag.
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> ObjectInfo {
        self.objects.insert(key, data.into())
    }

    pub fn remove(&self, key: &str) {
        lock(&self.objects.map).remove(key);
    }

    /// The bytes of `key`, if it exists (what a writer stored).
    pub fn data(&self, key: &str) -> Option<Bytes> {
        lock(&self.objects.map).get(key).map(|o| o.data.clone())
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = lock(&self.objects.map).keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Make [`Store::list`] fail, as on a plain HTTP server (callers then use HEADs).
    pub fn set_can_list(&self, can: bool) {
        self.can_list.store(can, Ordering::Relaxed);
    }

    fn not_found(&self, key: &str) -> RemoteError {
        RemoteError::NotFound {
            url: self.url.clone(),
            key: key.to_string(),
        }
    }

    /// The [`Expect`] a stub populated now would carry.
    pub fn expect_for(&self, key: &str) -> Option<Expect> {
        lock(&self.objects.map).get(key).map(|o| Expect {
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
        let obj = lock(&self.objects.map)
            .get(key)
            .cloned()
            .ok_or_else(|| self.not_found(key))?;
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

    async fn get_stream(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<ByteStream, RemoteError> {
        // One request, whose body arrives in chunks.
        Ok(chunked(self.get_range(key, range, expect).await?, None))
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        let objects = lock(&self.objects.map);
        let obj = objects.get(key).ok_or_else(|| self.not_found(key))?;
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

#[async_trait]
impl Store for MockRemote {
    async fn list(&self) -> Result<Vec<ListedObject>, RemoteError> {
        if !self.can_list.load(Ordering::Relaxed) {
            return Err(RemoteError::Failed {
                url: self.url.clone(),
                key: String::new(),
                detail: "list: this mock cannot list".into(),
            });
        }
        let mut list: Vec<ListedObject> = lock(&self.objects.map)
            .iter()
            .map(|(key, o)| ListedObject {
                key: key.clone(),
                size: o.data.len() as u64,
                etag: Some(o.etag.clone()),
                version: None,
                last_modified: o.modified,
            })
            .collect();
        list.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(list)
    }

    async fn get(&self, key: &str) -> Result<Bytes, RemoteError> {
        self.data(key).ok_or_else(|| self.not_found(key))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<PutInfo, RemoteError> {
        let info = self.objects.insert(key, data);
        Ok(PutInfo {
            etag: info.etag,
            version: None,
        })
    }

    async fn start_upload(
        &self,
        key: &str,
        _part_size: usize,
    ) -> Result<Option<Box<dyn Upload>>, RemoteError> {
        Ok(Some(Box::new(MockUpload {
            objects: self.objects.clone(),
            key: key.to_string(),
            parts: Vec::new(),
        })))
    }

    async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.remove(key);
        Ok(())
    }
}

/// A multipart upload into a [`MockRemote`]: the object appears on `finish`.
#[derive(Debug)]
struct MockUpload {
    objects: Arc<Objects>,
    key: String,
    parts: Vec<Bytes>,
}

#[async_trait]
impl Upload for MockUpload {
    async fn wait_for_capacity(&mut self, _max: usize) -> Result<(), RemoteError> {
        Ok(())
    }

    fn put(&mut self, data: Bytes) {
        self.parts.push(data);
    }

    async fn finish(self: Box<Self>) -> Result<PutInfo, RemoteError> {
        let data: Vec<u8> = self.parts.concat();
        let info = self.objects.insert(&self.key, Bytes::from(data));
        Ok(PutInfo {
            etag: info.etag,
            version: None,
        })
    }

    async fn abort(self: Box<Self>) -> Result<(), RemoteError> {
        Ok(())
    }
}

/// A fault to inject into one ranged read, or one write (see [`FaultRemote::fail_next_writes`]).
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
    /// The connection breaks after this many bytes of the body: a ranged read fails, a
    /// streamed one yields those bytes and then the error.
    Break(u64),
}

/// Wraps a remote and injects faults into its ranged reads and, for a [`Store`], its writes.
#[derive(Debug)]
pub struct FaultRemote<R> {
    inner: R,
    queue: Mutex<VecDeque<Fault>>,
    writes: Mutex<VecDeque<Fault>>,
    paused: tokio::sync::watch::Sender<bool>,
}

impl<R: Remote> FaultRemote<R> {
    pub fn new(inner: R) -> Self {
        FaultRemote {
            inner,
            queue: Mutex::new(VecDeque::new()),
            writes: Mutex::new(VecDeque::new()),
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

    /// Apply `fault` to the next `n` writes: a [`Store::put`] fails (`Error`), waits
    /// (`Delay`), or stores one byte fewer (`Truncate`) or its first byte flipped
    /// (`Corrupt`); a [`Store::start_upload`] fails or waits (the other faults do not apply
    /// to it and are used up).
    pub fn fail_next_writes(&self, n: usize, fault: Fault) {
        let mut q = lock(&self.writes);
        for _ in 0..n {
            q.push_back(fault.clone());
        }
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
        let fault = self.next_fault().await;
        self.faulted_range(fault, key, range, expect).await
    }

    async fn get_stream(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<ByteStream, RemoteError> {
        match self.next_fault().await {
            None => self.inner.get_stream(key, range, expect).await,
            Some(Fault::Break(n)) => {
                let b = self.inner.get_range(key, range, expect).await?;
                let n = (n as usize).min(b.len());
                Ok(chunked(b.slice(..n), Some(self.reset(key, n as u64))))
            }
            // The other faults act on the whole body.
            other => Ok(chunked(
                self.faulted_range(other, key, range, expect).await?,
                None,
            )),
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        self.inner.head(key).await
    }
}

impl<R: Remote> FaultRemote<R> {
    /// Wait while paused, then take the next read's fault.
    async fn next_fault(&self) -> Option<Fault> {
        let mut rx = self.paused.subscribe();
        // An error here means the sender is gone, which cannot happen while self lives.
        let _ = rx.wait_for(|paused| !paused).await;
        lock(&self.queue).pop_front()
    }

    fn reset(&self, key: &str, after: u64) -> RemoteError {
        RemoteError::Failed {
            url: self.inner.url().to_string(),
            key: key.to_string(),
            detail: format!("read: connection reset after {after} bytes of the body"),
        }
    }

    async fn faulted_range(
        &self,
        fault: Option<Fault>,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError> {
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
            Some(Fault::Break(n)) => {
                self.inner.get_range(key, range, expect).await?;
                Err(self.reset(key, n))
            }
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultRemote<S> {
    async fn list(&self) -> Result<Vec<ListedObject>, RemoteError> {
        self.inner.list().await
    }

    async fn get(&self, key: &str) -> Result<Bytes, RemoteError> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<PutInfo, RemoteError> {
        let fault = lock(&self.writes).pop_front();
        match fault {
            None => self.inner.put(key, data).await,
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.put(key, data).await
            }
            Some(Fault::Truncate) => {
                let short = data.slice(..data.len().saturating_sub(1));
                self.inner.put(key, short).await
            }
            Some(Fault::Corrupt) => {
                let mut v = data.to_vec();
                if let Some(first) = v.first_mut() {
                    *first ^= 0xff;
                }
                self.inner.put(key, Bytes::from(v)).await
            }
            Some(Fault::Break(n)) => Err(self.reset(key, n)),
        }
    }

    async fn start_upload(
        &self,
        key: &str,
        part_size: usize,
    ) -> Result<Option<Box<dyn Upload>>, RemoteError> {
        let fault = lock(&self.writes).pop_front();
        match fault {
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.start_upload(key, part_size).await
            }
            _ => self.inner.start_upload(key, part_size).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.inner.delete(key).await
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

    #[tokio::test]
    async fn mock_store_writes_lists_and_write_faults() {
        let f = FaultRemote::new(MockRemote::new("mock://w"));
        f.fail_next_writes(
            1,
            Fault::Error(RemoteError::Failed {
                url: "mock://w".into(),
                key: "a".into(),
                detail: "put: injected".into(),
            }),
        );
        let e = f
            .put("a", Bytes::from_static(b"abc"))
            .await
            .expect_err("fault");
        assert!(e.to_string().contains("\"a\""), "{e}");
        let put = f.put("a", Bytes::from_static(b"abc")).await.expect("put");
        assert_eq!(f.head("a").await.expect("head").etag, put.etag);
        let mut up = f
            .start_upload("b/c", 2)
            .await
            .expect("start")
            .expect("multipart");
        up.put(Bytes::from_static(b"12"));
        up.wait_for_capacity(2).await.expect("capacity");
        up.put(Bytes::from_static(b"34"));
        let done = up.finish().await.expect("finish");
        assert_eq!(
            f.get("b/c").await.expect("get"),
            Bytes::from_static(b"1234")
        );
        let list = f.list().await.expect("list");
        let keys: Vec<_> = list.iter().map(|o| (o.key.as_str(), o.size)).collect();
        assert_eq!(keys, [("a", 3), ("b/c", 4)]);
        assert_eq!(list[1].etag, done.etag);
        f.fail_next_writes(1, Fault::Corrupt);
        f.put("a", Bytes::from_static(b"abc")).await.expect("put");
        assert_eq!(f.inner().data("a").expect("a")[0], b'a' ^ 0xff);
        f.delete("a").await.expect("delete");
        f.delete("a").await.expect("deleting nothing is fine");
        assert!(matches!(
            f.get("a").await,
            Err(RemoteError::NotFound { .. })
        ));
        f.inner().set_can_list(false);
        assert!(f.list().await.is_err());
    }
}
