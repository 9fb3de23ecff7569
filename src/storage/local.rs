//! The local-directory backend: images as files under one root directory, each written to a
//! temporary file in its final directory, flushed, then renamed into place, so a reader never
//! sees a partial image and a crash leaves either the old file or the new one.
//!
//! Temporary files are named `.{file}.{random}.tmp` beside their target; [`LocalStorage::list`]
//! skips them. Object metadata has no place here and is dropped; the content type is the
//! extension's.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::StorageError;
use super::key::{percent_decode, percent_encode_path};

/// The suffix of in-flight temporary files.
const TMP_SUFFIX: &str = ".tmp";

/// A directory that holds images. Paths are built only from validated keys (see
/// [`super::key`]), so nothing is ever read or written outside `root`.
#[derive(Debug)]
pub struct LocalStorage {
    /// Absolute and canonical, so `file://` URLs are stable wherever the worker runs from.
    root: PathBuf,
    /// `IMAGEGEN_PUBLIC_BASE_URL` without its trailing `/`, if set.
    public_base: Option<String>,
}

impl LocalStorage {
    /// Creates `dir` (and its parents) if missing and resolves it to an absolute path.
    pub async fn open(dir: &Path, public_base: Option<String>) -> Result<Self, StorageError> {
        let dir = dir.to_owned();
        blocking(move || {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
            let root = fs::canonicalize(&dir).map_err(io_err("resolve", &dir))?;
            Ok(LocalStorage { root, public_base })
        })
        .await
    }

    /// The absolute root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_for(&self, key: &str) -> PathBuf {
        // The key was validated by the caller: relative, no `.`/`..`, safe characters.
        self.root.join(key)
    }

    pub(super) async fn put(&self, key: &str, body: Bytes) -> Result<(), StorageError> {
        let path = self.path_for(key);
        blocking(move || write_atomically(&path, &body)).await
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path_for(key);
        let location = self.describe();
        let key = key.to_owned();
        blocking(move || match fs::read(&path) {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::NotFound { key, location })
            }
            Err(e) => Err(io_err("read", &path)(e)),
        })
        .await
    }

    pub(super) async fn get_stream(&self, key: &str) -> Result<super::ByteChunks, StorageError> {
        use futures::StreamExt as _;
        let path = self.path_for(key);
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(tokio_util::io::ReaderStream::new(f).boxed()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound {
                key: key.to_owned(),
                location: self.describe(),
            }),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub(super) fn has_public_base(&self) -> bool {
        self.public_base.is_some()
    }

    pub(super) async fn head(&self, key: &str) -> Result<super::ObjectInfo, StorageError> {
        let path = self.path_for(key);
        let location = self.describe();
        let owned_key = key.to_owned();
        let meta = blocking(move || match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(m),
            Ok(_) => Err(StorageError::NotFound {
                key: owned_key,
                location,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound {
                key: owned_key,
                location,
            }),
            Err(e) => Err(io_err("stat", &path)(e)),
        })
        .await?;
        Ok(super::ObjectInfo {
            content_type: content_type_of(key).map(str::to_owned),
            bytes: meta.len(),
            metadata: BTreeMap::new(),
            cache_control: None,
        })
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_for(key);
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &path)(e)),
        })
        .await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut keys = Vec::new();
            walk(&root, "", &mut keys)?;
            keys.retain(|k| k.starts_with(&prefix));
            Ok(keys)
        })
        .await
    }

    /// The `file://` URL of `key`.
    pub fn file_url(&self, key: &str) -> String {
        let path = self.path_for(key);
        format!("file://{}", percent_encode_path(&path.to_string_lossy()))
    }

    pub(super) fn url_for(&self, key: &str) -> String {
        match &self.public_base {
            Some(base) => format!("{base}/{key}"),
            None => self.file_url(key),
        }
    }

    pub(super) fn key_from_url(&self, url: &str) -> Option<String> {
        if let Some(base) = &self.public_base
            && let Some(key) = url
                .strip_prefix(base.as_str())
                .and_then(|r| r.strip_prefix('/'))
        {
            return Some(key.to_owned());
        }
        let path = percent_decode(url.strip_prefix("file://")?)?;
        let rel = Path::new(&path).strip_prefix(&self.root).ok()?;
        rel.to_str().map(str::to_owned)
    }

    pub(super) fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }
}

/// Writes `body` to a temporary file beside `path`, flushes it to disk, renames it over `path`
/// and flushes the directory, so the rename itself survives a crash.
fn write_atomically(path: &Path, body: &[u8]) -> Result<(), StorageError> {
    let dir = path.parent().ok_or_else(|| StorageError::Io {
        op: "write",
        path: path.to_owned(),
        source: io::Error::other("path has no parent directory"),
    })?;
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Random, so concurrent writers of the same key never share a temporary file.
    let tmp = dir.join(format!(".{name}.{:016x}{TMP_SUFFIX}", fastrand::u64(..)));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(body).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("flush", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        // Persist the directory entry; some file systems refuse to sync a directory, and the
        // file itself is already safe, so that failure is not worth failing the job over.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Collects the keys of all regular files under `dir`, skipping in-flight temporary files.
fn walk(dir: &Path, rel: &str, keys: &mut Vec<String>) -> Result<(), StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ty = entry.file_type().map_err(io_err("stat", &entry.path()))?;
        if ty.is_dir() {
            walk(&entry.path(), &key, keys)?;
        } else if ty.is_file() && !(name.starts_with('.') && name.ends_with(TMP_SUFFIX)) {
            keys.push(key);
        }
    }
    Ok(())
}

/// The content type for a key's extension, the inverse of `ImageFormat::extension`.
fn content_type_of(key: &str) -> Option<&'static str> {
    use crate::image::ImageFormat as F;
    let ext = key.rsplit_once('.')?.1;
    [F::Png, F::Jpeg, F::Webp, F::Gif]
        .into_iter()
        .find(|f| f.extension() == ext)
        .map(|f| f.content_type())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { op, path, source }
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(join) => Err(StorageError::Io {
            op: "run file-system task",
            path: PathBuf::new(),
            source: io::Error::other(join.to_string()),
        }),
    }
}
