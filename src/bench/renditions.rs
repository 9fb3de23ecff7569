//! The `renditions` scenario: CPU milliseconds per job for the image work the worker adds to
//! each job, measured on this thread's CPU clock (so other engineers' builds on the machine do
//! not count): decoding the original once, its ThumbHash placeholder, and the renditions, exactly
//! as [`make_all`] runs them in the image pool. Two jobs: the automatic `thumb` alone, and `og` +
//! `thumb`; two sources: a 1344x768 original (the flash model's 16:9 answer, a PNG of about
//! 1.2 MB like a real one) and a 4K one (5504x3072, the pro model's 16:9 at 4K).
//!
//! A per-stage breakdown (decode, placeholder, each spec alone) follows, to show where the time
//! goes. Uploads are not counted: they are I/O, not CPU, and run outside the pool.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::{BenchArgs, Report, Row, verdict_at_most};
use crate::image::ImageFormat;
use crate::image::renditions::{
    Pixels, RenditionSettings, Spec, decode, encode, make_all, placeholder, render,
};

/// CPU per job for the automatic thumbnail of a 1344x768 original.
pub const TARGET_THUMB_MS: f64 = 10.0;
/// CPU per job for `og` + `thumb` of a 1344x768 original.
pub const TARGET_OG_THUMB_MS: f64 = 20.0;
/// Jobs per measurement at 1344x768 (a 4K source runs an eighth of them, at least 3).
pub const DEFAULT_RENDITION_JOBS: usize = 60;

/// The sources measured: name, width, height.
const SOURCES: [(&str, u32, u32); 2] = [("1344x768", 1344, 768), ("4K", 5504, 3072)];
/// About the size of a real 1344x768 PNG answer.
const SOURCE_BYTES_1K: usize = 1_200_000;

/// This thread's CPU time in nanoseconds (Linux's schedstat: time on a CPU, not waiting).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat (the benchmark needs Linux)")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("unreadable /proc/thread-self/schedstat")
}

/// Mean CPU milliseconds of `f` over `n` runs after one uncounted warm-up run.
fn cpu_ms(n: usize, mut f: impl FnMut()) -> anyhow::Result<f64> {
    f();
    let start = thread_cpu_ns()?;
    for _ in 0..n {
        f();
    }
    let spent = thread_cpu_ns()?.saturating_sub(start);
    Ok(spent as f64 / 1e6 / n.max(1) as f64)
}

/// An original like a model's answer: smooth shapes with fine grain (of amplitude `grain`, which
/// sets the file size), as an RGB PNG.
pub fn synthetic_original(width: u32, height: u32, grain: u32) -> anyhow::Result<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(u64::from(width) * 31 + u64::from(height));
    let (w, h) = (f64::from(width), f64::from(height));
    // sin(a + b) from per-row and per-column terms: no trigonometry per pixel.
    let col: Vec<(f64, f64, f64)> = (0..width)
        .map(|x| {
            let fx = f64::from(x) / w;
            ((fx * 6.0).sin(), (fx * 3.0).sin(), (fx * 3.0).cos())
        })
        .collect();
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        let fy = f64::from(y) / h;
        let (sy, cy) = ((fy * 9.0).sin(), (fy * 9.0).cos());
        for (x, (s6, s3, c3)) in col.iter().enumerate() {
            let fx = x as f64 / w;
            let d2 = (fx - 0.6).powi(2) + (fy - 0.4).powi(2);
            let sun = if d2 < 0.0324 { 90.0 } else { 0.0 };
            let base = [
                60.0 + 150.0 * fy + sun,
                90.0 + 80.0 * s6 * (1.0 - fy) + sun * 0.8,
                160.0 - 110.0 * fy + 40.0 * (sy * c3 + cy * s3),
            ];
            for c in base {
                let n = f64::from(rng.u32(0..=grain)) - f64::from(grain) / 2.0;
                rgb.push((c + n).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let px = Pixels { width, height, rgb };
    encode(&px, ImageFormat::Png, &RenditionSettings::default()).context("encoding the source")
}

/// The grain that makes a 1344x768 original about [`SOURCE_BYTES_1K`] bytes, as real answers
/// are; the 4K source uses the same grain.
fn calibrated_grain() -> anyhow::Result<u32> {
    let mut grain = 8u32;
    for _ in 0..4 {
        let size = synthetic_original(1344, 768, grain)?.len();
        if size * 10 > SOURCE_BYTES_1K * 12 {
            grain = (grain * 2 / 3).max(1);
        } else if size * 10 < SOURCE_BYTES_1K * 8 {
            grain = grain * 3 / 2 + 1;
        } else {
            break;
        }
    }
    Ok(grain)
}

pub fn renditions_scenario(args: &BenchArgs) -> anyhow::Result<Report> {
    let settings = RenditionSettings::default();
    let thumb = Spec::parse_list(&["thumb"])?;
    let og_thumb = Spec::parse_list(&["og", "thumb"])?;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let grain = calibrated_grain()?;
    for (name, width, height) in SOURCES {
        let original = synthetic_original(width, height, grain)?;
        let n = if width > 2000 {
            (args.rendition_jobs / 8).max(3)
        } else {
            args.rendition_jobs.max(1)
        };
        // Every job must come out right, or the figure means nothing.
        for specs in [&thumb, &og_thumb] {
            let made = make_all(&original, specs, &settings);
            for r in &made.renditions {
                r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            anyhow::ensure!(made.placeholder.is_some(), "no placeholder");
        }
        let wall = Instant::now();
        let thumb_ms = cpu_ms(n, || {
            std::hint::black_box(make_all(&original, &thumb, &settings));
        })?;
        let og_thumb_ms = cpu_ms(n, || {
            std::hint::black_box(make_all(&original, &og_thumb, &settings));
        })?;
        let wall_s = wall.elapsed().as_secs_f64();
        let decoded = decode(&original, settings.max_decode_pixels)?;
        let decode_ms = cpu_ms(n, || {
            std::hint::black_box(decode(&original, settings.max_decode_pixels).ok());
        })?;
        let placeholder_ms = cpu_ms(n, || {
            std::hint::black_box(placeholder(&decoded).ok());
        })?;
        let og_ms = cpu_ms(n, || {
            std::hint::black_box(render(&decoded, &og_thumb[0], &settings).ok());
        })?;
        let thumb_only_ms = cpu_ms(n, || {
            std::hint::black_box(render(&decoded, &thumb[0], &settings).ok());
        })?;
        let at_1k = width < 2000;
        let (t1, t2) = if at_1k {
            (
                (
                    format!("<= {TARGET_THUMB_MS} ms"),
                    verdict_at_most(thumb_ms, TARGET_THUMB_MS + f64::EPSILON),
                ),
                (
                    format!("<= {TARGET_OG_THUMB_MS} ms"),
                    verdict_at_most(og_thumb_ms, TARGET_OG_THUMB_MS + f64::EPSILON),
                ),
            )
        } else {
            (
                (String::new(), String::new()),
                (String::new(), String::new()),
            )
        };
        rows.push(Row {
            measure: format!(
                "{name} source ({} KB PNG): job with the automatic thumb",
                original.len() / 1000
            ),
            figure: format!("{thumb_ms:.1} ms CPU"),
            target: t1.0,
            verdict: t1.1,
        });
        rows.push(Row {
            measure: format!("{name} source: job with og + thumb"),
            figure: format!("{og_thumb_ms:.1} ms CPU"),
            target: t2.0,
            verdict: t2.1,
        });
        rows.push(Row::info(
            format!("{name} stages: decode / placeholder / thumb / og"),
            format!("{decode_ms:.1} / {placeholder_ms:.1} / {thumb_only_ms:.1} / {og_ms:.1} ms"),
        ));
        results.push(json!({
            "source": name, "width": width, "height": height, "source_bytes": original.len(),
            "jobs": n, "thumb_ms": thumb_ms, "og_thumb_ms": og_thumb_ms,
            "decode_ms": decode_ms, "placeholder_ms": placeholder_ms,
            "thumb_render_ms": thumb_only_ms, "og_render_ms": og_ms, "wall_s": wall_s,
        }));
    }
    let build = if cfg!(debug_assertions) {
        "a debug build: measure with a release build"
    } else {
        "release build"
    };
    Ok(Report {
        scenario: "renditions",
        title: format!(
            "CPU per job of the image work (decode once, placeholder, renditions), one thread, \
             {build}; JPEG q{}, WebP q{}",
            settings.jpeg_quality, settings.webp_quality
        ),
        rows,
        json: json!({
            "scenario": "renditions",
            "target_thumb_ms": TARGET_THUMB_MS,
            "target_og_thumb_ms": TARGET_OG_THUMB_MS,
            "release": !cfg!(debug_assertions),
            "results": results,
        }),
    })
}
