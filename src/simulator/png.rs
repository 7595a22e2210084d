//! The simulator's pictures: a tiny PNG encoder (stored deflate blocks),
//! and decoding of uploaded files (PNG, JPEG) through the `image` crate.
//!
//! Why the encoder by hand: it makes exact, uncompressed RGB files, so a
//! test can compare pixels without a decoder of its own.

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &d in data {
        a = (a + d as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A valid RGB PNG of one colour.
pub fn solid(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let (width, height) = (width.max(1), height.max(1));
    encode(width, height, &rgb.repeat((width * height) as usize))
}

/// Decodes a PNG or JPEG into RGB pixels: `(width, height, rgb)`.
pub fn decode(bytes: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    let img = image::load_from_memory(bytes).ok()?.to_rgb8();
    Some((img.width(), img.height(), img.into_raw()))
}

/// A valid RGB PNG of these pixels (`rgb` holds `width * height` triples).
pub fn encode(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    // Each row: filter type 0, then the pixels.
    let mut raw = Vec::with_capacity(rgb.len() + height as usize);
    for row in rgb.chunks((width * 3).max(1) as usize) {
        raw.push(0u8);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_reference_value() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_pixels() {
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let (w, h, back) = decode(&encode(3, 2, &rgb)).unwrap();
        assert_eq!((w, h), (3, 2));
        assert_eq!(back, rgb);
    }

    #[test]
    fn a_png_has_the_signature_and_ends_with_iend() {
        let p = solid(3, 2, [255, 0, 0]);
        assert_eq!(&p[..8], &[0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
        assert_eq!(&p[p.len() - 8..p.len() - 4], b"IEND");
    }
}
