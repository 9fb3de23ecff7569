//! The fast path for the PNGs models send: 8-bit RGB or RGBA, not interlaced, decoded to RGB.
//!
//! Decoding such a PNG is almost all inflate (about 70 % of the time with the `png` crate's
//! fdeflate on a 1.2 MB answer) plus row unfiltering. This path inflates the image data in one
//! call to libdeflate (through `libdeflater`), which is about 1.6x faster than fdeflate on the
//! streams encoders write, and unfilters the rows in place in that same buffer, so the peak is
//! the decoded image plus one byte per row, as with the `png` crate.
//!
//! It only ever takes the well-formed common case: anything else (another bit depth or colour
//! type, interlacing, an unknown critical chunk, a bad checksum, a stream that does not inflate
//! to exactly the image's size, an unknown row filter) gives `None`, and the caller decodes with
//! the general decoder (`image`), which then reads the image or names what is wrong with it. So
//! this path never produces an error message of its own and never accepts what the general
//! decoder would refuse in the image data itself.

use super::renditions::Pixels;

const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// The image header fields this path needs.
struct Header {
    width: usize,
    height: usize,
    /// Bytes per pixel: 3 (RGB) or 4 (RGBA).
    bpp: usize,
}

/// Decodes `bytes` to RGB when it is an 8-bit RGB or RGBA PNG without interlacing whose
/// filtered image data is at most `max_alloc` bytes; `None` otherwise (see the module's doc).
pub fn decode_rgb8(bytes: &[u8], max_alloc: usize) -> Option<Pixels> {
    let (header, data) = image_data(bytes)?;
    let stride = header.width.checked_mul(header.bpp)?;
    let filtered_len = stride.checked_add(1)?.checked_mul(header.height)?;
    if filtered_len > max_alloc {
        return None;
    }
    let joined;
    let input: &[u8] = match data.as_slice() {
        [one] => one,
        many => {
            joined = many.concat();
            &joined
        }
    };
    let mut buf = vec![0u8; filtered_len];
    let written = libdeflater::Decompressor::new()
        .zlib_decompress(input, &mut buf)
        .ok()?;
    if written != filtered_len {
        return None;
    }
    unfilter_in_place(&mut buf, &header)?;
    Some(Pixels {
        width: u32::try_from(header.width).ok()?,
        height: u32::try_from(header.height).ok()?,
        rgb: buf,
    })
}

/// Reads the chunks up to the end of the image data: the header, and the data of every IDAT
/// chunk in order (checksums checked).
fn image_data(bytes: &[u8]) -> Option<(Header, Vec<&[u8]>)> {
    if bytes.get(..SIGNATURE.len())? != SIGNATURE {
        return None;
    }
    let mut at = SIGNATURE.len();
    let mut header: Option<Header> = None;
    let mut data: Vec<&[u8]> = Vec::new();
    loop {
        let len = usize::try_from(be_u32(bytes, at)?).ok()?;
        let kind = bytes.get(at.checked_add(4)?..at.checked_add(8)?)?;
        let end = at.checked_add(8)?.checked_add(len)?;
        let body = bytes.get(at + 8..end)?;
        let mut crc = libdeflater::Crc::new();
        crc.update(kind);
        crc.update(body);
        if crc.sum() != be_u32(bytes, end)? {
            return None;
        }
        match kind {
            b"IHDR" if header.is_none() => header = Some(parse_header(body)?),
            // The data ends at the first chunk after it (the IEND, or ancillary chunks the
            // general decoder would skip too).
            _ if !data.is_empty() && kind != b"IDAT" => break,
            b"IDAT" => {
                header.as_ref()?;
                data.push(body);
            }
            b"IEND" => return None,
            // A suggested palette of a truecolour image: not needed to decode it.
            b"PLTE" => {}
            // Any other critical chunk (uppercase first letter) is one this path does not know.
            [first, ..] if first.is_ascii_uppercase() => return None,
            // Ancillary chunks (text, colour profile, gamma, ...) are dropped, as the general
            // decoder's pixels ignore them too; they may not come before the header.
            _ => {
                header.as_ref()?;
            }
        }
        at = end.checked_add(4)?;
    }
    Some((header?, data))
}

fn parse_header(body: &[u8]) -> Option<Header> {
    let [
        w0,
        w1,
        w2,
        w3,
        h0,
        h1,
        h2,
        h3,
        depth,
        colour,
        compression,
        filter,
        interlace,
    ] = *body
    else {
        return None;
    };
    let bpp = match (depth, colour) {
        (8, 2) => 3,
        (8, 6) => 4,
        _ => return None,
    };
    if (compression, filter, interlace) != (0, 0, 0) {
        return None;
    }
    let width = usize::try_from(u32::from_be_bytes([w0, w1, w2, w3])).ok()?;
    let height = usize::try_from(u32::from_be_bytes([h0, h1, h2, h3])).ok()?;
    if width == 0 || height == 0 {
        return None;
    }
    Some(Header { width, height, bpp })
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Undoes the row filters of `buf` (each row a filter byte, then the row) in place and packs
/// the pixels as RGB rows without filter bytes at the start of `buf`, which is then truncated.
fn unfilter_in_place(buf: &mut Vec<u8>, header: &Header) -> Option<()> {
    let stride = header.width * header.bpp;
    let row_len = stride + 1;
    let zero_row = vec![0u8; stride];
    let rgb_stride = header.width * 3;
    for row in 0..header.height {
        let start = row * row_len;
        let (before, rest) = buf.split_at_mut(start);
        let previous: &[u8] = match row {
            0 => &zero_row,
            _ => &before[start - stride..],
        };
        let (filter, current) = rest.get_mut(..row_len)?.split_first_mut()?;
        let known = if header.bpp == 3 {
            unfilter_row::<3>(*filter, previous, current)
        } else {
            unfilter_row::<4>(*filter, previous, current)
        };
        if !known {
            return None;
        }
        // The row above is no longer needed in place: move it to its packed position, which
        // is before this row's bytes (row * 3w < row * (3w + 1) + 1), while it is in cache.
        if header.bpp == 3 && row > 0 {
            let above = start - stride;
            buf.copy_within(above..start, (row - 1) * rgb_stride);
        }
    }
    if header.bpp == 3 {
        let last = (header.height - 1) * row_len + 1;
        buf.copy_within(last..last + stride, (header.height - 1) * rgb_stride);
    } else {
        // Alpha dropped, pixel by pixel: every pixel's packed position is at or before its own.
        let mut to = 0;
        for row in 0..header.height {
            let from = row * row_len + 1;
            for x in 0..header.width {
                let at = from + x * 4;
                buf.copy_within(at..at + 3, to);
                to += 3;
            }
        }
    }
    buf.truncate(rgb_stride * header.height);
    Some(())
}

/// Undoes one row's filter (PNG filter method 0) for `B` bytes per pixel; `false` for an
/// unknown filter type.
fn unfilter_row<const B: usize>(filter: u8, previous: &[u8], current: &mut [u8]) -> bool {
    match filter {
        0 => {}
        1 => {
            for i in B..current.len() {
                current[i] = current[i].wrapping_add(current[i - B]);
            }
        }
        2 => {
            for (c, up) in current.iter_mut().zip(previous) {
                *c = c.wrapping_add(*up);
            }
        }
        3 => {
            let mut left = [0u8; B];
            for (px, up) in current.chunks_exact_mut(B).zip(previous.chunks_exact(B)) {
                for k in 0..B {
                    let average = (u16::from(left[k]) + u16::from(up[k])) >> 1;
                    px[k] = px[k].wrapping_add(average as u8);
                    left[k] = px[k];
                }
            }
        }
        4 => {
            let mut left = [0i16; B];
            let mut up_left = [0i16; B];
            for (px, up) in current.chunks_exact_mut(B).zip(previous.chunks_exact(B)) {
                for k in 0..B {
                    let up_k = i16::from(up[k]);
                    px[k] = px[k].wrapping_add(paeth(left[k], up_k, up_left[k]));
                    left[k] = i16::from(px[k]);
                    up_left[k] = up_k;
                }
            }
        }
        _ => return false,
    }
    true
}

/// The Paeth predictor of left `a`, up `b` and up-left `c`, in the branch-free form of
/// stb_image (equal to the specification's for every input; a test checks all of them): the
/// row's chain of dependencies is a few instructions per byte instead of three mispredictable
/// comparisons.
fn paeth(a: i16, b: i16, c: i16) -> u8 {
    let threshold = c * 3 - (a + b);
    let (low, high) = (a.min(b), a.max(b));
    let not_low = if high <= threshold { low } else { c };
    (if threshold <= low { high } else { not_low }) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The general decoder's RGB pixels of `bytes`, or its error.
    fn general(bytes: &[u8]) -> Result<Vec<u8>, String> {
        image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
            .map(|img| img.into_rgb8().into_raw())
            .map_err(|e| e.to_string())
    }

    /// Pixels with every kind of neighbourhood (smooth runs, edges, noise), so each filter's
    /// arithmetic, wrap-around included, is exercised.
    fn pixels(width: u32, height: u32, channels: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..width as usize * height as usize * channels)
            .map(|i| match (i / 97) % 3 {
                0 => rng.u8(..),
                1 => (i % 256) as u8,
                _ => 255 - ((i / channels) % 7) as u8,
            })
            .collect()
    }

    fn encode(
        data: &[u8],
        width: u32,
        height: u32,
        colour: png::ColorType,
        filter: png::Filter,
        chunk: Option<usize>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, width, height);
            enc.set_color(colour);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_filter(filter);
            let mut writer = enc.write_header().unwrap();
            match chunk {
                // Small IDAT chunks: the data comes in many pieces.
                Some(size) => {
                    let mut stream = writer.stream_writer_with_size(size).unwrap();
                    std::io::Write::write_all(&mut stream, data).unwrap();
                    stream.finish().unwrap();
                }
                None => writer.write_image_data(data).unwrap(),
            }
        }
        out
    }

    #[test]
    fn the_paeth_predictor_is_the_specifications_for_every_input() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                for c in 0..=255u8 {
                    let p = i16::from(a) + i16::from(b) - i16::from(c);
                    let (pa, pb, pc) = (
                        (p - i16::from(a)).abs(),
                        (p - i16::from(b)).abs(),
                        (p - i16::from(c)).abs(),
                    );
                    let spec = if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    };
                    assert_eq!(
                        paeth(i16::from(a), i16::from(b), i16::from(c)),
                        spec,
                        "{a} {b} {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn decodes_exactly_what_the_general_decoder_does() {
        let filters = [
            png::Filter::NoFilter,
            png::Filter::Sub,
            png::Filter::Up,
            png::Filter::Avg,
            png::Filter::Paeth,
            png::Filter::Adaptive,
        ];
        let mut seed = 0;
        for (colour, channels) in [(png::ColorType::Rgb, 3), (png::ColorType::Rgba, 4)] {
            for (width, height) in [(1, 1), (1, 9), (7, 3), (64, 33), (301, 17)] {
                for filter in filters {
                    for chunk in [None, Some(100)] {
                        seed += 1;
                        let data = pixels(width, height, channels, seed);
                        let file = encode(&data, width, height, colour, filter, chunk);
                        let fast = decode_rgb8(&file, usize::MAX).unwrap_or_else(|| {
                            panic!("{colour:?} {width}x{height} {filter:?} {chunk:?} not taken")
                        });
                        assert_eq!((fast.width, fast.height), (width, height));
                        assert_eq!(
                            Ok(fast.rgb),
                            general(&file),
                            "{colour:?} {width}x{height} {filter:?} {chunk:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn other_kinds_of_png_are_left_to_the_general_decoder() {
        let grey = encode(
            &pixels(5, 5, 1, 1),
            5,
            5,
            png::ColorType::Grayscale,
            png::Filter::Sub,
            None,
        );
        assert!(decode_rgb8(&grey, usize::MAX).is_none());
        let mut sixteen = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut sixteen, 4, 4);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Sixteen);
            enc.write_header()
                .unwrap()
                .write_image_data(&pixels(4, 4, 6, 2))
                .unwrap();
        }
        assert!(decode_rgb8(&sixteen, usize::MAX).is_none());
        // Over the allocation cap: 8x8 RGB is 8 * (1 + 24) = 200 bytes filtered.
        let rgb = encode(
            &pixels(8, 8, 3, 3),
            8,
            8,
            png::ColorType::Rgb,
            png::Filter::Up,
            None,
        );
        assert!(decode_rgb8(&rgb, 199).is_none());
        assert!(decode_rgb8(&rgb, 200).is_some());
        assert!(decode_rgb8(b"\xff\xd8\xff\xe0 a JPEG", usize::MAX).is_none());
    }

    #[test]
    fn damaged_files_never_panic_and_never_decode_to_other_pixels() {
        let (w, h) = (40, 12);
        let data = pixels(w, h, 3, 9);
        let file = encode(
            &data,
            w,
            h,
            png::ColorType::Rgb,
            png::Filter::Paeth,
            Some(64),
        );
        // Every truncation.
        for len in 0..file.len() {
            assert!(
                decode_rgb8(&file[..len], usize::MAX).is_none(),
                "cut at {len}"
            );
        }
        // Every single-byte change: a checksum or the inflate catches it, or (a change in a
        // chunk the path skips, or in a CRC's own bytes that the general decoder may ignore)
        // the pixels still match the general decoder's exactly.
        let mut rng = fastrand::Rng::with_seed(5);
        for at in 8..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 1 << rng.u8(0..8);
            if let Some(px) = decode_rgb8(&bad, usize::MAX) {
                assert_eq!(px.rgb, data, "a change at {at} decoded to other pixels");
            }
        }
        // A change inside the image data with its CRC fixed up: only the inflate (or Adler-32)
        // can catch it, and the fast path then declines rather than guess.
        let idat = file.windows(4).position(|w| w == b"IDAT").unwrap();
        let len = u32::from_be_bytes(file[idat - 4..idat].try_into().unwrap()) as usize;
        for offset in [2, len / 2, len - 1] {
            let mut bad = file.clone();
            bad[idat + 4 + offset] ^= 0x5a;
            let mut crc = libdeflater::Crc::new();
            crc.update(&bad[idat..idat + 4 + len]);
            bad[idat + 4 + len..idat + 8 + len].copy_from_slice(&crc.sum().to_be_bytes());
            if let Some(px) = decode_rgb8(&bad, usize::MAX) {
                assert_eq!(Ok(px.rgb), general(&bad), "offset {offset}");
            }
        }
    }
}
