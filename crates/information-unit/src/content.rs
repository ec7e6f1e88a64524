//! Content in the JetStream object store: verification against the CID, the commit of an
//! upload into content named by its CID, corruption reported and quarantined, and the
//! collection rules that reclaim storage nobody can reach.
//!
//! Collection rules (each run every `--iu-collect-interval`; docs/information-units.md):
//! 1. an upload (`upload.<uuid>`) older than `--iu-orphan-grace` was never committed: deleted;
//! 2. chunks whose object has no metadata (an upload cut off mid-way), last written longer than
//!    the grace ago: purged;
//! 3. content no unit references any more — every unit whose versions include it is deleted —
//!    and whose object and tombstones are older than `--iu-content-retention`: deleted, but
//!    only once the storage manager has verified its archive on every required target
//!    (`cim_runtime::archive_guard`); until then it is kept. Rule 3 only runs while the
//!    projection is current, so it never acts on a partial view.
//!
//! Rules 1 and 2 remove bytes that never became content of any unit (an upload that was
//! never committed), so they do not wait for the archive.
//!
//! Every collection is recorded as a `cim.evt.iu.content.<object>.collected` event.

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_nats::{
    Message,
    jetstream::{
        self,
        object_store::{self, ObjectStore},
    },
};
use cim_events::{
    Cid, Payload,
    cid::CidHasher,
    iu,
    proto::iu::{ContentCollected, ContentCommitted, ContentCorrupted, ContentStored},
    resources,
};
use cim_runtime::{Reply, ServiceError};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::AsyncReadExt;

use crate::{
    app::{App, decode, internal, reject},
    domain,
};

#[derive(Debug)]
pub enum VerifyError {
    Missing,
    Mismatch(String),
    Other(String),
}

/// Reads the object stored for `cid` to the end and checks its bytes against the CID.
pub async fn verify(store: &ObjectStore, cid: &Cid) -> Result<(), VerifyError> {
    let info = match store.info(cid.to_string()).await {
        Ok(i) if i.deleted => return Err(VerifyError::Missing),
        Ok(i) => i,
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Err(VerifyError::Missing),
        Err(e) => return Err(VerifyError::Other(e.to_string())),
    };
    if info.digest.as_deref() != Some(cid.to_object_digest().as_str()) {
        return Err(VerifyError::Mismatch(format!("stored digest {:?} is not the CID's", info.digest)));
    }
    let mut object = store.get(cid.to_string()).await.map_err(|e| VerifyError::Other(e.to_string()))?;
    let mut hasher = CidHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match object.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            // async-nats reports its own digest check failing as a read error
            Err(e) if e.to_string().contains("digest") => return Err(VerifyError::Mismatch(e.to_string())),
            Err(e) => return Err(VerifyError::Other(e.to_string())),
        }
    }
    let actual = hasher.finish();
    if actual != *cid {
        return Err(VerifyError::Mismatch(format!("bytes hash to {actual}")));
    }
    Ok(())
}

fn age(modified: Option<time::OffsetDateTime>) -> Duration {
    modified.map(|m| (time::OffsetDateTime::now_utc() - m).unsigned_abs()).unwrap_or(Duration::ZERO)
}

impl App {
    async fn record_collected(&self, object: &str, size: u64, reason: &str) {
        tracing::info!(object, size, reason, "collected");
        let event = ContentCollected { object: object.to_string(), size, reason: reason.to_string() };
        let token = object.replace('.', "_");
        let Ok(subject) = iu::content_event(&token, iu::action::COLLECTED) else { return };
        let env = cim_events::Envelope::root::<ContentCollected>(self.ctx.source());
        if let Err(e) = cim_runtime::NewEvent::new(subject, &env, event.encode_to_vec()).publish(&self.js).await {
            tracing::warn!(object, error = %e, "collection not recorded");
        }
    }

    /// One pass of the collection rules; returns how many objects it reclaimed.
    pub async fn collect_once(&self) -> anyhow::Result<usize> {
        let grace = self.opts.orphan_grace;
        let mut collected = 0;
        let mut live_nuids = HashSet::new();
        let mut stored = Vec::new();
        let mut list = self.content.list().await?;
        while let Some(info) = list.next().await {
            let info = info?;
            if !info.deleted {
                live_nuids.insert(info.nuid.clone());
            }
            stored.push(info);
        }
        // Rule 1: uploads never committed.
        for info in stored.iter().filter(|i| i.name.starts_with(iu::UPLOAD_PREFIX)) {
            // A deleted upload (a client gave up) leaves only a tombstone: clear it too.
            if info.deleted || age(info.modified) > grace {
                self.remove_object(&info.name).await.map_err(|e| anyhow::anyhow!(e.message))?;
                self.record_collected(&info.name, info.size as u64, "upload never committed").await;
                collected += 1;
            }
        }
        // Rule 2: chunks without metadata.
        let stream = self.content_stream().await.map_err(|e| anyhow::anyhow!(e.message))?;
        let filter = cim_events::subject::all_object_chunks(iu::CONTENT_BUCKET)?;
        let info = stream.info_with_subjects(&filter).await?;
        let prefix = filter.trim_end_matches('>');
        let subjects: Vec<String> = {
            let mut names = Vec::new();
            let mut s = info;
            while let Some(page) = s.next().await {
                let (subject, _) = page?;
                names.push(subject);
            }
            names
        };
        for subject in subjects {
            let nuid = subject.trim_start_matches(prefix);
            if live_nuids.contains(nuid) {
                continue;
            }
            let last = stream.get_last_raw_message_by_subject(&subject).await;
            let old = match &last {
                Ok(m) => age(Some(m.time)) > grace,
                Err(_) => false,
            };
            if old {
                let purged = stream.purge().filter(&subject).await?;
                self.record_collected(nuid, purged.purged, "chunks of an interrupted upload").await;
                collected += 1;
            }
        }
        // Rule 3: content no live unit references.
        let status = self.status_numbers().await;
        if let Some((0, false)) = status {
            let retention = self.opts.content_retention;
            let units = self.index.snapshot();
            let referenced: HashSet<String> = units
                .iter()
                .filter(|u| !u.deleted || age(ms_to_time(u.updated_ms)) <= retention)
                .flat_map(|u| u.versions.iter().map(|v| v.cid.clone()))
                .collect();
            for info in stored.iter().filter(|i| !i.deleted && i.name.parse::<Cid>().is_ok()) {
                if !referenced.contains(&info.name) && age(info.modified) > retention {
                    // The retention guard: content leaves JetStream only once its archive is
                    // verified on every required target.
                    if let Err(why) =
                        cim_runtime::archive_guard::object_removable(&self.js, iu::CONTENT_BUCKET, &info.name).await
                    {
                        tracing::info!(object = %info.name, reason = %why, "unreferenced content kept until its archive is verified");
                        continue;
                    }
                    self.remove_object(&info.name).await.map_err(|e| anyhow::anyhow!(e.message))?;
                    self.record_collected(&info.name, info.size as u64, "no live unit references it").await;
                    collected += 1;
                }
            }
        }
        Ok(collected)
    }

    /// (lag, rebuilding) of the projection, if it can be read.
    async fn status_numbers(&self) -> Option<(u64, bool)> {
        let reply = self.status().await.ok()?;
        let s = cim_events::proto::iu::ProjectionStatus::decode(reply.body).ok()?;
        Some((s.lag, s.rebuilding))
    }

    /// Runs the collection rules every interval until shutdown.
    pub async fn run_collector(self: Arc<Self>) {
        loop {
            if !self.ctx.pause(self.opts.collect_interval).await {
                return;
            }
            match self.collect_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(collected = n, "collection pass done"),
                Err(e) => tracing::warn!(error = %e, "collection pass failed; will retry"),
            }
        }
    }
}

fn ms_to_time(ms: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

impl App {
    // ---- commit and corruption ----

    /// Turns a finished upload into content named by its CID (or drops it as a duplicate).
    pub async fn commit(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::CommitContent = decode(&msg)?;
        let id = c.upload.strip_prefix(iu::UPLOAD_PREFIX).unwrap_or("");
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(ServiceError::bad_request(format!(
                "{:?} is not an upload name ({}<uuid>)",
                c.upload,
                iu::UPLOAD_PREFIX
            )));
        }
        let info = match self.content.info(&c.upload).await {
            Ok(i) if !i.deleted => i,
            Ok(_) => return Err(ServiceError::not_found(format!("upload {} was removed", c.upload))),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                return Err(ServiceError::not_found(format!(
                    "upload {} does not exist (unfinished, or already committed)",
                    c.upload
                )));
            }
            Err(e) => return Err(internal("upload info")(Box::new(e))),
        };
        let cid = Cid::from_object_digest(info.digest.as_deref().unwrap_or(""))
            .map_err(|e| ServiceError::bad_request(format!("upload {}: {e}", c.upload)))?;
        let size = info.size as u64;
        let name = cid.to_string();
        let deduplicated = loop {
            match self.content.info(&name).await {
                Ok(existing) if existing.deleted => {
                    // Only a tombstone of earlier (quarantined or collected) bytes: clear it.
                    self.purge_object_meta(&name).await?;
                }
                Ok(existing) if existing.digest == info.digest => break true,
                Ok(_) => {
                    // A different object under this CID: never serve it; keep the honest bytes.
                    self.quarantine(&cid, "stored object's digest does not match its CID").await?;
                }
                Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                    let meta = object_store::UpdateMetadata { name: name.clone(), ..Default::default() };
                    match self.content.update_metadata(&c.upload, meta).await {
                        Ok(_) => break false,
                        // A concurrent commit of the same bytes won.
                        Err(e) if e.kind() == object_store::UpdateMetadataErrorKind::NameAlreadyInUse => continue,
                        Err(e) => return Err(internal("renaming the upload")(Box::new(e))),
                    }
                }
                Err(e) => return Err(internal("content info")(Box::new(e))),
            }
        };
        if deduplicated {
            if let Err(e) = self.remove_object(&c.upload).await {
                tracing::warn!(upload = %c.upload, error = %e.message, "could not drop a duplicate upload; collection will");
            }
        } else {
            let event = ContentStored { cid: name.clone(), size };
            let subject =
                iu::content_event(&name, iu::action::STORED).map_err(|e| ServiceError::internal(e.to_string()))?;
            let parent = Self::parent_envelope(&msg)?;
            let msg_id = format!("stored-{name}-{}", info.nuid);
            if let Err(e) = self
                .publish(subject, None, ContentStored::TYPE, event.encode_to_vec(), parent.as_ref(), Some(&msg_id))
                .await
            {
                tracing::warn!(cid = %name, error = ?e, "content stored but its event could not be written");
            }
        }
        Ok(Reply::proto(&ContentCommitted { cid: name, size, deduplicated }))
    }

    /// Removes an object whose bytes do not match its CID, and records why.
    pub async fn quarantine(&self, cid: &Cid, detail: &str) -> Result<(), ServiceError> {
        tracing::warn!(%cid, detail, "content does not match its CID; removing it");
        let event = ContentCorrupted { cid: cid.to_string(), detail: detail.to_string() };
        let subject = iu::content_event(&cid.to_string(), iu::action::CORRUPTED)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        self.publish(subject, None, ContentCorrupted::TYPE, event.encode_to_vec(), None, None)
            .await
            .map_err(|e| ServiceError::unavailable(format!("recording corruption: {e:?}")))?;
        self.remove_object(&cid.to_string()).await
    }

    /// Deletes an object completely: its chunks and its metadata (no tombstone is left).
    pub async fn remove_object(&self, name: &str) -> Result<(), ServiceError> {
        match self.content.delete(name).await {
            Ok(()) => {}
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing an object")(Box::new(e))),
        }
        self.purge_object_meta(name).await
    }

    async fn purge_object_meta(&self, name: &str) -> Result<(), ServiceError> {
        let subject = cim_events::subject::object_meta(iu::CONTENT_BUCKET, name)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        let stream = self.content_stream().await?;
        stream.purge().filter(subject).await.map_err(|e| internal("purging object metadata")(Box::new(e)))?;
        Ok(())
    }

    pub async fn content_stream(&self) -> Result<jetstream::stream::Stream, ServiceError> {
        let name = resources::object_buckets(cim_events::Component::InformationUnit)
            .first()
            .map(|b| b.stream_name())
            .unwrap_or_default();
        self.js.get_stream(&name).await.map_err(|e| internal("content stream")(Box::new(e)))
    }

    /// A reader says the bytes of a CID are wrong: check them; if so, record and remove them.
    pub async fn report_corrupt(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::ReportCorrupt = decode(&msg)?;
        let cid = domain::validate_cid(&c.cid).map_err(reject)?;
        match crate::content::verify(&self.content, &cid).await {
            Ok(()) => Err(ServiceError::conflict(format!("content {cid} was read back and matches its CID"))),
            Err(crate::content::VerifyError::Missing) => {
                Err(ServiceError::not_found(format!("content {cid} is not stored")))
            }
            Err(crate::content::VerifyError::Mismatch(detail)) => {
                let detail = if c.detail.is_empty() { detail } else { format!("{detail} (reported: {})", c.detail) };
                self.quarantine(&cid, &detail).await?;
                Ok(Reply::default())
            }
            Err(crate::content::VerifyError::Other(e)) => Err(ServiceError::unavailable(e)),
        }
    }
}
