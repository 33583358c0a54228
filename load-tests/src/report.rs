//! Run reports: one JSON file (every parameter and raw result), one Markdown file (the
//! tables docs/benchmarks.md quotes) and hand-written SVG plots (a latency histogram on a log
//! axis and percentile lines over steps or time) per scenario, in the report directory. Also
//! the small formatting helpers (ratios, rates). No plotting crate: the SVG is plain text.

use crate::hist::Histogram;
use crate::sys::Machine;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Default)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A table of one row, written as (column, cell) pairs so each value stands by its name.
    pub fn one_row(title: &str, cells: Vec<(&str, String)>) -> Self {
        let (columns, row): (Vec<&str>, Vec<String>) = cells.into_iter().unzip();
        let mut t = Self::new(title, &columns);
        t.row(row);
        t
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.title.is_empty() {
            let _ = writeln!(out, "### {}\n", self.title);
        }
        let esc = |s: &str| s.replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {} |",
            self.columns
                .iter()
                .map(|c| esc(c))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            out,
            "|{}|",
            self.columns
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} |",
                r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub machine: Machine,
    /// The exact command line that produced this report.
    pub command: String,
    pub unix_time: u64,
    pub params: serde_json::Value,
    pub tables: Vec<Table>,
    pub results: serde_json::Value,
    pub notes: Vec<String>,
    pub passed: Option<bool>,
    pub plots: Vec<String>,
    #[serde(skip)]
    svgs: Vec<(String, String)>,
}

impl Report {
    pub fn new(scenario: &str, params: serde_json::Value) -> Self {
        Self {
            scenario: scenario.to_owned(),
            machine: Machine::probe(),
            command: command_line(),
            unix_time: crate::frames::now_us() / 1_000_000,
            params,
            tables: Vec::new(),
            results: serde_json::Value::Null,
            notes: crate::procs::pins_line().into_iter().collect(),
            passed: None,
            plots: Vec::new(),
            svgs: Vec::new(),
        }
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("note: {s}");
        self.notes.push(s);
    }

    pub fn svg(&mut self, name: &str, svg: String) {
        let file = format!("{}-{name}.svg", self.scenario);
        self.plots.push(file.clone());
        self.svgs.push((file, svg));
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n", self.scenario);
        let _ = writeln!(out, "- machine: {}", self.machine.line());
        let _ = writeln!(out, "- command: `{}`", self.command);
        if let Some(p) = self.passed {
            let _ = writeln!(out, "- correctness: {}", if p { "PASS" } else { "FAIL" });
        }
        out.push('\n');
        for t in &self.tables {
            out.push_str(&t.markdown());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        for p in &self.plots {
            let _ = writeln!(out, "\n![{p}]({p})");
        }
        out
    }

    /// Writes `<scenario>.json`, `<scenario>.md` and the plots into `dir`; prints the tables.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        let md = self.markdown();
        std::fs::write(dir.join(format!("{}.md", self.scenario)), &md)?;
        for (name, svg) in &self.svgs {
            std::fs::write(dir.join(name), svg)?;
        }
        println!("{md}");
        println!("report written to {}", dir.display());
        Ok(json)
    }
}

/// The command line as typed (program name shortened to `studyhall-load`).
pub fn command_line() -> String {
    let mut args = std::env::args();
    let _ = args.next();
    let mut out = String::from("studyhall-load");
    for a in args {
        out.push(' ');
        if a.contains([' ', '"', '\'']) {
            out.push_str(&format!("'{a}'"));
        } else {
            out.push_str(&a);
        }
    }
    out
}

/// `a / b` as `1.23x`, or `n/a` when either is missing or b is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
            format!("{:.2}x", a / b)
        }
        _ => "n/a".into(),
    }
}

/// A rate per busy core of the server: `rate` / (`cpu_pct` / 100), "-" when no CPU was
/// measured.
pub fn per_core(rate: f64, cpu_pct: f64) -> String {
    if cpu_pct < 1.0 {
        "-".into()
    } else {
        human(rate / (cpu_pct / 100.0))
    }
}

/// Human number: 1234567 -> "1.23M", 12345 -> "12.3k", 12.5 -> "12.5".
pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// KiB (as /proc reports memory) in MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

// ------------------------------------------------------------------------------------------
// SVG

const W: f64 = 720.0;
const H: f64 = 360.0;
const L: f64 = 70.0;
const R: f64 = 20.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn frame(title: &str, x_label: &str, y_label: &str) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        W / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        L + (W - L - R) / 2.0,
        H - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>",
        T + (H - T - B) / 2.0,
        T + (H - T - B) / 2.0,
        esc(y_label)
    );
    let _ = writeln!(
        s,
        "<rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>",
        W - L - R,
        H - T - B
    );
    s
}

/// A linear or log10 axis mapping.
#[derive(Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(mut lo: f64, mut hi: f64, log: bool) -> Self {
        if log {
            lo = lo.max(1e-3).log10().floor();
            hi = hi.max(1e-3).log10().ceil();
            if hi <= lo {
                hi = lo + 1.0;
            }
        } else {
            lo = lo.min(0.0);
            if hi <= lo {
                hi = lo + 1.0;
            }
        }
        Self { lo, hi, log }
    }

    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-3).log10() } else { v };
        ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            (self.lo as i32..=self.hi as i32)
                .map(|e| 10f64.powi(e))
                .collect()
        } else {
            (0..=4)
                .map(|i| self.lo + (self.hi - self.lo) * f64::from(i) / 4.0)
                .collect()
        }
    }
}

fn tick_label(v: f64) -> String {
    if v >= 1000.0 || v == v.trunc() {
        human(v)
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn axes(s: &mut String, x: Axis, y: Axis) {
    let pw = W - L - R;
    let ph = H - T - B;
    for t in x.ticks() {
        let px = L + x.frac(t) * pw;
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{T}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            T + ph,
            T + ph + 16.0,
            tick_label(t)
        );
    }
    for t in y.ticks() {
        let py = T + ph - y.frac(t) * ph;
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            L + pw,
            L - 6.0,
            py + 4.0,
            tick_label(t)
        );
    }
}

/// Bars of a latency histogram (x: milliseconds, log scale; y: share of samples in %), one
/// colour per series, with p50/p99/p99.9 listed in the legend.
pub fn histogram_svg(title: &str, series: &[(&str, &Histogram)]) -> String {
    let mut s = frame(title, "latency (ms, log scale)", "samples (%)");
    let mut xmin = f64::MAX;
    let mut xmax: f64 = 0.0;
    let mut ymax: f64 = 0.0;
    for (_, h) in series {
        let total = h.count().max(1) as f64;
        for (lo, hi, c) in h.bars() {
            xmin = xmin.min((lo.max(1)) as f64 / 1000.0);
            xmax = xmax.max((hi + 1) as f64 / 1000.0);
            ymax = ymax.max(100.0 * c as f64 / total);
        }
    }
    if xmin == f64::MAX {
        xmin = 0.01;
        xmax = 1.0;
    }
    let x = Axis::new(xmin, xmax, true);
    let y = Axis::new(0.0, ymax * 1.05, false);
    axes(&mut s, x, y);
    let pw = W - L - R;
    let ph = H - T - B;
    for (i, (name, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let total = h.count().max(1) as f64;
        for (lo, hi, c) in h.bars() {
            let x0 = L + x.frac(lo.max(1) as f64 / 1000.0) * pw;
            let x1 = L + x.frac((hi + 1) as f64 / 1000.0) * pw;
            let hgt = y.frac(100.0 * c as f64 / total) * ph;
            let _ = writeln!(
                s,
                "<rect x=\"{x0:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{hgt:.2}\" fill=\"{color}\" fill-opacity=\"0.55\"/>",
                T + ph - hgt,
                (x1 - x0).max(0.5)
            );
        }
        let sm = h.summary();
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}: n={} p50={} p99={} p99.9={} ms</text>",
            L + 10.0,
            T + 16.0 + 16.0 * i as f64,
            esc(name),
            sm.count,
            ms(sm.p50_ms),
            ms(sm.p99_ms),
            ms(sm.p999_ms)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Lines: x against y for each named series (y optionally log scale); points marked.
pub fn line_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    log_y: bool,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let mut s = frame(title, x_label, y_label);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(px, py) in pts {
        xmin = xmin.min(px);
        xmax = xmax.max(px);
        ymin = ymin.min(py);
        ymax = ymax.max(py);
    }
    if xmin == f64::MAX {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    let x = Axis::new(xmin, xmax, log_x);
    let y = Axis::new(ymin, ymax * 1.05, log_y);
    axes(&mut s, x, y);
    let pw = W - L - R;
    let ph = H - T - B;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", L + x.frac(px) * pw, T + ph - y.frac(py) * ph))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            coords.join(" ")
        );
        for c in &coords {
            let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{color}\"/>"
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            L + 10.0,
            T + 16.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_numbers() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "n/a");
        assert_eq!(ratio(None, Some(1.0)), "n/a");
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(12_345.0), "12.3k");
        assert_eq!(human(512.0), "512");
        assert_eq!(human(12.34), "12.3");
        assert_eq!(ms(0.123), "0.12");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(123.4), "123");
    }

    #[test]
    fn markdown_table_escapes_pipes() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["1".into(), "x|y".into()]);
        let md = t.markdown();
        assert!(md.contains("### T"));
        assert!(md.contains("| a | b |\n|---|---|\n| 1 | x\\|y |\n"), "{md}");
    }

    #[test]
    fn svgs_are_well_formed_and_escape_text() {
        let mut h = Histogram::new();
        for v in [100, 200, 300, 5_000, 70_000] {
            h.record(v);
        }
        let svg = histogram_svg("lat <x>", &[("studyhall", &h), ("nats", &Histogram::new())]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("lat &lt;x&gt;"));
        assert_eq!(svg.matches("<rect").count(), 2 + h.bars().len());
        let svg = line_svg(
            "p99",
            "rate",
            "ms",
            true,
            true,
            &[("a".into(), vec![(10.0, 1.0), (100.0, 5.0)])],
        );
        assert!(svg.contains("<polyline"));
        assert_eq!(svg.matches("<circle").count(), 2);
        // Empty input still makes a valid picture.
        assert!(line_svg("e", "x", "y", false, false, &[]).ends_with("</svg>\n"));
    }

    #[test]
    fn log_axis_maps_decades() {
        let a = Axis::new(0.05, 80.0, true);
        assert_eq!((a.lo, a.hi), (-2.0, 2.0));
        assert!((a.frac(1.0) - 0.5).abs() < 1e-9);
        assert_eq!(a.ticks().len(), 5);
    }
}
