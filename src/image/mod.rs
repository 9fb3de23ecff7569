//! Decoded images: data-URL decoding, magic-byte sniffing of the real format, and pixel dimensions.
//!
//! The label a provider puts on an image is never trusted (OpenRouter has sent JPEG bytes labelled
//! `image/png`); the bytes decide.
//!
//! [`renditions`] makes the sizes a site needs (specs, decode with limits, resize, encode,
//! placeholder); [`pool`] is the bounded pool that work runs in, off the async threads.

mod fast_png;
pub mod placeholder;
pub mod pool;
pub mod renditions;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use sha2::Digest as _;

use crate::error::{Classify, ErrorClass};

/// Image formats the pipeline accepts, as sniffed from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
    Gif,
}

impl ImageFormat {
    /// The MIME type stored as the object's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Gif => "image/gif",
        }
    }

    /// The file extension used in object keys and file names.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
            ImageFormat::Gif => "gif",
        }
    }
}

/// One image as received from the provider, decoded and sniffed.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// The image file's bytes exactly as the provider sent them (after base64 decoding).
    pub bytes: Bytes,
    /// The format the bytes really are.
    pub format: ImageFormat,
    /// Pixel width read from the image header.
    pub width: u32,
    /// Pixel height read from the image header.
    pub height: u32,
    /// SHA-256 of `bytes`, computed once (while decoding, for a provider's image) and used for
    /// both the record and the upload's checksum.
    pub sha256: [u8; 32],
}

impl DecodedImage {
    /// An image from bytes already known to be one (sniffed), hashing them.
    pub fn new(bytes: Bytes, format: ImageFormat, width: u32, height: u32) -> DecodedImage {
        let sha256 = sha2::Sha256::digest(&bytes).into();
        DecodedImage {
            bytes,
            format,
            width,
            height,
            sha256,
        }
    }

    /// Takes decoded bytes whose SHA-256 is known: the real format and dimensions come from
    /// the bytes. `label` is the data URL's type, for the message when they are not an image.
    pub fn from_decoded(
        bytes: Vec<u8>,
        sha256: [u8; 32],
        label: &str,
    ) -> Result<DecodedImage, ImageError> {
        if bytes.is_empty() {
            return Err(ImageError::Empty);
        }
        let format = sniff_format(&bytes).ok_or_else(|| ImageError::NotAnImage {
            head: hex::encode(&bytes[..bytes.len().min(HEAD_SHOWN)]),
            label: if label.is_empty() {
                "without a type".to_owned()
            } else {
                label.chars().take(40).collect()
            },
        })?;
        let (width, height) = dimensions(&bytes).ok_or(ImageError::NoDimensions { format })?;
        Ok(DecodedImage {
            bytes: Bytes::from(bytes),
            format,
            width,
            height,
            sha256,
        })
    }

    /// The SHA-256 as lowercase hex, as recorded on image rows.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// The type label of a `data:<type>;base64,` URL head (`image/png`), JSON slash escapes undone.
pub fn data_url_label(url: &str) -> String {
    let meta = url
        .get(5..)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default();
    meta.split(';')
        .next()
        .unwrap_or_default()
        .replace("\\/", "/")
}

/// Why a provider's image could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The URL is not a `data:` URL (a provider that starts sending links would land here).
    #[error("image URL is not a data URL")]
    NotDataUrl,
    /// A `data:` URL whose payload is not marked `;base64`.
    #[error("data URL is not base64-encoded")]
    NotBase64Encoded,
    /// The payload is not valid base64.
    #[error("data URL payload is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The payload, decoded as it arrived, is not valid base64.
    #[error("data URL payload is not valid base64: {0}")]
    InvalidBase64(String),
    /// The payload decodes to nothing.
    #[error("data URL payload is empty")]
    Empty,
    /// The bytes are none of the accepted formats, whatever the label said.
    #[error(
        "image bytes are not PNG, JPEG, WebP or GIF (they start with {head}), labelled {label}"
    )]
    NotAnImage { head: String, label: String },
    /// The magic bytes name a format but its header does not give usable dimensions.
    #[error("{format:?} image has an unreadable header (no dimensions)")]
    NoDimensions { format: ImageFormat },
}

impl Classify for ImageError {
    /// A corrupt payload is one bad answer: the next call generates new bytes, so it is worth a
    /// retry. A URL of another shape means the provider changed its answer format, which no retry
    /// of this job will fix.
    fn class(&self) -> ErrorClass {
        match self {
            ImageError::NotDataUrl | ImageError::NotBase64Encoded => ErrorClass::Permanent,
            ImageError::Base64(_)
            | ImageError::InvalidBase64(_)
            | ImageError::Empty
            | ImageError::NotAnImage { .. }
            | ImageError::NoDimensions { .. } => ErrorClass::RETRY,
        }
    }
}

/// Standard-alphabet base64 that accepts the payload with or without its trailing `=` padding.
const DATA_URL_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How many leading bytes an error message shows when the bytes are not an image.
const HEAD_SHOWN: usize = 8;

/// Decodes a `data:<type>;base64,<payload>` URL into an image whose format and dimensions come
/// from the bytes, not from the label.
pub fn decode_data_url(url: &str) -> Result<DecodedImage, ImageError> {
    let rest = strip_prefix_ignore_case(url.trim(), "data:").ok_or(ImageError::NotDataUrl)?;
    let (meta, payload) = rest.split_once(',').ok_or(ImageError::NotDataUrl)?;
    let label = meta.split(';').next().unwrap_or_default();
    let is_base64 = meta
        .rsplit(';')
        .next()
        .is_some_and(|p| p.eq_ignore_ascii_case("base64"));
    if !is_base64 {
        return Err(ImageError::NotBase64Encoded);
    }
    let bytes = match DATA_URL_BASE64.decode(payload) {
        Ok(bytes) => bytes,
        // Some encoders wrap base64 lines; that costs a copy, so only on the rare failing path.
        Err(err) if payload.bytes().any(|b| b.is_ascii_whitespace()) => {
            let compact: Vec<u8> = payload
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            DATA_URL_BASE64.decode(compact).map_err(|_| err)?
        }
        Err(err) => return Err(err.into()),
    };
    let sha256 = sha2::Sha256::digest(&bytes).into();
    DecodedImage::from_decoded(bytes, sha256, label)
}

/// The real format and pixel dimensions of image bytes, or `None` if they are not a PNG, JPEG,
/// WebP or GIF with a readable header.
pub fn sniff(bytes: &[u8]) -> Option<(ImageFormat, u32, u32)> {
    let format = sniff_format(bytes)?;
    let (width, height) = dimensions(bytes)?;
    Some((format, width, height))
}

/// The format named by the magic bytes alone.
fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::Webp)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else {
        None
    }
}

/// Pixel dimensions from the image header; `None` when unreadable or zero.
fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let size = imagesize::blob_size(bytes).ok()?;
    let width = u32::try_from(size.width).ok().filter(|w| *w > 0)?;
    let height = u32::try_from(size.height).ok().filter(|h| *h > 0)?;
    Some((width, height))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::prelude::BASE64_STANDARD;

    /// A 3x2 PNG header (signature and IHDR) is all `sniff` needs.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        v.extend_from_slice(&width.to_be_bytes());
        v.extend_from_slice(&height.to_be_bytes());
        v.extend_from_slice(&[8, 2, 0, 0, 0]);
        v.extend_from_slice(&[0, 0, 0, 0]);
        v
    }

    fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let pixels = vec![128u8; usize::from(width) * usize::from(height) * 3];
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 80)
            .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    fn gif(width: u16, height: u16) -> Vec<u8> {
        let mut v = b"GIF89a".to_vec();
        v.extend_from_slice(&width.to_le_bytes());
        v.extend_from_slice(&height.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0]);
        v
    }

    fn webp_vp8x(width: u32, height: u32) -> Vec<u8> {
        let mut v = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00".to_vec();
        v.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
        v.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
        v
    }

    #[test]
    fn sniffs_each_accepted_format_with_its_dimensions() {
        assert_eq!(sniff(&png_header(3, 2)), Some((ImageFormat::Png, 3, 2)));
        assert_eq!(sniff(&jpeg(17, 9)), Some((ImageFormat::Jpeg, 17, 9)));
        assert_eq!(sniff(&gif(640, 480)), Some((ImageFormat::Gif, 640, 480)));
        assert_eq!(
            sniff(&webp_vp8x(1344, 768)),
            Some((ImageFormat::Webp, 1344, 768))
        );
    }

    #[test]
    fn non_image_bytes_are_not_sniffed() {
        assert_eq!(sniff(b"{\"error\": \"not an image\"}"), None);
        assert_eq!(sniff(b""), None);
        // Right magic, truncated header.
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), None);
    }

    #[test]
    fn the_bytes_win_over_the_label() {
        let url = format!(
            "data:image/png;base64,{}",
            BASE64_STANDARD.encode(jpeg(8, 8))
        );
        let image = decode_data_url(&url).unwrap();
        assert_eq!(image.format, ImageFormat::Jpeg);
        assert_eq!((image.width, image.height), (8, 8));
    }

    #[test]
    fn decodes_without_padding_and_with_wrapped_lines() {
        let bytes = png_header(5, 4);
        let encoded = BASE64_STANDARD.encode(&bytes);
        let unpadded = encoded.trim_end_matches('=');
        let image = decode_data_url(&format!("DATA:image/png;base64,{unpadded}")).unwrap();
        assert_eq!(&image.bytes[..], &bytes[..]);
        let wrapped = format!("{}\n{}", &encoded[..10], &encoded[10..]);
        let image = decode_data_url(&format!("data:image/png;base64,{wrapped}")).unwrap();
        assert_eq!(&image.bytes[..], &bytes[..]);
    }

    #[test]
    fn rejects_what_is_not_a_base64_image_with_a_specific_error() {
        assert!(matches!(
            decode_data_url("https://example.com/a.png"),
            Err(ImageError::NotDataUrl)
        ));
        assert!(matches!(
            decode_data_url("data:image/png,rawbytes"),
            Err(ImageError::NotBase64Encoded)
        ));
        assert!(matches!(
            decode_data_url("data:image/png;base64,@@@@"),
            Err(ImageError::Base64(_))
        ));
        assert!(matches!(
            decode_data_url("data:image/png;base64,"),
            Err(ImageError::Empty)
        ));
        let text = format!(
            "data:image/png;base64,{}",
            BASE64_STANDARD.encode(b"<html>nope</html>")
        );
        let err = decode_data_url(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image bytes are not PNG, JPEG, WebP or GIF (they start with 3c68746d6c3e6e6f), \
             labelled image/png"
        );
        assert_eq!(err.class(), ErrorClass::RETRY);
    }
}
