//! What a deployment archives and where an archive stands: the names of the archived streams
//! (each component's event and dead-letter streams and object-bucket streams, and on the
//! cluster the mirrors of every leaf's), and a stream's committed position on a target.

use cim_events::{Component, resources};

use crate::format::{self, Cursor};
use crate::s3::{S3Client, S3Error};
use crate::seal::ArchiveKey;

/// Every stream CIM archives: each component's event and dead-letter streams, and the
/// streams behind its object buckets. KV buckets are projections, rebuilt by replay, and are
/// not archived.
pub fn archived_streams() -> Vec<String> {
    let mut out = Vec::new();
    for c in Component::ALL {
        out.extend(resources::streams(c).into_iter().map(|s| s.name));
        out.extend(resources::object_buckets(c).into_iter().map(|b| b.stream_name()));
    }
    out
}

/// The cluster's mirrors of every archived stream of every leaf in `leaves`
/// (`<STREAM>_FROM_<LEAF>`, named by [`resources::leaf_mirror`]): the storage manager on the
/// cluster archives them too, so a leaf's data reaches S3 through the cluster.
pub fn mirror_streams(leaves: &[String]) -> Result<Vec<String>, cim_events::ContractError> {
    let mut out = Vec::new();
    for leaf in leaves {
        for stream in archived_streams() {
            out.push(resources::leaf_mirror(&stream, leaf)?);
        }
    }
    Ok(out)
}

/// For a mirror's name, the archived stream it mirrors and the leaf's domain as the name
/// spells it (upper case): `CIM_IU_EVENTS_FROM_LEAF1` → (`CIM_IU_EVENTS`, `LEAF1`).
pub fn mirrored_stream(name: &str) -> Option<(String, String)> {
    archived_streams().into_iter().find_map(|stream| {
        let leaf = resources::leaf_mirror_domain(name, &stream)?.to_string();
        Some((stream, leaf))
    })
}

/// Where the archive of one stream stands on a target.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Position {
    /// The epoch being archived (0 for a stream never recreated).
    pub epoch: u64,
    /// Everything up to this stream sequence is archived in `epoch` (0 = nothing yet).
    pub last_seq: u64,
    /// The newest committed manifest of `epoch`.
    pub manifest_key: Option<String>,
    /// The cursor, when it was readable and correctly signed.
    pub cursor: Option<Cursor>,
    /// What was wrong with the cursor object, if anything (a missing cursor is not a problem).
    pub cursor_problem: Option<String>,
}

/// Reads the committed position of `stream` on a target: the signed cursor (epoch and
/// position), corrected by any manifest committed after it (a crash between manifest and
/// cursor). A cursor that is missing, unreadable or not signed with `key` is not trusted: the
/// position is then found from the manifests of the newest epoch alone.
pub async fn committed_position(s3: &S3Client, key: &ArchiveKey, stream: &str) -> Result<Position, S3Error> {
    let prefix = &s3.target().prefix;
    let mut pos = Position::default();
    match s3.get(&format::cursor_key(prefix, stream)).await? {
        None => {}
        Some(body) => match serde_json::from_slice::<Cursor>(&body) {
            Ok(c) => match key.check(&c) {
                Ok(()) => {
                    pos.epoch = c.epoch;
                    pos.last_seq = c.last_seq;
                    pos.manifest_key = Some(c.manifest_key.clone());
                    pos.cursor = Some(c);
                }
                Err(e) => pos.cursor_problem = Some(format!("cursor of {stream}: {e}")),
            },
            Err(e) => pos.cursor_problem = Some(format!("cursor of {stream}: {e}")),
        },
    }
    if pos.cursor.is_none() {
        pos.epoch = newest_epoch(s3, stream).await?;
    }
    let later = s3.list(&format::manifests_prefix(prefix, stream, pos.epoch), pos.manifest_key.as_deref()).await?;
    for k in later {
        if let Some((_, last)) = format::parse_manifest_key(&k)
            && last > pos.last_seq
        {
            pos.last_seq = last;
            pos.manifest_key = Some(k);
        }
    }
    Ok(pos)
}

/// How far `stream` is archived on a target in its current epoch, with the target's own key.
pub async fn archived_through(s3: &S3Client, stream: &str) -> Result<u64, crate::restore::ArchiveError> {
    Ok(committed_position(s3, &ArchiveKey::for_target(s3.target())?, stream).await?.last_seq)
}

/// The epochs of `stream` present on a target, ascending (0 is always there).
pub async fn epochs(s3: &S3Client, stream: &str) -> Result<Vec<u64>, S3Error> {
    let p = format::epochs_prefix(&s3.target().prefix, stream);
    let keys = s3.list(&p, None).await?;
    let mut out = vec![0];
    out.extend(format::parse_epochs(&p, &keys));
    out.dedup();
    Ok(out)
}

/// The newest epoch of `stream` on a target.
pub async fn newest_epoch(s3: &S3Client, stream: &str) -> Result<u64, S3Error> {
    Ok(epochs(s3, stream).await?.last().copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_map_back_to_their_stream_and_leaf() {
        let mirrors = mirror_streams(&["leaf1".to_string(), "edge-b".to_string()]).unwrap();
        assert_eq!(mirrors.len(), 2 * archived_streams().len());
        for m in &mirrors {
            let (stream, leaf) = mirrored_stream(m).unwrap_or_else(|| panic!("{m}"));
            assert!(archived_streams().contains(&stream), "{m}");
            assert!(leaf == "LEAF1" || leaf == "EDGE-B", "{m}: {leaf}");
            assert_eq!(&resources::leaf_mirror(&stream, &leaf).unwrap(), m);
        }
        for s in archived_streams() {
            assert_eq!(mirrored_stream(&s), None, "{s} is not a mirror");
            assert_eq!(mirrored_stream(&format!("{s}_FROM_")), None);
        }
        assert!(mirror_streams(&["bad leaf".to_string()]).is_err());
    }
}
