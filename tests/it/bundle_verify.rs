//! `stowage bundle verify` on bundles damaged on purpose (built here, byte
//! by byte): each refused with a message naming what is wrong, exit 1 (2
//! for a file that is not a tar at all).

use std::path::{Path, PathBuf};
use std::process::Output;

use sha2::{Digest, Sha256};

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Parts {
    layer: Vec<u8>,
    layer_digest: String,
    files: Vec<(String, Vec<u8>)>,
}

/// A one-image bundle: OCI manifest, config, one layer.
fn parts(index_digest_override: Option<&str>) -> Parts {
    let layer: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let diff = digest(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff}"]}}}}"#
    )
    .into_bytes();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{diff}","size":{}}}]}}"#,
        digest(&config),
        config.len(),
        layer.len()
    )
    .into_bytes();
    let target = index_digest_override.map_or_else(|| digest(&manifest), str::to_owned);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{target}","size":{},"annotations":{{"io.containerd.image.name":"r.example/t/app:1","org.opencontainers.image.ref.name":"1"}}}}]}}"#,
        manifest.len()
    )
    .into_bytes();
    let blob = |b: &[u8]| format!("blobs/sha256/{}", &digest(b)[7..]);
    Parts {
        layer_digest: diff.clone(),
        files: vec![
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), index),
            (blob(&manifest), manifest.clone()),
            (blob(&config), config.clone()),
            (blob(&layer), layer.clone()),
        ],
        layer,
    }
}

/// A tar of `files`; names written raw (so `../` and `/` can be).
fn tar(dir: &Path, name: &str, files: &[(String, Vec<u8>)], symlink: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    for (n, data) in files {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..n.len()].copy_from_slice(n.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    if let Some(target) = symlink {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_path("repositories").unwrap();
        h.set_link_name(target).unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    b.finish().unwrap();
    path
}

fn verify(path: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("bundle")
        .arg("verify")
        .arg(path)
        .args(extra)
        .output()
        .unwrap()
}

fn said(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_sound_bundle_is_valid_and_pinned_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let p = parts(None);
    let file = tar(dir.path(), "ok.tar", &p.files, None);
    let ok = verify(&file, &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", said(&ok));
    let index = &p.files[1].1;
    assert!(said(&ok).contains(&digest(index)), "{}", said(&ok));
    assert!(said(&ok).contains("r.example/t/app:1"), "{}", said(&ok));
    let pinned = verify(&file, &["--expect", &digest(index)]);
    assert_eq!(pinned.status.code(), Some(0), "{}", said(&pinned));
    let other = verify(&file, &["--expect", &digest(b"other")]);
    assert_eq!(other.status.code(), Some(1), "{}", said(&other));
    assert!(
        said(&other).contains("not the expected one"),
        "{}",
        said(&other)
    );
}

#[test]
fn a_flipped_byte_names_the_layer_and_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = parts(None);
    p.files[4].1[1000] ^= 1;
    let file = tar(dir.path(), "flip.tar", &p.files, None);
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    let text = said(&o);
    assert!(
        text.contains(&p.layer_digest) && text.contains("hash to"),
        "{text}"
    );
    assert!(text.contains("breaks r.example/t/app:1"), "{text}");
}

#[test]
fn a_truncated_file_names_the_blob_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let p = parts(None);
    let file = tar(dir.path(), "cut.tar", &p.files, None);
    let bytes = std::fs::read(&file).unwrap();
    // Cut halfway through the layer (the last entry).
    let at = bytes.len() - 1024 - 512 * 2 - p.layer.len() / 2;
    std::fs::write(&file, &bytes[..at]).unwrap();
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    assert!(
        said(&o).contains(&p.layer_digest) && said(&o).contains("cut short"),
        "{}",
        said(&o)
    );
}

#[test]
fn a_missing_blob_is_named_with_the_image_it_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = parts(None);
    p.files.remove(4);
    let file = tar(dir.path(), "missing.tar", &p.files, None);
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    let text = said(&o);
    assert!(
        text.contains(&p.layer_digest) && text.contains("missing"),
        "{text}"
    );
    assert!(text.contains("r.example/t/app:1"), "{text}");
}

#[test]
fn an_index_pointing_outside_the_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = parts(Some("sha256:../../../../etc/passwd"));
    let file = tar(dir.path(), "outside.tar", &p.files, None);
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    assert!(
        said(&o).contains("not a blob of the layout"),
        "{}",
        said(&o)
    );
}

#[test]
fn path_traversal_absolute_names_and_links_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, why) in [
        ("../evil", "climbs out"),
        ("blobs/../../evil", "climbs out"),
        ("/etc/cron.d/evil", "absolute"),
        ("blobs/sha256/evil", "no place in a bundle"),
    ] {
        let mut p = parts(None);
        p.files.push((name.to_owned(), b"x".to_vec()));
        let file = tar(dir.path(), "trav.tar", &p.files, None);
        let o = verify(&file, &[]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", said(&o));
        assert!(
            said(&o).contains(why) && said(&o).contains("refused"),
            "{name}: {}",
            said(&o)
        );
    }
    let p = parts(None);
    let file = tar(dir.path(), "link.tar", &p.files, Some("/etc/shadow"));
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    assert!(said(&o).contains("symbolic link"), "{}", said(&o));
}

#[test]
fn a_file_that_is_not_a_tar_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("junk.tar");
    std::fs::write(&file, vec![0x42u8; 3000]).unwrap();
    let o = verify(&file, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", said(&o));
    let gone = verify(&dir.path().join("absent.tar"), &[]);
    assert_eq!(gone.status.code(), Some(2), "{}", said(&gone));
}
