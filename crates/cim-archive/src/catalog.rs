//! What a deployment archives and where an archive stands: the names of the archived streams
//! (each component's event and dead-letter streams and object-bucket streams, and on the
//! cluster the mirrors of every leaf's), and a stream's committed position on a target.

use cim_events::{Component, resources};

use crate::format::{self, Cursor};
use crate::s3::{S3Client, S3Error};

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

/// Reads the committed position of `stream` on a target: the cursor object, corrected by
/// any manifest committed after it (a crash between manifest and cursor). 0 = nothing yet.
pub async fn committed_position(s3: &S3Client, stream: &str) -> Result<(u64, Option<String>), S3Error> {
    let prefix = &s3.target().prefix;
    let cursor_key = format::cursor_key(prefix, stream);
    let mut position = 0;
    let mut last_manifest = None;
    if let Some(body) = s3.get(&cursor_key).await?
        && let Ok(c) = serde_json::from_slice::<Cursor>(&body)
    {
        position = c.last_seq;
        last_manifest = Some(c.manifest_key);
    }
    let later = s3.list(&format::manifests_prefix(prefix, stream), last_manifest.as_deref()).await?;
    for key in later {
        if let Some((_, last)) = format::parse_manifest_key(&key)
            && last > position
        {
            position = last;
            last_manifest = Some(key);
        }
    }
    Ok((position, last_manifest))
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
