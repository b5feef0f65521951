//! The loss curve as a PNG: training loss per step (blue), evaluation loss (orange, with a dot
//! at each evaluation), axes with labelled ticks and a legend. Drawn on an RGB canvas with a
//! small built-in 5×7 pixel font (digits and the few letters the labels use), so no system
//! font is needed, and encoded with the `png` crate.

use crate::error::{Error, Result};
use std::path::Path;

const W: usize = 800;
const H: usize = 500;
const LEFT: usize = 80;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 50;
const SCALE: usize = 2; // font pixels per glyph pixel

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
pub const TRAIN: Rgb = [31, 119, 180];
pub const EVAL: Rgb = [255, 127, 14];

/// 5×7 glyphs, one row per byte, the leftmost pixel in bit 4.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11110, 0b00001, 0b00001, 0b01110, 0b00001, 0b00001, 0b11110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        '.' => [0, 0, 0, 0, 0, 0b01100, 0b01100],
        '-' => [0, 0, 0, 0b11111, 0, 0, 0],
        'e' => [0, 0, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110],
        'a' => [0, 0, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111],
        'i' => [0b00100, 0, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110],
        'l' => [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'n' => [0, 0, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'o' => [0, 0, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110],
        'p' => [0, 0, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000],
        'r' => [0, 0, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000],
        's' => [0, 0, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110],
        't' => [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110],
        'v' => [0, 0, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        ' ' => [0; 7],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas { px: WHITE.repeat(W * H) }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line `width` pixels thick (Bresenham, with a square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..width {
                for oy in 0..width {
                    self.set(x + ox - width / 2, y + oy - width / 2, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dot(&mut self, (x, y): (i64, i64), c: Rgb) {
        for ox in -3..=3 {
            for oy in -3..=3 {
                if ox * ox + oy * oy <= 9 {
                    self.set(x + ox, y + oy, c);
                }
            }
        }
    }

    /// Text with its top-left corner at (x, y); characters without a glyph are skipped.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            let x0 = x + (k * 6 * SCALE) as i64;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for (ox, oy) in (0..SCALE).flat_map(|a| (0..SCALE).map(move |b| (a, b))) {
                            self.set(x0 + (col * SCALE + ox) as i64, y + (row * SCALE + oy) as i64, c);
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    (s.chars().count() * 6 * SCALE) as i64
}

/// Ticks at 1, 2 or 5 × 10^k covering `[lo, hi]`, about `n` of them, and the decimals to show.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), decimals)
}

/// Writes the loss curves to `path`. Points are (step, loss); non-finite losses are left out.
pub fn loss_curve_png(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64)]) -> Result<()> {
    let finite = |v: &[(u64, f64)]| v.iter().copied().filter(|(_, l)| l.is_finite()).collect::<Vec<_>>();
    let (train, eval) = (finite(train), finite(eval));
    let all = train.iter().chain(&eval);
    let max_step = all.clone().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let (x0, x1, y0, y1) = (LEFT as f64, (W - RIGHT) as f64, (H - BOTTOM) as f64, TOP as f64);
    let to_px = |(s, l): (u64, f64)| {
        ((x0 + s as f64 / max_step * (x1 - x0)) as i64, (y0 + (l - lo) / (hi - lo) * (y1 - y0)) as i64)
    };

    let mut c = Canvas::new();
    let (yt, yd) = ticks(lo, hi, 6);
    for v in yt {
        let y = to_px((0, v)).1;
        c.line((x0 as i64, y), (x1 as i64, y), GRID, 1);
        let label = format!("{v:.yd$}");
        c.text(x0 as i64 - 8 - text_width(&label), y - 7, &label, BLACK);
    }
    let (xt, _) = ticks(0.0, max_step, 8);
    for v in xt.into_iter().filter(|v| v.fract() == 0.0) {
        let x = to_px((v as u64, lo)).0;
        c.line((x, y0 as i64), (x, y0 as i64 + 6), BLACK, 1);
        let label = format!("{v:.0}");
        c.text(x - text_width(&label) / 2, y0 as i64 + 12, &label, BLACK);
    }
    c.line((x0 as i64, y0 as i64), (x1 as i64, y0 as i64), BLACK, 2);
    c.line((x0 as i64, y0 as i64), (x0 as i64, y1 as i64), BLACK, 2);
    c.text((x0 + x1) as i64 / 2 - text_width("step") / 2, H as i64 - 22, "step", BLACK);
    for w in train.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), TRAIN, 2);
    }
    if let [only] = train[..] {
        c.dot(to_px(only), TRAIN);
    }
    for w in eval.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), EVAL, 2);
    }
    for &p in &eval {
        c.dot(to_px(p), EVAL);
    }
    // Legend, top right.
    let lx = x1 as i64 - 335;
    c.line((lx, 20), (lx + 30, 20), TRAIN, 3);
    c.text(lx + 38, 13, "train loss", BLACK);
    if !eval.is_empty() {
        let ex = lx + 38 + text_width("train loss") + 24;
        c.line((ex, 20), (ex + 30, 20), EVAL, 3);
        c.text(ex + 38, 13, "eval loss", BLACK);
    }

    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let io = |e: png::EncodingError| Error::io(path, std::io::Error::other(e));
    let mut w = enc.write_header().map_err(io)?;
    w.write_image_data(&c.px).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        let (t, d) = ticks(0.0, 10.0, 5);
        assert_eq!((t, d), (vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0], 0));
        let (t, d) = ticks(2.31, 2.74, 5);
        assert_eq!(d, 1);
        assert!(t.first().unwrap() >= &2.31 && t.len() >= 3, "{t:?}");
    }

    #[test]
    fn png_has_the_curves() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..=50).map(|s| (s, 3.0 / (1.0 + s as f64 / 10.0))).collect();
        loss_curve_png(&p, &train, &[(10, 2.5), (20, 2.2), (30, f64::NAN), (50, 2.4)]).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let count = |c: Rgb| buf.chunks_exact(3).filter(|p| *p == c).count();
        assert!(count(TRAIN) > 500 && count(EVAL) > 100 && count(BLACK) > 1000);
    }
}
