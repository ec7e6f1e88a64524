//! The plugins every host ships: WebAssembly modules (written in WAT, in `builtin/`) that the
//! host pushes into the artifact bucket like any other plugin, so they are listed, invoked by
//! capability and referenced by pipelines the same way.

use cim_events::proto::plugin::Manifest;

/// One shipped plugin. Bump `version` whenever its source changes: versions are immutable.
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    pub name: &'static str,
    pub version: &'static str,
    pub capabilities: &'static [&'static str],
    pub description: &'static str,
    pub wat: &'static str,
}

pub const BUILTINS: [Builtin; 4] = [
    Builtin {
        name: "text-normalize",
        version: "1.0.0",
        capabilities: &["text.normalize"],
        description: "normalizes line endings and whitespace of text; metadata case=lower lowercases ASCII",
        wat: include_str!("../builtin/text-normalize.wat"),
    },
    Builtin {
        name: "content-sniff",
        version: "1.0.0",
        capabilities: &["content.sniff"],
        description: "guesses the media type of content from its first bytes",
        wat: include_str!("../builtin/content-sniff.wat"),
    },
    Builtin {
        name: "crc32",
        version: "1.0.0",
        capabilities: &["checksum.crc32"],
        description: "crc-32 (ieee) of the input as 8 hex digits, with the size",
        wat: include_str!("../builtin/crc32.wat"),
    },
    Builtin {
        name: "identity",
        version: "1.0.0",
        capabilities: &["debug.identity"],
        description: "returns its input unchanged (connectivity checks, benchmarks)",
        wat: include_str!("../builtin/identity.wat"),
    },
];

impl Builtin {
    /// The module in binary form.
    pub fn wasm(&self) -> Vec<u8> {
        // The sources are part of this crate and checked by its tests.
        wat::parse_str(self.wat).unwrap_or_else(|e| panic!("builtin {} does not parse: {e}", self.name))
    }

    pub fn manifest(&self) -> Manifest {
        Manifest {
            name: self.name.to_string(),
            version: self.version.to_string(),
            capabilities: self.capabilities.iter().map(|c| c.to_string()).collect(),
            description: self.description.to_string(),
            ..Default::default()
        }
    }

    pub fn find(name: &str) -> Option<&'static Builtin> {
        BUILTINS.iter().find(|b| b.name == name)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use cim_events::proto::plugin::Status;

    use super::*;
    use crate::sandbox::{Policy, Sandbox};

    fn run(name: &str, input: &[u8], meta: &[(&str, &str)]) -> crate::sandbox::Outcome {
        let b = Builtin::find(name).unwrap();
        let sandbox = Sandbox::new(Policy::default()).unwrap();
        let c = sandbox.load(&b.wasm(), &b.manifest()).unwrap();
        let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let o = c.invoke(Bytes::copy_from_slice(input), meta, None);
        assert_eq!(o.status, Status::Ok, "{name}: {}", o.message);
        o
    }

    #[test]
    fn every_builtin_is_valid() {
        for b in BUILTINS {
            cim_events::plugin::validate_name(b.name).unwrap();
            cim_events::plugin::validate_version(b.version).unwrap();
            for c in b.capabilities {
                cim_events::plugin::validate_capability(c).unwrap();
            }
            run(b.name, b"", &[]);
        }
    }

    #[test]
    fn crc32_matches_the_check_value() {
        let o = run("crc32", b"123456789", &[]);
        assert_eq!(o.output, b"cbf43926");
        assert_eq!(o.metadata["size"], "9");
        assert_eq!(run("crc32", b"", &[]).output, b"00000000");
        let big = vec![7u8; 300_000];
        assert_eq!(run("crc32", &big, &[]).metadata["size"], "300000");
    }

    #[test]
    fn text_normalize_cleans_whitespace() {
        let input = b"  Hello,\t\tWorld!  \r\n\r\n\r\n\nSecond   line \n\n";
        let o = run("text-normalize", input, &[]);
        assert_eq!(String::from_utf8(o.output).unwrap(), "Hello, World!\n\nSecond line\n");
        assert_eq!(o.metadata["lines"], "3");
        let o = run("text-normalize", "Grüße  AUS\rBerlin".as_bytes(), &[("case", "lower")]);
        assert_eq!(String::from_utf8(o.output).unwrap(), "grüße aus\nberlin\n");
        assert_eq!(run("text-normalize", b" \n\t ", &[]).output, b"");
    }

    #[test]
    fn content_sniff_knows_common_types() {
        let cases: [(&[u8], &str); 12] = [
            (b"\x89PNG\r\n\x1a\n....", "image/png"),
            (b"\xff\xd8\xff\xe0", "image/jpeg"),
            (b"GIF89a..", "image/gif"),
            (b"%PDF-1.7", "application/pdf"),
            (b"PK\x03\x04rest", "application/zip"),
            (b"\x1f\x8b\x08", "application/gzip"),
            (b"\0asm\x01\0\0\0", "application/wasm"),
            (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
            (b"  <?xml version=\"1.0\"?>", "application/xml"),
            (b"\n<!DOCTYPE html><html>", "text/html"),
            (b" {\"a\": 1}", "application/json"),
            (b"just some text\n", "text/plain"),
        ];
        for (input, want) in cases {
            let o = run("content-sniff", input, &[]);
            assert_eq!(String::from_utf8(o.output).unwrap(), want, "{input:?}");
            assert_eq!(o.metadata["media-type"], want);
        }
        assert_eq!(run("content-sniff", b"\x00\x01\x02binary", &[]).output, b"application/octet-stream");
        assert_eq!(run("content-sniff", b"", &[]).output, b"application/octet-stream");
    }

    #[test]
    fn identity_echoes_large_inputs() {
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(run("identity", &big, &[]).output, big);
    }
}
