//! The object key scheme: deterministic keys for a job's images, the sanitising that keeps
//! user-chosen batch names inside the storage root, and the validation every backend applies to
//! a key before touching storage.
//!
//! A key is `[{batch}/]{job_id}-{index}.{ext}` for an original and
//! `[{batch}/]{job_id}-{index}.{spec}.{ext}` for a rendition of it (`{spec}` is the spec's key
//! token: `og`, `thumb`, `webp`, `1200x630-webp`), relative to the storage root (the bucket prefix
//! or the directory). A regenerated picture (the job's `generation` `g` > 1) gets
//! `{job_id}-g{g}-{index}...`, so a CDN never serves an old picture under a new one's URL and the
//! old one stays as history; generation 1 is the plain form above, which is every key made
//! before regeneration existed. [`parse_file_name`] reads any of them back, so code
//! that finds objects by listing (the recovery of paid images) can tell an original from a
//! rendition by structure, never by guessing. Invariants the rest of the module relies on:
//! - Keys contain only `[A-Za-z0-9._-]` and `/`, never an empty, `.` or `..` segment, never a
//!   leading or trailing `/`. So they are the same string in a URL path, an S3 key and a relative
//!   file path, and cannot name anything outside the root.
//! - Batch segments never contain a `.` and file names always do, so a batch directory can never
//!   collide with an image file on a local file system (`7-0.png` the file versus a batch named
//!   `7-0.png`, which becomes `7-0-png`).
//! - The job id and image index alone make a key unique; two batch names that sanitise to the
//!   same string therefore share a folder but never an object.

use crate::image::ImageFormat;

/// The longest sanitised batch prefix kept in a key, in bytes. Batch names are labels chosen by
/// other applications; a short bound keeps keys far from S3's 1024-byte limit and from servers
/// that derive file names from whole keys (s3s-fs fails on keys of about 180 bytes).
pub const MAX_BATCH_LEN: usize = 64;

/// The longest key (relative to the storage root) any backend accepts, in bytes. S3 allows 1024
/// for the full key; this leaves room for the bucket prefix.
pub const MAX_KEY_LEN: usize = 512;

/// The deterministic key of image `index` (0-based) of job `job_id`: a retried upload of the same
/// job writes the same key and overwrites instead of duplicating.
///
/// The extension follows the sniffed format, so a retry that gets a different format from the
/// provider writes a second object; the row only ever records the last one.
pub fn object_key(batch: Option<&str>, job_id: i64, index: usize, format: ImageFormat) -> String {
    generation_key(batch, job_id, FIRST_GENERATION, index, format)
}

/// The generation every job starts at (`jobs.generation`'s default); its keys are the plain ones.
pub const FIRST_GENERATION: u32 = 1;

/// [`object_key`] for generation `generation` of the job (1 gives the same key).
pub fn generation_key(
    batch: Option<&str>,
    job_id: i64,
    generation: u32,
    index: usize,
    format: ImageFormat,
) -> String {
    with_batch(
        batch,
        format!("{}.{}", stem(job_id, generation, index), format.extension()),
    )
}

/// The key of rendition `spec_token` (see `Spec::key_token`) of image `index` of generation
/// `generation` of job `job_id`. Deterministic like [`object_key`], so a retried upload
/// overwrites.
pub fn rendition_key(
    batch: Option<&str>,
    job_id: i64,
    generation: u32,
    index: usize,
    spec_token: &str,
    format: ImageFormat,
) -> String {
    with_batch(
        batch,
        format!(
            "{}.{spec_token}.{}",
            stem(job_id, generation, index),
            format.extension()
        ),
    )
}

/// `{job_id}-{index}` for the first generation, `{job_id}-g{generation}-{index}` after.
fn stem(job_id: i64, generation: u32, index: usize) -> String {
    if generation <= FIRST_GENERATION {
        format!("{job_id}-{index}")
    } else {
        format!("{job_id}-g{generation}-{index}")
    }
}

fn with_batch(batch: Option<&str>, file: String) -> String {
    match batch.and_then(sanitize_batch) {
        Some(prefix) => format!("{prefix}/{file}"),
        None => file,
    }
}

/// What an object's file name (the last key segment) says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedName {
    pub job_id: i64,
    pub generation: u32,
    pub index: usize,
    /// `None` for an original; the spec's key token for a rendition.
    pub rendition: Option<String>,
    pub extension: String,
}

/// Reads a file name made by [`object_key`] or [`rendition_key`]; `None` for anything else. The
/// numbers must be canonical (no sign, no leading zero), so one object has one reading.
pub fn parse_file_name(name: &str) -> Option<ParsedName> {
    let mut parts = name.split('.');
    let stem = parts.next()?;
    let (middle, extension) = match (parts.next(), parts.next(), parts.next()) {
        (Some(ext), None, None) => (None, ext),
        (Some(token), Some(ext), None) => (Some(token), ext),
        _ => return None,
    };
    let (job, rest) = stem.split_once('-')?;
    let (generation, index) = match rest.strip_prefix('g') {
        Some(gen_rest) => {
            let (g, i) = gen_rest.split_once('-')?;
            let g: u32 = canonical(g)?;
            (g, i)
        }
        None => (FIRST_GENERATION, rest),
    };
    if generation <= FIRST_GENERATION && rest.starts_with('g') {
        // `g0` and `g1` are never written: the first generation has the plain form.
        return None;
    }
    let token_ok =
        |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if middle.is_some_and(|t| !token_ok(t)) || extension.is_empty() {
        return None;
    }
    Some(ParsedName {
        job_id: canonical(job)?,
        generation,
        index: canonical(index)?,
        rendition: middle.map(str::to_owned),
        extension: extension.to_owned(),
    })
}

fn canonical<T: std::str::FromStr>(s: &str) -> Option<T> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok { s.parse().ok() } else { None }
}

/// Turns a batch name into a safe key prefix, or `None` if nothing safe is left.
///
/// `/` and `\` separate segments (so `campaign/2024` nests); within a segment every run of
/// characters outside `[A-Za-z0-9_-]` becomes one `-`, and leading or trailing `-` are trimmed.
/// Empty segments are dropped. The result is cut to [`MAX_BATCH_LEN`] bytes.
pub fn sanitize_batch(batch: &str) -> Option<String> {
    let mut out = String::new();
    for raw in batch.split(['/', '\\']) {
        let mut seg = String::new();
        for c in raw.chars() {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                seg.push(c);
            } else if !seg.ends_with('-') {
                seg.push('-');
            }
        }
        let seg = seg.trim_matches('-');
        if seg.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(seg);
        if out.len() >= MAX_BATCH_LEN {
            break;
        }
    }
    // ASCII only, so any byte index is a char boundary.
    out.truncate(MAX_BATCH_LEN);
    let trimmed = out.trim_end_matches(['/', '-']);
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// True for the characters a key segment may contain.
pub(crate) fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'
}

/// Checks that `key` is a safe relative key (see the module invariants); every backend calls it
/// before building a path or an S3 key, so a key from anywhere cannot escape the root.
pub fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("key too long");
    }
    validate_path(key)
}

/// The segment rules shared by keys and the bucket prefix: `/`-separated, no empty, `.` or `..`
/// segment, only [`is_key_char`] characters.
pub(crate) fn validate_path(path: &str) -> Result<(), &'static str> {
    for seg in path.split('/') {
        if seg.is_empty() {
            return Err("empty path segment (leading, trailing or doubled '/')");
        }
        if seg == "." || seg == ".." {
            return Err("'.' or '..' segment");
        }
        if !seg.chars().all(is_key_char) {
            return Err("characters outside [A-Za-z0-9._-]");
        }
    }
    Ok(())
}

/// Percent-encodes a path for a URL, keeping `/` and RFC 3986 unreserved characters.
pub(crate) fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '/') {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` if an escape is malformed or the result is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_carry_the_format() {
        let a = object_key(Some("spring"), 42, 1, ImageFormat::Png);
        assert_eq!(a, "spring/42-1.png");
        assert_eq!(a, object_key(Some("spring"), 42, 1, ImageFormat::Png));
        assert_eq!(object_key(None, 42, 0, ImageFormat::Jpeg), "42-0.jpg");
        assert_eq!(object_key(Some(""), 42, 0, ImageFormat::Webp), "42-0.webp");
    }

    #[test]
    fn rendition_keys_extend_the_scheme_and_parse_back() {
        let og = rendition_key(Some("spring"), 42, 1, 1, "og", ImageFormat::Jpeg);
        assert_eq!(og, "spring/42-1.og.jpg");
        assert_eq!(
            rendition_key(None, 42, 3, 0, "1200x630-webp", ImageFormat::Webp),
            "42-g3-0.1200x630-webp.webp"
        );
        let name = |k: &str| parse_file_name(k.rsplit('/').next().unwrap());
        assert_eq!(
            name(&og),
            Some(ParsedName {
                job_id: 42,
                generation: 1,
                index: 1,
                rendition: Some("og".into()),
                extension: "jpg".into()
            })
        );
        let original = name(&object_key(Some("b"), 42, 10, ImageFormat::Png)).unwrap();
        assert_eq!((original.index, original.rendition), (10, None));
        let g = name("42-g2-0.png").unwrap();
        assert_eq!((g.generation, g.index, g.rendition), (2, 0, None));
        assert_eq!(
            generation_key(Some("b"), 42, 2, 0, ImageFormat::Png),
            "b/42-g2-0.png"
        );
        assert_eq!(
            generation_key(Some("b"), 42, 1, 0, ImageFormat::Png),
            object_key(Some("b"), 42, 0, ImageFormat::Png)
        );
        for bad in [
            "42-0",
            "42-01.png",
            "042-0.png",
            "42-g0-0.png",
            "42-g1-0.png",
            "42--0.png",
            "x-0.png",
            "42-0.a.b.png",
            "42-0..png",
            "42-0.png.",
            "-42-0.png",
            "42-g-0.png",
            ".42-0.png.tmp",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn batch_names_are_sanitised() {
        let cases = [
            ("spring-2024", Some("spring-2024")),
            ("campaign/2024", Some("campaign/2024")),
            ("../../etc/passwd", Some("etc/passwd")),
            ("/abs/path/", Some("abs/path")),
            ("..", None),
            (".", None),
            ("", None),
            ("   ", None),
            ("a//b", Some("a/b")),
            ("a\\..\\b", Some("a/b")),
            ("v1.2 final!", Some("v1-2-final")),
            ("7-0.png", Some("7-0-png")),
            (".hidden", Some("hidden")),
            ("x\0y\n", Some("x-y")),
            ("café/naïve", Some("caf/na-ve")),
            ("%2e%2e/%2fetc", Some("2e-2e/2fetc")),
            ("名前", None),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_batch(input).as_deref(), want, "batch {input:?}");
        }
    }

    #[test]
    fn long_batches_are_cut_without_a_dangling_separator() {
        let long = "ab/".repeat(200);
        let s = sanitize_batch(&long).unwrap();
        assert!(s.len() <= MAX_BATCH_LEN);
        assert!(!s.ends_with('/') && !s.starts_with('/'));
        let key = object_key(
            Some(&"x".repeat(10_000)),
            i64::MAX,
            usize::MAX,
            ImageFormat::Png,
        );
        assert!(validate_key(&key).is_ok(), "{key}");
    }

    #[test]
    fn every_sanitised_key_validates() {
        let hostile = [
            "../..",
            "/",
            "//x//",
            "a/./b",
            "....",
            "-/-/-",
            "\u{202e}gnp.exe",
            "C:\\Windows\\System32",
            "%00",
        ];
        for b in hostile {
            let key = object_key(Some(b), 1, 0, ImageFormat::Png);
            assert!(validate_key(&key).is_ok(), "batch {b:?} gave {key:?}");
            assert!(key.ends_with("1-0.png"), "{key}");
        }
    }

    #[test]
    fn validation_rejects_escapes() {
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", "./a", "a b", "a?b", "a%2F",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(validate_key(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
        for good in ["a", "a/b.png", ".imagegen-probe/x.bin", "x_y-z/1-2.webp"] {
            assert!(validate_key(good).is_ok(), "{good:?} must be accepted");
        }
    }

    #[test]
    fn percent_encoding_round_trips() {
        let p = "/tmp/my images/ünï%code";
        let enc = percent_encode_path(p);
        assert_eq!(enc, "/tmp/my%20images/%C3%BCn%C3%AF%25code");
        assert_eq!(percent_decode(&enc).as_deref(), Some(p));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
