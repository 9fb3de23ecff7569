//! The stand-in's images: real PNGs (and JPEGs) of the right pixel size and about the byte size of
//! a real answer, a visibly different picture per prompt, generated once per size and reused.
//!
//! Serving 1,000 answers at once must not encode images or base64 megabytes per answer. A PNG
//! answer is an indexed-colour PNG cut into pieces whose lengths are multiples of 3 (so their
//! base64 encodings concatenate into the encoding of the whole file):
//! 1. signature, header and a private ancillary chunk of incompressible filler that brings the
//!    file to the target size (decoders skip it): shared per size, hashed once;
//! 2. the palette, built per prompt from a hash of it (the picture's colours): 780 bytes;
//! 3. the pixel data, one of a few cached shape layouts picked by the same hash;
//! 4. a text chunk with the generation id (so every answer's bytes differ) and the end.
//!
//! So an answer costs a 780-byte palette, a SHA-256 over a few dozen KB and no encoding. JPEG
//! answers (the `jpeg-as-png` quirk) are one shared picture per size.

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
/// How many shape layouts a size has (each prompt gets one, and its own colours).
const LAYOUTS: u64 = 6;
/// The private, ancillary, safe-to-copy chunk that carries the filler bytes.
const FILLER_CHUNK: &[u8; 4] = b"igPd";

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
    /// Base64 of the shared head (the whole file for JPEG).
    head_b64: Bytes,
    head_len: usize,
    /// SHA-256 state after the head.
    head_hash: Sha256,
    /// PNG only: the pixel data of each layout (IDAT chunks plus a filler text chunk that makes
    /// the length a multiple of 3), raw and base64.
    layouts: Vec<(Bytes, Bytes)>,
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
    /// The image for one answer to `prompt`. PNGs take their colours and layout from a hash of
    /// the prompt and carry `tag` in a text chunk, so every answer's bytes differ; JPEGs are
    /// served as generated.
    pub fn render(&self, tag: &str, prompt: &str) -> Rendered {
        let mut hash = self.head_hash.clone();
        let mut b64 = vec![self.head_b64.clone()];
        let mut len = self.head_len;
        if self.format == ImageFormat::Png {
            let look = prompt_hash(prompt);
            let plte = chunk(b"PLTE", &palette(look));
            let (layout, layout_b64) = &self.layouts[(look % self.layouts.len() as u64) as usize];
            let mut tail = chunk(b"tEXt", &[TAG_KEYWORD, b"\0", tag.as_bytes()].concat());
            tail.extend_from_slice(&chunk(b"IEND", &[]));
            for piece in [&plte[..], &layout[..], &tail[..]] {
                hash.update(piece);
                len += piece.len();
            }
            b64.push(Bytes::from(BASE64_STANDARD.encode(&plte)));
            b64.push(layout_b64.clone());
            b64.push(Bytes::from(BASE64_STANDARD.encode(&tail)));
        }
        Rendered {
            b64,
            sha256: hex::encode(hash.finalize()),
            len,
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

/// Generates a base image. A PNG is its layouts (see the module doc) plus filler to the target
/// size. A JPEG is a smooth gradient with enough rows of noise to reach the target size (noise
/// does not compress, the gradient almost vanishes): the size is about linear in the noise rows,
/// so one encoding without noise and one with a first guess give the line; targets above what
/// pure noise gives are clamped.
fn generate(key: ImageKey) -> io::Result<BaseImage> {
    let ImageKey {
        format,
        width,
        height,
        target,
    } = key;
    if format == ImageFormat::Png {
        return generate_png(width, height, target);
    }
    let rows = height as usize;
    let guess = (target / (width as usize * 3).max(1)).min(rows);
    let mut bytes = encode_jpeg(&pixels(width, height, guess), width, height)?;
    if guess > 0 && bytes.len().abs_diff(target) > target / 50 {
        let floor = encode_jpeg(&pixels(width, height, 0), width, height)?.len();
        let per_row = (bytes.len().saturating_sub(floor) as f64 / guess as f64).max(1.0);
        let fitted = (target.saturating_sub(floor) as f64 / per_row) as usize;
        bytes = encode_jpeg(&pixels(width, height, fitted.min(rows)), width, height)?;
    }
    let mut hash = Sha256::new();
    hash.update(&bytes);
    Ok(BaseImage {
        format,
        head_b64: Bytes::from(BASE64_STANDARD.encode(&bytes)),
        head_len: bytes.len(),
        head_hash: hash,
        layouts: Vec::new(),
    })
}

/// An indexed PNG: head (signature, header, filler), then per answer palette, layout, tail.
fn generate_png(width: u32, height: u32, target: usize) -> io::Result<BaseImage> {
    let mut layouts = Vec::new();
    for layout in 0..LAYOUTS {
        let png = encode_indexed(&shapes(width, height, layout), width, height)?;
        layouts.push(idat_piece(&png)?);
    }
    let mut head = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // 8-bit indexed colour, deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    head.extend_from_slice(&chunk(b"IHDR", &ihdr));
    // The rest of a typical answer: palette 780, layout, tail about 60.
    let largest = layouts.iter().map(|(raw, _)| raw.len()).max().unwrap_or(0);
    let rest = head.len() + 12 + 780 + largest + 60;
    // Filler data length: a multiple of 3, so head (33) + chunk framing (12) + data stays one.
    let filler_len = target.saturating_sub(rest) / 3 * 3;
    let mut filler = vec![0u8; filler_len];
    fastrand::Rng::with_seed(u64::from(width) << 32 | u64::from(height)).fill(&mut filler);
    head.extend_from_slice(&chunk(FILLER_CHUNK, &filler));
    debug_assert_eq!(head.len() % 3, 0);
    let mut hash = Sha256::new();
    hash.update(&head);
    Ok(BaseImage {
        format: ImageFormat::Png,
        head_b64: Bytes::from(BASE64_STANDARD.encode(&head)),
        head_len: head.len(),
        head_hash: hash,
        layouts,
    })
}

/// FNV-1a of the prompt: stable across runs and platforms, unlike `DefaultHasher`.
fn prompt_hash(prompt: &str) -> u64 {
    prompt.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The palette of a prompt: entries 0-127 a gradient between two colours (the background),
/// 128-255 a gradient between two others (the shapes); hues from the hash.
fn palette(look: u64) -> Vec<u8> {
    let hue = |shift: u32| ((look >> shift) & 0xff) as f32 / 255.0 * 360.0;
    let (bg_top, bg_bottom) = (hsv(hue(8), 0.55, 0.95), hsv(hue(16), 0.7, 0.35));
    let (fg_a, fg_b) = (hsv(hue(24), 0.85, 0.9), hsv(hue(32), 0.6, 0.6));
    let mut out = Vec::with_capacity(768);
    for i in 0..256u32 {
        let (a, b, t) = if i < 128 {
            (bg_top, bg_bottom, i as f32 / 127.0)
        } else {
            (fg_a, fg_b, (i - 128) as f32 / 127.0)
        };
        for c in 0..3 {
            out.push((a[c] + (b[c] - a[c]) * t).round() as u8);
        }
    }
    out
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// Palette indices of one layout: a vertical background gradient and shapes over it.
fn shapes(width: u32, height: u32, layout: u64) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut px = vec![0u8; w * h];
    let (wf, hf) = (w as f32, h as f32);
    let short = wf.min(hf);
    for y in 0..h {
        let bg = (y * 127 / h.max(1)) as u8;
        let (yf, row) = (y as f32, &mut px[y * w..(y + 1) * w]);
        for (x, p) in row.iter_mut().enumerate() {
            let xf = x as f32;
            let (u, v) = (xf / wf, yf / hf);
            let shade = |t: f32| 128 + (t.clamp(0.0, 1.0) * 127.0) as u8;
            let inside = match layout {
                // Three discs.
                0 => [(0.25, 0.4, 0.2), (0.6, 0.6, 0.28), (0.85, 0.3, 0.12)]
                    .iter()
                    .any(|(cx, cy, r)| {
                        let (dx, dy) = (xf - cx * wf, yf - cy * hf);
                        (dx * dx + dy * dy).sqrt() < r * short
                    }),
                // Horizontal bands.
                1 => ((v * 7.0) as u32) % 2 == 1,
                // Diagonal stripes.
                2 => (((xf + yf) / (short / 6.0)) as u32).is_multiple_of(2),
                // Rings around the centre.
                3 => {
                    let (dx, dy) = (xf - wf / 2.0, yf - hf / 2.0);
                    (((dx * dx + dy * dy).sqrt() / (short / 10.0)) as u32).is_multiple_of(2)
                }
                // A mountain: a triangle from the bottom.
                4 => v > 0.35 + (u - 0.5).abs() * 1.1,
                // A checkerboard.
                _ => (((u * 8.0) as u32) + ((v * 5.0) as u32)).is_multiple_of(2),
            };
            *p = if inside { shade(v) } else { bg };
        }
    }
    px
}

fn encode_indexed(indices: &[u8], width: u32, height: u32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    // Any palette will do for the encoder; the served one is spliced in per answer.
    encoder.set_palette(vec![0u8; 768]);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Sub);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer.write_image_data(indices).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)?;
    Ok(out)
}

/// The IDAT chunks of an encoded PNG plus a filler text chunk that makes their length a
/// multiple of 3: raw and base64.
fn idat_piece(png: &[u8]) -> io::Result<(Bytes, Bytes)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]) as usize;
        let end = at + 12 + len;
        if end > png.len() {
            break;
        }
        if &png[at + 4..at + 8] == b"IDAT" {
            out.extend_from_slice(&png[at..end]);
        }
        at = end;
    }
    if out.is_empty() {
        return Err(io::Error::other("encoded PNG has no IDAT"));
    }
    // A chunk adds 12 bytes plus its data; 12 is a multiple of 3, so the data length decides.
    let keyword = b"Software\0imagegen fake-openrouter";
    let pad = (3 - (out.len() + keyword.len()) % 3) % 3;
    let mut data = keyword.to_vec();
    data.extend(std::iter::repeat_n(b' ', pad));
    out.extend_from_slice(&chunk(b"tEXt", &data));
    debug_assert_eq!(out.len() % 3, 0);
    let b64 = Bytes::from(BASE64_STANDARD.encode(&out));
    Ok((Bytes::from(out), b64))
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
        let a = base.render("gen-a", "a lighthouse at dusk");
        let b = base.render("gen-bb", "a lighthouse at dusk");
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
    fn each_prompt_gets_its_own_picture_and_the_same_prompt_the_same_one() {
        let base = generate(ImageKey {
            format: ImageFormat::Png,
            width: 768,
            height: 1344,
            target: 600_000,
        })
        .unwrap();
        let pixels = |tag: &str, prompt: &str| {
            let bytes = decode(&base.render(tag, prompt));
            assert!((540_000..660_000).contains(&bytes.len()), "{}", bytes.len());
            let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!(img.dimensions(), (768, 1344));
            img.into_raw()
        };
        let lake = pixels("gen-1", "a calm lake");
        assert_eq!(lake, pixels("gen-2", "a calm lake"));
        let prompts = [
            "a red fox",
            "a city at night",
            "a bowl of fruit",
            "snowy peaks",
        ];
        for p in prompts {
            let other = pixels("gen-3", p);
            let differing = lake
                .chunks_exact(3)
                .zip(other.chunks_exact(3))
                .filter(|(a, b)| a.iter().zip(b.iter()).any(|(x, y)| x.abs_diff(*y) > 24))
                .count();
            // Visibly different: most pixels change by more than a faint tint.
            assert!(
                differing > lake.len() / 3 / 2,
                "{p}: {differing} pixels differ"
            );
        }
    }

    #[test]
    fn jpegs_are_real_jpegs() {
        let key = ImageKey {
            format: ImageFormat::Jpeg,
            width: 1024,
            height: 1024,
            target: 100_000,
        };
        let rendered = generate(key).unwrap().render("x", "any");
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
