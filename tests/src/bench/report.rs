//! The results: a table on standard output, `bench.json`, and `bench.png` drawn by gnuplot.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Which way a target points.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtMost,
    AtLeast,
    Below,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub measure: String,
    pub value: f64,
    pub unit: String,
    pub goal: Goal,
    pub target: f64,
    /// How it was measured, and anything a reader must know to trust the number.
    pub note: String,
}

impl Row {
    pub fn new(measure: &str, value: f64, unit: &str, goal: Goal, target: f64) -> Self {
        Self {
            measure: measure.to_owned(),
            value,
            unit: unit.to_owned(),
            goal,
            target,
            note: String::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    pub fn met(&self) -> Option<bool> {
        if !self.value.is_finite() {
            return None;
        }
        Some(match self.goal {
            Goal::AtMost => self.value <= self.target,
            Goal::AtLeast => self.value >= self.target,
            Goal::Below => self.value < self.target,
        })
    }

    /// Headroom: >= 1 meets the target (target/value for costs, value/target for rates).
    pub fn score(&self) -> f64 {
        match self.goal {
            Goal::AtLeast => self.value / self.target,
            Goal::AtMost | Goal::Below if self.target == 0.0 => {
                if self.value == 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Goal::AtMost | Goal::Below => self.target / self.value.max(f64::MIN_POSITIVE),
        }
    }

    fn target_text(&self) -> String {
        let op = match self.goal {
            Goal::AtMost => "<=",
            Goal::AtLeast => ">=",
            Goal::Below => "<",
        };
        format!("{op} {} {}", fmt_value(self.target), self.unit)
    }

    fn status(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }
}

pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v == 0.0 {
        "0".to_owned()
    } else if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| measure | result | target | status |");
    let _ = writeln!(out, "|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} {} | {} | {} |",
            r.measure,
            fmt_value(r.value),
            r.unit,
            r.target_text(),
            r.status()
        );
    }
    out
}

pub fn notes(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        let _ = writeln!(out, "- {}: {}", r.measure, r.note);
    }
    out
}

/// A horizontal bar per row: its headroom against the target (1 = exactly the target).
pub fn plot(rows: &[Row], title: &str, dir: &Path) -> anyhow::Result<()> {
    const CAP: f64 = 3.0;
    let mut data = String::new();
    // gnuplot draws the first row at the bottom: reverse so the plot reads like the table.
    for (i, r) in rows.iter().rev().enumerate() {
        let score = r.score();
        // A missed target of zero still gets a visible stub.
        let shown = if score.is_finite() {
            score.clamp(0.02, CAP)
        } else {
            0.0
        };
        let colour = match r.met() {
            Some(true) => 3_050_327,
            Some(false) => 12_597_547,
            None => 10_066_329,
        };
        let label = format!(
            "{}: {} {} (target {})",
            r.measure,
            fmt_value(r.value),
            r.unit,
            r.target_text()
        );
        let _ = writeln!(
            data,
            "{i}\t{}\t{shown}\t{colour}",
            label.replace(['"', '\t'], "'")
        );
    }
    let data_path = dir.join("bench.dat");
    std::fs::write(&data_path, data).with_context(|| format!("writing {}", data_path.display()))?;
    let png = dir.join("bench.png");
    let height = 160 + 46 * rows.len();
    let script = format!(
        r##"set terminal pngcairo size 1800,{height} font "DejaVu Sans,11"
set output "{png}"
set title "{title}" font "DejaVu Sans,13" noenhanced
set xrange [0:{cap}]
set yrange [-0.7:{top}]
set xlabel "headroom against the target: target / measured for costs, measured / target for rates\nright of the dashed line = target met (green); bars capped at {cap}x"
set ytics scale 0 noenhanced
set xtics 0.5
set grid xtics lc rgb "#dddddd"
set arrow from 1,-0.7 to 1,{top} nohead dt 2 lw 2 lc rgb "#333333"
set key off
set label "target" at 1.02,{top} left offset 0,-0.6 font "DejaVu Sans,10"
set lmargin 100
set datafile separator "\t"
plot "{data}" using (($3)/2):1:(0):($3):($1-0.33):($1+0.33):4:ytic(2) with boxxyerror fs solid 0.8 lc rgb variable
"##,
        png = png.display(),
        title = title.replace('"', "'").replace('\n', "\\n"),
        cap = CAP,
        top = rows.len() as f64 - 0.3,
        data = data_path.display(),
    );
    let script_path = dir.join("bench.gnuplot");
    std::fs::write(&script_path, &script)
        .with_context(|| format!("writing {}", script_path.display()))?;
    let out = Command::new("gnuplot")
        .arg(&script_path)
        .output()
        .context("running gnuplot (Debian package gnuplot-nox; cargo xtask bench installs it)")?;
    if !out.status.success() {
        bail!("gnuplot failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
