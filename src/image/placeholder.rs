//! Painting a stored ThumbHash (see [`super::renditions::placeholder`]) back into a tiny PNG, so
//! a page can show the blurred preview as an ordinary `data:` image while the real one loads,
//! without any script.

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;

/// The PNG of a base64 ThumbHash (at most 32 pixels a side), or `None` when it does not decode.
pub fn placeholder_png(hash_b64: &str) -> Option<Vec<u8>> {
    let hash = BASE64_STANDARD.decode(hash_b64.trim()).ok()?;
    let (w, h, rgba) = thumbhash::thumb_hash_to_rgba(&hash).ok()?;
    let mut out = Vec::with_capacity(w * h + 128);
    {
        let mut enc = png::Encoder::new(&mut out, u32::try_from(w).ok()?, u32::try_from(h).ok()?);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().ok()?;
        writer.write_image_data(&rgba).ok()?;
    }
    Some(out)
}

/// The placeholder as a `data:image/png;base64,...` URL.
pub fn placeholder_data_url(hash_b64: &str) -> Option<String> {
    placeholder_png(hash_b64)
        .map(|png| format!("data:image/png;base64,{}", BASE64_STANDARD.encode(png)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thumbhash_paints_and_garbage_does_not() {
        // A 4x2 red-left, blue-right image.
        let rgba: Vec<u8> = (0..8)
            .flat_map(|i| {
                if i % 4 < 2 {
                    [255, 0, 0, 255]
                } else {
                    [0, 0, 255, 255]
                }
            })
            .collect();
        let hash = BASE64_STANDARD.encode(thumbhash::rgba_to_thumb_hash(4, 2, &rgba));
        let png = placeholder_png(&hash).expect("decodes");
        assert_eq!(&png[1..4], b"PNG");
        assert!(
            placeholder_data_url(&hash)
                .unwrap()
                .starts_with("data:image/png;base64,")
        );
        assert!(placeholder_png("not base64 !!").is_none());
        assert!(placeholder_png("").is_none());
    }
}
