//! What is known about the image models: their ids, accepted aspect ratios and image sizes, and
//! the pixel dimensions each combination produces (shared by the client's request validation and
//! the stand-in's answers).

use rust_decimal::Decimal;

/// Nano Banana: the fast, cheap image model.
pub const FLASH_IMAGE: &str = "google/gemini-2.5-flash-image";
/// Nano Banana Pro: slower and dearer, with 2K and 4K output.
pub const PRO_IMAGE: &str = "google/gemini-3-pro-image-preview";

/// The aspect ratios OpenRouter accepts for these models; anything else is a 400.
pub const ASPECT_RATIOS: [&str; 10] = [
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];

/// The `image_config.image_size` values OpenRouter documents ("1K" is the default).
pub const IMAGE_SIZES: [&str; 3] = ["1K", "2K", "4K"];

/// Pixel dimensions of the flash model's output per aspect ratio (OpenRouter's table).
const FLASH_DIMENSIONS: [(u32, u32); 10] = [
    (1024, 1024),
    (832, 1248),
    (1248, 832),
    (864, 1184),
    (1184, 864),
    (896, 1152),
    (1152, 896),
    (768, 1344),
    (1344, 768),
    (1536, 672),
];

/// Pixel dimensions of the pro model's 1K output per aspect ratio, from Google's Gemini 3 Pro
/// Image table; 2K doubles and 4K quadruples each side. Consistent with the one size seen through
/// OpenRouter (4K 16:9 came out 5504x3072).
const PRO_DIMENSIONS_1K: [(u32, u32); 10] = [
    (1024, 1024),
    (848, 1264),
    (1264, 848),
    (896, 1200),
    (1200, 896),
    (928, 1152),
    (1152, 928),
    (768, 1376),
    (1376, 768),
    (1584, 672),
];

/// Per-million-token prices in USD (shared/openrouter.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: Decimal,
    /// Text and reasoning output.
    pub text_out: Decimal,
    pub image_out: Decimal,
}

const FLASH_PRICE: Price = Price {
    input: Decimal::from_parts(30, 0, 0, false, 2),
    text_out: Decimal::from_parts(250, 0, 0, false, 2),
    image_out: Decimal::from_parts(30, 0, 0, false, 0),
};

const PRO_PRICE: Price = Price {
    input: Decimal::from_parts(2, 0, 0, false, 0),
    text_out: Decimal::from_parts(12, 0, 0, false, 0),
    image_out: Decimal::from_parts(120, 0, 0, false, 0),
};

/// The price of a known model.
pub fn price(model: &str) -> Option<Price> {
    match model {
        FLASH_IMAGE => Some(FLASH_PRICE),
        PRO_IMAGE => Some(PRO_PRICE),
        _ => None,
    }
}

/// Image tokens billed for one image: 1290 for flash; 1120 for pro at 1K/2K, 2000 at 4K.
pub fn image_tokens(model: &str, image_size: Option<&str>) -> i64 {
    match (model, image_size) {
        (PRO_IMAGE, Some("4K")) => 2000,
        (PRO_IMAGE, _) => 1120,
        _ => 1290,
    }
}

/// Text and reasoning tokens allowed for in an estimate: a few hundred are seen in practice.
const ESTIMATED_TEXT_TOKENS: i64 = 500;

/// What one call is expected to cost before it is made, in USD: its image tokens and
/// [`ESTIMATED_TEXT_TOKENS`] at the model's prices, rounded up to the cent. Budgets count calls
/// in flight at this price. An unknown model is estimated as the dearest known call (pro at 4K).
pub fn expected_cost(model: &str, image_size: Option<&str>) -> Decimal {
    let (model, image_size, p) = match price(model) {
        Some(p) => (model, image_size, p),
        None => (PRO_IMAGE, Some("4K"), PRO_PRICE),
    };
    let per_million = Decimal::from(image_tokens(model, image_size)) * p.image_out
        + Decimal::from(ESTIMATED_TEXT_TOKENS) * p.text_out;
    (per_million / Decimal::from(1_000_000))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::AwayFromZero)
}

/// True for an aspect ratio OpenRouter accepts.
pub fn is_valid_aspect_ratio(ratio: &str) -> bool {
    ASPECT_RATIOS.contains(&ratio)
}

/// True for a documented image size.
pub fn is_valid_image_size(size: &str) -> bool {
    IMAGE_SIZES.contains(&size)
}

/// True for a model whose `image_size` changes the output (only the pro model has 2K and 4K).
pub fn has_image_sizes(model: &str) -> bool {
    model == PRO_IMAGE
}

/// The pixel dimensions `model` produces for an aspect ratio and image size, `None` for an
/// aspect ratio or size outside the accepted sets. Models without sizes ignore `image_size`.
pub fn dimensions(model: &str, aspect_ratio: &str, image_size: Option<&str>) -> Option<(u32, u32)> {
    let index = ASPECT_RATIOS.iter().position(|r| *r == aspect_ratio)?;
    if !has_image_sizes(model) {
        return Some(FLASH_DIMENSIONS[index]);
    }
    let scale = match image_size.unwrap_or("1K") {
        "1K" => 1,
        "2K" => 2,
        "4K" => 4,
        _ => return None,
    };
    let (w, h) = PRO_DIMENSIONS_1K[index];
    Some((w * scale, h * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_costs_cover_the_image_and_some_text() {
        assert_eq!(expected_cost(FLASH_IMAGE, None), Decimal::new(4, 2));
        assert_eq!(expected_cost(PRO_IMAGE, Some("2K")), Decimal::new(15, 2));
        assert_eq!(expected_cost(PRO_IMAGE, Some("4K")), Decimal::new(25, 2));
        assert_eq!(expected_cost("vendor/unknown", None), Decimal::new(25, 2));
    }

    #[test]
    fn dimensions_follow_the_tables() {
        assert_eq!(dimensions(FLASH_IMAGE, "16:9", None), Some((1344, 768)));
        assert_eq!(
            dimensions(FLASH_IMAGE, "16:9", Some("4K")),
            Some((1344, 768))
        );
        assert_eq!(
            dimensions(PRO_IMAGE, "16:9", Some("4K")),
            Some((5504, 3072))
        );
        assert_eq!(dimensions(PRO_IMAGE, "1:1", Some("2K")), Some((2048, 2048)));
        assert_eq!(dimensions(FLASH_IMAGE, "1.91:1", None), None);
        assert_eq!(dimensions(PRO_IMAGE, "1:1", Some("8K")), None);
    }

    #[test]
    fn every_ratio_has_the_orientation_it_names() {
        for (i, ratio) in ASPECT_RATIOS.iter().enumerate() {
            let (a, b) = ratio.split_once(':').unwrap();
            let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            for (w, h) in [FLASH_DIMENSIONS[i], PRO_DIMENSIONS_1K[i]] {
                assert_eq!(a.cmp(&b), w.cmp(&h), "{ratio} -> {w}x{h}");
            }
        }
    }
}
