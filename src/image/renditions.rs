//! Renditions: the spec grammar (`og`, `thumb`, `webp`, `WxH.fmt`, `Ww.fmt`), decoding an
//! original with limits, resizing it and encoding each rendition, plus the ThumbHash placeholder.
//! Pure CPU work on bytes: no storage, no SQL, no async (the pool in [`super::pool`] runs it).
//!
//! The grammar is the one `imagegen.renditions_valid` checks at INSERT (first renditions
//! migration); the two must agree, and a test holds them to it.
//!
//! Pixels are decoded to 8-bit RGB and re-encoded, so metadata (EXIF, XMP, text chunks) never
//! reaches a rendition. Embedded colour profiles are dropped and values are taken as sRGB, which is
//! what the providers send. Alpha is dropped: generated images are opaque.

use std::io::Cursor;
use std::num::NonZeroUsize;

use fast_image_resize as fr;

use super::ImageFormat;

/// Open Graph card size (Facebook, LinkedIn, X all crop 1.91:1 to this).
pub const OG_SIZE: (u32, u32) = (1200, 630);
/// Width of the automatic thumbnail; its height follows the original's aspect ratio.
pub const THUMB_WIDTH: u32 = 480;
/// Smallest and largest side a custom spec may ask for.
pub const MIN_SIDE: u32 = 16;
pub const MAX_SIDE: u32 = 4096;
/// Most specs one job may ask for.
pub const MAX_SPECS: usize = 8;
/// The spec made for every job unless the worker is told otherwise.
pub const AUTO_THUMB: &str = "thumb";
/// The side the original is shrunk to for its ThumbHash. The hash keeps only the lowest
/// frequencies (at most 7 terms a side), so 48 px give the same hash as ThumbHash's own maximum
/// of 100 (a test compares the previews) for a fifth of its cost: 0.15 ms instead of 0.6 per
/// image, which is 6 % of the automatic thumbnail's CPU budget.
const PLACEHOLDER_MAX_SIDE: u32 = 48;

/// [`RenditionSettings::jpeg_quality`]'s default.
pub const DEFAULT_JPEG_QUALITY: u8 = 85;
/// [`RenditionSettings::webp_quality`]'s default (libwebp's own default is 75; 80 keeps text in
/// generated headers crisp at a few percent more bytes).
pub const DEFAULT_WEBP_QUALITY: u8 = 80;
/// [`RenditionSettings::webp_method`]'s default. libwebp's own default (4) spends about twice
/// the CPU of 2 for files a few percent smaller; 2 keeps the thumbnail of a 1344x768 original
/// within its CPU budget (see `imagegen bench renditions`).
pub const DEFAULT_WEBP_METHOD: u8 = 2;
/// [`RenditionSettings::max_decode_pixels`]'s default: well above a 4K original (5504x3072,
/// 17 MP), far below what would exhaust memory with a full pool.
pub const DEFAULT_MAX_DECODE_PIXELS: u64 = 40_000_000;
/// The decoder's allocation cap (the decoded image counts towards it): a 40 MP RGBA image plus
/// working buffers.
pub const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;

/// How renditions are made, parsed once by the CLI (`imagegen worker`, `imagegen renditions`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RenditionSettings {
    /// Images decoded, resized and encoded at once (each 4K original is about 50 MB decoded):
    /// the bound that keeps 1,000 calls in flight from meaning 1,000 decoded images. Default:
    /// the number of cores.
    #[arg(
        long = "image-threads",
        env = "IMAGEGEN_IMAGE_THREADS",
        value_name = "N"
    )]
    pub image_threads: Option<NonZeroUsize>,

    /// Do not make the automatic `thumb` rendition of every image (only what jobs ask for).
    #[arg(long = "no-auto-thumb", env = "IMAGEGEN_NO_AUTO_THUMB")]
    pub no_auto_thumb: bool,

    /// JPEG quality of renditions (1-100).
    #[arg(long = "jpeg-quality", env = "IMAGEGEN_JPEG_QUALITY", default_value_t = DEFAULT_JPEG_QUALITY,
        value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: u8,

    /// Lossy WebP quality of renditions (1-100).
    #[arg(long = "webp-quality", env = "IMAGEGEN_WEBP_QUALITY", default_value_t = DEFAULT_WEBP_QUALITY,
        value_parser = clap::value_parser!(u8).range(1..=100))]
    pub webp_quality: u8,

    /// Lossy WebP effort, 0 (fastest) to 6 (smallest files), as libwebp's `-m`.
    #[arg(long = "webp-method", env = "IMAGEGEN_WEBP_METHOD", default_value_t = DEFAULT_WEBP_METHOD,
        value_parser = clap::value_parser!(u8).range(0..=6))]
    pub webp_method: u8,

    /// Originals with more pixels than this are not decoded (their renditions fail, the job
    /// still succeeds): a hostile or broken answer is an error, never an out-of-memory.
    #[arg(long = "max-decode-pixels", env = "IMAGEGEN_MAX_DECODE_PIXELS",
        default_value_t = DEFAULT_MAX_DECODE_PIXELS)]
    pub max_decode_pixels: u64,
}

impl Default for RenditionSettings {
    fn default() -> Self {
        RenditionSettings {
            image_threads: None,
            no_auto_thumb: false,
            jpeg_quality: DEFAULT_JPEG_QUALITY,
            webp_quality: DEFAULT_WEBP_QUALITY,
            webp_method: DEFAULT_WEBP_METHOD,
            max_decode_pixels: DEFAULT_MAX_DECODE_PIXELS,
        }
    }
}

impl RenditionSettings {
    /// The pool size: the setting, or the number of cores.
    pub fn threads(&self) -> usize {
        self.image_threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }
}

/// What a spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Exactly this size: scale to cover, crop the centre.
    Cover { width: u32, height: u32 },
    /// This width; the height follows the original's aspect ratio.
    Width { width: u32 },
    /// The original's size.
    Full,
}

/// One parsed spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spec {
    /// As written by the app: the key of `rendition_urls`.
    pub text: String,
    pub shape: Shape,
    pub format: ImageFormat,
}

/// Why a spec or a rendition failed. Every variant is permanent for that spec and that
/// original: making it again from the same bytes fails the same way.
#[derive(Debug, thiserror::Error)]
pub enum RenditionError {
    #[error(
        "invalid rendition spec {0:?}: use og, thumb, webp, WxH.fmt or Ww.fmt (fmt jpg, jpeg, png or webp; 16 to 4096 px)"
    )]
    InvalidSpec(String),
    #[error("the original is {width}x{height} ({pixels} pixels), over the decode limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("the original could not be decoded: {0}")]
    Decode(String),
    #[error("resizing failed: {0}")]
    Resize(String),
    #[error("encoding {format:?} failed: {detail}")]
    Encode { format: ImageFormat, detail: String },
    #[error("the image pool is shut down")]
    PoolClosed,
}

impl Spec {
    /// Parses one spec by the grammar of `imagegen.renditions_valid`.
    pub fn parse(text: &str) -> Result<Spec, RenditionError> {
        let bad = || RenditionError::InvalidSpec(text.chars().take(40).collect());
        let (shape, format) = match text {
            "og" => (
                Shape::Cover {
                    width: OG_SIZE.0,
                    height: OG_SIZE.1,
                },
                ImageFormat::Jpeg,
            ),
            "thumb" => (Shape::Width { width: THUMB_WIDTH }, ImageFormat::Webp),
            "webp" => (Shape::Full, ImageFormat::Webp),
            custom => {
                let (size, ext) = custom.split_once('.').ok_or_else(bad)?;
                let format = match ext {
                    "jpg" | "jpeg" => ImageFormat::Jpeg,
                    "png" => ImageFormat::Png,
                    "webp" => ImageFormat::Webp,
                    _ => return Err(bad()),
                };
                let shape = if let Some(w) = size.strip_suffix('w') {
                    Shape::Width {
                        width: side(w).ok_or_else(bad)?,
                    }
                } else {
                    let (w, h) = size.split_once('x').ok_or_else(bad)?;
                    Shape::Cover {
                        width: side(w).ok_or_else(bad)?,
                        height: side(h).ok_or_else(bad)?,
                    }
                };
                (shape, format)
            }
        };
        Ok(Spec {
            text: text.to_owned(),
            shape,
            format,
        })
    }

    /// Parses a list of specs, with the list rules (at most [`MAX_SPECS`], no duplicates).
    pub fn parse_list<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Spec>, RenditionError> {
        let mut specs: Vec<Spec> = Vec::with_capacity(texts.len());
        for t in texts {
            let spec = Spec::parse(t.as_ref())?;
            if specs.iter().any(|s| s.text == spec.text) {
                return Err(RenditionError::InvalidSpec(format!(
                    "{} (twice)",
                    spec.text
                )));
            }
            specs.push(spec);
        }
        if specs.len() > MAX_SPECS {
            return Err(RenditionError::InvalidSpec(format!(
                "{} specs (at most {MAX_SPECS})",
                specs.len()
            )));
        }
        Ok(specs)
    }

    /// The spec's token in object keys: only `[a-z0-9-]`, one per spec text, so every spec
    /// written differently gets its own key (`1200x630.jpg` and `1200x630.jpeg` too).
    pub fn key_token(&self) -> String {
        self.text.replace('.', "-")
    }

    /// The output size for an original of `width` x `height`. Always exact: a smaller original
    /// is scaled up.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.shape {
            Shape::Cover { width, height } => (width, height),
            Shape::Full => (width, height),
            Shape::Width { width: w } => {
                let h = (u64::from(w) * u64::from(height) + u64::from(width) / 2)
                    / u64::from(width.max(1));
                (w, u32::try_from(h).unwrap_or(u32::MAX).max(1))
            }
        }
    }
}

/// A side length of a custom spec: digits without a leading zero, within the limits.
fn side(s: &str) -> Option<u32> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 4 {
        return None;
    }
    s.parse().ok().filter(|n| (MIN_SIDE..=MAX_SIDE).contains(n))
}

/// One encoded rendition.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// A decoded original: 8-bit RGB, row by row.
#[derive(Clone)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Decodes an original (PNG, JPEG or WebP, whatever its label said) with a pixel cap checked
/// from the header before any pixel is decoded, and an allocation cap inside the decoder.
/// 8-bit RGB and RGBA PNGs, what models send, take [`super::fast_png`]; everything else, and
/// anything that path declines, the general decoder.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Pixels, RenditionError> {
    let (format, width, height) = super::sniff(bytes)
        .ok_or_else(|| RenditionError::Decode("not a PNG, JPEG or WebP".into()))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(RenditionError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if format == ImageFormat::Png
        && let Some(px) = super::fast_png::decode_rgb8(
            bytes,
            usize::try_from(MAX_DECODE_ALLOC).unwrap_or(usize::MAX),
        )
    {
        return Ok(px);
    }
    let format = match format {
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        ImageFormat::Webp => image::ImageFormat::WebP,
        ImageFormat::Gif => return Err(RenditionError::Decode("GIF is not supported".into())),
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    let side_cap = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side_cap);
    limits.max_image_height = Some(side_cap);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| RenditionError::Decode(e.to_string()))?;
    let rgb = decoded.into_rgb8();
    Ok(Pixels {
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

/// Resizes to exactly `width` x `height`; with `cover`, the source is first cropped around its
/// centre to the target's aspect ratio (scale to cover, crop the centre).
pub fn resize(
    src: &Pixels,
    width: u32,
    height: u32,
    cover: bool,
) -> Result<Pixels, RenditionError> {
    resize_with(src, width, height, cover, RESIZE_FILTER)
}

/// The filter of renditions: sharp, and with half the taps of Lanczos3.
const RESIZE_FILTER: fr::FilterType = fr::FilterType::CatmullRom;

fn resize_with(
    src: &Pixels,
    width: u32,
    height: u32,
    cover: bool,
    filter: fr::FilterType,
) -> Result<Pixels, RenditionError> {
    if (width, height) == (src.width, src.height) {
        return Ok(src.clone());
    }
    let view = fr::images::ImageRef::new(src.width, src.height, &src.rgb, fr::PixelType::U8x3)
        .map_err(|e| RenditionError::Resize(e.to_string()))?;
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let mut options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(filter));
    if cover {
        options = options.fit_into_destination(Some((0.5, 0.5)));
    }
    fr::Resizer::new()
        .resize(&view, &mut dst, &options)
        .map_err(|e| RenditionError::Resize(e.to_string()))?;
    Ok(Pixels {
        width,
        height,
        rgb: dst.into_vec(),
    })
}

/// Encodes RGB pixels in `format`.
pub fn encode(
    px: &Pixels,
    format: ImageFormat,
    settings: &RenditionSettings,
) -> Result<Vec<u8>, RenditionError> {
    let fail = |detail: String| RenditionError::Encode { format, detail };
    match format {
        ImageFormat::Jpeg => {
            let (w, h) = match (u16::try_from(px.width), u16::try_from(px.height)) {
                (Ok(w), Ok(h)) => (w, h),
                _ => return Err(fail("too large for JPEG".into())),
            };
            let mut out = Vec::new();
            jpeg_encoder::Encoder::new(&mut out, settings.jpeg_quality)
                .encode(&px.rgb, w, h, jpeg_encoder::ColorType::Rgb)
                .map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        ImageFormat::Png => {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, px.width, px.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
            writer
                .write_image_data(&px.rgb)
                .map_err(|e| fail(e.to_string()))?;
            writer.finish().map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        ImageFormat::Webp => {
            let mut config =
                webp::WebPConfig::new().map_err(|()| fail("libwebp refused its config".into()))?;
            config.lossless = 0;
            config.quality = f32::from(settings.webp_quality);
            config.method = i32::from(settings.webp_method.min(6));
            let mem = webp::Encoder::from_rgb(&px.rgb, px.width, px.height)
                .encode_advanced(&config)
                .map_err(|e| fail(format!("{e:?}")))?;
            Ok(mem.to_vec())
        }
        ImageFormat::Gif => Err(fail("GIF renditions are not made".into())),
    }
}

/// Makes one rendition from decoded pixels.
pub fn render(
    src: &Pixels,
    spec: &Spec,
    settings: &RenditionSettings,
) -> Result<Encoded, RenditionError> {
    render_keeping(src, spec, settings).map(|(encoded, _)| encoded)
}

/// [`render`], also handing back the resized pixels (`None` when the spec is the original's
/// own size, so nothing was resized) for the placeholder to reuse.
fn render_keeping(
    src: &Pixels,
    spec: &Spec,
    settings: &RenditionSettings,
) -> Result<(Encoded, Option<Pixels>), RenditionError> {
    let (width, height) = spec.output_size(src.width, src.height);
    let cover = matches!(spec.shape, Shape::Cover { .. });
    let resized = if (width, height) == (src.width, src.height) {
        None
    } else {
        Some(resize(src, width, height, cover)?)
    };
    let bytes = encode(resized.as_ref().unwrap_or(src), spec.format, settings)?;
    let encoded = Encoded {
        bytes,
        format: spec.format,
        width,
        height,
    };
    Ok((encoded, resized.filter(|_| !cover)))
}

/// The ThumbHash of an image (base64, standard alphabet with padding): a blurred preview in
/// about 25 bytes.
pub fn placeholder(src: &Pixels) -> Result<String, RenditionError> {
    use base64::Engine as _;
    let scale = f64::from(PLACEHOLDER_MAX_SIDE) / f64::from(src.width.max(src.height));
    let w = ((f64::from(src.width) * scale).round() as u32).clamp(1, PLACEHOLDER_MAX_SIDE);
    let h = ((f64::from(src.height) * scale).round() as u32).clamp(1, PLACEHOLDER_MAX_SIDE);
    // A 48 px preview of a blur: the cheapest filter is plenty.
    let small = resize_with(src, w, h, false, fr::FilterType::Box)?;
    let rgba: Vec<u8> = small
        .rgb
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let hash = thumbhash::rgba_to_thumb_hash(w as usize, h as usize, &rgba);
    Ok(base64::prelude::BASE64_STANDARD.encode(hash))
}

/// Everything made from one original: its placeholder and one result per spec, in order.
pub struct Made {
    pub placeholder: Option<String>,
    pub renditions: Vec<Result<Encoded, RenditionError>>,
}

/// Decodes `original` once and makes every spec from it. A decode failure fails every spec
/// (and leaves no placeholder); otherwise each spec succeeds or fails on its own.
///
/// The placeholder is computed from the smallest full-frame rendition made (the thumbnail,
/// usually) rather than from the original: the same picture, a tenth of the pixels to shrink.
pub fn make_all(original: &[u8], specs: &[Spec], settings: &RenditionSettings) -> Made {
    let src = match decode(original, settings.max_decode_pixels) {
        Ok(src) => src,
        Err(e) => {
            let msg = e.to_string();
            return Made {
                placeholder: None,
                renditions: specs
                    .iter()
                    .map(|_| Err(RenditionError::Decode(msg.clone())))
                    .collect(),
            };
        }
    };
    let mut smallest: Option<Pixels> = None;
    let mut renditions = Vec::with_capacity(specs.len());
    for spec in specs {
        match render_keeping(&src, spec, settings) {
            Ok((encoded, resized)) => {
                if let Some(px) = resized.filter(|p| {
                    p.width.max(p.height) >= PLACEHOLDER_MAX_SIDE
                        && smallest.as_ref().is_none_or(|s| p.width < s.width)
                }) {
                    smallest = Some(px);
                }
                renditions.push(Ok(encoded));
            }
            Err(e) => renditions.push(Err(e)),
        }
    }
    Made {
        placeholder: placeholder(smallest.as_ref().unwrap_or(&src)).ok(),
        renditions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(width: u32, height: u32) -> Vec<u8> {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&[(x % 256) as u8, (y % 256) as u8, 128]);
            }
        }
        let px = Pixels { width, height, rgb };
        encode(&px, ImageFormat::Png, &RenditionSettings::default()).unwrap()
    }

    #[test]
    fn specs_parse_by_the_grammar() {
        let ok = [
            (
                "og",
                Shape::Cover {
                    width: 1200,
                    height: 630,
                },
                ImageFormat::Jpeg,
            ),
            ("thumb", Shape::Width { width: 480 }, ImageFormat::Webp),
            ("webp", Shape::Full, ImageFormat::Webp),
            (
                "1200x630.webp",
                Shape::Cover {
                    width: 1200,
                    height: 630,
                },
                ImageFormat::Webp,
            ),
            (
                "16x4096.jpeg",
                Shape::Cover {
                    width: 16,
                    height: 4096,
                },
                ImageFormat::Jpeg,
            ),
            ("800w.png", Shape::Width { width: 800 }, ImageFormat::Png),
        ];
        for (text, shape, format) in ok {
            let s = Spec::parse(text).unwrap();
            assert_eq!((s.shape, s.format), (shape, format), "{text}");
        }
        for bad in [
            "",
            "OG",
            "thumb ",
            "15x100.png",
            "100x4097.png",
            "0100x100.png",
            "100x100",
            "100x100.gif",
            "100w",
            "w.png",
            "x100.png",
            "100x.png",
            "1e3x100.png",
            "-16w.png",
            "100x100.png.png",
            "99999w.png",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Spec::parse_list(&["og", "og"]).is_err());
        assert!(
            Spec::parse_list(&[
                "16w.png", "17w.png", "18w.png", "19w.png", "20w.png", "21w.png", "22w.png",
                "23w.png"
            ])
            .is_ok()
        );
        assert!(
            Spec::parse_list(&[
                "16w.png", "17w.png", "18w.png", "19w.png", "20w.png", "21w.png", "22w.png",
                "23w.png", "og"
            ])
            .is_err()
        );
    }

    #[test]
    fn key_tokens_are_safe_and_distinct() {
        let a = Spec::parse("1200x630.jpg").unwrap().key_token();
        let b = Spec::parse("1200x630.jpeg").unwrap().key_token();
        assert_eq!(a, "1200x630-jpg");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn sizes_are_exact_even_when_scaling_up() {
        let portrait = source(90, 160);
        let made = make_all(
            &portrait,
            &Spec::parse_list(&["og", "thumb", "40w.png"]).unwrap(),
            &RenditionSettings::default(),
        );
        let dims: Vec<(u32, u32, ImageFormat)> = made
            .renditions
            .iter()
            .map(|r| {
                let r = r.as_ref().unwrap();
                let (f, w, h) = crate::image::sniff(&r.bytes).unwrap();
                assert_eq!((w, h), (r.width, r.height));
                (w, h, f)
            })
            .collect();
        assert_eq!(
            dims,
            [
                (1200, 630, ImageFormat::Jpeg),
                (480, 853, ImageFormat::Webp),
                (40, 71, ImageFormat::Png)
            ]
        );
        let hash = made.placeholder.unwrap();
        assert!((20..60).contains(&hash.len()), "{hash}");
    }

    #[test]
    fn the_placeholder_previews_as_one_from_thumbhashs_largest_input_does() {
        let (width, height) = (1344, 768);
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let (fx, fy) = (x as f64 / width as f64, y as f64 / height as f64);
                let disc = (fx - 0.7).powi(2) + (fy - 0.3).powi(2) < 0.02;
                rgb.extend_from_slice(&[
                    (40.0 + 180.0 * fy) as u8,
                    if disc {
                        240
                    } else {
                        (200.0 * (fx * 9.0).sin().abs()) as u8
                    },
                    (220.0 - 150.0 * fx) as u8,
                ]);
            }
        }
        let src = Pixels {
            width: width as u32,
            height: height as u32,
            rgb,
        };
        let preview = |hash: &[u8]| thumbhash::thumb_hash_to_rgba(hash).unwrap().2;
        let ours = base64::Engine::decode(
            &base64::prelude::BASE64_STANDARD,
            placeholder(&src).unwrap(),
        )
        .unwrap();
        let big = resize_with(&src, 100, 57, false, fr::FilterType::Box).unwrap();
        let rgba: Vec<u8> = big
            .rgb
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect();
        let theirs = thumbhash::rgba_to_thumb_hash(100, 57, &rgba);
        let (a, b) = (preview(&ours), preview(&theirs));
        assert_eq!(a.len(), b.len());
        let mean_diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64;
        assert!(
            mean_diff <= 1.0,
            "previews differ by {mean_diff:.2} levels on average"
        );
    }

    #[test]
    fn decode_limits_refuse_before_decoding() {
        let err = decode(&source(64, 64), 64 * 63).err().unwrap();
        assert!(
            matches!(err, RenditionError::TooLarge { pixels: 4096, .. }),
            "{err}"
        );
        let err = decode(b"\x89PNG\r\n\x1a\nnot really", 1000).err().unwrap();
        assert!(matches!(err, RenditionError::Decode(_)), "{err}");
    }
}
