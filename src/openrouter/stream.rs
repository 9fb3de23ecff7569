//! The answer read as it arrives: the image data URL is found with a scan of the JSON's strings,
//! its base64 decoded (SIMD) and hashed (SHA-256) chunk by chunk, and only the rest of the JSON
//! (a kilobyte or two: ids, usage, finish reasons) is kept for serde. So an answer never exists
//! whole in memory, nor as a JSON string and then a copy: what a call holds is the decoded image
//! so far plus the chunk in hand, and each byte is touched once by the decoder and once by the
//! hash while it is still in cache.
//!
//! In the kept JSON (the "skeleton") each intercepted data URL keeps its `data:<type>;base64,`
//! head and its payload is replaced by `#<n>`, the payload's number in the answer; `#` is not a
//! base64 character, so no real payload reads that way. Only the last payload is kept (the
//! client keeps the last image of an answer); earlier ones are dropped as soon as the next
//! starts.

use base64_simd::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

/// Strings longer than this before their first `,` are not data-URL heads (`data:image/png;base64`
/// is 21 bytes; a generous cap for parameters such as `;charset=`).
const MAX_DATA_URL_HEAD: usize = 200;

/// One decoded payload: the bytes, their SHA-256, and the type label of its data URL.
#[derive(Debug)]
pub(crate) struct Payload {
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

/// The answer after reading: the skeleton JSON and the last payload (or why it did not decode).
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub skeleton: Vec<u8>,
    /// How many payloads the answer carried.
    pub payloads: usize,
    /// The last one, decoded; `Err` holds the base64 error's text.
    pub last: Option<Result<Payload, String>>,
    /// Bytes fed, padding excluded.
    pub len: usize,
}

impl Answer {
    /// The payload number a skeleton URL refers to (`data:...;base64,#3` is payload 3), if it is
    /// one of ours.
    pub fn payload_ref(url: &str) -> Option<usize> {
        let (head, rest) = url.split_once(',')?;
        if !head.get(..5)?.eq_ignore_ascii_case("data:") {
            return None;
        }
        rest.strip_prefix('#')?.parse().ok()
    }
}

#[derive(Debug)]
enum Mode {
    /// Outside any string.
    Json,
    /// Inside a string that started at `start` in the skeleton; `escape` after a backslash.
    Str { start: usize, escape: bool },
    /// Inside a data URL's payload.
    Payload { escape: bool },
}

/// Feeds an answer through; see the module doc.
#[derive(Debug)]
pub(crate) struct AnswerReader {
    answer: Answer,
    mode: Mode,
    decoder: Option<Base64Stream>,
    /// Bytes reserved for a payload's decoded image when it starts (see
    /// [`AnswerReader::with_payload_hint`]).
    payload_hint: usize,
}

impl Default for AnswerReader {
    fn default() -> Self {
        AnswerReader::with_payload_hint(0)
    }
}

impl AnswerReader {
    /// A reader that reserves `hint` bytes for each payload's decoded image when the payload
    /// starts. A growing `Vec` is copied at each doubling, into memory the kernel must map and
    /// zero first: a profile of the pipeline bench put 15 % of the worker's CPU in that realloc.
    /// With a good hint the image is decoded in place, once; a short one costs one more growth,
    /// a long one only address space (the pages past the image are never touched, and the rest
    /// goes back at the end).
    pub fn with_payload_hint(hint: usize) -> Self {
        AnswerReader {
            answer: Answer::default(),
            mode: Mode::Json,
            decoder: None,
            payload_hint: hint,
        }
    }

    /// Takes the next bytes of the answer (padding already skipped).
    pub fn feed(&mut self, mut chunk: &[u8]) {
        self.answer.len += chunk.len();
        while !chunk.is_empty() {
            chunk = match self.mode {
                Mode::Payload { .. } => self.payload(chunk),
                _ => self.json(chunk),
            };
        }
    }

    /// The answer, once the body ended. A payload still open (the body was cut) is dropped: the
    /// skeleton is then not valid JSON and the answer is judged malformed.
    pub fn finish(mut self) -> Answer {
        if matches!(self.mode, Mode::Payload { .. }) {
            self.decoder = None;
        }
        self.answer
    }

    /// Copies JSON outside payloads into the skeleton, tracking strings, until a data URL's
    /// payload starts. Returns the rest of `chunk`.
    fn json<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let skeleton = &mut self.answer.skeleton;
        for (i, &b) in chunk.iter().enumerate() {
            skeleton.push(b);
            match &mut self.mode {
                Mode::Json => {
                    if b == b'"' {
                        self.mode = Mode::Str {
                            start: skeleton.len(),
                            escape: false,
                        };
                    }
                }
                Mode::Str { start, escape } => {
                    let start = *start;
                    if *escape {
                        *escape = false;
                    } else if b == b'\\' {
                        *escape = true;
                    } else if b == b'"' {
                        self.mode = Mode::Json;
                    } else if b == b','
                        && skeleton.len() - start <= MAX_DATA_URL_HEAD
                        && is_base64_data_url_head(&skeleton[start..skeleton.len() - 1])
                    {
                        self.mode = Mode::Payload { escape: false };
                        self.decoder = Some(Base64Stream {
                            out: Vec::with_capacity(self.payload_hint),
                            ..Base64Stream::default()
                        });
                        // Only the last image is kept: an earlier one goes now, not at the end.
                        self.answer.last = None;
                        return &chunk[i + 1..];
                    }
                }
                Mode::Payload { .. } => unreachable!("payload bytes are not JSON"),
            }
        }
        &[]
    }

    /// Decodes payload bytes up to the closing quote. Returns the rest of `chunk`.
    fn payload<'a>(&mut self, mut chunk: &'a [u8]) -> &'a [u8] {
        let Mode::Payload { escape } = &mut self.mode else {
            return chunk;
        };
        let Some(decoder) = self.decoder.as_mut() else {
            return chunk;
        };
        if *escape {
            *escape = false;
            match chunk[0] {
                // `\/` from encoders that escape slashes; `\n`, `\r`: line-wrapped base64.
                b'/' => decoder.feed(b"/"),
                b'n' | b'r' | b't' => {}
                other => decoder.fail(format!("unexpected escape \\{}", other as char)),
            }
            chunk = &chunk[1..];
        }
        match memchr::memchr2(b'"', b'\\', chunk) {
            None => {
                decoder.feed(chunk);
                &[]
            }
            Some(i) => {
                decoder.feed(&chunk[..i]);
                if chunk[i] == b'\\' {
                    *escape = true;
                    return &chunk[i + 1..];
                }
                // The payload ends: its number goes into the skeleton in its place.
                let n = self.answer.payloads;
                self.answer.payloads += 1;
                let done = self.decoder.take().map(Base64Stream::finish);
                self.answer.last = done;
                let skeleton = &mut self.answer.skeleton;
                skeleton.push(b'#');
                skeleton.extend_from_slice(n.to_string().as_bytes());
                skeleton.push(b'"');
                self.mode = Mode::Json;
                &chunk[i + 1..]
            }
        }
    }
}

/// Whether a string's text before its first `,` is `data:<anything>;base64` (JSON escapes of
/// `/` allowed, as some encoders write `image\/png`).
fn is_base64_data_url_head(head: &[u8]) -> bool {
    head.len() >= 5
        && head[..5].eq_ignore_ascii_case(b"data:")
        && head.len() >= 7
        && head[head.len() - 7..].eq_ignore_ascii_case(b";base64")
}

/// Base64 decoded as it arrives, in whole quads, with the last 1-4 characters held back so the
/// final quad (which may be padded or short) is decoded once the payload ends. Standard
/// alphabet, padding optional, as the one-shot decoder before it accepted.
#[derive(Debug, Default)]
struct Base64Stream {
    out: Vec<u8>,
    carry: [u8; 4],
    carry_len: usize,
    hash: Sha256,
    error: Option<String>,
}

impl Base64Stream {
    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(why);
            self.out = Vec::new();
        }
    }

    fn feed(&mut self, mut s: &[u8]) {
        if self.error.is_some() || s.is_empty() {
            return;
        }
        let total = self.carry_len + s.len();
        if total <= 4 {
            self.carry[self.carry_len..total].copy_from_slice(s);
            self.carry_len = total;
            return;
        }
        // Hold back the last 1..=4 characters.
        let keep = match total % 4 {
            0 => 4,
            r => r,
        };
        if self.carry_len > 0 {
            let fill = 4 - self.carry_len;
            self.carry[self.carry_len..].copy_from_slice(&s[..fill]);
            s = &s[fill..];
            let quad = self.carry;
            self.carry_len = 0;
            self.decode(&quad, false);
        }
        let bulk = s.len() - keep;
        self.decode(&s[..bulk], false);
        self.carry[..keep].copy_from_slice(&s[bulk..]);
        self.carry_len = keep;
    }

    /// Decodes whole quads (or, `last`, the final group) onto `out` and hashes what it added.
    fn decode(&mut self, src: &[u8], last: bool) {
        if src.is_empty() || self.error.is_some() {
            return;
        }
        let from = self.out.len();
        let engine = if last && src.contains(&b'=') {
            STANDARD
        } else {
            STANDARD_NO_PAD
        };
        match engine.decode_append(src, &mut self.out) {
            Ok(()) => self.hash.update(&self.out[from..]),
            Err(_) => self.fail("not valid base64".to_owned()),
        }
    }

    fn finish(mut self) -> Result<Payload, String> {
        let quad = self.carry;
        self.decode(&quad[..self.carry_len], true);
        if let Some(e) = self.error {
            return Err(e);
        }
        self.out.shrink_to_fit();
        Ok(Payload {
            bytes: self.out,
            sha256: self.hash.finalize().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::prelude::{BASE64_STANDARD, BASE64_STANDARD_NO_PAD};

    fn read_in_chunks(body: &[u8], size: usize) -> Answer {
        let mut r = AnswerReader::default();
        for c in body.chunks(size) {
            r.feed(c);
        }
        r.finish()
    }

    fn answer_with(url_payload: &str, head: &str) -> Vec<u8> {
        format!(
            r#"{{"choices":[{{"message":{{"content":"a \"data:x;base64,no\" quote, here","images":[{{"image_url":{{"url":"{head}{url_payload}"}}}}]}}}}],"usage":{{"cost":0.5}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn the_payload_is_decoded_and_hashed_whatever_the_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (b64, head) in [
            (BASE64_STANDARD.encode(&data), "data:image/png;base64,"),
            (
                BASE64_STANDARD_NO_PAD.encode(&data[..9_998]),
                "data:image\\/png;base64,",
            ),
            (
                BASE64_STANDARD.encode(&data[..9_999]),
                "DATA:image/png;BASE64,",
            ),
        ] {
            let body = answer_with(&b64, head);
            let want = BASE64_STANDARD_NO_PAD
                .decode(b64.trim_end_matches('='))
                .unwrap();
            for size in [1, 3, 4, 5, 7, 64, 4096, body.len()] {
                let a = read_in_chunks(&body, size);
                assert_eq!(a.payloads, 1);
                assert_eq!(a.len, body.len());
                let p = a.last.unwrap().unwrap();
                assert_eq!(p.bytes, want, "chunk size {size}");
                assert_eq!(p.sha256, <[u8; 32]>::from(Sha256::digest(&want)));
                let skeleton: serde_json::Value = serde_json::from_slice(&a.skeleton).unwrap();
                let url = skeleton["choices"][0]["message"]["images"][0]["image_url"]["url"]
                    .as_str()
                    .unwrap();
                assert_eq!(Answer::payload_ref(url), Some(0), "{url}");
                // The text that only looks like a data URL stays in the skeleton untouched.
                assert_eq!(
                    skeleton["choices"][0]["message"]["content"],
                    "a \"data:x;base64,no\" quote, here"
                );
            }
        }
    }

    #[test]
    fn a_size_hint_changes_no_byte_and_its_unused_reserve_goes_back() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let body = answer_with(&BASE64_STANDARD.encode(&data), "data:image/png;base64,");
        for hint in [0, 1, data.len() / 2, data.len(), data.len() * 4] {
            let mut r = AnswerReader::with_payload_hint(hint);
            for c in body.chunks(1500) {
                r.feed(c);
            }
            let p = r.finish().last.unwrap().unwrap();
            assert_eq!(p.bytes, data, "hint {hint}");
            assert_eq!(p.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
            // An image waiting for storage holds its own bytes, not the guess.
            assert_eq!(p.bytes.capacity(), data.len(), "hint {hint}");
        }
    }

    #[test]
    fn wrapped_and_escaped_base64_decodes_and_bad_base64_is_reported() {
        let body = answer_with("AAEC\\nAwQF\\/w==", "data:image/png;base64,");
        let p = read_in_chunks(&body, 2).last.unwrap().unwrap();
        assert_eq!(p.bytes, [0, 1, 2, 3, 4, 5, 255]);

        let body = answer_with("AAEC*wQF", "data:image/png;base64,");
        assert!(read_in_chunks(&body, 3).last.unwrap().is_err());
        let body = answer_with("AA==AAAA", "data:image/png;base64,");
        assert!(read_in_chunks(&body, 100).last.unwrap().is_err());
    }

    #[test]
    fn only_the_last_of_several_payloads_is_kept() {
        let body = br#"{"images":[{"url":"data:image/png;base64,AAAA"},{"url":"data:image/png;base64,AQID"}]}"#;
        let a = read_in_chunks(body, 5);
        assert_eq!(a.payloads, 2);
        assert_eq!(a.last.unwrap().unwrap().bytes, [1, 2, 3]);
        assert_eq!(
            String::from_utf8(a.skeleton).unwrap(),
            r#"{"images":[{"url":"data:image/png;base64,#0"},{"url":"data:image/png;base64,#1"}]}"#
        );
    }

    #[test]
    fn a_cut_payload_leaves_an_unfinished_skeleton() {
        let a = read_in_chunks(br#"{"images":[{"url":"data:image/png;base64,AAAAAQ"#, 4);
        assert_eq!(a.payloads, 0);
        assert!(a.last.is_none());
        assert!(serde_json::from_slice::<serde_json::Value>(&a.skeleton).is_err());
    }
}
