#!/usr/bin/env python3
"""Generate signed TUF fixture repositories with python-tuf's Metadata API.

Usage: make_fixtures.py [OUT_DIR]     (default: <repo>/tests/fixtures/python-tuf)

Each scenario becomes OUT_DIR/<scenario>/ laid out as a python-tuf repository is
published with consistent snapshots:

    metadata/1.root.json, 2.root.json, ...   every root version
    metadata/timestamp.json
    metadata/N.snapshot.json, N.targets.json, N.<delegated role>.json
    targets/<dir>/<hash>.<basename>           one copy per listed hash
    scenario.json                             what a client should conclude

Metadata is built with tuf.api.metadata, signed with securesystemslib
CryptoSigners over the canonical JSON of "signed" (Metadata.sign), and written
with JSONSerializer(compact=False), as python-tuf's own repository tooling does.
The "bad" scenarios get their defect from the smallest possible edit, after
python-tuf has produced otherwise valid metadata.

Keys are freshly generated on every run, so regenerating rewrites every file;
the repositories are equivalent, not byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Key,
    MetaFile,
    Metadata,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

VALID_EXPIRES = datetime(2100, 1, 1, tzinfo=timezone.utc)
PAST_EXPIRES = datetime(2020, 1, 1, tzinfo=timezone.utc)
REFERENCE_TIME = "2026-11-22T00:00:00Z"
TOP_LEVEL_ROLES = ("root", "timestamp", "snapshot", "targets")

# python-tuf publishes pretty-printed JSON; signatures cover the canonical
# form of "signed", never the file bytes.
SERIALIZER = JSONSerializer(compact=False)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "python-tuf"

REGENERATE_CMD = (
    "interop/setup-venv.sh target/interop-venv && "
    "target/interop-venv/bin/python interop/make_fixtures.py"
)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def ed25519() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def keyid_for(key_dict: dict[str, Any]) -> str:
    """TUF keyid: sha256 of the canonical JSON of the full key object."""
    return hashlib.sha256(encode_canonical(key_dict).encode("utf-8")).hexdigest()


def ed25519_with_fields(
    private_key: Ed25519PrivateKey, extra: dict[str, Any]
) -> CryptoSigner:
    """ed25519 signer whose public key object carries unrecognized fields.

    The keyid is computed over the whole key dict, extra fields included, so
    it is the correct keyid for the key object as published (securesystemslib
    would only hash keytype/scheme/keyval).
    """
    base = SSlibKey.from_crypto(private_key.public_key())
    key_dict = {**base.to_dict(), **extra}
    key = SSlibKey(
        keyid_for(key_dict), base.keytype, base.scheme, dict(base.keyval), dict(extra)
    )
    return CryptoSigner(private_key, key)


def det_bytes(label: str, length: int) -> bytes:
    """Deterministic pseudo-random content (a sha256 counter stream)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def tern_custom(version: str = "1.2.3", device_type: str = "sim-x86") -> dict[str, Any]:
    return {"tern": {"version": version, "device_type": device_type, "hardware": ["rev-a"]}}


def dump_json(data: dict[str, Any]) -> bytes:
    """Serialize a hand-edited envelope exactly like JSONSerializer(compact=False)."""
    return json.dumps(data, indent=1, separators=(",", ": "), sort_keys=True).encode("utf-8")


def flip_hex_digit(hex_str: str, index: int = 0) -> str:
    flipped = format(int(hex_str[index], 16) ^ 0x1, "x")
    return hex_str[:index] + flipped + hex_str[index + 1 :]


# --------------------------------------------------------------------------
# Repository builder
# --------------------------------------------------------------------------

Tamper = Callable[[dict[str, Any]], None]


class Repo:
    """One published repository, built and signed with python-tuf.

    Hooks for the bad scenarios (all keyed by role name):
      sign_with      sign with these signers instead of all of the role's keys
      tamper         edit the envelope dict after signing, before writing
      file_version   publish N.<role>.json under (and list in snapshot with) a
                     version other than the one the metadata claims
      snapshot_hashes  roles listed in snapshot with length + sha256
    """

    def __init__(self, out_dir: Path, consistent_snapshot: bool = True):
        self.dir = out_dir
        self.metadata_dir = out_dir / "metadata"
        self.targets_dir = out_dir / "targets"
        self.consistent_snapshot = consistent_snapshot

        self.root = Metadata(Root(expires=VALID_EXPIRES, consistent_snapshot=consistent_snapshot))
        self.timestamp = Metadata(Timestamp(expires=VALID_EXPIRES))
        self.snapshot = Metadata(Snapshot(expires=VALID_EXPIRES))
        self.targets = Metadata(Targets(expires=VALID_EXPIRES))
        # Delegated targets roles, in creation order.
        self.delegated: dict[str, Metadata[Targets]] = {}

        self.signers: dict[str, list[CryptoSigner]] = {}
        self.sign_with: dict[str, list[CryptoSigner]] = {}
        self.tamper: dict[str, Tamper] = {}
        self.file_version: dict[str, int] = {}
        self.snapshot_hashes: set[str] = set()

        self.target_data: dict[str, bytes] = {}
        self.published: dict[str, bytes] = {}  # role -> last bytes written
        self._written_roots: set[int] = set()

    # -- keys and roles ----------------------------------------------------

    def add_top_key(self, role: str, signer: CryptoSigner) -> None:
        self.root.signed.add_key(signer.public_key, role)
        self.signers.setdefault(role, []).append(signer)

    def role_md(self, role: str) -> Metadata:
        if role in TOP_LEVEL_ROLES:
            return getattr(self, role)
        return self.delegated[role]

    def delegate(
        self, parent: str, role: DelegatedRole, signers: list[CryptoSigner]
    ) -> Metadata[Targets]:
        """Delegate from `parent` to `role` (keyids are filled in from signers)."""
        parent_md = self.role_md(parent)
        if parent_md.signed.delegations is None:
            parent_md.signed.delegations = Delegations(keys={}, roles={})
        parent_md.signed.delegations.roles[role.name] = role
        for signer in signers:
            parent_md.signed.add_key(signer.public_key, role.name)
        self.signers[role.name] = list(signers)
        md = Metadata(Targets(expires=VALID_EXPIRES))
        self.delegated[role.name] = md
        return md

    def delegate_succinct(
        self, bit_length: int, name_prefix: str, signers: list[CryptoSigner], threshold: int = 1
    ) -> SuccinctRoles:
        """Hash-bin delegation from top-level targets; every bin gets metadata."""
        succinct = SuccinctRoles([], threshold, bit_length, name_prefix)
        self.targets.signed.delegations = Delegations(keys={}, succinct_roles=succinct)
        for signer in signers:
            self.targets.signed.add_key(signer.public_key)  # role=None: succinct
        for bin_name in succinct.get_roles():
            self.signers[bin_name] = list(signers)
            self.delegated[bin_name] = Metadata(Targets(expires=VALID_EXPIRES))
        return succinct

    # -- targets -------------------------------------------------------------

    def add_target(
        self,
        path: str,
        data: bytes,
        role: str = "targets",
        hash_algorithms: list[str] | None = None,
        custom: dict[str, Any] | None = None,
    ) -> TargetFile:
        info = TargetFile.from_data(path, data, hash_algorithms)
        return self.add_target_info(info, data, role, custom)

    def add_target_info(
        self, info: TargetFile, data: bytes, role: str = "targets",
        custom: dict[str, Any] | None = None,
    ) -> TargetFile:
        info.unrecognized_fields["custom"] = custom if custom is not None else tern_custom()
        self.role_md(role).signed.targets[info.path] = info
        self.target_data[info.path] = data
        return info

    def published_target_paths(self, path: str) -> list[Path]:
        """Where target `path` is (or will be) published, one per hash."""
        info = self._find_target(path)
        names = info.get_prefixed_paths() if self.consistent_snapshot else [info.path]
        paths = []
        for name in names:
            dest = (self.targets_dir / name).resolve()
            # Only bad-target-name's "../escape.txt" leaves targets/; it still
            # must stay inside the scenario directory.
            if not dest.is_relative_to(self.dir.resolve()):
                raise ValueError(f"target {path!r} would be published outside {self.dir}")
            paths.append(dest)
        return paths

    def _find_target(self, path: str) -> TargetFile:
        for md in [self.targets, *self.delegated.values()]:
            if path in md.signed.targets:
                return md.signed.targets[path]
        raise KeyError(path)

    # -- signing and writing -------------------------------------------------

    def _sign(self, md: Metadata, role: str, signers: list[CryptoSigner] | None) -> None:
        if signers is None:
            signers = self.sign_with.get(role, self.signers.get(role, []))
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _serialize(self, md: Metadata, role: str) -> bytes:
        if role not in self.tamper:
            return SERIALIZER.serialize(md)
        envelope = md.to_dict()
        self.tamper[role](envelope)
        return dump_json(envelope)

    def _write(self, filename: str, data: bytes) -> None:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        (self.metadata_dir / filename).write_bytes(data)

    def write_root(self, signers: list[CryptoSigner] | None = None) -> bytes:
        """Sign the current root version and write it as N.root.json."""
        version = self.root.signed.version
        self._sign(self.root, "root", signers)
        data = self._serialize(self.root, "root")
        self._write(f"{version}.root.json", data)
        self._written_roots.add(version)
        self.published["root"] = data
        return data

    def role_filename(self, role: str) -> str:
        if role == "timestamp" or not self.consistent_snapshot:
            return f"{role}.json"
        version = self.file_version.get(role, self.role_md(role).signed.version)
        return f"{version}.{role}.json"

    def write_role(self, role: str, signers: list[CryptoSigner] | None = None) -> bytes:
        md = self.role_md(role)
        self._sign(md, role, signers)
        data = self._serialize(md, role)
        self._write(self.role_filename(role), data)
        self.published[role] = data
        return data

    def publish(self) -> None:
        """Write root (unless already written), targets, snapshot, timestamp, files."""
        if self.root.signed.version not in self._written_roots:
            self.write_root()

        meta: dict[str, MetaFile] = {}
        for role in ["targets", *self.delegated]:
            data = self.write_role(role)
            version = self.file_version.get(role, self.role_md(role).signed.version)
            if role in self.snapshot_hashes:
                meta[f"{role}.json"] = MetaFile.from_data(version, data, ["sha256"])
            else:
                meta[f"{role}.json"] = MetaFile(version=version)
        self.snapshot.signed.meta = meta
        snapshot_data = self.write_role("snapshot")

        self.timestamp.signed.snapshot_meta = MetaFile.from_data(
            self.snapshot.signed.version, snapshot_data, ["sha256"]
        )
        self.write_role("timestamp")

        for path, data in self.target_data.items():
            for dest in self.published_target_paths(path):
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)


def standard_repo(out_dir: Path) -> Repo:
    """Repository with one fresh ed25519 key per top-level role."""
    repo = Repo(out_dir)
    for role in TOP_LEVEL_ROLES:
        repo.add_top_key(role, ed25519())
    return repo


def hello(repo: Repo) -> None:
    repo.add_target("hello.txt", b"Hello from Tern!\n")


# --------------------------------------------------------------------------
# Scenarios: each builds and publishes a repository in `d` and returns the
# scenario.json fields it decides (description, targets, expect, ...).
# --------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def scenario(name: str):
    def register(fn: Callable[[Path], dict[str, Any]]):
        SCENARIOS[name] = fn
        return fn

    return register


def error(variant: str, role: str) -> dict[str, str]:
    return {"error": variant, "role": role}


# -- valid ------------------------------------------------------------------


@scenario("basic-ed25519")
def basic_ed25519(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    repo.add_target("images/rootfs.img", det_bytes("rootfs", 5 * 1024),
                    custom=tern_custom("2.0.0"))
    # Distinct versions per role so a client that mixes them up fetches a
    # file that does not exist.
    repo.targets.signed.version = 2
    repo.snapshot.signed.version = 3
    repo.timestamp.signed.version = 4
    repo.publish()
    return {
        "description": "ed25519 keys for every role, two targets (one in a "
                       "subdirectory), targets/snapshot/timestamp at versions 2/3/4.",
        "targets": ["hello.txt", "images/rootfs.img"],
        "expect": "ok",
    }


@scenario("ecdsa-rsa-keys")
def ecdsa_rsa_keys(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    repo.add_top_key("root", CryptoSigner.generate_ecdsa())  # ecdsa-sha2-nistp256
    repo.add_top_key("targets", CryptoSigner.generate_rsa(scheme="rsassa-pss-sha256", size=3072))
    repo.add_top_key("snapshot", CryptoSigner.generate_ecdsa())
    repo.add_top_key("timestamp", CryptoSigner.generate_ed25519())
    repo.add_target("firmware/app.bin", det_bytes("ecdsa-rsa app", 3000))
    repo.publish()
    return {
        "description": "root and snapshot keys ecdsa-sha2-nistp256, targets key "
                       "rsassa-pss-sha256 (RSA 3072), timestamp key ed25519.",
        "targets": ["firmware/app.bin"],
        "expect": "ok",
    }


@scenario("delegation")
def delegation(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    repo.add_target("top.txt", b"listed directly by top-level targets\n")

    # A wildcard never matches "/" (TUF spec, python-tuf), so product-a also
    # needs "products/a/*/*" to be trusted for the nested beta path at all.
    product_keys = [ed25519() for _ in range(3)]
    product_a = DelegatedRole("product-a", [], 2, False,
                              paths=["products/a/*", "products/a/*/*"])
    repo.delegate("targets", product_a, product_keys)
    repo.sign_with["product-a"] = product_keys[:2]
    repo.delegated["product-a"].signed.version = 2
    repo.add_target("products/a/app.bin", det_bytes("product-a app", 2048), role="product-a")

    beta = DelegatedRole("product-a-beta", [], 1, True, paths=["products/a/beta/*"])
    repo.delegate("product-a", beta, [ed25519()])
    repo.add_target("products/a/beta/app.bin", det_bytes("product-a beta app", 2100),
                    role="product-a-beta", custom=tern_custom("1.3.0-beta.1"))

    hashed_path = "hashed/x.bin"
    prefix = hashlib.sha256(hashed_path.encode()).hexdigest()[:2]
    by_hash = DelegatedRole("by-hash", [], 1, False, path_hash_prefixes=[prefix])
    repo.delegate("targets", by_hash, [ed25519()])
    repo.add_target(hashed_path, det_bytes("hashed x", 777), role="by-hash")

    repo.publish()
    return {
        "description": "targets delegates products/a/* (+ products/a/*/*) to product-a "
                       "(2-of-3 keys), which delegates products/a/beta/* to terminating "
                       f"product-a-beta; by-hash is delegated path_hash_prefixes [\"{prefix}\"].",
        "targets": ["products/a/app.bin", "products/a/beta/app.bin", hashed_path, "top.txt"],
        "expect": "ok",
    }


@scenario("succinct-delegation")
def succinct_delegation(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    succinct = repo.delegate_succinct(4, "bin", [ed25519()])
    paths = ["fleet/alpha.bin", "fleet/beta.bin", "models/gamma.onnx"]
    bins = {}
    for i, path in enumerate(paths):
        bins[path] = succinct.get_role_for_target(path)
        repo.add_target(path, det_bytes(path, 1000 + i), role=bins[path])
    repo.publish()
    placed = ", ".join(f"{p} in {b}" for p, b in bins.items())
    return {
        "description": "targets delegates via succinct_roles (bit_length 4, prefix "
                       f"\"bin\", bins bin-0..bin-f, 1 key); {placed}.",
        "targets": paths,
        "expect": "ok",
    }


@scenario("rotated-root")
def rotated_root(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    root = repo.root.signed
    old = repo.signers["root"][0]
    repo.write_root()  # 1.root.json

    # v2: one old key -> two new keys, threshold 2; signed by old and new.
    new1, new2 = ed25519(), ed25519()
    root.version = 2
    root.revoke_key(old.public_key.keyid, "root")
    root.add_key(new1.public_key, "root")
    root.add_key(new2.public_key, "root")
    root.roles["root"].threshold = 2
    repo.write_root([old, new1, new2])

    # v3: new2 -> new3; signed by 2 of v2's keys and 2 of v3's keys.
    new3 = ed25519()
    root.version = 3
    root.revoke_key(new2.public_key.keyid, "root")
    root.add_key(new3.public_key, "root")
    repo.signers["root"] = [new1, new3]
    repo.write_root([new1, new2, new3])

    repo.publish()
    return {
        "description": "root rotates 1 -> 2 (one key replaced by two, threshold 2) -> 3 "
                       "(one of those keys replaced); client starts from 1.root.json.",
        "targets": ["hello.txt"],
        "expect": "ok",
    }


@scenario("threshold-2of3")
def threshold_2of3(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    for role in ("root", "snapshot", "timestamp"):
        repo.add_top_key(role, ed25519())
    keys = [ed25519() for _ in range(3)]
    for key in keys:
        repo.add_top_key("targets", key)
    repo.root.signed.roles["targets"].threshold = 2
    repo.sign_with["targets"] = keys[:2]
    hello(repo)
    repo.publish()
    return {
        "description": "targets role has 3 keys, threshold 2; targets.json is signed "
                       "by exactly 2 of them.",
        "targets": ["hello.txt"],
        "expect": "ok",
    }


@scenario("unknown-fields")
def unknown_fields(d: Path) -> dict[str, Any]:
    vendor = {"x-vendor": {"a": [1, "b"]}}
    repo = Repo(d)
    for role in ("root", "snapshot", "timestamp"):
        repo.add_top_key(role, ed25519())
    # Key objects carrying an unknown field; their keyids cover that field.
    repo.add_top_key("targets", ed25519_with_fields(Ed25519PrivateKey.generate(), vendor))
    repo.root.signed.unrecognized_fields.update(vendor)

    repo.targets.signed.unrecognized_fields.update(vendor)
    hello(repo)
    repo.targets.signed.targets["hello.txt"].unrecognized_fields.update(vendor)

    role = DelegatedRole("vendor", [], 1, False, paths=["vendor/*"],
                         unrecognized_fields=dict(vendor))
    repo.delegate("targets", role,
                  [ed25519_with_fields(Ed25519PrivateKey.generate(), vendor)])
    repo.targets.signed.delegations.unrecognized_fields.update(vendor)
    repo.delegated["vendor"].signed.unrecognized_fields.update(vendor)
    repo.add_target("vendor/blob.bin", det_bytes("vendor blob", 1500), role="vendor")
    repo.publish()
    return {
        "description": "unrecognized \"x-vendor\" fields in root and targets signed, in key "
                       "objects (keyids cover them), delegations, a delegated role and a "
                       "target entry; signatures are over them.",
        "targets": ["hello.txt", "vendor/blob.bin"],
        "expect": "ok",
    }


@scenario("sha512-hashes")
def sha512_hashes(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    with tempfile.TemporaryDirectory() as tmp:
        for path, data in [("notes.txt", b"sha256 and sha512 listed\n"),
                           ("bundles/update.tar", det_bytes("bundle", 4096))]:
            local = Path(tmp) / path.replace("/", "_")
            local.write_bytes(data)
            info = TargetFile.from_file(path, str(local), ["sha256", "sha512"])
            repo.add_target_info(info, data)
    repo.publish()  # publishes each file under both the sha256 and sha512 name
    return {
        "description": "targets list sha256 and sha512 hashes; each file is published "
                       "as <sha256>.<name> and as <sha512>.<name>.",
        "targets": ["notes.txt", "bundles/update.tar"],
        "expect": "ok",
    }


# -- bad ------------------------------------------------------------------------


@scenario("bad-signature")
def bad_signature(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)

    def corrupt(envelope: dict[str, Any]) -> None:
        sig = envelope["signatures"][0]
        sig["sig"] = flip_hex_digit(sig["sig"])

    repo.tamper["targets"] = corrupt
    repo.publish()
    return {
        "description": "targets.json's only signature has one hex digit flipped "
                       "(threshold 1).",
        "targets": ["hello.txt"],
        "expect": error("BadSignature", "targets"),
    }


@scenario("below-threshold")
def below_threshold(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    for role in ("root", "snapshot", "timestamp"):
        repo.add_top_key(role, ed25519())
    keys = [ed25519(), ed25519()]
    for key in keys:
        repo.add_top_key("targets", key)
    repo.root.signed.roles["targets"].threshold = 2
    repo.sign_with["targets"] = keys[:1]
    hello(repo)
    repo.publish()
    return {
        "description": "targets threshold is 2 of 2 keys but targets.json carries one "
                       "valid signature.",
        "targets": ["hello.txt"],
        "expect": error("BelowThreshold", "targets"),
    }


@scenario("key-counted-twice")
def key_counted_twice(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    for role in ("root", "snapshot", "timestamp"):
        repo.add_top_key(role, ed25519())
    # The same public key twice: the second key object differs only by an
    # unknown field, so it gets its own (correctly computed) keyid.
    private_key = Ed25519PrivateKey.generate()
    first = CryptoSigner(private_key)
    second = ed25519_with_fields(private_key, {"x-dup": 1})
    assert first.public_key.keyid != second.public_key.keyid
    repo.add_top_key("targets", first)
    repo.add_top_key("targets", second)
    repo.root.signed.roles["targets"].threshold = 2
    hello(repo)
    repo.publish()
    return {
        "description": "root lists one ed25519 public key under two keyids (second copy "
                       "has an extra \"x-dup\" field), targets threshold 2; targets.json "
                       "has a signature for each keyid, i.e. one distinct key.",
        "targets": ["hello.txt"],
        "expect": error("BelowThreshold", "targets"),
    }


@scenario("duplicate-signature")
def duplicate_signature(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    # python-tuf keeps signatures in a keyid-keyed dict, so the duplicate
    # can only be made by editing the envelope.
    repo.tamper["targets"] = lambda env: env["signatures"].append(dict(env["signatures"][0]))
    repo.publish()
    return {
        "description": "targets.json's signatures array holds the same valid signature "
                       "entry twice.",
        "targets": ["hello.txt"],
        "expect": error("DuplicateSignature", "targets"),
    }


@scenario("wrong-role-type")
def wrong_role_type(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    repo.publish()
    # Replace timestamp.json with a Snapshot-typed object with timestamp-like
    # content, validly signed by the timestamp key.
    impostor = Metadata(Snapshot(
        version=repo.timestamp.signed.version,
        expires=VALID_EXPIRES,
        meta={"snapshot.json": repo.timestamp.signed.snapshot_meta},
    ))
    impostor.sign(repo.signers["timestamp"][0])
    (repo.metadata_dir / "timestamp.json").write_bytes(SERIALIZER.serialize(impostor))
    return {
        "description": "timestamp.json has \"_type\": \"snapshot\" (a Snapshot signed "
                       "with the timestamp key).",
        "targets": ["hello.txt"],
        "expect": error("WrongRoleType", "timestamp"),
    }


@scenario("expired-targets")
def expired_targets(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    repo.targets.signed.expires = PAST_EXPIRES
    repo.publish()
    return {
        "description": "targets expires 2020-01-01T00:00:00Z; everything else is valid.",
        "targets": ["hello.txt"],
        "expect": error("Expired", "targets"),
    }


@scenario("expired-timestamp")
def expired_timestamp(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    repo.timestamp.signed.expires = PAST_EXPIRES
    repo.publish()
    return {
        "description": "timestamp expires 2020-01-01T00:00:00Z; everything else is valid.",
        "targets": ["hello.txt"],
        "expect": error("Expired", "timestamp"),
    }


@scenario("version-mismatch")
def version_mismatch(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    # Snapshot lists targets.json version 2 and 2.targets.json is served, but
    # the (validly signed) metadata inside says version 1.
    repo.file_version["targets"] = 2
    repo.publish()
    return {
        "description": "snapshot lists targets.json version 2; 2.targets.json exists but "
                       "its signed version is 1.",
        "targets": ["hello.txt"],
        "expect": error("VersionMismatch", "targets"),
    }


@scenario("unknown-key-type")
def unknown_key_type(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    for role in ("root", "snapshot", "targets"):
        repo.add_top_key(role, ed25519())
    key_dict = {"keytype": "x-future-sig", "scheme": "x-future-sig", "keyval": {"public": "00"}}
    future_key: Key = SSlibKey(keyid_for(key_dict), "x-future-sig", "x-future-sig",
                               {"public": "00"})
    repo.root.signed.add_key(future_key, "timestamp")
    repo.signers["timestamp"] = []  # nobody can sign with x-future-sig ...
    # ... so add a signature entry for it by hand.
    repo.tamper["timestamp"] = lambda env: env["signatures"].append(
        {"keyid": future_key.keyid, "sig": "ab" * 64})
    hello(repo)
    repo.publish()
    return {
        "description": "root's only timestamp key has keytype/scheme \"x-future-sig\"; "
                       "timestamp.json carries a signature entry for it.",
        "targets": ["hello.txt"],
        "expect": error("UnsupportedKey", "timestamp"),
    }


@scenario("keyid-mismatch")
def keyid_mismatch(d: Path) -> dict[str, Any]:
    repo = Repo(d)
    for role in ("root", "snapshot", "timestamp"):
        repo.add_top_key(role, ed25519())
    wrong_keyid = hashlib.sha256(b"not the canonical form of any key").hexdigest()
    repo.add_top_key("targets", CryptoSigner.generate_ed25519(keyid=wrong_keyid))
    hello(repo)
    repo.publish()
    return {
        "description": "root lists the targets key under a keyid that is not the sha256 "
                       "of its canonical JSON (signatures use that keyid).",
        "targets": ["hello.txt"],
        "expect": error("KeyIdMismatch", "root"),
    }


@scenario("tampered-target")
def tampered_target(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    original = det_bytes("tampered image", 4096)
    repo.add_target("images/tampered.img", original)
    repo.publish()
    tampered = bytearray(original)
    tampered[100] ^= 0xFF  # same length, different content
    for dest in repo.published_target_paths("images/tampered.img"):
        dest.write_bytes(bytes(tampered))
    return {
        "description": "images/tampered.img was changed (same length) after targets.json "
                       "was signed; hello.txt is intact.",
        "targets": ["hello.txt", "images/tampered.img"],
        "expect": error("HashMismatch", "targets"),
    }


@scenario("bad-target-name")
def bad_target_name(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    # Published where a client that joins names naively would fetch it:
    # targets/../<sha256>.escape.txt, i.e. the scenario directory itself.
    repo.add_target("../escape.txt", b"escaped the target directory\n")
    repo.publish()
    return {
        "description": "validly signed targets.json lists a target named \"../escape.txt\" "
                       "(its file is published at <scenario>/<sha256>.escape.txt).",
        "targets": ["../escape.txt"],
        "expect": error("BadTargetName", "targets"),
    }


@scenario("rotated-root-bad")
def rotated_root_bad(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    root = repo.root.signed
    old = repo.signers["root"][0]
    repo.write_root()

    new = ed25519()
    root.version = 2
    root.revoke_key(old.public_key.keyid, "root")
    root.add_key(new.public_key, "root")
    repo.signers["root"] = [new]
    repo.write_root([new])  # not signed by v1's root key
    repo.publish()
    return {
        "description": "2.root.json replaces the root key but is signed only by the new "
                       "key, not by a threshold of 1.root.json's keys.",
        "targets": ["hello.txt"],
        "expect": error("BelowThreshold", "root"),
    }


@scenario("snapshot-hash-mismatch")
def snapshot_hash_mismatch(d: Path) -> dict[str, Any]:
    repo = standard_repo(d)
    hello(repo)
    repo.snapshot_hashes.add("targets")
    repo.publish()
    # Re-sign targets with a same-length change under the same version, after
    # snapshot recorded the old length and sha256.
    repo.targets.signed.targets["hello.txt"].custom["tern"]["version"] = "1.2.4"
    repo.write_role("targets")
    return {
        "description": "snapshot lists targets.json with length and sha256; the published "
                       "1.targets.json was re-signed afterwards (same version and length, "
                       "different bytes).",
        "targets": ["hello.txt"],
        "expect": error("HashMismatch", "targets"),
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def generate(out_root: Path, names: list[str]) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        scenario_dir = out_root / name
        if scenario_dir.exists():
            shutil.rmtree(scenario_dir)
        scenario_dir.mkdir()
        fields = SCENARIOS[name](scenario_dir)
        doc = {
            "description": fields["description"],
            "trusted_root": fields.get("trusted_root", "metadata/1.root.json"),
            "reference_time": REFERENCE_TIME,
            "targets": fields["targets"],
            "expect": fields["expect"],
        }
        (scenario_dir / "scenario.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {scenario_dir}", file=sys.stderr)
    write_readme(out_root)


def write_readme(out_root: Path) -> None:
    lines = [
        "# python-tuf interop fixtures",
        "",
        "Signed TUF repositories generated with python-tuf's Metadata API "
        "(`interop/make_fixtures.py`); do not edit by hand. Each directory has "
        "`metadata/` (1.root.json..., timestamp.json, N.snapshot.json, N.<role>.json), "
        "`targets/` (consistent-snapshot names `<dir>/<hash>.<basename>`) and "
        "`scenario.json` (trusted root, reference time, targets to look up, and "
        "`\"expect\"`: `\"ok\"` or the expected error variant and role).",
        "",
        "Regenerate (keys are new each time, so every file changes):",
        "",
        "```sh",
        REGENERATE_CMD,
        "```",
        "",
        "Check the \"ok\" scenarios with python-tuf's own client (ngclient):",
        "",
        "```sh",
        "target/interop-venv/bin/python interop/check_fixtures.py",
        "```",
        "",
        "## Scenarios",
        "",
    ]
    for name in SCENARIOS:
        path = out_root / name / "scenario.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        expect = doc["expect"]
        outcome = "ok" if expect == "ok" else f"{expect['error']} ({expect['role']})"
        lines.append(f"- `{name}` — {outcome}: {doc['description']}")
    (out_root / "README.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"output root (default: {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                        help="regenerate only this scenario (repeatable)")
    args = parser.parse_args()
    generate(args.out_dir, args.only or list(SCENARIOS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
