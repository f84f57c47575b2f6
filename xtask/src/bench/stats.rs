//! Summaries (median with min–max) and their text: numbers, ratios, aligned tables.

use serde_json::{Value, json};

/// The median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// The middle sample; the mean of the two middle ones for an even count.
    pub(crate) median: f64,
    /// The smallest sample.
    pub(crate) min: f64,
    /// The largest sample.
    pub(crate) max: f64,
    /// How many samples.
    pub(crate) count: usize,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none (NaNs are ignored).
    pub(crate) fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            count: n,
        })
    }

    /// `1,371 (1,332–1,420)`, or just the number for a single sample.
    pub(crate) fn cell(&self) -> String {
        self.cell_with(fmt_num)
    }

    /// [`Self::cell`] with another number format.
    pub(crate) fn cell_with(&self, fmt: fn(f64) -> String) -> String {
        if self.count == 1 {
            fmt(self.median)
        } else {
            format!("{} ({}–{})", fmt(self.median), fmt(self.min), fmt(self.max))
        }
    }

    /// The summary with its samples, for the JSON report.
    pub(crate) fn to_json(self, samples: &[f64]) -> Value {
        json!({
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "samples": samples,
        })
    }
}

/// A number with three significant digits and thousands separators: `0.94`, `6.25`,
/// `14.0`, `161`, `1,371`.
pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let a = x.abs();
    let text = if a == 0.0 {
        "0".to_owned()
    } else if a < 10.0 {
        format!("{x:.2}")
    } else if a < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    };
    group_thousands(&text)
}

/// A count: a whole number with thousands separators (a median between two counts
/// keeps its `.5`).
pub(crate) fn fmt_count(x: f64) -> String {
    if x.fract() == 0.0 && x.is_finite() {
        group_thousands(&format!("{x:.0}"))
    } else {
        group_thousands(&format!("{x:.1}"))
    }
}

fn group_thousands(text: &str) -> String {
    let (sign, digits) = text
        .strip_prefix('-')
        .map_or(("", text), |rest| ("-", rest));
    let (int, frac) = digits
        .split_once('.')
        .map_or((digits, None), |(i, f)| (i, Some(f)));
    if int.len() <= 3 {
        return text.to_owned();
    }
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// `drover / peer` of two medians as `0.21x`; `n/a` when the peer's is zero.
pub(crate) fn ratio(drover: f64, peer: f64) -> String {
    if peer == 0.0 || !peer.is_finite() || !drover.is_finite() {
        return "n/a".to_owned();
    }
    let r = drover / peer;
    if r == 0.0 {
        "0x".to_owned()
    } else if r < 0.1 {
        // Two significant digits: 0.0028x, 0.050x.
        let decimals = (-r.log10()).floor() as usize + 2;
        format!("{r:.decimals$}x")
    } else if r < 10.0 {
        format!("{r:.2}x")
    } else if r < 100.0 {
        format!("{r:.1}x")
    } else {
        format!("{}x", group_thousands(&format!("{r:.0}")))
    }
}

/// A Markdown table with columns padded to equal width (the first column left-aligned,
/// the others right-aligned), so it reads in a terminal and pastes into a document.
pub(crate) fn render_table(header: &[String], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, w) in width.iter().enumerate() {
            let c = cells.get(i).map_or("", String::as_str);
            let pad = w.saturating_sub(c.chars().count());
            if i == 0 {
                s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
            } else {
                s.push_str(&format!(" {}{c} |", " ".repeat(pad)));
            }
        }
        s
    };
    let mut out = line(header);
    out.push('\n');
    out.push('|');
    for (i, w) in width.iter().enumerate() {
        if i == 0 {
            out.push_str(&format!(" {} |", "-".repeat(*w)));
        } else {
            out.push_str(&format!(" {}: |", "-".repeat(w.saturating_sub(1))));
        }
    }
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}
