//! The IDX format of (Fashion-)MNIST, gzip-compressed: unsigned-byte image stacks and label lists,
//! with magic numbers and sizes checked.
//!
//! Layout: a 4-byte big-endian magic `0x0000_08nn` (`08` = unsigned byte, `nn` = number of
//! dimensions), one big-endian `u32` per dimension, then the data, row-major.

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use crate::{Error, Result};

/// Magic of an unsigned-byte array with 3 dimensions (count, rows, columns).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an unsigned-byte array with 1 dimension (count).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// A stack of 8-bit grayscale images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// `count * rows * cols` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i` (`rows * cols` bytes).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

fn bad(path: &Path, problem: impl Into<String>) -> Error {
    Error::Idx { path: path.to_path_buf(), problem: problem.into() }
}

/// Reads and gunzips a file (a plain, uncompressed IDX file is read as is).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| bad(path, format!("gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks the header (magic and dimensions) and that the data is exactly as long as they say.
/// `path` is only used in errors.
fn parse<'a>(bytes: &'a [u8], path: &Path, magic: u32, what: &str) -> Result<(Vec<usize>, &'a [u8])> {
    let dims = (magic & 0xff) as usize;
    let header = 4 + 4 * dims;
    let word = |i: usize| u32::from_be_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    if bytes.len() >= 4 && word(0) != magic {
        let found = word(0);
        return Err(bad(path, format!("magic number {found:#010x}, expected {magic:#010x} ({what})")));
    }
    if bytes.len() < header {
        return Err(bad(path, format!("{} bytes is shorter than the {header}-byte header of {what}", bytes.len())));
    }
    let shape: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let data = &bytes[header..];
    match expected {
        Some(n) if n == data.len() => Ok((shape, data)),
        Some(n) if n > data.len() => {
            Err(bad(path, format!("truncated: the header {shape:?} needs {n} data bytes, the file has {}", data.len())))
        }
        Some(n) => {
            Err(bad(path, format!("{} bytes after the {n} data bytes the header {shape:?} describes", data.len() - n)))
        }
        None => Err(bad(path, format!("header dimensions {shape:?} overflow"))),
    }
}

/// Parses an image stack (magic `0x00000803`).
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages> {
    let (shape, data) = parse(bytes, path, IMAGES_MAGIC, "an unsigned-byte image stack")?;
    if shape[1] == 0 || shape[2] == 0 {
        return Err(bad(path, format!("images of {}x{} pixels", shape[1], shape[2])));
    }
    Ok(IdxImages { count: shape[0], rows: shape[1], cols: shape[2], pixels: data.to_vec() })
}

/// Parses a label list (magic `0x00000801`).
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let (_, data) = parse(bytes, path, LABELS_MAGIC, "an unsigned-byte label list")?;
    Ok(data.to_vec())
}

/// Reads a (gzipped) image stack file.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(&read_file(path)?, path)
}

/// Reads a (gzipped) label list file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(&read_file(path)?, path)
}

/// Encodes an IDX byte array (for tests and fixtures): magic, dimensions, data.
pub fn encode(magic: u32, shape: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in shape {
        out.extend(d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_a_gzipped_image_stack_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..3 * 2 * 5).map(|i| (i * 7) as u8).collect();
        let path = write(dir.path(), "img.gz", &gz(&encode(IMAGES_MAGIC, &[3, 2, 5], &pixels)));
        let images = read_images(&path).unwrap();
        assert_eq!((images.count, images.rows, images.cols), (3, 2, 5));
        assert_eq!(images.image(1), &pixels[10..20]);
        let path = write(dir.path(), "lab.gz", &gz(&encode(LABELS_MAGIC, &[4], &[9, 0, 3, 3])));
        assert_eq!(read_labels(&path).unwrap(), vec![9, 0, 3, 3]);
        // plain (not gzipped) files work too
        let path = write(dir.path(), "lab", &encode(LABELS_MAGIC, &[2], &[1, 2]));
        assert_eq!(read_labels(&path).unwrap(), vec![1, 2]);
    }

    fn idx_problem(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::Idx { problem, .. }) => problem,
            other => panic!("expected an IDX error, got {other:?}"),
        }
    }

    #[test]
    fn truncated_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let full = encode(IMAGES_MAGIC, &[3, 2, 5], &[0u8; 30]);
        let path = write(dir.path(), "short.gz", &gz(&full[..full.len() - 1]));
        let problem = idx_problem(read_images(&path));
        assert!(problem.contains("truncated") && problem.contains("29"), "{problem}");
        // a cut gzip stream
        let zipped = gz(&full);
        let path = write(dir.path(), "cut.gz", &zipped[..zipped.len() / 2]);
        assert!(idx_problem(read_images(&path)).contains("gzip"));
        // shorter than the header
        assert!(idx_problem(parse_images(&full[..9], Path::new("x"))).contains("header"));
    }

    #[test]
    fn wrong_magic_and_trailing_bytes_are_errors() {
        let labels = encode(LABELS_MAGIC, &[2], &[1, 2]);
        assert!(idx_problem(parse_images(&labels, Path::new("x"))).contains("magic"));
        let mut long = labels.clone();
        long.push(0);
        assert!(idx_problem(parse_labels(&long, Path::new("x"))).contains("1 bytes after"));
    }
}
