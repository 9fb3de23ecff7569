//! What templates show, made ready in Rust: relative times with their exact form, money, sizes,
//! percent-encoded links, and the geometry of the server-drawn SVG charts. Templates only place
//! these strings (askama escapes each), so no formatting logic hides in markup.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rust_decimal::Decimal;

use crate::queue::pages::HourBucket;

/// A time as the pages show it: "3 min ago", with the exact UTC time on hover.
#[derive(Debug, Clone)]
pub struct RelTime {
    pub iso: String,
    pub exact: String,
    pub rel: String,
}

impl RelTime {
    pub fn of(t: DateTime<Utc>, now: DateTime<Utc>) -> RelTime {
        RelTime {
            iso: t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            exact: t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            rel: relative(t, now),
        }
    }
}

/// "just now", "42 s ago", "3 min ago", "5 h ago", "2 d ago", or "in 3 min" for the future.
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = now.signed_duration_since(t);
    let (future, d) = if d < ChronoDuration::zero() {
        (true, -d)
    } else {
        (false, d)
    };
    let s = d.num_seconds();
    let amount = if s < 5 {
        return "just now".to_owned();
    } else if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86_400 {
        format!("{} h", s / 3600)
    } else {
        format!("{} d", s / 86_400)
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// "$0.0387", "$12.50", "$1,234.00".
pub fn usd(d: Decimal) -> String {
    let places = if d.abs() >= Decimal::from(10) { 2 } else { 4 };
    let r = d.round_dp(places);
    let text = format!("{r:.places$}", places = places as usize);
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if frac.is_empty() {
        format!("{sign}${grouped}")
    } else {
        format!("{sign}${grouped}.{frac}")
    }
}

/// 1234567 -> "1,234,567".
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "512 B", "14.2 KB", "1.8 MB".
pub fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n < 1000.0 {
        format!("{n} B")
    } else if n < 1_000_000.0 {
        format!("{:.1} KB", n / 1000.0)
    } else {
        format!("{:.1} MB", n / 1_000_000.0)
    }
}

/// "850 ms", "12.4 s", "3 min 5 s".
pub fn millis(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Percent-encodes one path segment or query value: everything but the unreserved characters,
/// so a batch named `a/b?c` stays one segment.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The link of a batch's gallery.
pub fn batch_href(batch: &str) -> String {
    format!("/batches/{}", enc(batch))
}

/// The first `n` characters of `s`, with an ellipsis when cut.
pub fn short(s: &str, n: usize) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(n).collect();
    if chars.next().is_some() {
        format!("{}…", head.trim_end())
    } else {
        head
    }
}

/// A share as a whole percent, 0 to 100.
pub fn percent(part: i64, whole: i64) -> i64 {
    if whole <= 0 {
        0
    } else {
        ((part as f64 / whole as f64) * 100.0)
            .round()
            .clamp(0.0, 100.0) as i64
    }
}

/// One bar of a chart, in the SVG's user units.
#[derive(Debug, Clone)]
pub struct Bar {
    pub x: String,
    pub y: String,
    pub w: String,
    pub h: String,
    /// Hover text: the hour and the value.
    pub label: String,
}

/// An hour label under the chart.
#[derive(Debug, Clone)]
pub struct Tick {
    pub x: String,
    pub text: String,
    /// SVG `text-anchor`: the first and last labels are held inside the chart's edges.
    pub anchor: &'static str,
}

/// A 24-hour bar chart drawn on the server.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: &'static str,
    /// CSS class of the bars (colour).
    pub class: &'static str,
    pub total: String,
    pub max: String,
    pub bars: Vec<Bar>,
    pub ticks: Vec<Tick>,
    /// Screen-reader summary.
    pub summary: String,
}

/// The chart's drawing area, in SVG user units (the viewBox is wider for labels).
pub const CHART_W: f64 = 480.0;
pub const CHART_H: f64 = 110.0;

/// Builds the chart of the 24 hours ending with the current one from `buckets`, one value per
/// hour taken by `value` (hours without attempts are zero).
pub fn chart(
    title: &'static str,
    class: &'static str,
    buckets: &[HourBucket],
    now: DateTime<Utc>,
    value: impl Fn(&HourBucket) -> f64,
    fmt: impl Fn(f64) -> String,
) -> Chart {
    let this_hour = hour_start(now);
    let hours: Vec<DateTime<Utc>> = (0..24)
        .rev()
        .map(|i| this_hour - ChronoDuration::hours(i))
        .collect();
    let values: Vec<f64> = hours
        .iter()
        .map(|h| buckets.iter().find(|b| b.hour == *h).map_or(0.0, &value))
        .collect();
    let max = values.iter().copied().fold(0.0, f64::max);
    let total: f64 = values.iter().sum();
    let slot = CHART_W / 24.0;
    let bars = hours
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (h, v))| {
            let height = if max > 0.0 { v / max * CHART_H } else { 0.0 };
            // A zero hour still shows a hairline, so the axis reads as 24 hours.
            let height = if *v > 0.0 { height.max(2.0) } else { 0.5 };
            Bar {
                x: format!("{:.1}", i as f64 * slot + 1.0),
                y: format!("{:.1}", CHART_H - height),
                w: format!("{:.1}", slot - 2.0),
                h: format!("{height:.1}"),
                label: format!(
                    "{}–{}: {}",
                    h.format("%H:00"),
                    (*h + ChronoDuration::hours(1)).format("%H:00"),
                    fmt(*v)
                ),
            }
        })
        .collect();
    let ticks = hours
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 == 0 || *i == 23)
        .map(|(i, h)| {
            let (x, anchor) = match i {
                0 => (0.0, "start"),
                23 => (24.0 * slot, "end"),
                _ => (i as f64 * slot + slot / 2.0, "middle"),
            };
            Tick {
                x: format!("{x:.1}"),
                text: h.format("%H:00").to_string(),
                anchor,
            }
        })
        .collect();
    Chart {
        title,
        class,
        total: fmt(total),
        max: fmt(max),
        summary: format!(
            "{title}: {} in the last 24 hours, at most {} in one hour",
            fmt(total),
            fmt(max)
        ),
        bars,
        ticks,
    }
}

/// The start of the hour `t` is in (what `date_trunc('hour', ...)` gives).
pub fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::DurationRound as _;
    t.duration_trunc(ChronoDuration::hours(1)).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(usd("0.0387036".parse().unwrap()), "$0.0387");
        assert_eq!(usd("1234.5".parse().unwrap()), "$1,234.50");
        assert_eq!(usd(Decimal::ZERO), "$0.0000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(bytes(14_200), "14.2 KB");
        assert_eq!(enc("a/b c?"), "a%2Fb%20c%3F");
        assert_eq!(short("abcdef", 3), "abc…");
        assert_eq!(short("abc", 3), "abc");
        assert_eq!(percent(1, 3), 33);
        let now = Utc::now();
        assert_eq!(relative(now - ChronoDuration::minutes(3), now), "3 min ago");
        assert_eq!(relative(now + ChronoDuration::minutes(3), now), "in 3 min");
        assert_eq!(relative(now, now), "just now");
    }

    #[test]
    fn a_chart_has_24_bars_scaled_to_the_highest_hour() {
        let now = Utc::now();
        let hour = hour_start(now);
        let b = |h: i64, n: i64| HourBucket {
            hour: hour - ChronoDuration::hours(h),
            succeeded: n,
            failed: 0,
            retried: 0,
            cost_usd: Decimal::ZERO,
        };
        let c = chart(
            "Images",
            "ok",
            &[b(0, 10), b(5, 5)],
            now,
            |b| b.succeeded as f64,
            |v| format!("{v}"),
        );
        assert_eq!(c.bars.len(), 24);
        assert_eq!(c.bars[23].h, format!("{CHART_H:.1}"));
        assert_eq!(c.bars[18].h, format!("{:.1}", CHART_H / 2.0));
        assert_eq!(c.bars[0].h, "0.5");
        assert_eq!(c.total, "15");
    }
}
