//! The HPKE layer (`tern_core::keywrap`) against RFC 9180's published test vectors for the
//! suite Tern uses: base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.
//! `vectors/rfc9180-base-x25519-sha256-aes256gcm.json` is copied verbatim from the
//! specification's vector set (its `source` field says where from).

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR};
use serde::Deserialize;
use tern_core::keywrap::{open_base, seal_base, RecipientKey, RecipientSecret, WrapError};

#[derive(Deserialize)]
struct VectorFile {
    source: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Vector {
    mode: u8,
    kem_id: u16,
    kdf_id: u16,
    aead_id: u16,
    info: String,
    ikmE: String,
    skRm: String,
    pkRm: String,
    pkEm: String,
    enc: String,
    encryptions: Vec<Encryption>,
    exports: Vec<Export>,
}

#[derive(Deserialize)]
struct Encryption {
    aad: String,
    ct: String,
    pt: String,
}

#[derive(Deserialize)]
struct Export {
    exporter_context: String,
    #[serde(rename = "L")]
    len: usize,
    exported_value: String,
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector hex")
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().expect("32 bytes")
}

fn vectors() -> VectorFile {
    let bytes = include_bytes!("vectors/rfc9180-base-x25519-sha256-aes256gcm.json");
    serde_json::from_slice(bytes).expect("vector file parses")
}

#[test]
fn rfc9180_vectors_for_tern_suite() {
    let file = vectors();
    assert!(
        file.source.contains("9180") || file.source.contains("hpke"),
        "{}",
        file.source
    );
    assert!(!file.vectors.is_empty());
    for v in &file.vectors {
        assert_eq!((v.mode, v.kem_id, v.kdf_id, v.aead_id), (0, 0x20, 1, 2));
        assert!(!v.encryptions.is_empty());
        // The recipient's public key derived from its private key.
        let sk = RecipientSecret::from_bytes(&h32(&v.skRm)).unwrap();
        assert_eq!(sk.public(), &RecipientKey::from_bytes(h32(&v.pkRm)));
        // SealBase with the vector's ephemeral seed: the same enc and ciphertext, byte for byte.
        let first = &v.encryptions[0];
        let (enc, ct) = seal_base(sk.public(), &h(&v.info), &h(&first.aad), &h(&first.pt), &h32(&v.ikmE)).unwrap();
        assert_eq!(hex::encode(enc), v.enc);
        assert_eq!(v.enc, v.pkEm, "DHKEM's enc is the ephemeral public key");
        assert_eq!(hex::encode(&ct), first.ct);
        // OpenBase recovers the plaintext; one flipped bit anywhere is refused.
        assert_eq!(
            open_base(&sk, &h32(&v.enc), &h(&v.info), &h(&first.aad), &ct).unwrap(),
            h(&first.pt)
        );
        for i in [0, ct.len() / 2, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert_eq!(
                open_base(&sk, &h32(&v.enc), &h(&v.info), &h(&first.aad), &bad),
                Err(WrapError::Open)
            );
        }
        let mut enc_bad = h32(&v.enc);
        enc_bad[0] ^= 1;
        assert!(open_base(&sk, &enc_bad, &h(&v.info), &h(&first.aad), &ct).is_err());

        // The whole context (every sequence number, and the exporter) through the HPKE crate
        // Tern builds on, so its key schedule is checked beyond the first message.
        let skr = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&h(&v.skRm)).unwrap();
        let encapped = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&h(&v.enc)).unwrap();
        let mut ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &skr,
            &encapped,
            &h(&v.info),
        )
        .unwrap();
        for (seq, e) in v.encryptions.iter().enumerate() {
            let pt = ctx
                .open(&h(&e.ct), &h(&e.aad))
                .unwrap_or_else(|err| panic!("sequence {seq}: {err}"));
            assert_eq!(pt, h(&e.pt), "sequence {seq}");
        }
        for x in &v.exports {
            let mut out = vec![0u8; x.len];
            ctx.export(&h(&x.exporter_context), &mut out).unwrap();
            assert_eq!(hex::encode(out), x.exported_value);
        }
    }
}
