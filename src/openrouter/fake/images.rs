//! The stand-in's images: real PNGs (and JPEGs) of the right pixel size, generated once per size
//! and reused, each answer made byte-distinct by a small text chunk carrying its generation id.
//!
//! Serving 1,000 answers at once must not encode images or base64 megabytes per answer. So each
//! base image is cut in two: a prefix (signature, header, pixel data) whose length is a multiple
//! of 3, base64-encoded once and shared; and a tail written per answer (a `tEXt` chunk with the
//! generation id, then `IEND`), a few dozen bytes. Base64 of a multiple of 3 bytes has no padding,
//! so the two encodings concatenate into the encoding of the whole file. The SHA-256 of the
//! prefix is likewise computed once and only the tail is hashed per answer.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::image::ImageFormat;

/// Pixel count of a 1K 16:9 flash image (1344x768), the size [`super::FakeConfig::image_bytes`]
/// refers to.
const REFERENCE_PIXELS: u64 = 1344 * 768;
/// A 2K pro image is "a few MB" and a 4K one about 8 MB against about 1.2 MB at 1K: they carry
/// fewer bytes per pixel than 1K ones. These are the byte-per-pixel factors relative to 1K.
const DENSITY_2K: f64 = 0.625;
const DENSITY_4K: f64 = 0.4;
/// JPEG quality of the `jpeg-as-png` image.
const JPEG_QUALITY: u8 = 85;
/// Keyword of the per-answer text chunk.
const TAG_KEYWORD: &[u8] = b"imagegen-fake-id";

/// The file size to aim for, given the configured 1K 16:9 size and the image's pixels and tier.
pub(crate) fn target_bytes(image_bytes: usize, width: u32, height: u32, tier: &str) -> usize {
    let pixels = u64::from(width) * u64::from(height);
    let density = match tier {
        "2K" => DENSITY_2K,
        "4K" => DENSITY_4K,
        _ => 1.0,
    };
    (image_bytes as f64 * pixels as f64 / REFERENCE_PIXELS as f64 * density) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ImageKey {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub target: usize,
}

/// One generated image, ready to be served many times.
#[derive(Debug)]
pub(crate) struct BaseImage {
    pub format: ImageFormat,
    /// Base64 of the shared prefix (the whole file for JPEG).
    prefix_b64: Bytes,
    prefix_len: usize,
    /// SHA-256 state after the prefix.
    prefix_hash: Sha256,
}

/// One image as served in one answer.
#[derive(Debug, Clone)]
pub(crate) struct Rendered {
    /// Base64 of the image file, in pieces to be written one after the other.
    pub b64: Vec<Bytes>,
    /// SHA-256 (hex) of the image file.
    pub sha256: String,
    /// Size of the image file in bytes.
    pub len: usize,
}

impl BaseImage {
    /// The image for one answer. PNGs carry `tag` in a text chunk, so every answer's bytes
    /// differ; JPEGs are served as generated.
    pub fn render(&self, tag: &str) -> Rendered {
        let tail = match self.format {
            ImageFormat::Png => {
                let mut tail = chunk(b"tEXt", &[TAG_KEYWORD, b"\0", tag.as_bytes()].concat());
                tail.extend_from_slice(&chunk(b"IEND", &[]));
                tail
            }
            _ => Vec::new(),
        };
        let mut hash = self.prefix_hash.clone();
        hash.update(&tail);
        let mut b64 = vec![self.prefix_b64.clone()];
        if !tail.is_empty() {
            b64.push(Bytes::from(BASE64_STANDARD.encode(&tail)));
        }
        Rendered {
            b64,
            sha256: hex::encode(hash.finalize()),
            len: self.prefix_len + tail.len(),
        }
    }
}

/// Base images by size, each generated once on first use (off the async threads) and shared.
#[derive(Debug, Default)]
pub(crate) struct ImageCache {
    entries: Mutex<HashMap<ImageKey, Arc<OnceCell<Arc<BaseImage>>>>>,
}

impl ImageCache {
    pub async fn get(&self, key: ImageKey) -> io::Result<Arc<BaseImage>> {
        let cell = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.entry(key).or_default().clone()
        };
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || generate(key))
                .await
                .map_err(io::Error::other)?
                .map(Arc::new)
        })
        .await
        .cloned()
    }
}

/// Generates a base image: a smooth gradient with enough rows of noise to reach the target
/// size (noise does not compress, the gradient almost vanishes). The size is about linear in
/// the noise rows, so one encoding without noise and one with a first guess give the line;
/// targets above what pure noise gives are clamped.
fn generate(key: ImageKey) -> io::Result<BaseImage> {
    let ImageKey {
        format,
        width,
        height,
        target,
    } = key;
    let rows = height as usize;
    let guess = (target / (width as usize * 3).max(1)).min(rows);
    let mut bytes = encode(format, &pixels(width, height, guess), width, height)?;
    if guess > 0 && bytes.len().abs_diff(target) > target / 50 {
        let floor = encode(format, &pixels(width, height, 0), width, height)?.len();
        let per_row = (bytes.len().saturating_sub(floor) as f64 / guess as f64).max(1.0);
        let fitted = (target.saturating_sub(floor) as f64 / per_row) as usize;
        bytes = encode(
            format,
            &pixels(width, height, fitted.min(rows)),
            width,
            height,
        )?;
    }
    let prefix = match format {
        ImageFormat::Png => png_prefix(bytes)?,
        _ => bytes,
    };
    let mut hash = Sha256::new();
    hash.update(&prefix);
    Ok(BaseImage {
        format,
        prefix_b64: Bytes::from(BASE64_STANDARD.encode(&prefix)),
        prefix_len: prefix.len(),
        prefix_hash: hash,
    })
}

/// RGB pixels: a vertical gradient (each row one colour, so filtered rows are zeros), its first `noise_rows` rows replaced by noise seeded by the size
/// (so a given size is the same image in every run).
fn pixels(width: u32, height: u32, noise_rows: usize) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let row = w * 3;
    let mut pixels = vec![0u8; row * h];
    for (y, line) in pixels.chunks_exact_mut(row).enumerate() {
        let shade = (y * 255 / h.max(1)) as u8;
        for px in line.chunks_exact_mut(3) {
            px.copy_from_slice(&[shade / 2 + 40, shade, 200 - shade / 4]);
        }
    }
    let mut rng = fastrand::Rng::with_seed(u64::from(width) << 32 | u64::from(height));
    rng.fill(&mut pixels[..noise_rows.min(h) * row]);
    pixels
}

fn encode(format: ImageFormat, pixels: &[u8], width: u32, height: u32) -> io::Result<Vec<u8>> {
    match format {
        ImageFormat::Jpeg => encode_jpeg(pixels, width, height),
        _ => encode_png(pixels, width, height),
    }
}

fn encode_png(pixels: &[u8], width: u32, height: u32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Sub turns the gradient rows into runs of equal bytes, which deflate to almost nothing.
    encoder.set_filter(png::Filter::Sub);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer.write_image_data(pixels).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)?;
    Ok(out)
}

fn encode_jpeg(pixels: &[u8], width: u32, height: u32) -> io::Result<Vec<u8>> {
    let (w, h) = match (u16::try_from(width), u16::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(io::Error::other("image too large for JPEG")),
    };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, JPEG_QUALITY)
        .encode(pixels, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(io::Error::other)?;
    Ok(out)
}

/// The PNG without its `IEND`, plus a filler text chunk that makes its length a multiple of 3.
fn png_prefix(mut png: Vec<u8>) -> io::Result<Vec<u8>> {
    let iend = chunk(b"IEND", &[]);
    if !png.ends_with(&iend) {
        return Err(io::Error::other("encoded PNG does not end with IEND"));
    }
    png.truncate(png.len() - iend.len());
    // A chunk adds 12 bytes plus its data; 12 is a multiple of 3, so the data length decides.
    let keyword = b"Software\0imagegen fake-openrouter";
    let pad = (3 - (png.len() + keyword.len()) % 3) % 3;
    let mut data = keyword.to_vec();
    data.extend(std::iter::repeat_n(b' ', pad));
    png.extend_from_slice(&chunk(b"tEXt", &data));
    debug_assert_eq!(png.len() % 3, 0);
    Ok(png)
}

/// A PNG chunk: length, type, data, CRC of type and data.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + data.len());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(r: &Rendered) -> Vec<u8> {
        let text: Vec<u8> = r.b64.iter().flat_map(|b| b.iter().copied()).collect();
        BASE64_STANDARD.decode(text).unwrap()
    }

    #[test]
    fn rendered_pngs_are_valid_distinct_and_hashed_correctly() {
        let key = ImageKey {
            format: ImageFormat::Png,
            width: 1344,
            height: 768,
            target: 1_200_000,
        };
        let base = generate(key).unwrap();
        let a = base.render("gen-a");
        let b = base.render("gen-bb");
        let (bytes_a, bytes_b) = (decode(&a), decode(&b));
        assert_ne!(bytes_a, bytes_b);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&bytes_a)));
        assert_eq!(a.len, bytes_a.len());
        assert_eq!(
            crate::image::sniff(&bytes_a),
            Some((ImageFormat::Png, 1344, 768))
        );
        // Within 10% of the target: "about 1.2 MB, like a real one".
        assert!(
            (1_080_000..1_320_000).contains(&bytes_a.len()),
            "{}",
            bytes_a.len()
        );
        // A full decode proves the chunk layout and CRCs are right.
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes_b));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        reader.finish().unwrap();
        let texts = &reader.info().uncompressed_latin1_text;
        assert!(
            texts
                .iter()
                .any(|t| t.keyword == "imagegen-fake-id" && t.text == "gen-bb")
        );
    }

    #[test]
    fn jpegs_are_real_jpegs() {
        let key = ImageKey {
            format: ImageFormat::Jpeg,
            width: 1024,
            height: 1024,
            target: 100_000,
        };
        let rendered = generate(key).unwrap().render("x");
        assert_eq!(
            crate::image::sniff(&decode(&rendered)),
            Some((ImageFormat::Jpeg, 1024, 1024))
        );
    }

    #[test]
    fn target_size_scales_with_pixels_and_tier() {
        assert_eq!(target_bytes(1_200_000, 1344, 768, "1K"), 1_200_000);
        let four_k = target_bytes(1_200_000, 5504, 3072, "4K");
        assert!((7_000_000..9_000_000).contains(&four_k), "{four_k}");
    }
}
