//! Decoded images: data-URL decoding, magic-byte sniffing of the real format, and pixel dimensions.
//!
//! The label a provider puts on an image is never trusted (OpenRouter has sent JPEG bytes labelled
//! `image/png`); the bytes decide.

use bytes::Bytes;

/// Image formats the pipeline accepts, as sniffed from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}
