//! Thumbnails of image outputs: made once, on the server, kept beside the
//! output as `.thumb-SIZE-NAME`.
//!
//! Why on the server and cached: a list of fifty finished shots must not
//! pull fifty 4096×4096 PNGs into a browser, and decoding one costs a CPU
//! core for a second, so each size of each output is decoded once, off the
//! async runtime, a few at a time. Retention deletes them with their output
//! (`retention::output_files` matches the name).

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use tokio::sync::Semaphore;

/// The sizes a thumbnail may have (its longer side, in pixels): bounded, so
/// a client cannot fill the disk with one copy per pixel count.
pub const SIZES: &[u32] = &[64, 128, 256, 512];

/// The content type thumbnails are served with.
pub const CONTENT_TYPE: &str = "image/jpeg";

/// The outputs this build decodes into thumbnails, by content type: what
/// ComfyUI's own save nodes write (PNG; WebP and GIF for animations, as
/// `SaveAnimatedWEBP` and video nodes' previews; JPEG from custom nodes).
/// A job list's `preview` is chosen among these only, so a list never
/// points at a thumbnail that cannot be made.
pub const PICTURES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/gif"];

/// Whether an output of this content type has thumbnails.
pub fn of_a_picture(content_type: &str) -> bool {
    PICTURES.contains(&content_type)
}

/// Largest decoded image a thumbnail is made from (a decompression bomb is
/// refused, not allocated).
const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Decodes at once (each may hold a large image in memory).
static DECODERS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(2));

/// Why no thumbnail could be made.
#[derive(Debug, thiserror::Error)]
pub enum ThumbError {
    /// The output is not a picture this build can decode.
    #[error("cannot make a thumbnail of this output: {0}")]
    NotAnImage(String),
    /// Reading or writing failed.
    #[error("thumbnail: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the thumbnail of `name` at `size` is kept.
pub fn path(dir: &Path, name: &str, size: u32) -> PathBuf {
    dir.join(format!(".thumb-{size}-{name}"))
}

/// The thumbnail of output `name` in `dir` at `size` (one of [`SIZES`]):
/// the cached file, made first when missing.
pub async fn get(dir: &Path, name: &str, size: u32) -> Result<PathBuf, ThumbError> {
    let thumb = path(dir, name, size);
    if tokio::fs::try_exists(&thumb).await? {
        return Ok(thumb);
    }
    let _permit = DECODERS.acquire().await.expect("never closed");
    // Another request may have made it while this one waited.
    if tokio::fs::try_exists(&thumb).await? {
        return Ok(thumb);
    }
    let source = dir.join(name);
    let target = thumb.clone();
    tokio::task::spawn_blocking(move || make(&source, &target, size))
        .await
        .map_err(|e| ThumbError::Io(std::io::Error::other(e)))??;
    Ok(thumb)
}

/// Decodes, scales (keeping the aspect ratio) and writes a JPEG under a
/// temporary name, renamed when complete: no half thumbnail is ever served.
fn make(source: &Path, target: &Path, size: u32) -> Result<(), ThumbError> {
    let mut reader = image::ImageReader::open(source)?
        .with_guessed_format()
        .map_err(ThumbError::Io)?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let picture = reader
        .decode()
        .map_err(|e| ThumbError::NotAnImage(e.to_string()))?;
    let small = picture.thumbnail(size, size).to_rgb8();
    let part = PathBuf::from(format!("{}.part", target.display()));
    {
        let file = std::fs::File::create(&part)?;
        let mut out = std::io::BufWriter::new(file);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82)
            .encode_image(&small)
            .map_err(|e| ThumbError::Io(std::io::Error::other(e)))?;
        std::io::Write::flush(&mut out)?;
    }
    std::fs::rename(&part, target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_picture_becomes_a_small_jpeg_once() {
        let dir = tempfile::tempdir().unwrap();
        let big = image::RgbaImage::from_pixel(2048, 1024, image::Rgba([200, 30, 30, 255]));
        big.save(dir.path().join("shot.png")).unwrap();
        let thumb = get(dir.path(), "shot.png", 128).await.unwrap();
        assert_eq!(thumb, dir.path().join(".thumb-128-shot.png"));
        let made = image::load_from_memory(&std::fs::read(&thumb).unwrap()).unwrap();
        assert_eq!((made.width(), made.height()), (128, 64));
        let first = std::fs::metadata(&thumb).unwrap().modified().unwrap();
        get(dir.path(), "shot.png", 128).await.unwrap();
        assert_eq!(
            std::fs::metadata(&thumb).unwrap().modified().unwrap(),
            first
        );
        // Retention finds it as a file of that output.
        let files = crate::retention::output_files(
            dir.path().parent().unwrap(),
            dir.path().file_name().unwrap().to_str().unwrap(),
            "shot.png",
        );
        assert!(files.contains(&thumb), "{files:?}");
    }

    #[tokio::test]
    async fn an_animation_becomes_a_still_of_its_first_frame() {
        let dir = tempfile::tempdir().unwrap();
        let red = image::RgbaImage::from_pixel(300, 150, image::Rgba([220, 0, 0, 255]));
        // WebP as SaveAnimatedWEBP writes it (lossless), and a GIF.
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(red.as_raw(), 300, 150, image::ExtendedColorType::Rgba8)
            .unwrap();
        std::fs::write(dir.path().join("anim.webp"), webp).unwrap();
        let mut gif = Vec::new();
        {
            let mut e = image::codecs::gif::GifEncoder::new(&mut gif);
            e.encode_frame(image::Frame::new(red.clone())).unwrap();
            e.encode_frame(image::Frame::new(red)).unwrap();
        }
        std::fs::write(dir.path().join("loop.gif"), gif).unwrap();
        for name in ["anim.webp", "loop.gif"] {
            let thumb = get(dir.path(), name, 64).await.unwrap();
            let made = image::load_from_memory(&std::fs::read(&thumb).unwrap()).unwrap();
            assert_eq!((made.width(), made.height()), (64, 32), "{name}");
            let px = made.to_rgb8().get_pixel(10, 10).0;
            assert!(px[0] > 180 && px[1] < 40, "{name}: {px:?}");
        }
        for t in ["image/webp", "image/gif", "image/png", "image/jpeg"] {
            assert!(of_a_picture(t), "{t}");
        }
        for t in ["video/mp4", "image/tiff", "audio/flac"] {
            assert!(!of_a_picture(t), "{t}");
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_picture_is_said_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.png"), b"not a picture").unwrap();
        let e = get(dir.path(), "notes.png", 64).await.unwrap_err();
        assert!(matches!(e, ThumbError::NotAnImage(_)), "{e}");
        assert!(!path(dir.path(), "notes.png", 64).exists());
    }
}
