//! A small media-type guess from a file name, for the common cases.

use std::path::Path;

/// What is used when nothing better is known.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Guesses the media type from the file name's extension (case-insensitive); unknown or no
/// extension gives `application/octet-stream`.
pub fn guess_media_type(path: impl AsRef<Path>) -> &'static str {
    let ext = path.as_ref().extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "text" | "log" => "text/plain",
        "md" | "markdown" => "text/markdown",
        "csv" => "text/csv",
        "tsv" => "text/tab-separated-values",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "ndjson" | "jsonl" => "application/x-ndjson",
        "xml" => "application/xml",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "zst" => "application/zstd",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "proto" => "text/plain",
        _ => OCTET_STREAM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_common_types() {
        assert_eq!(guess_media_type("a/b/report.PDF"), "application/pdf");
        assert_eq!(guess_media_type("notes.md"), "text/markdown");
        assert_eq!(guess_media_type("photo.JPeG"), "image/jpeg");
        assert_eq!(guess_media_type("data.json"), "application/json");
        assert_eq!(guess_media_type("archive.tar.gz"), "application/gzip");
        assert_eq!(guess_media_type("README"), OCTET_STREAM);
        assert_eq!(guess_media_type("blob.xyz"), OCTET_STREAM);
        assert_eq!(guess_media_type(".hidden"), OCTET_STREAM);
    }
}
