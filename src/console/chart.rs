//! Charts as server-rendered SVG: no script, no library, readable with
//! JavaScript off. One chart is one or more series over the same minutes.

use std::fmt::Write;

use maud::{html, Markup, PreEscaped};

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    /// CSS class of the line (its colour lives in the stylesheet).
    pub class: &'a str,
    /// One value per minute of `Chart::minutes`; None is a gap.
    pub values: Vec<Option<f64>>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    /// The unit shown after the largest value ("rows/min", "s").
    pub unit: &'a str,
    /// Unix seconds of each minute, oldest first.
    pub minutes: Vec<i64>,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 640.0;
const H: f64 = 140.0;
const PAD_L: f64 = 8.0;
const PAD_R: f64 = 8.0;
const PAD_T: f64 = 8.0;
const PAD_B: f64 = 18.0;

/// "12:34" (UTC) of unix seconds.
fn clock(t: i64) -> String {
    let s = t.rem_euclid(86_400);
    format!("{:02}:{:02}", s / 3600, (s % 3600) / 60)
}

/// A compact number: 950, 1.2k, 3.4M; small fractions keep 3 digits.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

impl Chart<'_> {
    pub fn render(&self) -> Markup {
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .fold(0.0_f64, |m, v| m.max(*v));
        let top = if max > 0.0 { max * 1.1 } else { 1.0 };
        let n = self.minutes.len();
        let x = |i: usize| {
            if n <= 1 {
                PAD_L
            } else {
                PAD_L + (W - PAD_L - PAD_R) * i as f64 / (n - 1) as f64
            }
        };
        let y = |v: f64| PAD_T + (H - PAD_T - PAD_B) * (1.0 - v / top);
        let mut lines = String::new();
        for s in &self.series {
            // A gap breaks the line: one polyline per run of values, and a
            // dot for a value alone (a polyline of one point draws nothing).
            let mut run: Vec<(f64, f64)> = Vec::new();
            let flush = |run: &mut Vec<(f64, f64)>, lines: &mut String| {
                match run.as_slice() {
                    [] => {}
                    [(px, py)] => {
                        let _ = write!(
                            lines,
                            r#"<circle class="{}" cx="{px:.1}" cy="{py:.1}" r="2.5"/>"#,
                            s.class
                        );
                    }
                    points => {
                        let pts: Vec<String> = points.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
                        let _ = write!(lines, r#"<polyline class="{}" points="{}"/>"#, s.class, pts.join(" "));
                    }
                }
                run.clear();
            };
            for (i, v) in s.values.iter().enumerate() {
                match v {
                    Some(v) => run.push((x(i), y(*v))),
                    None => flush(&mut run, &mut lines),
                }
            }
            flush(&mut run, &mut lines);
        }
        let first = self.minutes.first().map(|t| clock(*t)).unwrap_or_default();
        let last = self.minutes.last().map(|t| clock(*t)).unwrap_or_default();
        html! {
            figure.chart {
                figcaption {
                    (self.title)
                    @for s in &self.series {
                        " " span.(s.class) { "— " (s.name) }
                    }
                }
                svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(self.title) {
                    line.axis x1=(PAD_L) y1=(H - PAD_B) x2=(W - PAD_R) y2=(H - PAD_B) {}
                    text.label x=(PAD_L) y=(H - 4.0) { (first) " UTC" }
                    text.label x=(W - PAD_R) y=(H - 4.0) text-anchor="end" { (last) }
                    text.label x=(PAD_L + 2.0) y=(PAD_T + 10.0) { "max " (compact(max)) " " (self.unit) }
                    (PreEscaped(lines))
                    @if n == 0 {
                        text.label x=(W / 2.0) y=(H / 2.0) text-anchor="middle" { "no data yet" }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_splits_the_line_and_numbers_are_compact() {
        let c = Chart {
            title: "Throughput <rows>",
            unit: "rows/min",
            minutes: vec![0, 60, 120, 180],
            series: vec![Series {
                name: "delivered",
                class: "s1",
                values: vec![Some(1.0), Some(2.0), None, Some(4.0)],
            }],
        };
        let svg = c.render().into_string();
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "the value alone is a dot: {svg}");
        assert!(svg.contains("Throughput &lt;rows&gt;"), "escaped title: {svg}");
        assert!(svg.contains("max 4.000 rows/min"), "{svg}");
        assert_eq!(compact(1_234_567.0), "1.2M");
        assert_eq!(compact(12_345.0), "12k");
        assert_eq!(compact(1_234.0), "1.2k");
        assert_eq!(compact(0.0123), "0.012");
        assert_eq!(clock(3600 * 13 + 60 * 5), "13:05");
    }
}
