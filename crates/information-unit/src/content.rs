//! Content in the JetStream object store: verification against the CID, the commit of an
//! upload into content named by its CID, corruption reported and quarantined, and the
//! collection rules that reclaim storage nobody can reach.
//!
//! A commit renames the upload: the content object keeps the upload's nuid, so the two names
//! share one chunk subject. An upload brought back after its commit (a restore from an archive
//! or a mirror, neither of which replays purges) therefore names the chunks of live content.
//! So removing an object removes its metadata, and its chunks only when no other live
//! (non-deleted) object names the same nuid; the chunks are otherwise left to rule 2.
//!
//! Collection rules (each run every `--iu-collect-interval`; docs/information-units.md):
//! 1. an upload (`upload.<uuid>`) older than `--iu-orphan-grace` was never committed (a commit
//!    refuses such an upload): its metadata is removed, and its chunks unless they are those of
//!    live content (the upload was committed and has come back);
//! 3. content no unit references any more — every unit whose versions include it is deleted —
//!    and whose object and tombstones are older than `--iu-content-retention`: deleted, but
//!    only once the storage manager has verified its archive on every required target
//!    (`cim_runtime::archive_guard`); until then it is kept. Rule 3 only runs while the
//!    projection is current, so it never acts on a partial view;
//! 2. (last, on a fresh listing) chunks that no live object's metadata names — an upload cut
//!    off mid-way, or chunks rules 1 and 3 left — last written longer than the grace ago:
//!    purged, once a second listing still shows no live object naming them.
//!
//! Rules 1 and 2 do not wait for the archive: rule 1 removes uploads never committed, and the
//! chunks rule 2 purges are named by no live object (never content, or content whose record
//! rule 3, after the retention guard, or a quarantine removed).
//!
//! Every collection is recorded as a `cim.evt.iu.content.<object>.collected` event.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_nats::{
    Message,
    jetstream::{
        self,
        object_store::{self, ObjectInfo, ObjectStore},
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

/// How long a read of stored content may wait for its next chunk before it gives up.
const CHUNK_WAIT: Duration = Duration::from_secs(30);

/// How many chunk messages the content stream holds for `nuid`.
pub async fn stored_chunks(stream: &jetstream::stream::Stream, nuid: &str) -> Result<u64, String> {
    let subject = cim_events::subject::object_chunks(iu::CONTENT_BUCKET, nuid).map_err(|e| e.to_string())?;
    let mut pages = stream.info_with_subjects(&subject).await.map_err(|e| e.to_string())?;
    let mut n = 0u64;
    while let Some(page) = pages.next().await {
        n += page.map_err(|e| e.to_string())?.1 as u64;
    }
    Ok(n)
}

/// Reads the object stored for `cid` to the end and checks its bytes against the CID. Chunks
/// that are gone (purged or lost) are a mismatch, found before reading: a reader waiting for
/// them would wait forever.
pub async fn verify(store: &ObjectStore, stream: &jetstream::stream::Stream, cid: &Cid) -> Result<(), VerifyError> {
    let info = match store.info(cid.to_string()).await {
        Ok(i) if i.deleted => return Err(VerifyError::Missing),
        Ok(i) => i,
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Err(VerifyError::Missing),
        Err(e) => return Err(VerifyError::Other(e.to_string())),
    };
    if info.digest.as_deref() != Some(cid.to_object_digest().as_str()) {
        return Err(VerifyError::Mismatch(format!("stored digest {:?} is not the CID's", info.digest)));
    }
    let chunks = stored_chunks(stream, &info.nuid).await.map_err(VerifyError::Other)?;
    if chunks < info.chunks as u64 {
        return Err(VerifyError::Mismatch(format!(
            "{chunks} of its {} chunks are stored (the others were purged or lost)",
            info.chunks
        )));
    }
    let mut object = store.get(cid.to_string()).await.map_err(|e| VerifyError::Other(e.to_string()))?;
    let mut hasher = CidHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let read = tokio::time::timeout(CHUNK_WAIT, object.read(&mut buf))
            .await
            .map_err(|_| VerifyError::Other(format!("no chunk of {cid} arrived within {CHUNK_WAIT:?}")))?;
        match read {
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

/// The objects of the content bucket at one moment, and which live names each nuid has.
struct Listing {
    objects: Vec<ObjectInfo>,
    live_names: HashMap<String, Vec<String>>,
}

impl Listing {
    /// A live object other than `name` that names the chunks of `nuid`.
    fn other_owner(&self, nuid: &str, name: &str) -> Option<String> {
        self.live_names.get(nuid)?.iter().find(|n| *n != name).cloned()
    }
}

/// What removing an object did with its chunks.
#[derive(Debug)]
pub enum Removed {
    /// Metadata and chunks removed (or there was nothing).
    Whole,
    /// Only the metadata: the chunks are also those of this live object.
    MetadataOnly { chunks_of: String },
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

    async fn list_objects(&self) -> anyhow::Result<Listing> {
        let mut objects = Vec::new();
        let mut live_names: HashMap<String, Vec<String>> = HashMap::new();
        let mut list = self.content.list().await?;
        while let Some(info) = list.next().await {
            let info = info?;
            if !info.deleted {
                live_names.entry(info.nuid.clone()).or_default().push(info.name.clone());
            }
            objects.push(info);
        }
        Ok(Listing { objects, live_names })
    }

    /// Records the removal of `info` by a collection rule.
    async fn record_removal(&self, info: &ObjectInfo, removed: Removed, reason: &str) {
        match removed {
            Removed::Whole => self.record_collected(&info.name, info.size as u64, reason).await,
            Removed::MetadataOnly { chunks_of } => {
                let reason = format!("{reason}; metadata only: its chunks are those of live object {chunks_of}");
                self.record_collected(&info.name, 0, &reason).await
            }
        }
    }

    /// One pass of the collection rules; returns how many objects it reclaimed.
    pub async fn collect_once(&self) -> anyhow::Result<usize> {
        let grace = self.opts.orphan_grace;
        let mut collected = 0;
        let listing = self.list_objects().await?;
        // Rule 1: uploads never committed.
        for info in listing.objects.iter().filter(|i| i.name.starts_with(iu::UPLOAD_PREFIX)) {
            // A deleted upload (a client gave up) leaves only a tombstone: clear it too.
            if info.deleted || age(info.modified) > grace {
                let removed = self
                    .remove_object(info, listing.other_owner(&info.nuid, &info.name))
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                self.record_removal(info, removed, "upload never committed").await;
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
            for info in listing.objects.iter().filter(|i| !i.deleted && i.name.parse::<Cid>().is_ok()) {
                if !referenced.contains(&info.name) && age(info.modified) > retention {
                    // The retention guard: content leaves JetStream only once its archive is
                    // verified on every required target.
                    if let Err(why) =
                        cim_runtime::archive_guard::object_removable(&self.js, iu::CONTENT_BUCKET, &info.name).await
                    {
                        tracing::info!(object = %info.name, reason = %why, "unreferenced content kept until its archive is verified");
                        continue;
                    }
                    let removed = self
                        .remove_object(info, listing.other_owner(&info.nuid, &info.name))
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                    self.record_removal(info, removed, "no live unit references it").await;
                    collected += 1;
                }
            }
        }
        // Rule 2: chunks no live object names, on a listing taken after rules 1 and 3.
        collected += self.collect_unnamed_chunks(grace).await?;
        Ok(collected)
    }

    /// Rule 2: purges chunk subjects older than `grace` that no live object's metadata names.
    /// A candidate is purged only if a second listing, taken after the candidates were found,
    /// still shows no live object naming it: a commit renames an upload by purging its
    /// metadata and then writing the content's, and a listing between the two sees neither.
    async fn collect_unnamed_chunks(&self, grace: Duration) -> anyhow::Result<usize> {
        let live = self.list_objects().await?.live_names;
        let stream = self.content_stream().await.map_err(|e| anyhow::anyhow!(e.message))?;
        let filter = cim_events::subject::all_object_chunks(iu::CONTENT_BUCKET)?;
        let prefix = filter.trim_end_matches('>');
        let mut subjects = Vec::new();
        let mut pages = stream.info_with_subjects(&filter).await?;
        while let Some(page) = pages.next().await {
            subjects.push(page?.0);
        }
        let mut candidates = Vec::new();
        for subject in subjects {
            let nuid = subject.trim_start_matches(prefix).to_string();
            if live.contains_key(&nuid) {
                continue;
            }
            let old = match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => age(Some(m.time)) > grace,
                Err(_) => false,
            };
            if old {
                candidates.push((subject, nuid));
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        let live = self.list_objects().await?.live_names;
        let mut collected = 0;
        for (subject, nuid) in candidates {
            if live.contains_key(&nuid) {
                continue;
            }
            let purged = stream.purge().filter(&subject).await?;
            self.record_collected(&nuid, purged.purged, "chunks no live object names").await;
            collected += 1;
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
        let info = match self.object_info(&c.upload).await {
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
        // Collection removes uploads older than the grace at any moment (rule 1); one that old
        // is also what a restore or a mirror brings back of an upload committed long ago.
        let grace = self.opts.orphan_grace;
        if age(info.modified) > grace {
            return Err(ServiceError::conflict(format!(
                "upload {} is older than the orphan grace ({grace:?}) and is collected as never committed; upload the content again",
                c.upload
            )));
        }
        let cid = Cid::from_object_digest(info.digest.as_deref().unwrap_or(""))
            .map_err(|e| ServiceError::bad_request(format!("upload {}: {e}", c.upload)))?;
        let size = info.size as u64;
        let name = cid.to_string();
        let deduplicated = loop {
            match self.object_info(&name).await {
                Ok(existing) if existing.deleted => {
                    // Only a tombstone of earlier (quarantined or collected) bytes: clear it.
                    self.purge_object_meta(&name).await?;
                }
                Ok(existing) if existing.digest == info.digest => {
                    if existing.nuid != info.nuid && !self.chunks_complete(&existing).await? {
                        // The stored copy lost its chunks: this upload's bytes take its place.
                        self.quarantine(&cid, "its chunks are not all stored").await?;
                        continue;
                    }
                    break true;
                }
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
            // The copy already stored keeps its own chunks; `remove_object` checks that they
            // are not this upload's (an upload brought back after its own commit).
            if let Err(e) = self.remove_object(&info, None).await {
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
        let info = match self.content.info(cid.to_string()).await {
            Ok(i) => i,
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(internal("content info")(Box::new(e))),
        };
        let listing =
            self.list_objects().await.map_err(|e| ServiceError::unavailable(format!("listing objects: {e}")))?;
        let removed = self.remove_object(&info, listing.other_owner(&info.nuid, &info.name)).await?;
        if let Removed::MetadataOnly { chunks_of } = removed {
            tracing::warn!(%cid, %chunks_of, "quarantined content's chunks kept: another live object names them");
        }
        Ok(())
    }

    /// Removes an object: its metadata (no tombstone is left) and its chunks, unless another
    /// live object names the same chunks. The caller passes such an object if it knows one
    /// (from a listing); for an upload, the content its digest names is checked too, after
    /// the upload's metadata is gone: that is what a commit renames the upload to, keeping its
    /// nuid, and a commit under way has then either failed (no upload) or written it.
    pub async fn remove_object(&self, info: &ObjectInfo, other_owner: Option<String>) -> Result<Removed, ServiceError> {
        self.purge_object_meta(&info.name).await?;
        let owner = match other_owner {
            Some(o) => Some(o),
            None => self.committed_as(info).await?,
        };
        if let Some(chunks_of) = owner {
            tracing::info!(object = %info.name, %chunks_of, "metadata removed; the chunks are another live object's");
            return Ok(Removed::MetadataOnly { chunks_of });
        }
        let subject = cim_events::subject::object_chunks(iu::CONTENT_BUCKET, &info.nuid)
            .map_err(|e| ServiceError::internal(format!("object {}: {e}", info.name)))?;
        let stream = self.content_stream().await?;
        stream.purge().filter(subject).await.map_err(|e| internal("purging object chunks")(Box::new(e)))?;
        Ok(Removed::Whole)
    }

    /// The live content an upload was committed as: the object its digest names, if that
    /// has the upload's nuid.
    async fn committed_as(&self, upload: &ObjectInfo) -> Result<Option<String>, ServiceError> {
        if !upload.name.starts_with(iu::UPLOAD_PREFIX) {
            return Ok(None);
        }
        let Some(cid) = upload.digest.as_deref().and_then(|d| Cid::from_object_digest(d).ok()) else {
            return Ok(None);
        };
        match self.content.info(cid.to_string()).await {
            Ok(c) if !c.deleted && c.nuid == upload.nuid => Ok(Some(c.name)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(internal("content info")(Box::new(e))),
        }
    }

    /// Whether the stream holds every chunk `info` records.
    async fn chunks_complete(&self, info: &ObjectInfo) -> Result<bool, ServiceError> {
        let stream = self.content_stream().await?;
        let stored = stored_chunks(&stream, &info.nuid).await.map_err(ServiceError::unavailable)?;
        Ok(stored >= info.chunks as u64)
    }

    async fn purge_object_meta(&self, name: &str) -> Result<(), ServiceError> {
        let subject = cim_events::subject::object_meta(iu::CONTENT_BUCKET, name)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        let stream = self.content_stream().await?;
        stream.purge().filter(subject).await.map_err(|e| internal("purging object metadata")(Box::new(e)))?;
        Ok(())
    }

    /// An object's info, which a lagging replica cannot hide: a direct get first, and a "not
    /// found" asked again of the stream's leader ([`cim_iu_client::leader_object_info`]).
    pub(crate) async fn object_info(&self, name: &str) -> Result<ObjectInfo, object_store::InfoError> {
        match self.content.info(name).await {
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                let stream = self
                    .content_stream()
                    .await
                    .map_err(|e| object_store::InfoError::with_source(object_store::InfoErrorKind::Other, e.message))?;
                cim_iu_client::leader_object_info(&stream, name).await
            }
            other => other,
        }
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
        let stream = self.content_stream().await?;
        match crate::content::verify(&self.content, &stream, &cid).await {
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
