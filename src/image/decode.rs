//! Image decoding: sniff PNG / JPEG / WebP from the bytes, refuse oversized input before
//! decoding, apply EXIF orientation and flatten to 8-bit RGB over a white background.
//!
//! [`decode_for`] is what the model's inputs go through: a JPEG much larger than the model's
//! input is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (the inverse transform of each
//! 8x8 block computed at 4x4, 2x2 or 1x1), which skips most of the decoder's and the resize's work
//! on a photo; [`decode`] always decodes every pixel.

use std::io::{Cursor, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use ::image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// Bounds on what [`decode`] accepts (everything past them is refused before pixels are
/// decoded), and whether [`decode_for`] may decode large JPEGs at a reduced scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest encoded size in bytes.
    pub max_bytes: usize,
    /// Largest width x height, read from the header (decompression bombs).
    pub max_pixels: u64,
    /// Largest width or height.
    pub max_side: u32,
    /// Whether [`decode_for`] decodes a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain when
    /// its shorter side still covers the requested size (`false`: every pixel, as [`decode`]).
    #[serde(default = "dct_scaling_default")]
    pub jpeg_dct_scaling: bool,
}

fn dct_scaling_default() -> bool {
    true
}

impl Default for Limits {
    /// 20 MiB, 40 megapixels, 16384 pixels a side, scaled JPEG decoding on.
    fn default() -> Self {
        Limits { max_bytes: 20 * 1024 * 1024, max_pixels: 40_000_000, max_side: 16384, jpeg_dct_scaling: true }
    }
}

/// Which dimension limit an image broke (carried by [`Error::ImageTooManyPixels`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLimit {
    /// More than this many pixels in total.
    Pixels(u64),
    /// A side longer than this.
    Side(u32),
}

impl std::fmt::Display for PixelLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PixelLimit::Pixels(n) => write!(f, "{n} pixels"),
            PixelLimit::Side(n) => write!(f, "{n} pixels per side"),
        }
    }
}

/// The formats [`decode`] accepts.
const ACCEPTED: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP];

/// Bytes per pixel of the widest buffer a PNG / JPEG / WebP decoder produces (RGBA, 16 bit).
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;
/// Working memory a decoder may use beyond its output buffer.
const DECODER_HEADROOM_BYTES: u64 = 64 * 1024 * 1024;

/// Decodes a PNG, JPEG or WebP image to 8-bit RGB.
///
/// The format is sniffed from the bytes, never taken from a name. In order: empty input is
/// [`Error::ImageDecode`]; more than `limits.max_bytes` is [`Error::ImageTooLarge`]; any other
/// format (or none recognised) is [`Error::UnsupportedImageFormat`]; the header's dimensions
/// over `max_side` or `max_pixels` are [`Error::ImageTooManyPixels`], before any pixel is
/// decoded (the `image` crate's own limits are set too); corrupt or truncated data is
/// [`Error::ImageDecode`] (a JPEG cut inside its scan data still decodes, the missing part
/// filled in, as browsers show it). The EXIF orientation (JPEG, WebP, PNG `eXIf`) is applied. Alpha is
/// composited over white (`a*c + (1-a)*255`); 16-bit and float images are scaled to 8 bits.
/// A panic inside a decoder is caught and reported as [`Error::ImageDecode`].
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RgbImage> {
    decode_for(bytes, &Limits { jpeg_dct_scaling: false, ..*limits }, 0)
}

/// As [`decode`], for an image that will be resized so that its shorter side is `min_side`:
/// with `limits.jpeg_dct_scaling`, a baseline or progressive 8-bit grey or colour JPEG whose
/// shorter side is at least `2 * min_side` is decoded at the smallest of 1/2, 1/4 and 1/8 scale
/// that keeps the shorter side at or above `min_side` (the output is `ceil(side / d)`), so the
/// resize that follows still only shrinks. Pixels then differ slightly from a full decode
/// followed by the resize (the scaled inverse DCT averages each block before the filter sees
/// it); `tests` bound the difference. Anything the scaled path does not handle (CMYK, 16-bit,
/// lossless, a damaged file) goes through the full decoder, errors and all. `min_side` 0 is
/// [`decode`].
pub fn decode_for(bytes: &[u8], limits: &Limits, min_side: u32) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::ImageDecode { reason: "empty input".into() });
    }
    if bytes.len() > limits.max_bytes {
        return Err(Error::ImageTooLarge { bytes: bytes.len() as u64, limit: limits.max_bytes as u64 });
    }
    let format = sniff(bytes)?;
    if format == ImageFormat::Jpeg && limits.jpeg_dct_scaling && min_side > 0 {
        // A panic in the scaled path falls through to the full decoder like any other refusal.
        if let Ok(Some(img)) = catch_unwind(AssertUnwindSafe(|| decode_jpeg_scaled(bytes, limits, min_side))) {
            return Ok(img);
        }
    }
    catch_unwind(AssertUnwindSafe(|| decode_sniffed(bytes, format, limits)))
        .unwrap_or_else(|_| Err(Error::ImageDecode { reason: format!("{} decoder panicked", mime(format)) }))
}

/// Reads and decodes an image file; the file's size is checked against `max_bytes` before
/// it is read. Unreadable files are [`Error::Io`]; otherwise as [`decode`].
pub fn decode_file(path: &Path, limits: &Limits) -> Result<RgbImage> {
    decode_file_for(path, &Limits { jpeg_dct_scaling: false, ..*limits }, 0)
}

/// [`decode_file`] with [`decode_for`]'s reduced JPEG decoding.
pub fn decode_file_for(path: &Path, limits: &Limits, min_side: u32) -> Result<RgbImage> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size > limits.max_bytes as u64 {
        return Err(Error::ImageTooLarge { bytes: size, limit: limits.max_bytes as u64 });
    }
    // The file may grow after the check: read at most one byte past the limit.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limits.max_bytes as u64 + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    decode_for(&bytes, limits, min_side)
}

/// The DCT scale denominator (1, 2, 4 or 8) for a JPEG whose shorter side is `short`: the
/// largest that keeps `ceil(short / d) >= min_side`.
fn dct_denominator(short: u32, min_side: u32) -> u32 {
    [8, 4, 2].into_iter().find(|d| short.div_ceil(*d) >= min_side).unwrap_or(1)
}

/// The scaled JPEG path of [`decode_for`]; `None` hands the image to the full decoder (no
/// reduction possible, a format this path leaves alone, or anything the decoder refused).
fn decode_jpeg_scaled(bytes: &[u8], limits: &Limits, min_side: u32) -> Option<RgbImage> {
    use jpeg_decoder::{CodingProcess, PixelFormat};
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.read_info().ok()?;
    let info = decoder.info()?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    // Over the limits: the full path refuses it with the dimensions in the message.
    check_dimensions(width, height, limits).ok()?;
    if !matches!(info.pixel_format, PixelFormat::L8 | PixelFormat::RGB24)
        || info.coding_process == CodingProcess::Lossless
    {
        return None;
    }
    let d = dct_denominator(width.min(height), min_side);
    if d == 1 {
        return None;
    }
    let want = (width.div_ceil(d), height.div_ceil(d));
    decoder.set_max_decoding_buffer_size(usize::try_from(alloc_budget(limits)).unwrap_or(usize::MAX));
    let (w, h) = decoder.scale(u16::try_from(want.0).ok()?, u16::try_from(want.1).ok()?).ok()?;
    if (u32::from(w), u32::from(h)) != want {
        return None;
    }
    let pixels = decoder.decode().ok()?;
    let mut image = match info.pixel_format {
        PixelFormat::RGB24 => DynamicImage::ImageRgb8(RgbImage::from_raw(want.0, want.1, pixels)?),
        _ => DynamicImage::ImageLuma8(::image::GrayImage::from_raw(want.0, want.1, pixels)?),
    };
    let orientation = decoder
        .exif_data()
        .and_then(::image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(::image::metadata::Orientation::NoTransforms);
    image.apply_orientation(orientation);
    Some(image.into_rgb8())
}

/// The accepted format the bytes start with.
fn sniff(bytes: &[u8]) -> Result<ImageFormat> {
    match ::image::guess_format(bytes) {
        Ok(format) if ACCEPTED.contains(&format) => Ok(format),
        Ok(format) => Err(Error::UnsupportedImageFormat { format: mime(format).into() }),
        Err(_) if is_truncated_signature(bytes) => {
            Err(Error::ImageDecode { reason: format!("truncated image: only {} bytes", bytes.len()) })
        }
        Err(_) => Err(Error::UnsupportedImageFormat { format: "unknown".into() }),
    }
}

/// Whether the bytes are too short to be recognised but start like an accepted format.
fn is_truncated_signature(bytes: &[u8]) -> bool {
    const SIGNATURES: [&[u8]; 3] = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF"];
    // WebP is recognised from 12 bytes: "RIFF", a size, "WEBP".
    let short_riff = bytes.len() < 12 && bytes.starts_with(b"RIFF");
    short_riff || SIGNATURES.iter().any(|sig| bytes.len() < sig.len() && sig.starts_with(bytes))
}

fn mime(format: ImageFormat) -> &'static str {
    format.to_mime_type()
}

fn decode_sniffed(bytes: &[u8], format: ImageFormat, limits: &Limits) -> Result<RgbImage> {
    let fail = |err: ImageError| Error::ImageDecode { reason: format!("{}: {err}", mime(format)) };
    let alloc_budget = alloc_budget(limits);

    // Read the header with a memory budget but no dimension limit, so that we can say what the
    // dimensions were when refusing them.
    let mut header_limits = ::image::Limits::default();
    header_limits.max_alloc = Some(alloc_budget);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(header_limits);
    let mut decoder = reader.into_decoder().map_err(fail)?;

    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;

    let mut decode_limits = ::image::Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(alloc_budget);
    decode_limits.reserve(decoder.total_bytes()).map_err(fail)?;
    decoder.set_limits(decode_limits).map_err(fail)?;

    // A broken EXIF block should not cost an otherwise good image its pixels.
    let orientation = decoder.orientation().unwrap_or_else(|err| {
        tracing::debug!(%err, "ignoring unreadable EXIF orientation");
        ::image::metadata::Orientation::NoTransforms
    });
    let mut image = DynamicImage::from_decoder(decoder).map_err(fail)?;
    image.apply_orientation(orientation);
    Ok(flatten_to_rgb(image))
}

/// The most memory a decoder may allocate: the largest allowed image at the widest pixel, plus
/// working room.
fn alloc_budget(limits: &Limits) -> u64 {
    limits.max_pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL).saturating_add(DECODER_HEADROOM_BYTES)
}

fn check_dimensions(width: u32, height: u32, limits: &Limits) -> Result<()> {
    let too_many = |limit| Err(Error::ImageTooManyPixels { width, height, limit });
    if width > limits.max_side || height > limits.max_side {
        return too_many(PixelLimit::Side(limits.max_side));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return too_many(PixelLimit::Pixels(limits.max_pixels));
    }
    Ok(())
}

/// Converts any decoded image to 8-bit RGB, compositing transparency over white.
pub(crate) fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let u8_unit = |v: u8| f32::from(v) / 255.0;
    let u16_unit = |v: u16| f32::from(v) / 65535.0;
    let f32_unit = |v: f32| v.clamp(0.0, 1.0);
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(_) => image.to_rgb8(),
        DynamicImage::ImageLumaA8(b) => composite(w, h, b.as_raw(), 2, u8_unit),
        DynamicImage::ImageRgba8(b) => composite(w, h, b.as_raw(), 4, u8_unit),
        DynamicImage::ImageLuma16(b) => composite(w, h, b.as_raw(), 1, u16_unit),
        DynamicImage::ImageLumaA16(b) => composite(w, h, b.as_raw(), 2, u16_unit),
        DynamicImage::ImageRgb16(b) => composite(w, h, b.as_raw(), 3, u16_unit),
        DynamicImage::ImageRgba16(b) => composite(w, h, b.as_raw(), 4, u16_unit),
        DynamicImage::ImageRgb32F(b) => composite(w, h, b.as_raw(), 3, f32_unit),
        DynamicImage::ImageRgba32F(b) => composite(w, h, b.as_raw(), 4, f32_unit),
        other => composite(w, h, other.to_rgba32f().as_raw(), 4, f32_unit),
    }
}

/// Interleaved L / LA / RGB / RGBA samples (`channels` = 1..=4) to RGB over white:
/// `round(a*c + (1-a)*255)` with `c` on the 0..255 scale and `a` in 0..1, in f32.
fn composite<T: Copy>(w: u32, h: u32, raw: &[T], channels: usize, unit: impl Fn(T) -> f32) -> RgbImage {
    let mut out = Vec::with_capacity(raw.len() / channels * 3);
    for px in raw.chunks_exact(channels) {
        let (rgb, alpha) = match channels {
            1 => ([px[0]; 3], 1.0),
            2 => ([px[0]; 3], unit(px[1])),
            3 => ([px[0], px[1], px[2]], 1.0),
            _ => ([px[0], px[1], px[2]], unit(px[3])),
        };
        for c in rgb {
            let v = alpha * (unit(c) * 255.0) + (1.0 - alpha) * 255.0;
            out.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("one RGB triple per source pixel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::{ImageBuffer, ImageEncoder, LumaA, Rgb, Rgba};

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(img).unwrap();
        out
    }

    /// A 40x20 image, red on the left quarter of the top half, blue elsewhere.
    fn asymmetric(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| if x < w / 4 && y < h / 2 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) })
    }

    /// Rewrites a PNG's IHDR width and height and fixes the chunk's CRC.
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png_bytes(&DynamicImage::ImageRgb8(asymmetric(4, 4)));
        assert_eq!(&bytes[12..16], b"IHDR");
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        bytes
    }

    /// Rewrites a baseline JPEG's SOF0 height and width.
    fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = jpeg_bytes(&asymmetric(16, 16));
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0 marker");
        bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        bytes
    }

    /// Inserts an APP1 EXIF segment (big-endian TIFF, one IFD entry: Orientation) after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\x00\x2a");
        tiff.extend_from_slice(&8u32.to_be_bytes()); // IFD0 right after the header
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // tag: Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // type: SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]); // value padding
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let payload_len = 2 + 6 + tiff.len();
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        out.extend_from_slice(b"Exif\x00\x00");
        out.extend_from_slice(&tiff);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn is_red(p: &Rgb<u8>) -> bool {
        p[0] > 200 && p[1] < 60 && p[2] < 60
    }

    #[test]
    fn png_round_trips_exactly() {
        let img = asymmetric(40, 20);
        let out = decode(&png_bytes(&DynamicImage::ImageRgb8(img.clone())), &Limits::default()).unwrap();
        assert_eq!(out, img);
    }

    #[test]
    fn jpeg_and_webp_decode() {
        let img = asymmetric(40, 20);
        let jpeg = decode(&jpeg_bytes(&img), &Limits::default()).unwrap();
        assert_eq!(jpeg.dimensions(), (40, 20));
        assert!(is_red(jpeg.get_pixel(2, 2)) && !is_red(jpeg.get_pixel(30, 15)));

        let mut webp = Vec::new();
        ::image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(img.as_raw(), 40, 20, ::image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode(&webp, &Limits::default()).unwrap(), img);
    }

    #[test]
    fn empty_input_is_a_decode_error() {
        assert!(matches!(decode(&[], &Limits::default()), Err(Error::ImageDecode { .. })));
    }

    #[test]
    fn byte_limit_is_checked_before_decoding() {
        let bytes = png_bytes(&DynamicImage::ImageRgb8(asymmetric(8, 8)));
        let n = bytes.len();
        let limits = Limits { max_bytes: n - 1, ..Limits::default() };
        match decode(&bytes, &limits) {
            Err(Error::ImageTooLarge { bytes, limit }) => assert_eq!((bytes, limit), (n as u64, n as u64 - 1)),
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        assert!(decode(&bytes, &Limits { max_bytes: n, ..Limits::default() }).is_ok());
        // Over the limit with garbage: the size is refused before the format is looked at.
        assert!(matches!(decode(&vec![7u8; n], &limits), Err(Error::ImageTooLarge { .. })));
    }

    #[test]
    fn decode_file_checks_size_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let bytes = png_bytes(&DynamicImage::ImageRgb8(asymmetric(8, 8)));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(decode_file(&path, &Limits::default()).unwrap(), asymmetric(8, 8));
        let small = Limits { max_bytes: 10, ..Limits::default() };
        let n = bytes.len() as u64;
        assert!(matches!(decode_file(&path, &small), Err(Error::ImageTooLarge { bytes, limit: 10 }) if bytes == n));
        assert!(matches!(decode_file(&dir.path().join("missing.png"), &small), Err(Error::Io { .. })));
    }

    #[test]
    fn png_header_claiming_too_many_pixels_is_refused() {
        // 10000 x 10000 = 100 megapixels, each side under 16384: the pixel limit fires.
        match decode(&png_claiming(10_000, 10_000), &Limits::default()) {
            Err(Error::ImageTooManyPixels { width, height, limit }) => {
                assert_eq!((width, height), (10_000, 10_000));
                assert_eq!(limit, PixelLimit::Pixels(40_000_000));
            }
            other => panic!("expected ImageTooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn jpeg_header_claiming_a_long_side_is_refused() {
        // 20000 x 10 is only 200k pixels, but one side is over 16384.
        match decode(&jpeg_claiming(20_000, 10), &Limits::default()) {
            Err(Error::ImageTooManyPixels { width, height, limit }) => {
                assert_eq!((width, height), (20_000, 10));
                assert_eq!(limit, PixelLimit::Side(16384));
            }
            other => panic!("expected ImageTooManyPixels, got {other:?}"),
        }
        match decode(&jpeg_claiming(8000, 8000), &Limits::default()) {
            Err(Error::ImageTooManyPixels { limit: PixelLimit::Pixels(_), .. }) => {}
            other => panic!("expected the pixel limit, got {other:?}"),
        }
    }

    #[test]
    fn dimension_limits_apply_to_real_images() {
        let bytes = png_bytes(&DynamicImage::ImageRgb8(asymmetric(40, 20)));
        let side = Limits { max_side: 39, ..Limits::default() };
        assert!(matches!(decode(&bytes, &side), Err(Error::ImageTooManyPixels { limit: PixelLimit::Side(39), .. })));
        let pixels = Limits { max_pixels: 799, ..Limits::default() };
        assert!(matches!(
            decode(&bytes, &pixels),
            Err(Error::ImageTooManyPixels { limit: PixelLimit::Pixels(799), .. })
        ));
        assert!(decode(&bytes, &Limits { max_side: 40, max_pixels: 800, ..Limits::default() }).is_ok());
    }

    #[test]
    fn other_formats_are_unsupported() {
        let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,";
        match decode(gif, &Limits::default()) {
            Err(Error::UnsupportedImageFormat { format }) => assert_eq!(format, "image/gif"),
            other => panic!("expected UnsupportedImageFormat, got {other:?}"),
        }
        let mut bmp = b"BM".to_vec();
        bmp.extend_from_slice(&[0u8; 60]);
        let bmp = decode(&bmp, &Limits::default());
        assert!(matches!(bmp, Err(Error::UnsupportedImageFormat { format }) if format == "image/bmp"));
        assert!(matches!(
            decode(b"hello, this is not an image", &Limits::default()),
            Err(Error::UnsupportedImageFormat { format }) if format == "unknown"
        ));
    }

    #[test]
    fn truncated_and_corrupt_data_are_decode_errors() {
        let png = png_bytes(&DynamicImage::ImageRgb8(asymmetric(40, 20)));
        for cut in [4, 20, 40, png.len() / 2, png.len() - 13] {
            assert!(
                matches!(decode(&png[..cut], &Limits::default()), Err(Error::ImageDecode { .. })),
                "PNG cut at {cut}"
            );
        }
        let jpeg = jpeg_bytes(&asymmetric(40, 20));
        assert!(matches!(decode(b"RIFF\x10\0", &Limits::default()), Err(Error::ImageDecode { .. })));
        for cut in [2, 20] {
            assert!(
                matches!(decode(&jpeg[..cut], &Limits::default()), Err(Error::ImageDecode { .. })),
                "JPEG cut at {cut}"
            );
        }
        // A PNG whose image data is overwritten with noise: zlib or CRC checks fail.
        let mut corrupt = png.clone();
        let idat = corrupt.windows(4).position(|w| w == b"IDAT").unwrap();
        for b in &mut corrupt[idat + 4..idat + 20] {
            *b ^= 0x5A;
        }
        assert!(matches!(decode(&corrupt, &Limits::default()), Err(Error::ImageDecode { .. })));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 40x20, red block at the top-left (x < 10, y < 10).
        let jpeg = jpeg_bytes(&asymmetric(40, 20));
        let plain = decode(&jpeg, &Limits::default()).unwrap();
        assert_eq!(plain.dimensions(), (40, 20));

        // 6 = rotate 90 degrees clockwise: 20x40, the block lands at the top-right.
        let rotated = decode(&with_exif_orientation(&jpeg, 6), &Limits::default()).unwrap();
        assert_eq!(rotated.dimensions(), (20, 40));
        assert!(is_red(rotated.get_pixel(15, 5)), "top-right should be red");
        assert!(!is_red(rotated.get_pixel(5, 5)) && !is_red(rotated.get_pixel(15, 35)));
        // Pixel for pixel: rotated(x, y) = plain(y, H-1-x) with H = 20.
        for (x, y) in [(0, 0), (19, 0), (3, 30), (12, 7)] {
            let a = rotated.get_pixel(x, y);
            let b = plain.get_pixel(y, 19 - x);
            assert!(a.0.iter().zip(b.0).all(|(p, q)| p.abs_diff(q) <= 2), "({x},{y}): {a:?} vs {b:?}");
        }

        // 3 = rotate 180: same size, the block at the bottom-right.
        let upside_down = decode(&with_exif_orientation(&jpeg, 3), &Limits::default()).unwrap();
        assert_eq!(upside_down.dimensions(), (40, 20));
        assert!(is_red(upside_down.get_pixel(35, 15)) && !is_red(upside_down.get_pixel(5, 5)));

        // 2 = mirror: the block at the top-right.
        let mirrored = decode(&with_exif_orientation(&jpeg, 2), &Limits::default()).unwrap();
        assert!(is_red(mirrored.get_pixel(35, 5)) && !is_red(mirrored.get_pixel(5, 5)));
    }

    /// `round(a*c + (1-a)*255)` in f64, `a` in 0..1, `c` on the 0..255 scale.
    fn over_white(c: f64, a: f64) -> u8 {
        (a * c + (1.0 - a) * 255.0).round() as u8
    }

    #[test]
    fn rgba_is_composited_over_white() {
        let alphas = [0u8, 1, 64, 127, 128, 200, 254, 255];
        let img = ImageBuffer::from_fn(alphas.len() as u32, 3, |x, y| {
            let c = [(30 + 70 * y) as u8, (250 - 90 * y) as u8, (7 * x) as u8];
            Rgba([c[0], c[1], c[2], alphas[x as usize]])
        });
        let out = decode(&png_bytes(&DynamicImage::ImageRgba8(img.clone())), &Limits::default()).unwrap();
        for (x, y, p) in img.enumerate_pixels() {
            let a = f64::from(p[3]) / 255.0;
            let want: Vec<u8> = (0..3).map(|c| over_white(f64::from(p[c]), a)).collect();
            assert_eq!(out.get_pixel(x, y).0.to_vec(), want, "pixel ({x},{y}) = {p:?}");
        }
        // Fully transparent is white whatever the colour; opaque keeps the colour.
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(7, 1).0, [100, 160, 49]);
    }

    #[test]
    fn grey_is_replicated_and_webp_alpha_composited() {
        let grey = ImageBuffer::from_fn(3, 2, |x, y| ::image::Luma([(40 * x + 90 * y) as u8]));
        let out = decode(&png_bytes(&DynamicImage::ImageLuma8(grey.clone())), &Limits::default()).unwrap();
        assert!(grey.enumerate_pixels().all(|(x, y, p)| out.get_pixel(x, y).0 == [p[0]; 3]));

        let rgba = ImageBuffer::from_fn(4, 1, |x, _| Rgba([200, 10 * x as u8, 90, [0, 90, 180, 255][x as usize]]));
        let mut webp = Vec::new();
        ::image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(rgba.as_raw(), 4, 1, ::image::ExtendedColorType::Rgba8)
            .unwrap();
        let out = decode(&webp, &Limits::default()).unwrap();
        for (x, _, p) in rgba.enumerate_pixels() {
            let want: Vec<u8> = (0..3).map(|c| over_white(f64::from(p[c]), f64::from(p[3]) / 255.0)).collect();
            assert_eq!(out.get_pixel(x, 0).0.to_vec(), want, "pixel {x}");
        }
    }

    #[test]
    fn luma_alpha_and_16_bit_are_converted() {
        let la = ImageBuffer::from_fn(4, 1, |x, _| LumaA([(60 * x) as u8, (85 * x) as u8]));
        let out = decode(&png_bytes(&DynamicImage::ImageLumaA8(la.clone())), &Limits::default()).unwrap();
        for (x, _, p) in la.enumerate_pixels() {
            let v = over_white(f64::from(p[0]), f64::from(p[1]) / 255.0);
            assert_eq!(out.get_pixel(x, 0).0, [v; 3]);
        }

        let rgba16: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::from_fn(5, 1, |x, _| {
            Rgba([1000 * x as u16 + 3, 65535 - 9000 * x as u16, 40000, [65535, 0, 20000, 32768, 65000][x as usize]])
        });
        let out = decode(&png_bytes(&DynamicImage::ImageRgba16(rgba16.clone())), &Limits::default()).unwrap();
        for (x, _, p) in rgba16.enumerate_pixels() {
            let a = f64::from(p[3]) / 65535.0;
            let want: Vec<u8> = (0..3).map(|c| over_white(f64::from(p[c]) / 65535.0 * 255.0, a)).collect();
            assert_eq!(out.get_pixel(x, 0).0.to_vec(), want, "pixel {x} = {p:?}");
        }
    }

    /// A photo-like test picture: smooth gradients, soft blobs and a little texture.
    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            let blob = (-((u - 0.35).powi(2) + (v - 0.55).powi(2)) * 18.0).exp();
            let ring = ((u * 9.0).sin() * (v * 7.0).cos() + 1.0) * 0.5;
            let grain = ((x * 73 + y * 151 + x * y * 7) % 17) as f32 / 17.0;
            let r = 40.0 + 150.0 * u + 60.0 * blob + 6.0 * grain;
            let g = 30.0 + 120.0 * v + 50.0 * ring + 6.0 * grain;
            let b = 200.0 - 120.0 * blob - 40.0 * u + 6.0 * grain;
            Rgb([r.clamp(0.0, 255.0) as u8, g.clamp(0.0, 255.0) as u8, b.clamp(0.0, 255.0) as u8])
        })
    }

    #[test]
    fn dct_denominator_keeps_the_shorter_side_covered() {
        for (short, min_side, d) in [
            (1024, 128, 8),
            (1000, 128, 4),
            (256, 128, 2),
            (255, 128, 2),
            (254, 128, 1),
            (200, 128, 1),
            (64, 128, 1),
            (4000, 224, 8),
            (1500, 224, 4),
        ] {
            assert_eq!(dct_denominator(short, min_side), d, "short side {short}, min {min_side}");
            assert!(short.div_ceil(d) >= min_side || d == 1);
        }
    }

    #[test]
    fn large_jpeg_is_decoded_reduced_only_when_allowed() {
        let img = photo(1024, 768);
        let bytes = jpeg_bytes(&img);
        // 768 / 4 = 192 >= 128 > 768 / 8.
        let reduced = decode_for(&bytes, &Limits::default(), 128).unwrap();
        assert_eq!(reduced.dimensions(), (256, 192));
        assert_eq!(decode_for(&bytes, &Limits::default(), 400).unwrap().dimensions(), (1024, 768));
        let full = decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(full.dimensions(), (1024, 768));
        let off = Limits { jpeg_dct_scaling: false, ..Limits::default() };
        assert_eq!(decode_for(&bytes, &off, 128).unwrap(), full, "scaling off is the full decode, bit for bit");
        // Other formats are never reduced.
        let png = png_bytes(&DynamicImage::ImageRgb8(img.clone()));
        assert_eq!(decode_for(&png, &Limits::default(), 128).unwrap(), img);
        // Grey JPEGs take the reduced path too.
        let grey = DynamicImage::ImageRgb8(img).to_luma8();
        let mut grey_jpeg = Vec::new();
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut grey_jpeg, 95).encode_image(&grey).unwrap();
        let out = decode_for(&grey_jpeg, &Limits::default(), 128).unwrap();
        assert_eq!(out.dimensions(), (256, 192));
        assert!(out.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    /// The model input from a reduced decode against a full decode + the same resize, on the
    /// 0..1 scale: mean absolute difference <= 0.005 (1.3 levels of 255; 0.0009-0.0022 seen) and
    /// no value off by more than 0.03 (0.012 seen): the scaled inverse DCT low-passes each 8x8
    /// block before the resize filter does.
    #[test]
    fn reduced_decode_matches_full_decode_and_resize() {
        use crate::image::{Preprocess, to_tensor};
        for (w, h) in [(1024, 768), (2000, 1333), (640, 960)] {
            let bytes = jpeg_bytes(&photo(w, h));
            let p = Preprocess { size: 128, ..Preprocess::default() };
            let full = to_tensor(&decode(&bytes, &Limits::default()).unwrap(), &p);
            let reduced = to_tensor(&decode_for(&bytes, &Limits::default(), 128).unwrap(), &p);
            assert_eq!(full.shape(), reduced.shape());
            // Back to the 0..1 scale: x * std + mean per channel.
            let unit = |i: usize, v: f32| v * p.std[i / (128 * 128)] + p.mean[i / (128 * 128)];
            let diffs: Vec<f32> = full
                .iter()
                .zip(reduced.iter())
                .enumerate()
                .map(|(i, (a, b))| (unit(i, *a) - unit(i, *b)).abs())
                .collect();
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            let max = diffs.iter().copied().fold(0.0, f32::max);
            eprintln!("{w}x{h}: mean absolute difference {mean:.5}, max {max:.5}");
            assert!(mean <= 0.005 && max <= 0.03, "{w}x{h}: mean {mean}, max {max}");
        }
    }

    #[test]
    fn reduced_decode_applies_exif_orientation() {
        // 800 x 400 with the red quarter top left; orientation 6 (rotate 90 clockwise) puts it top right.
        let jpeg = with_exif_orientation(&jpeg_bytes(&asymmetric(800, 400)), 6);
        let full = decode(&jpeg, &Limits::default()).unwrap();
        let reduced = decode_for(&jpeg, &Limits::default(), 64).unwrap();
        assert_eq!(full.dimensions(), (400, 800));
        assert_eq!(reduced.dimensions(), (100, 200));
        assert!(is_red(reduced.get_pixel(90, 10)) && !is_red(reduced.get_pixel(10, 10)));
        assert!(is_red(full.get_pixel(360, 40)) && !is_red(full.get_pixel(40, 40)));
    }

    #[test]
    fn reduced_decode_keeps_the_full_paths_refusals_and_repairs() {
        // Over the pixel limit: refused with the header's dimensions, as decode does.
        assert!(matches!(
            decode_for(&jpeg_claiming(10_000, 10_000), &Limits::default(), 128),
            Err(Error::ImageTooManyPixels { width: 10_000, height: 10_000, .. })
        ));
        // Cut inside the scan data: whatever the reduced path makes of it, an image comes back
        // when the full decoder gives one, and a refusal stays a refusal.
        let bytes = jpeg_bytes(&photo(1024, 768));
        for cut in [bytes.len() / 2, bytes.len() - 100, 400, 40] {
            let part = &bytes[..cut];
            let (full, reduced) = (decode(part, &Limits::default()), decode_for(part, &Limits::default(), 128));
            if full.is_ok() {
                assert!(reduced.is_ok(), "cut at {cut}: {reduced:?}");
            }
        }
        // Garbage after a JPEG signature still fails cleanly.
        let mut junk = b"\xff\xd8\xff\xe0".to_vec();
        junk.extend(std::iter::repeat_n(0x5a, 5000));
        assert!(matches!(decode_for(&junk, &Limits::default(), 128), Err(Error::ImageDecode { .. })));
    }
}
