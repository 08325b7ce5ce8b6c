//! Line charts written as PNG, with no system fonts or plotting stack: an RGB canvas, lines, and
//! text in the public-domain 8x8 bitmap font. Enough for loss curves and expert-load panels.

use std::path::Path;

use font8x8::UnicodeFonts;

use crate::error::{Error, Result};
use crate::train::StepLog;

type Rgb = [u8; 3];

const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];

/// Distinct colours for series (Tableau 10).
pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// An RGB image.
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line `width` pixels wide.
    pub fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb, width: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..width {
                for dy in 0..width {
                    self.set(x + dx - width / 2, y + dy - width / 2, c);
                }
            }
        }
    }

    /// Text with its top-left corner at `(x, y)`, scaled `scale` times.
    pub fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                let px = x + (i as i64 * 8 + col) * scale + sx;
                                self.set(px, y + row as i64 * scale + sy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Writes the canvas as a PNG file (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let to_err = |e: png::EncodingError| Error::io(path, std::io::Error::other(e.to_string()));
            let mut writer = enc.write_header().map_err(to_err)?;
            writer.write_image_data(&self.px).map_err(to_err)?;
        }
        crate::train::write_atomic(path, &bytes)
    }
}

/// One series of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

/// A rectangle of the canvas holding one chart.
#[derive(Clone, Copy)]
pub struct Panel {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws a line chart of `series` in `panel`, with axes, ticks, a title and a legend.
pub fn chart(c: &mut Canvas, panel: Panel, title: &str, x_label: &str, series: &[Series<'_>]) {
    let Panel { x, y, w, h } = panel;
    let (left, right, top, bottom) = (x + 70, x + w - 10, y + 28, y + h - 34);
    c.text(x + 70, y + 6, title, BLACK, 2);
    c.text((left + right) / 2 - 4 * x_label.len() as i64, bottom + 20, x_label, BLACK, 1);
    let all: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if all.is_empty() {
        c.text(left + 10, (top + bottom) / 2, "no data yet", BLACK, 1);
        return;
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
        x0 -= 0.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
        y0 -= 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |v: f64| left as f64 + (v - x0) / (x1 - x0) * (right - left) as f64;
    let py = |v: f64| bottom as f64 - (v - y0) / (y1 - y0) * (bottom - top) as f64;
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let yy = py(fy);
        c.line((left as f64, yy), (right as f64, yy), GRID, 1);
        let l = label(fy);
        c.text(left - 6 - 8 * l.len() as i64, yy as i64 - 4, &l, BLACK, 1);
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let xx = px(fx);
        c.line((xx, bottom as f64), (xx, bottom as f64 + 4.0), BLACK, 1);
        let l = if x1 - x0 >= 4.0 { format!("{}", fx.round()) } else { label(fx) };
        c.text(xx as i64 - 4 * l.len() as i64, bottom + 7, &l, BLACK, 1);
    }
    c.line((left as f64, top as f64), (left as f64, bottom as f64), BLACK, 1);
    c.line((left as f64, bottom as f64), (right as f64, bottom as f64), BLACK, 1);
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
        if pts.len() == 1 {
            let (a, b) = (px(pts[0].0), py(pts[0].1));
            c.line((a - 2.0, b), (a + 2.0, b), s.color, 3);
        }
        for p in pts.windows(2) {
            c.line((px(p[0].0), py(p[0].1)), (px(p[1].0), py(p[1].1)), s.color, 2);
        }
    }
    let named = series.iter().filter(|s| !s.name.is_empty() && !s.points.is_empty());
    // The legend ends at the right edge, however long its names.
    let longest = named.clone().map(|s| s.name.chars().count() as i64).max().unwrap_or(0);
    let lx = (right - 30 - 8 * longest).min(right - 150).max(left + 10);
    for (i, s) in named.enumerate() {
        let ly = top + 6 + 12 * i as i64;
        c.line((lx as f64, ly as f64 + 4.0), (lx as f64 + 16.0, ly as f64 + 4.0), s.color, 3);
        c.text(lx + 22, ly, s.name, BLACK, 1);
    }
}

/// Moving average over `window` points (keeps the x of each point).
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for (i, p) in points.iter().enumerate() {
        sum += p.1;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((p.0, sum / (i + 1).min(window) as f64));
    }
    out
}

/// Writes `loss.png` (training and validation loss, balance losses) and `expert_load.png` (each MoE
/// layer's share of tokens per expert over training, and MaxVio) into `out`.
pub fn training_plots(history: &[StepLog], out: &Path) -> Result<()> {
    let steps = |f: &dyn Fn(&StepLog) -> Option<f64>| -> Vec<(f64, f64)> {
        history.iter().filter_map(|h| f(h).map(|v| (h.step as f64, v))).collect()
    };
    let window = (history.len() / 50).max(1);
    let mut c = Canvas::new(900, 760);
    chart(
        &mut c,
        Panel { x: 0, y: 0, w: 900, h: 430 },
        "loss",
        "step",
        &[
            Series {
                name: "train (smoothed)",
                color: PALETTE[0],
                points: smooth(&steps(&|h| Some(h.lm_loss)), window),
            },
            Series { name: "validation", color: PALETTE[1], points: steps(&|h| h.val_loss) },
            Series { name: "MTP", color: PALETTE[2], points: smooth(&steps(&|h| h.mtp_loss), window) },
        ],
    );
    let aux = [
        ("expert balance", PALETTE[3], steps(&|h| Some(h.expert_balance_loss))),
        ("device balance", PALETTE[4], steps(&|h| Some(h.device_balance_loss))),
        ("comm balance", PALETTE[5], steps(&|h| Some(h.comm_balance_loss))),
        ("seq balance", PALETTE[6], steps(&|h| Some(h.seq_balance_loss))),
    ];
    let aux: Vec<Series<'_>> = aux
        .into_iter()
        .filter(|(_, _, p)| p.iter().any(|v| v.1 != 0.0))
        .map(|(name, color, p)| Series { name, color, points: smooth(&p, window) })
        .collect();
    chart(&mut c, Panel { x: 0, y: 440, w: 900, h: 320 }, "balance losses", "step", &aux);
    c.save(&out.join("loss.png"))?;

    let layers = history.last().map(|h| h.moe_layers.clone()).unwrap_or_default();
    let cols = 2usize;
    let rows = layers.len().div_ceil(cols) + 1;
    let (pw, ph) = (520i64, 300i64);
    let mut c = Canvas::new(pw as usize * cols, ph as usize * rows);
    for (li, layer) in layers.iter().enumerate() {
        let n_experts = history.last().map_or(0, |h| h.expert_load.get(li).map_or(0, Vec::len));
        let series: Vec<Series<'_>> = (0..n_experts)
            .map(|e| {
                let pts: Vec<(f64, f64)> = history
                    .iter()
                    .filter_map(|h| {
                        let l = h.expert_load.get(li)?;
                        let total: usize = l.iter().sum();
                        (total > 0).then(|| (h.step as f64, l[e] as f64 / total as f64))
                    })
                    .collect();
                Series { name: "", color: PALETTE[e % PALETTE.len()], points: smooth(&pts, window) }
            })
            .collect();
        let panel = Panel { x: (li % cols) as i64 * pw, y: (li / cols) as i64 * ph, w: pw, h: ph };
        chart(&mut c, panel, &format!("layer {layer}: share per expert"), "step", &series);
    }
    let names: Vec<String> = layers.iter().map(|l| format!("layer {l}")).collect();
    let vio: Vec<Series<'_>> = layers
        .iter()
        .enumerate()
        .map(|(li, _)| Series {
            name: &names[li],
            color: PALETTE[li % PALETTE.len()],
            points: smooth(&steps(&|h| h.max_vio.get(li).copied()), window),
        })
        .collect();
    let panel = Panel { x: 0, y: (rows as i64 - 1) * ph, w: pw * cols as i64, h: ph };
    chart(&mut c, panel, "MaxVio per MoE layer", "step", &vio);
    c.save(&out.join("expert_load.png"))
}
