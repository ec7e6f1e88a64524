//! `cimctl iu get`: download content, verified against its CID, to stdout or atomically to a
//! file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cim_iu_client::{IuClient, proto::GetUnit};
use serde_json::json;

use super::{
    parse::{ByteRange, GetTarget},
    print,
    progress::Bar,
    render::human_size,
};
use crate::error::usage;

/// `get`: resolve the CID, stream it (verified) to stdout or atomically to a file.
pub async fn get(
    iu: &IuClient,
    json: bool,
    target: GetTarget,
    output: Option<&Path>,
    range: Option<ByteRange>,
    at_version: Option<u64>,
) -> Result<()> {
    let (cid, size) = match target {
        GetTarget::Cid(cid) => {
            if at_version.is_some() {
                return Err(usage("--at-version applies to a unit id, not to a CID"));
            }
            let size = match range {
                Some(ByteRange { end: None, .. }) => Some(iu.content_size(&cid).await?),
                _ => None,
            };
            (cid, size)
        }
        GetTarget::Unit(unit_id) => {
            let unit = iu
                .get_unit(GetUnit {
                    unit_id: unit_id.clone(),
                    at_version: at_version.unwrap_or(0),
                    ..Default::default()
                })
                .await?;
            if unit.cid.is_empty() {
                bail!("unit {unit_id} has no content");
            }
            (unit.cid, Some(unit.size))
        }
    };
    let range = range.map(|r| r.resolve(size.unwrap_or(u64::MAX)));
    let mut bar = Bar::new("download");
    let read = match output {
        None => {
            let stdout = tokio::io::stdout();
            match iu.get_content(&cid, range, stdout, &mut bar).await {
                Ok(read) => read,
                // The reader went away (`cimctl iu get X | head`): not an error of ours.
                Err(cim_iu_client::IuError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Some(path) => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let file_name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "content".into());
            // 0666 less the umask, like any file this user creates (tempfile's default is 0600).
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{file_name}."))
                .suffix(".part")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .tempfile_in(&dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
            let mut file = tokio::fs::File::from_std(tmp.reopen().context("opening the temporary file")?);
            // On any error `tmp` is dropped and the temporary file removed.
            let read = iu.get_content(&cid, range, &mut file, &mut bar).await?;
            file.sync_all().await.context("syncing the downloaded file")?;
            drop(file);
            tmp.persist(path).with_context(|| format!("renaming the download to {}", path.display()))?;
            read
        }
    };
    drop(bar);
    if let Some(path) = output {
        print(
            json,
            || json!({ "cid": read.cid, "size": read.size, "written": read.written, "path": path.display().to_string() }),
            || format!("wrote {} ({}) of {} to {}", human_size(read.written), read.written, read.cid, path.display()),
        );
    }
    Ok(())
}
