//! CPU per image without a full run: the answer parser (data URL found, base64 decoded and
//! hashed as chunks arrive) and the image path (format and dimensions from the bytes) on a flash
//! answer of 1.2 MB and a Pro 4K answer of 8 MB. The worker's target is 2.5 ms per 1.2 MB image
//! and 16 ms per 7.9 MB one, everything included; this is the part of it the client owns.
//!
//! `cargo bench --bench answer` (divan prints the median and the spread per size).

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;

fn main() {
    divan::main();
}

/// Image sizes: a flash 1K answer, and the Pro model at 4K.
const SIZES: [usize; 2] = [1_200_000, 8_000_000];
/// What the client reads per chunk from a loopback connection, about.
const CHUNK: usize = 16 * 1024;

/// A PNG signature and IHDR (so sniffing finds a 5504x3072 image) followed by incompressible
/// bytes, as a generated picture is.
fn png_like(len: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    out.extend_from_slice(&5504u32.to_be_bytes());
    out.extend_from_slice(&3072u32.to_be_bytes());
    out.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    let mut rng = fastrand::Rng::with_seed(7);
    out.extend((out.len()..len).map(|_| rng.u8(..)));
    out
}

/// An answer shaped like OpenRouter's, with the image as a data URL.
fn answer(image_len: usize) -> Vec<u8> {
    let b64 = BASE64_STANDARD.encode(png_like(image_len));
    format!(
        r#"{{"choices":[{{"finish_reason":"stop","native_finish_reason":"STOP","index":0,"message":{{"content":"","images":[{{"image_url":{{"url":"data:image/png;base64,{b64}"}},"index":0,"type":"image_url"}}],"refusal":null,"role":"assistant"}}}}],"created":1764926649,"id":"gen-1764926649-tF4W3t4FuuPsXb0VBWLB","model":"google/gemini-2.5-flash-image","object":"chat.completion","provider":"Google AI Studio","usage":{{"completion_tokens":1290,"completion_tokens_details":{{"image_tokens":1290,"reasoning_tokens":0}},"cost":0.0387036,"prompt_tokens":12,"total_tokens":1302}}}}"#
    )
    .into_bytes()
}

/// The whole client-side path of one answer: parse, decode, hash, sniff.
#[divan::bench(args = SIZES)]
fn parse_decode_hash(bencher: divan::Bencher, image_len: usize) {
    let body = answer(image_len);
    bencher
        .counter(divan::counter::BytesCount::new(body.len()))
        .bench(|| {
            let g = imagegen::openrouter::client::interpret_bytes(200, &body, CHUNK)
                .expect("the answer parses");
            divan::black_box(g.images[0].sha256)
        });
}

/// For comparison: the old path's floor, one SHA-256 of the image alone.
#[divan::bench(args = SIZES)]
fn sha256_only(bencher: divan::Bencher, image_len: usize) {
    use sha2::Digest as _;
    let image = png_like(image_len);
    bencher
        .counter(divan::counter::BytesCount::new(image.len()))
        .bench(|| divan::black_box(<[u8; 32]>::from(sha2::Sha256::digest(&image))));
}
