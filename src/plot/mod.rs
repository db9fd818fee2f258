//! Line charts to PNG without a plotting dependency: axes with tick labels, series in colours, a legend, and text from an embedded bitmap font.
//!
//! ```no_run
//! use hiercon::plot::{LineChart, Series};
//! let mut chart = LineChart::new("training loss", "step", "loss");
//! chart.log_y = true;
//! chart.series.push(Series::new("hmce", vec![(0.0, 5.1), (100.0, 3.2), (200.0, f64::NAN), (300.0, 2.4)]));
//! chart.write_png(std::path::Path::new("loss.png")).unwrap();
//! ```
//!
//! Points whose x or y is not finite (or, with `log_y`, whose y is not positive) are skipped and
//! break the line: the segments on either side of them are not drawn. Series are drawn in order,
//! each in [`colour`]`(i)`; the legend sits in a column right of the plot area.

pub mod font;

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// `(x, y)` in drawing order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points }
    }
}

/// A line chart; fields are public, [`LineChart::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Logarithmic y axis (base 10).
    pub log_y: bool,
    /// Fixed y range (data units); `None` fits the data.
    pub y_range: Option<(f64, f64)>,
    /// Image size in pixels.
    pub width: u32,
    pub height: u32,
}

/// Colours of series `0, 1, ...` (then repeating): distinct on white and for common colour blindness.
pub const PALETTE: [[u8; 3]; 8] = [
    [0, 114, 178],   // blue
    [213, 94, 0],    // vermilion
    [0, 158, 115],   // green
    [204, 121, 167], // purple
    [230, 159, 0],   // orange
    [86, 180, 233],  // sky blue
    [120, 120, 0],   // olive
    [0, 0, 0],       // black
];

/// The colour series `i` is drawn in.
pub fn colour(i: usize) -> Rgb<u8> {
    Rgb(PALETTE[i % PALETTE.len()])
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TEXT_SCALE: usize = 2;
const TITLE_SCALE: usize = 3;
const LINE_WIDTH: i64 = 2;

/// Where the plot area is and how data map onto it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    /// Plot area in pixels: left, top, right, bottom (inclusive).
    pub left: i64,
    pub top: i64,
    pub right: i64,
    pub bottom: i64,
    /// Data range shown (y in log10 units when `log_y`).
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub log_y: bool,
}

impl Frame {
    /// The pixel of a data point (`None` for a point that is skipped), possibly outside the area.
    pub fn to_px(&self, x: f64, y: f64) -> Option<(i64, i64)> {
        let y = if self.log_y && y > 0.0 {
            y.log10()
        } else if self.log_y {
            return None;
        } else {
            y
        };
        (x.is_finite() && y.is_finite()).then(|| (self.x_px(x), self.y_px(y)))
    }

    /// The pixel column of `x` (data units).
    fn x_px(&self, x: f64) -> i64 {
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        (self.left as f64 + fx * (self.right - self.left) as f64).round() as i64
    }

    /// The pixel row of `y` in axis units (log10 of the value when `log_y`).
    fn y_px(&self, y: f64) -> i64 {
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        (self.bottom as f64 - fy * (self.bottom - self.top) as f64).round() as i64
    }

    fn contains(&self, x: i64, y: i64) -> bool {
        (self.left..=self.right).contains(&x) && (self.top..=self.bottom).contains(&y)
    }
}

impl LineChart {
    /// An empty 960×600 chart with linear axes.
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
            log_y: false,
            y_range: None,
            width: 960,
            height: 600,
        }
    }

    /// Points that are drawn, in data units (y in log10 units when `log_y`).
    fn drawable(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.series.iter().flat_map(|s| s.points.iter()).filter_map(|&(x, y)| {
            let y = if self.log_y { if y > 0.0 { y.log10() } else { f64::NAN } } else { y };
            (x.is_finite() && y.is_finite()).then_some((x, y))
        })
    }

    /// The plot area and the data ranges.
    pub fn frame(&self) -> Frame {
        let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) =
            (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in self.drawable() {
            (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
        }
        if let Some((lo, hi)) = self.y_range {
            let t = |v: f64| if self.log_y { v.max(f64::MIN_POSITIVE).log10() } else { v };
            (y_lo, y_hi) = (t(lo), t(hi));
        }
        let x_range = padded(x_lo, x_hi, 0.0);
        let y_range = padded(y_lo, y_hi, if self.y_range.is_some() { 0.0 } else { 0.05 });
        let text_h = (font::HEIGHT * TEXT_SCALE) as i64;
        let legend_w = self
            .series
            .iter()
            .map(|s| (font::text_width(&s.name) * TEXT_SCALE) as i64 + 44)
            .max()
            .map_or(0, |w| w + 16);
        let y_ticks_w =
            ticks(y_range, self.log_y).iter().map(|t| (font::text_width(&t.1) * TEXT_SCALE) as i64).max().unwrap_or(0);
        Frame {
            left: 16 + text_h + 12 + y_ticks_w + 10,
            top: 20 + (font::HEIGHT * TITLE_SCALE) as i64 + 16,
            right: self.width as i64 - 20 - legend_w,
            bottom: self.height as i64 - (16 + text_h + 12 + text_h + 10),
            x_range,
            y_range,
            log_y: self.log_y,
        }
    }

    /// Draws the chart.
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(self.width, self.height, WHITE);
        let f = self.frame();
        let text_h = (font::HEIGHT * TEXT_SCALE) as i64;
        // Grid, ticks and their labels.
        for (v, label) in ticks(f.x_range, false) {
            let x = f.x_px(v);
            line(&mut img, (x, f.top), (x, f.bottom), GRID, 1, None);
            line(&mut img, (x, f.bottom), (x, f.bottom + 5), BLACK, 1, None);
            let w = (font::text_width(&label) * TEXT_SCALE) as i64;
            text(&mut img, x - w / 2, f.bottom + 10, &label, TEXT_SCALE, BLACK);
        }
        for (v, label) in ticks(f.y_range, f.log_y) {
            let y = f.y_px(v);
            line(&mut img, (f.left, y), (f.right, y), GRID, 1, None);
            line(&mut img, (f.left - 5, y), (f.left, y), BLACK, 1, None);
            let w = (font::text_width(&label) * TEXT_SCALE) as i64;
            text(&mut img, f.left - 10 - w, y - text_h / 2, &label, TEXT_SCALE, BLACK);
        }
        // Axes box.
        for (a, b) in [
            ((f.left, f.top), (f.right, f.top)),
            ((f.right, f.top), (f.right, f.bottom)),
            ((f.left, f.bottom), (f.right, f.bottom)),
            ((f.left, f.top), (f.left, f.bottom)),
        ] {
            line(&mut img, a, b, BLACK, 1, None);
        }
        // Series: segments between consecutive drawable points; a skipped point breaks the line.
        for (i, s) in self.series.iter().enumerate() {
            let c = colour(i);
            let px: Vec<Option<(i64, i64)>> = s.points.iter().map(|&(x, y)| f.to_px(x, y)).collect();
            for w in px.windows(2) {
                if let [Some(a), Some(b)] = w {
                    line(&mut img, *a, *b, c, LINE_WIDTH, Some(&f));
                }
            }
            if s.points.len() <= 60 {
                for p in px.iter().flatten() {
                    fill_rect(&mut img, p.0 - 3, p.1 - 3, 7, 7, c, Some(&f));
                }
            }
        }
        // Title, axis labels, legend.
        // Centred over the plot area, moved right / down a size so that a long title stays whole.
        let (width, glyphs) = (i64::from(self.width), font::text_width(&self.title));
        let scale = if (glyphs * TITLE_SCALE) as i64 <= width - 8 { TITLE_SCALE } else { TEXT_SCALE };
        let tw = (glyphs * scale) as i64;
        let tx = ((f.left + f.right) / 2 - tw / 2).min(width - tw - 4).max(4);
        text(&mut img, tx, 20, &self.title, scale, BLACK);
        let xw = (font::text_width(&self.x_label) * TEXT_SCALE) as i64;
        text(&mut img, (f.left + f.right) / 2 - xw / 2, f.bottom + 10 + text_h + 12, &self.x_label, TEXT_SCALE, BLACK);
        let yw = (font::text_width(&self.y_label) * TEXT_SCALE) as i64;
        text_up(&mut img, 16, (f.top + f.bottom) / 2 + yw / 2, &self.y_label, TEXT_SCALE, BLACK);
        let lx = f.right + 16;
        for (i, s) in self.series.iter().enumerate() {
            let y = f.top + 8 + i as i64 * (text_h + 10);
            line(&mut img, (lx + 4, y + text_h / 2), (lx + 32, y + text_h / 2), colour(i), LINE_WIDTH, None);
            text(&mut img, lx + 40, y, &s.name, TEXT_SCALE, BLACK);
        }
        img
    }

    /// Renders and writes the chart as a PNG.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        if self.width < 200 || self.height < 150 {
            return Err(Error::InvalidArgument {
                name: "chart size",
                reason: format!("{}x{} is below the 200x150 minimum", self.width, self.height),
            });
        }
        self.render()
            .save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| Error::ImageWrite { path: path.to_path_buf(), reason: e.to_string() })
    }
}

/// A non-empty range around `[lo, hi]` with `pad` of its span added on each side; `(0, 1)` when
/// there are no data.
fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * pad;
    (lo - d, hi + d)
}

/// Tick positions (in axis units: log10 of the value when `log`) and their labels.
pub fn ticks(range: (f64, f64), log: bool) -> Vec<(f64, String)> {
    let (lo, hi) = range;
    if log {
        let decades: Vec<i32> = (lo.ceil() as i32..=hi.floor() as i32).collect();
        let mut out: Vec<(f64, String)> =
            decades.iter().map(|&e| (e as f64, format_value(10f64.powi(e), (-e).max(0) as usize))).collect();
        if out.len() < 3 {
            // Less than two decades shown: also 2× and 5× of each decade.
            out.clear();
            for e in lo.floor() as i32..=hi.ceil() as i32 {
                for m in [1.0, 2.0, 5.0] {
                    let v: f64 = m * 10f64.powi(e);
                    let t = v.log10();
                    if t >= lo - 1e-9 && t <= hi + 1e-9 {
                        out.push((t, format_value(v, (-e).max(0) as usize)));
                    }
                }
            }
        }
        return out;
    }
    let step = nice_step((hi - lo) / 6.0);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).map(|v| (v, format_value(v, decimals))).collect()
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * p)
}

/// A tick label: fixed point with `decimals`, or scientific for very large or small values.
fn format_value(v: f64, decimals: usize) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{:.*}", decimals.min(6), v);
    if s.starts_with("-0") && s.trim_start_matches(['-', '0', '.']).is_empty() { s[1..].to_string() } else { s }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>, clip: Option<&Frame>) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
        return;
    }
    if clip.is_some_and(|f| !f.contains(x, y)) {
        return;
    }
    img.put_pixel(x as u32, y as u32, c);
}

fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>, clip: Option<&Frame>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c, clip);
        }
    }
}

/// A straight line of `width` pixels (a square brush stepped along it).
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>, width: i64, clip: Option<&Frame>) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
    // Far outside the image (a wild data point): nothing sensible to draw pixel by pixel.
    if steps > 100_000 {
        return;
    }
    let off = (width - 1) / 2;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let x = (a.0 as f64 + t * (b.0 - a.0) as f64).round() as i64;
        let y = (a.1 as f64 + t * (b.1 - a.1) as f64).round() as i64;
        fill_rect(img, x - off, y - off, width, width, c, clip);
    }
}

/// Text left to right with its top-left corner at (`x`, `y`).
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: usize, c: Rgb<u8>) {
    let sc = scale as i64;
    for (i, ch) in s.chars().enumerate() {
        let x0 = x + (i * font::ADVANCE * scale) as i64;
        for col in 0..font::WIDTH {
            for row in 0..font::HEIGHT {
                if font::pixel(ch, col, row) {
                    fill_rect(img, x0 + col as i64 * sc, y + row as i64 * sc, sc, sc, c, None);
                }
            }
        }
    }
}

/// Text bottom to top (rotated a quarter turn anticlockwise) starting at (`x`, `y`), the
/// bottom-left corner of the first character.
fn text_up(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: usize, c: Rgb<u8>) {
    let sc = scale as i64;
    for (i, ch) in s.chars().enumerate() {
        let y0 = y - (i * font::ADVANCE * scale) as i64;
        for col in 0..font::WIDTH {
            for row in 0..font::HEIGHT {
                if font::pixel(ch, col, row) {
                    fill_rect(img, x + row as i64 * sc, y0 - (col as i64 + 1) * sc, sc, sc, c, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &RgbImage, c: Rgb<u8>) -> usize {
        img.pixels().filter(|p| **p == c).count()
    }

    /// Whether a pixel within `r` of `p` has colour `c`.
    fn near(img: &RgbImage, p: (i64, i64), r: i64, c: Rgb<u8>) -> bool {
        (p.1 - r..=p.1 + r).any(|y| {
            (p.0 - r..=p.0 + r).any(|x| {
                x >= 0
                    && y >= 0
                    && (x as u32) < img.width()
                    && (y as u32) < img.height()
                    && *img.get_pixel(x as u32, y as u32) == c
            })
        })
    }

    #[test]
    fn png_decodes_with_its_size_and_series_appear_in_their_colours() {
        let mut chart = LineChart::new("Accuracy at K", "K", "accuracy");
        chart.width = 640;
        chart.height = 400;
        chart.series.push(Series::new("level1", vec![(1.0, 0.2), (10.0, 0.5), (40.0, 0.9)]));
        chart.series.push(Series::new("product", vec![(1.0, 0.1), (10.0, 0.3), (40.0, 0.6)]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        chart.write_png(&path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 400));
        assert_eq!(img, chart.render());
        let f = chart.frame();
        for (i, s) in chart.series.iter().enumerate() {
            // Every point and every segment midpoint carries the series' colour.
            for w in s.points.windows(2) {
                let a = f.to_px(w[0].0, w[0].1).unwrap();
                let mid = f.to_px((w[0].0 + w[1].0) / 2.0, (w[0].1 + w[1].1) / 2.0).unwrap();
                assert!(f.contains(a.0, a.1));
                assert!(near(&img, a, 1, colour(i)), "series {i} point {a:?}");
                assert!(near(&img, mid, 1, colour(i)), "series {i} segment midpoint {mid:?}");
            }
        }
        // A point in an empty part of the area is background or grid.
        let empty = f.to_px(35.0, 0.05).unwrap();
        let p = *img.get_pixel(empty.0 as u32, empty.1 as u32);
        assert!(p == WHITE || p == GRID, "{p:?}");
        // Title text is drawn in black above the area, and no series colour leaks outside the
        // area except in the legend column.
        let title_black = (0..f.top as u32)
            .flat_map(|y| (0..f.right as u32).map(move |x| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x, y) == BLACK)
            .count();
        assert!(title_black > 100, "{title_black}");
        for (x, y, p) in img.enumerate_pixels() {
            if (*p == colour(0) || *p == colour(1)) && !f.contains(x as i64, y as i64) {
                assert!(x as i64 > f.right, "series colour outside the area at ({x}, {y})");
            }
        }
    }

    #[test]
    fn a_long_title_stays_inside_the_image() {
        // The trainer's titles name the loss and the arch; centred at full size this one ran
        // off the left edge.
        let mut chart = LineChart::new("training loss: hmce / efficientnet-lite0 (mean of 15 steps)", "step", "loss");
        chart.series.push(Series::new("total", vec![(0.0, 5.0), (1500.0, 3.0)]));
        let img = chart.render();
        let top = chart.frame().top as u32;
        let xs: Vec<u32> = (0..top)
            .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x, y) == BLACK)
            .map(|(x, _)| x)
            .collect();
        assert!(xs.len() > 100, "title drawn");
        let (lo, hi) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        assert!(lo >= 4 && hi < img.width() - 3, "title spans x {lo}..={hi} of {}", img.width());
    }

    #[test]
    fn non_finite_points_are_skipped_and_break_the_line() {
        let mut chart = LineChart::new("loss", "step", "loss");
        chart
            .series
            .push(Series::new("a", vec![(0.0, 0.0), (1.0, f64::NAN), (2.0, 2.0), (3.0, f64::INFINITY), (4.0, 0.0)]));
        let img = chart.render();
        let f = chart.frame();
        // The range is fitted to finite points only.
        assert!(f.x_range.0 <= 0.0 && f.x_range.1 >= 4.0 && f.y_range.1 < 3.0, "{f:?}");
        // Markers at the finite points, nothing where a segment through a skipped point would run.
        for (x, y) in [(0.0, 0.0), (2.0, 2.0), (4.0, 0.0)] {
            assert!(near(&img, f.to_px(x, y).unwrap(), 1, colour(0)), "point ({x}, {y})");
        }
        for (x, y) in [(1.0, 1.0), (3.0, 1.0), (0.5, 0.5)] {
            assert!(!near(&img, f.to_px(x, y).unwrap(), 2, colour(0)), "gap at ({x}, {y})");
        }
        // Only NaNs: still renders, nothing in the series colour but the legend sample.
        let mut blank = LineChart::new("t", "x", "y");
        blank.series.push(Series::new("nan", vec![(f64::NAN, 1.0), (1.0, f64::NAN)]));
        let img = blank.render();
        let f = blank.frame();
        assert!(img.enumerate_pixels().all(|(x, _, p)| *p != colour(0) || x as i64 > f.right));
        assert!(count(&img, colour(0)) > 0);
    }

    #[test]
    fn log_axis_skips_non_positive_values_and_ticks_at_decades() {
        let mut chart = LineChart::new("loss", "step", "loss");
        chart.log_y = true;
        chart.series.push(Series::new("a", vec![(0.0, 100.0), (1.0, 0.0), (2.0, 10.0), (3.0, 1.0), (4.0, 0.01)]));
        let f = chart.frame();
        assert!(f.y_range.0 <= -2.0 && f.y_range.1 >= 2.0);
        assert_eq!(f.to_px(1.0, 0.0), None);
        assert_eq!(f.to_px(1.0, -1.0), None);
        let labels: Vec<String> = ticks(f.y_range, true).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.01", "0.1", "1", "10", "100"]);
        let img = chart.render();
        // (2,10) -> (3,1) is drawn; (0,100) -> (2,10) is broken by the zero.
        let a = f.to_px(2.5, 10f64.powf(0.5)).unwrap();
        assert!(near(&img, a, 1, colour(0)));
        let gap = f.to_px(1.0, 10f64.powf(1.5)).unwrap();
        assert!(!near(&img, gap, 2, colour(0)));
    }

    #[test]
    fn linear_ticks_are_round_and_cover_the_range() {
        let t = ticks((0.0, 1.0), false);
        let v: Vec<f64> = t.iter().map(|t| t.0).collect();
        assert_eq!(t.iter().map(|t| t.1.as_str()).collect::<Vec<_>>(), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert!((v[1] - 0.2).abs() < 1e-12);
        let t = ticks((-3.0, 47.0), false);
        assert_eq!(t.iter().map(|t| t.1.as_str()).collect::<Vec<_>>(), ["0", "10", "20", "30", "40"]);
        let t = ticks((0.0, 2.0e7), false);
        assert!(t.iter().all(|t| t.1.contains('e') || t.1 == "0"), "{t:?}");
        assert_eq!(padded(5.0, 5.0, 0.05), (4.5, 5.5));
        assert_eq!(padded(f64::INFINITY, f64::NEG_INFINITY, 0.05), (0.0, 1.0));
    }
}
