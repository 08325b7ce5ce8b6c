//! DeepSeek-V3's block FP8: weights stored as `float8_e4m3fn` with one f32 `weight_scale_inv` per
//! block of `weight_block_size` (128 x 128 as published); `W[i][j] = q[i][j] * s[i / b_r][j / b_c]`.
//! The scale grid has `ceil(rows / b_r) x ceil(cols / b_c)` entries, so the last block of a row or
//! column may be partial (DeepSeek's `weight_dequant`; V3's `kv_a_proj_with_mqa` has 576 rows).

use std::sync::OnceLock;

/// The value of an e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
/// `S.1111.111` is NaN, exponent 0 is subnormal.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = ((byte >> 3) & 0x0f) as i32;
    let mantissa = (byte & 0x07) as f32;
    let magnitude = match (exponent, byte & 0x07) {
        (15, 7) => f32::NAN,
        (0, _) => mantissa * 2f32.powi(-9),
        _ => (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
    };
    sign * magnitude
}

fn table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

/// The shape of the scale grid of a `(rows, cols)` weight with `block` rows x columns per scale.
pub fn scale_grid(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

/// `(rows, cols)` f32 values of the e4m3 bytes `q`, each multiplied by its block's scale.
pub fn dequantize(q: &[u8], scales: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> Vec<f32> {
    let lut = table();
    let grid_cols = cols.div_ceil(block[1]);
    let mut out = Vec::with_capacity(rows * cols);
    for (i, row) in q.chunks_exact(cols).enumerate().take(rows) {
        let scale_row = &scales[(i / block[0]) * grid_cols..][..grid_cols];
        out.extend(row.iter().enumerate().map(|(j, &b)| lut[b as usize] * scale_row[j / block[1]]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_its_landmarks() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn partial_blocks_at_the_edges_use_their_own_scale() {
        // A 3 x 3 weight in 2 x 2 blocks: a 2 x 2 grid whose last row and column are partial.
        let q = [0x38u8; 9]; // all 1.0
        let scales = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(scale_grid(3, 3, [2, 2]), [2, 2]);
        let w = dequantize(&q, &scales, 3, 3, [2, 2]);
        assert_eq!(w, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0]);
    }
}
