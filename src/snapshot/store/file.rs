//! [`FileStore`]: a snapshot store in a directory (`file:///DIR`).
//!
//! An object is a file at `DIR/<key>`. A put writes a temporary file beside the target
//! (named with a leading '.', which no key segment may have), fsyncs it, renames it over the
//! target and fsyncs the directory, so a crash leaves the old object or the new one, never
//! a torn one, and the new one survives once `put` returned.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ObjectInfo, SnapshotStore, StoreError, StoreUrl, check_key, check_list_prefix};

/// Prefix of the temporary files a put writes before renaming them into place.
const TMP_PREFIX: &str = ".put-";

/// A snapshot store in a local directory.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    url: String,
    /// Makes temporary file names unique among this process's concurrent puts.
    next_tmp: AtomicU64,
}

impl FileStore {
    /// The store in `dir` (absolute), created with its parents if missing.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the directory cannot be made or is not a directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
        let meta = fs::metadata(dir).map_err(|e| StoreError::io("inspect", dir, e))?;
        if !meta.is_dir() {
            return Err(StoreError::io(
                "use as a directory",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Ok(Self {
            root: dir.to_owned(),
            url: StoreUrl::File(dir.to_owned()).to_string(),
            next_tmp: AtomicU64::new(0),
        })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join(check_key(key)?))
    }

    /// Creates the directories of `key`'s parent under the root that are missing, fsyncing
    /// the directory each new one was made in so the new entry survives a crash.
    fn make_parents(&self, key: &str) -> Result<PathBuf, StoreError> {
        let mut dir = self.root.clone();
        let mut segments: Vec<&str> = key.split('/').collect();
        segments.pop();
        for segment in segments {
            let parent = dir.clone();
            dir.push(segment);
            match fs::create_dir(&dir) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("create directory", &dir, e)),
            }
        }
        Ok(dir)
    }

    /// Every file under `dir`, as keys relative to the root, into `out`.
    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("list", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue; // not a key this store wrote
            };
            if name.starts_with('.') {
                continue; // a put in progress (or a file no key names)
            }
            let kind = entry
                .file_type()
                .map_err(|e| StoreError::io("inspect", &path, e))?;
            if kind.is_dir() {
                self.walk(&path, prefix, out)?;
            } else if kind.is_file() {
                let key = key_of(&self.root, &path);
                if !key.starts_with(prefix) {
                    continue;
                }
                let meta = entry
                    .metadata()
                    .map_err(|e| StoreError::io("inspect", &path, e))?;
                let modified = meta
                    .modified()
                    .map_err(|e| StoreError::io("inspect", &path, e))?;
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified,
                });
            }
        }
        Ok(())
    }
}

/// The key of `path`, a file under `root` whose components are all UTF-8.
fn key_of(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

impl SnapshotStore for FileStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let target = self.path_of(key)?;
        let dir = self.make_parents(key)?;
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(body)?;
                f.sync_all()
            })
            .map_err(|e| StoreError::io("write", &tmp, e));
        if let Err(e) = written.and_then(|()| {
            fs::rename(&tmp, &target).map_err(|e| StoreError::io("rename into place", &target, e))
        }) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&dir)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key)?;
        fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound {
                key: key.to_owned(),
            },
            _ => StoreError::io("read", &path, e),
        })
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("inspect", &path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        check_list_prefix(prefix)?;
        // Start at the deepest directory the prefix names whole.
        let start = match prefix.rsplit_once('/') {
            Some((dirs, _)) => self.root.join(dirs),
            None => self.root.clone(),
        };
        let mut out = Vec::new();
        self.walk(&start, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("delete", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(&dir.path().join("snaps/new")).expect("open");
        (dir, store)
    }

    fn all_files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_dir() {
                out.extend(all_files(&entry.path()));
            } else {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }

    #[test]
    fn open_creates_the_directory_and_describes_it() {
        let (dir, store) = store();
        assert!(dir.path().join("snaps/new").is_dir());
        assert_eq!(
            store.describe(),
            format!("file://{}", dir.path().join("snaps/new").display())
        );
    }

    #[test]
    fn put_get_exists_delete() {
        let (_dir, store) = store();
        assert!(!store.exists("chunks/aa").expect("exists"));
        store.put("chunks/aa", b"first").expect("put");
        assert!(store.exists("chunks/aa").expect("exists"));
        assert_eq!(store.get("chunks/aa").expect("get"), b"first");
        store
            .put("chunks/aa", b"second, longer")
            .expect("overwrite");
        assert_eq!(store.get("chunks/aa").expect("get"), b"second, longer");
        store.put("empty", b"").expect("put empty");
        assert_eq!(store.get("empty").expect("get"), b"");
        store.delete("chunks/aa").expect("delete");
        assert!(!store.exists("chunks/aa").expect("exists"));
        store
            .delete("chunks/aa")
            .expect("deleting a missing object succeeds");
        assert!(!store.exists("chunks").expect("a directory is no object"));
    }

    #[test]
    fn a_missing_object_is_not_found_naming_the_key() {
        let (_dir, store) = store();
        match store.get("workspaces/ws-1/user/t.json") {
            Err(StoreError::NotFound { key }) => assert_eq!(key, "workspaces/ws-1/user/t.json"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn put_leaves_no_temporary_file() {
        let (dir, store) = store();
        for i in 0..5u8 {
            store.put("chunks/ab", &[i; 100]).expect("put");
        }
        store
            .put("workspaces/ws-1/user/t.json", b"{}")
            .expect("put");
        let mut files = all_files(dir.path());
        files.sort();
        assert_eq!(files, ["ab", "t.json"]);
    }

    #[test]
    fn list_is_sorted_filtered_by_prefix_and_skips_puts_in_progress() {
        let (dir, store) = store();
        for key in [
            "workspaces/ws-2/user/b.json",
            "chunks/bb",
            "workspaces/ws-1/root/a.json",
            "chunks/ab",
            "chunks/aa",
            "workspaces/ws-1/user/a.json",
        ] {
            store.put(key, key.as_bytes()).expect("put");
        }
        // A put that crashed before its rename.
        fs::write(dir.path().join("snaps/new/chunks/.put-1-0"), b"torn").expect("write");
        let keys = |p: &str| -> Vec<String> {
            store
                .list(p)
                .expect("list")
                .into_iter()
                .map(|o| o.key)
                .collect()
        };
        assert_eq!(keys("chunks/"), ["chunks/aa", "chunks/ab", "chunks/bb"]);
        assert_eq!(keys("chunks/a"), ["chunks/aa", "chunks/ab"]);
        assert_eq!(
            keys("workspaces/ws-1/"),
            ["workspaces/ws-1/root/a.json", "workspaces/ws-1/user/a.json"]
        );
        assert_eq!(keys("").len(), 6);
        assert!(keys("nothing/").is_empty());
        let info = &store.list("chunks/bb").expect("list")[0];
        assert_eq!(info.size, 9);
        assert!(info.modified <= std::time::SystemTime::now());
    }

    #[test]
    fn bad_keys_are_refused_before_touching_the_disk() {
        let (dir, store) = store();
        for bad in ["../escape", "/abs", "a//b", ".put-1-0"] {
            assert!(
                matches!(store.put(bad, b"x"), Err(StoreError::BadKey { .. })),
                "{bad}"
            );
            assert!(
                matches!(store.get(bad), Err(StoreError::BadKey { .. })),
                "{bad}"
            );
            assert!(
                matches!(store.delete(bad), Err(StoreError::BadKey { .. })),
                "{bad}"
            );
        }
        assert!(!dir.path().join("snaps/escape").exists());
    }

    #[test]
    fn concurrent_puts_of_one_key_all_land_whole() {
        let (_dir, store) = store();
        std::thread::scope(|s| {
            for i in 0..16u8 {
                let store = &store;
                s.spawn(move || {
                    for _ in 0..20 {
                        store.put("chunks/same", &[i; 4096]).expect("put");
                    }
                });
            }
        });
        let body = store.get("chunks/same").expect("get");
        assert_eq!(body.len(), 4096);
        assert!(body.iter().all(|&b| b == body[0]));
        assert_eq!(store.list("chunks/").expect("list").len(), 1);
    }
}
