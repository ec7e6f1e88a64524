//! The retention guard, on the side of the services that remove things: nothing leaves an
//! archived stream before the storage manager has verified its archive on every required
//! target (the watermarks of `cim_events::storage`).

use async_nats::jetstream;
use cim_events::{Component, resources, storage};

/// The sequence through which `stream` is archived and verified on every required target;
/// `None` while no storage manager has verified any of it (or its bucket does not exist).
pub async fn verified_through(js: &jetstream::Context, stream: &str) -> Result<Option<u64>, String> {
    let bucket = resources::kv_bucket(Component::StorageManager, storage::KV_ARCHIVE).map_err(|e| e.to_string())?;
    let key = storage::verified_key(stream).map_err(|e| e.to_string())?;
    let Ok(kv) = js.get_key_value(&bucket).await else { return Ok(None) };
    match kv.get(&key).await {
        Ok(Some(v)) => {
            let w: storage::Watermark =
                serde_json::from_slice(&v).map_err(|e| format!("watermark {key} is unreadable: {e}"))?;
            Ok(Some(w.verified_seq))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(format!("reading watermark {key}: {e}")),
    }
}

/// Whether object `name` of `bucket` may be removed: `Ok(())` when its metadata (written after
/// all of its chunks) is at or below the bucket stream's verified watermark, otherwise the
/// reason it must stay.
pub async fn object_removable(js: &jetstream::Context, bucket: &str, name: &str) -> Result<(), String> {
    let stream_name = resources::object_stream(bucket);
    let meta = cim_events::subject::object_meta(bucket, name).map_err(|e| e.to_string())?;
    let stream = js.get_stream(&stream_name).await.map_err(|e| format!("stream {stream_name}: {e}"))?;
    let seq = stream
        .get_last_raw_message_by_subject(&meta)
        .await
        .map_err(|e| format!("metadata of {name} in {stream_name}: {e}"))?
        .sequence;
    match verified_through(js, &stream_name).await? {
        Some(through) if seq <= through => Ok(()),
        Some(through) => Err(format!(
            "its archive is not verified yet ({stream_name} verified through {through}, the object is at {seq})"
        )),
        None => Err(format!(
            "no verified archive of {stream_name} yet (is a storage manager with archive targets running?)"
        )),
    }
}
