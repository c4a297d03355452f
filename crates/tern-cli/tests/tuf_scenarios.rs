//! TUF client scenarios, each run against Tern's client and python-tuf's through the same
//! command line, over real HTTP on 127.0.0.1. Each asserts the outcome, the trusted files left
//! on disk (with their versions) and the requests made.
//!
//! Where the two clients disagree, the test says which one the specification supports.

mod support;

use support::*;

fn fresh(kind: Kind) -> (Sim, Server, Client) {
    let sim = Sim::new();
    let server = Server::start(sim.path());
    let c = Client::new(kind);
    let out = c.init(&sim.root_file(1));
    assert!(out.ok, "{out:?}");
    (sim, server, c)
}

#[track_caller]
fn ok(out: &Outcome) {
    assert!(out.ok, "expected success: {}", out.stderr);
}

#[track_caller]
fn fails(out: &Outcome, kind: Kind, tern: &str, python: &str) {
    assert!(!out.ok, "{kind:?} should have failed");
    let (prefix, want) = match kind {
        Kind::Tern => ("tern: ", tern),
        Kind::Python => ("tuf_client: ", python),
    };
    assert!(
        out.stderr.starts_with(prefix) && out.stderr.contains(want),
        "{kind:?}: expected {prefix}…{want}… in {:?}",
        out.stderr
    );
}

/// A repository with `a.txt` and `dir/sub/b.bin` in top-level targets (targets v2, snapshot
/// v2, timestamp v2).
fn two_targets(sim: &mut Sim) {
    sim.add_target("targets", "a.txt", b"hello tern");
    sim.add_target("targets", "dir/sub/b.bin", &[7u8; 3000]);
    sim.bump("targets");
    sim.commit_snapshot();
}

#[test]
fn init_installs_the_root_and_makes_no_request() {
    for kind in CLIENTS {
        let (_sim, server, c) = fresh(kind);
        assert_eq!(c.trusted(), files(&[("root.json", 1)]), "{kind:?}");
        assert_eq!(server.take_requests(), reqs(&[]), "{kind:?}");
    }
}

#[test]
fn refresh_and_download_targets_in_subdirectories() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        two_targets(&mut sim);
        ok(&c.download(&server, &["a.txt", "dir/sub/b.bin"]));
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 1),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 2)
            ])
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/2.snapshot.json",
                "/metadata/2.targets.json",
                &sim.target_request("targets", "a.txt"),
                &sim.target_request("targets", "dir/sub/b.bin"),
            ]),
            "{kind:?}"
        );
        assert_eq!(c.downloaded(), ["a.txt", "dir%2Fsub%2Fb.bin"], "{kind:?}");
        assert_eq!(std::fs::read(c.target_dir().join("a.txt")).unwrap(), b"hello tern");

        // Nothing changed: only root N+1 and timestamp are asked for, targets are cached.
        ok(&c.download(&server, &["a.txt", "dir/sub/b.bin"]));
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"]),
            "{kind:?}"
        );
    }
}

// ---- the specification's threat list -------------------------------------------------

#[test]
fn arbitrary_software_a_replaced_target_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        two_targets(&mut sim);
        let url = sim.target_request("targets", "a.txt");
        sim.write_target(url.trim_start_matches("/targets/"), b"evil tern!");
        let out = c.download(&server, &["a.txt"]);
        fails(
            &out,
            kind,
            "target `a.txt`: a.txt: sha256 hash does not match",
            "LengthOrHashMismatchError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/2.snapshot.json",
                "/metadata/2.targets.json",
                &url
            ]),
            "{kind:?}"
        );
        assert!(c.downloaded().is_empty(), "{kind:?}: {:?}", c.downloaded());
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 1),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 2)
            ])
        );
    }
}

#[test]
fn arbitrary_software_targets_signed_by_an_unknown_key_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.add_target("targets", "a.txt", b"payload");
        sim.targets.get_mut("targets").unwrap().common.version = 2;
        let attacker = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
            .unwrap()
            .0;
        sim.write_signed("2.targets.json", &sim.targets["targets"], "targets", &[&attacker]);
        sim.commit_snapshot();
        let out = c.download(&server, &["a.txt"]);
        fails(
            &out,
            kind,
            "targets: 0 of 1 required signatures",
            "UnsignedMetadataError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/2.snapshot.json",
                "/metadata/2.targets.json"
            ]),
            "{kind:?}"
        );
        assert_eq!(
            c.trusted(),
            files(&[("root.json", 1), ("timestamp.json", 2), ("snapshot.json", 2)])
        );
    }
}

#[test]
fn rollback_an_older_timestamp_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        let old = std::fs::read(sim.path().join("metadata/timestamp.json")).unwrap();
        sim.commit_timestamp();
        ok(&c.refresh(&server));
        assert_eq!(c.trusted()["timestamp.json"], 2);
        sim.write_meta("timestamp.json", &old);
        server.take_requests();
        let out = c.refresh(&server);
        fails(
            &out,
            kind,
            "timestamp: version 1 is older than trusted version 2",
            "BadVersionNumberError",
        );
        assert_eq!(c.trusted()["timestamp.json"], 2, "{kind:?}");
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"])
        );
    }
}

#[test]
fn rollback_a_timestamp_naming_an_older_snapshot_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.commit_snapshot(); // snapshot v2, timestamp v2
        ok(&c.refresh(&server));
        // A newer timestamp that names snapshot version 1 again.
        sim.timestamp.common.version = 3;
        sim.timestamp.meta.get_mut("snapshot.json").unwrap().version = 1;
        sim.publish_timestamp();
        server.take_requests();
        let out = c.refresh(&server);
        fails(
            &out,
            kind,
            "snapshot: version 1 is older than trusted version 2",
            "BadVersionNumberError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"])
        );
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 1),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 1)
            ])
        );
    }
}

#[test]
fn rollback_a_snapshot_with_an_older_targets_version_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.bump("targets"); // targets v2
        sim.commit_snapshot(); // snapshot v2
        ok(&c.refresh(&server));
        sim.snapshot.meta.get_mut("targets.json").unwrap().version = 1;
        sim.snapshot.common.version = 3;
        sim.publish_snapshot();
        sim.commit_timestamp();
        server.take_requests();
        let out = c.refresh(&server);
        fails(
            &out,
            kind,
            "targets: version 1 is older than trusted version 2",
            "BadVersionNumberError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/3.snapshot.json"
            ]),
            "{kind:?}"
        );
        assert_eq!(c.trusted()["snapshot.json"], 2, "{kind:?}");
    }
}

#[test]
fn indefinite_freeze_an_expired_timestamp_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.set_expired("timestamp");
        sim.commit_timestamp();
        let out = c.refresh(&server);
        fails(&out, kind, "timestamp: expired", "ExpiredMetadataError");
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"])
        );
        assert_eq!(c.trusted(), files(&[("root.json", 1)]), "{kind:?}");
    }
}

#[test]
fn endless_data_an_endless_timestamp_is_cut_off() {
    for kind in CLIENTS {
        let (_sim, server, c) = fresh(kind);
        server.fault("/metadata/timestamp.json", Fault::Endless);
        let out = c.refresh(&server);
        fails(&out, kind, "more than 16384 bytes", "DownloadLengthMismatchError");
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"])
        );
        assert_eq!(c.trusted(), files(&[("root.json", 1)]), "{kind:?}");
    }
}

#[test]
fn endless_data_a_target_longer_than_signed_is_cut_off() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        two_targets(&mut sim);
        let mut long = b"hello tern".to_vec();
        long.extend([b'x'; 5000]);
        server.fault(&sim.target_request("targets", "a.txt"), Fault::Body(long));
        let out = c.download(&server, &["a.txt"]);
        fails(&out, kind, "more than 10 bytes", "DownloadLengthMismatchError");
        assert_eq!(
            server.take_requests().last(),
            Some(&sim.target_request("targets", "a.txt"))
        );
        assert!(c.downloaded().is_empty());
    }
}

#[test]
fn extraneous_dependencies_a_role_cannot_list_paths_it_is_not_trusted_for() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate("targets", "app", Some(vec!["app/*"]), None, false, 1, 1);
        // `app` also lists a target outside app/*: nobody trusts it for that path.
        sim.add_target("app", "app/x.bin", b"x");
        sim.add_target("app", "base/libc.so", b"evil");
        sim.bump("app");
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &["app/x.bin"]));
        server.take_requests();
        let out = c.download(&server, &["base/libc.so"]);
        fails(
            &out,
            kind,
            "target `base/libc.so` is not listed by any trusted role",
            "TargetNotFoundError",
        );
        // Everything is cached and no role is trusted for base/*: nothing else is fetched.
        assert_eq!(
            server.take_requests(),
            reqs(&["/metadata/2.root.json", "/metadata/timestamp.json"])
        );
        assert_eq!(c.downloaded(), ["app%2Fx.bin"], "{kind:?}");
    }
}

#[test]
fn mix_and_match_targets_of_another_snapshot_are_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.meta_hashes = true;
        sim.add_target("targets", "a.txt", b"one");
        sim.bump("targets"); // v2
        sim.commit_snapshot();
        // The mirror serves other content under 2.targets.json: validly signed, same version,
        // same length, but not the document snapshot names.
        sim.add_target("targets", "a.txt", b"two");
        sim.publish_targets("targets");
        let out = c.refresh(&server);
        fails(
            &out,
            kind,
            "targets: sha256 hash does not match",
            "LengthOrHashMismatchError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/2.snapshot.json",
                "/metadata/2.targets.json"
            ])
        );
        assert_eq!(
            c.trusted(),
            files(&[("root.json", 1), ("timestamp.json", 2), ("snapshot.json", 2)])
        );
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn malicious_mirrors_cannot_prevent_updates_from_good_mirrors() {
    for kind in CLIENTS {
        let (sim, bad_mirror, c) = fresh(kind);
        // A good mirror keeps the repository as it is.
        let good_dir = tempfile::tempdir().unwrap();
        copy_dir(sim.path(), good_dir.path());
        let good_mirror = Server::start(good_dir.path());
        // The bad mirror serves a snapshot signed by its own key.
        let mirror = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
            .unwrap()
            .0;
        let mut snap = sim.snapshot.clone();
        snap.common.expires = now().plus_secs(3650 * DAY).to_string();
        sim.write_signed("1.snapshot.json", &snap, "snapshot", &[&mirror]);
        let out = c.refresh(&bad_mirror);
        fails(
            &out,
            kind,
            "snapshot: 0 of 1 required signatures",
            "UnsignedMetadataError",
        );
        assert_eq!(
            bad_mirror.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json"
            ])
        );
        assert_eq!(c.trusted(), files(&[("root.json", 1), ("timestamp.json", 1)]));
        // Nothing the bad mirror sent was kept: the good mirror's update goes through.
        ok(&c.refresh(&good_mirror));
        assert_eq!(
            good_mirror.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json",
                "/metadata/1.targets.json"
            ]),
            "{kind:?}"
        );
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 1),
                ("timestamp.json", 1),
                ("snapshot.json", 1),
                ("targets.json", 1)
            ])
        );
    }
}

#[test]
fn wrong_software_another_trusted_file_in_place_of_the_one_wanted_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.add_target("targets", "a.txt", b"hello tern");
        sim.add_target("targets", "b.txt", b"hello TERN");
        sim.bump("targets");
        sim.commit_snapshot();
        // b.txt's genuine bytes (same length) served where a.txt was asked for.
        server.fault(
            &sim.target_request("targets", "a.txt"),
            Fault::Body(b"hello TERN".to_vec()),
        );
        let out = c.download(&server, &["a.txt"]);
        fails(
            &out,
            kind,
            "a.txt: sha256 hash does not match",
            "LengthOrHashMismatchError",
        );
        assert!(c.downloaded().is_empty(), "{kind:?}");
    }
}

#[test]
fn key_compromise_below_threshold_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.rotate("targets", 3, 2); // root v2: targets needs 2 of 3
        sim.bump("targets"); // signed by all three
        sim.commit_snapshot();
        ok(&c.refresh(&server));
        // An attacker holding one targets key publishes targets v3.
        sim.add_target("targets", "evil.bin", b"evil");
        sim.targets.get_mut("targets").unwrap().common.version = 3;
        let one = &sim.keys["targets"][0];
        sim.write_signed("3.targets.json", &sim.targets["targets"], "targets", &[one]);
        sim.commit_snapshot();
        server.take_requests();
        let out = c.download(&server, &["evil.bin"]);
        fails(
            &out,
            kind,
            "targets: 1 of 2 required signatures",
            "UnsignedMetadataError",
        );
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/3.root.json",
                "/metadata/timestamp.json",
                "/metadata/3.snapshot.json",
                "/metadata/3.targets.json"
            ])
        );
        assert_eq!(c.trusted()["targets.json"], 2, "{kind:?}");
        assert!(c.downloaded().is_empty());
    }
}

#[test]
fn slow_retrieval_a_trickling_server_is_given_up_on() {
    // Tern only: python-tuf has no minimum rate; a stalled or trickling server holds it for
    // four times its 30 s socket timeout (urllib3 retries), which a test suite cannot wait for.
    let (_sim, server, mut c) = fresh(Kind::Tern);
    c.extra = ["--stall-timeout", "2", "--grace", "1", "--min-rate", "2000"]
        .map(String::from)
        .to_vec();
    server.fault(
        "/metadata/timestamp.json",
        Fault::Trickle(std::time::Duration::from_millis(100)),
    );
    let started = std::time::Instant::now();
    let out = c.refresh(&server);
    fails(&out, Kind::Tern, "timestamp.json: slower than 2000 bytes/s", "");
    // Connect timeout (10 s) plus stall timeout (2 s) at most.
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    assert_eq!(c.trusted(), files(&[("root.json", 1)]));
}

#[test]
fn fast_forward_recovery_after_the_timestamp_key_rotates() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        // An attacker with the timestamp key pushes the version to 1000.
        sim.timestamp.common.version = 999;
        sim.commit_timestamp();
        ok(&c.refresh(&server));
        assert_eq!(c.trusted()["timestamp.json"], 1000);
        // The repository rotates the timestamp key and starts again from a low version.
        sim.rotate("timestamp", 1, 1);
        sim.timestamp.common.version = 1;
        sim.commit_timestamp();
        server.take_requests();
        ok(&c.refresh(&server));
        // Tern deletes the trusted snapshot with the timestamp (§5.3.11) and fetches it again;
        // python-tuf keeps its snapshot, whose signature still verifies. Both end up trusting
        // the same versions.
        let mut want = vec![
            "/metadata/2.root.json",
            "/metadata/3.root.json",
            "/metadata/timestamp.json",
        ];
        if kind == Kind::Tern {
            want.push("/metadata/1.snapshot.json");
        }
        assert_eq!(server.take_requests(), reqs(&want), "{kind:?}");
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 2),
                ("timestamp.json", 2),
                ("snapshot.json", 1),
                ("targets.json", 1)
            ]),
            "{kind:?}"
        );
    }
}

#[test]
fn fast_forward_recovery_after_the_snapshot_key_rotates() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.snapshot.common.version = 499;
        sim.commit_snapshot(); // snapshot v500, timestamp v2
        ok(&c.refresh(&server));
        sim.rotate("snapshot", 1, 1);
        sim.snapshot.common.version = 0;
        sim.commit_snapshot(); // snapshot v1 signed by the new key, timestamp v3
                               // §5.3.11: a snapshot key rotation deletes the trusted timestamp and snapshot, so the
                               // fast-forwarded snapshot version no longer blocks the repository's real one. Tern does
                               // this; python-tuf only drops metadata whose signatures fail, and keeps the (still
                               // valid) timestamp naming snapshot v500, so it refuses the recovery. The specification
                               // supports Tern.
        let out = c.refresh(&server);
        match kind {
            Kind::Tern => {
                ok(&out);
                assert_eq!(c.trusted()["snapshot.json"], 1);
                assert_eq!(c.trusted()["timestamp.json"], 3);
            }
            Kind::Python => fails(
                &out,
                kind,
                "",
                "BadVersionNumberError: New snapshot version must be >= 500",
            ),
        }
    }
}

// ---- key rotation of every role ---------------------------------------------------------

#[test]
fn root_rotations_with_threshold_changes_are_followed() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.rotate("root", 3, 2); // v2: 2 of 3
        sim.rotate("root", 2, 2); // v3: 2 of 2, all keys new
        sim.rotate("root", 1, 1); // v4
        ok(&c.refresh(&server));
        assert_eq!(c.trusted()["root.json"], 4, "{kind:?}");
        assert_eq!(
            server.take_requests()[..5],
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/3.root.json",
                "/metadata/4.root.json",
                "/metadata/5.root.json",
                "/metadata/timestamp.json"
            ])[..],
            "{kind:?}"
        );
    }
}

#[test]
fn a_root_not_signed_by_the_previous_keys_is_refused() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        let old = sim.keys["root"].len();
        sim.rotate("root", 1, 1);
        assert_eq!(old, 1);
        // Re-publish v2 signed by the new key only.
        sim.prev_root_keys.clear();
        sim.publish_root();
        let out = c.refresh(&server);
        fails(&out, kind, "root: 0 of 1 required signatures", "UnsignedMetadataError");
        assert_eq!(c.trusted(), files(&[("root.json", 1)]), "{kind:?}");
        assert_eq!(server.take_requests(), reqs(&["/metadata/2.root.json"]));
    }
}

#[test]
fn targets_snapshot_and_timestamp_rotations_are_followed() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        ok(&c.refresh(&server));
        sim.rotate("targets", 2, 2);
        sim.rotate("snapshot", 2, 1);
        sim.rotate("timestamp", 3, 2);
        sim.add_target("targets", "new.bin", b"new");
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &["new.bin"]));
        assert_eq!(
            c.trusted(),
            files(&[
                ("root.json", 4),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 2)
            ]),
            "{kind:?}"
        );
    }
}

#[test]
fn a_delegated_role_key_rotation_is_followed() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate("targets", "app", Some(vec!["app/*"]), None, false, 1, 1);
        sim.add_target("app", "app/a.bin", b"a");
        sim.bump("app");
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &["app/a.bin"]));
        // Re-delegate `app` with two new keys, threshold 2.
        let d = sim.targets.get_mut("targets").unwrap().delegations.as_mut().unwrap();
        d.roles.as_mut().unwrap().clear();
        sim.keys.remove("app");
        let app = sim.targets.remove("app").unwrap();
        sim.delegate("targets", "app", Some(vec!["app/*"]), None, false, 2, 2);
        sim.targets.insert("app".into(), app);
        sim.add_target("app", "app/b.bin", b"b");
        sim.bump("app"); // v3, signed by both new keys
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &["app/b.bin"]));
        assert_eq!(c.trusted()["app.json"], 3, "{kind:?}");
    }
}

// ---- expiry at each step ------------------------------------------------------------------

#[test]
fn expired_roles_at_each_step_are_refused() {
    for (role, tern, python) in [
        ("root", "root: expired", "ExpiredMetadataError"),
        ("snapshot", "snapshot: expired", "ExpiredMetadataError"),
        ("targets", "targets: expired", "ExpiredMetadataError"),
        ("app", "app: expired", "ExpiredMetadataError"),
    ] {
        for kind in CLIENTS {
            let (mut sim, server, c) = fresh(kind);
            sim.delegate("targets", "app", Some(vec!["app/*"]), None, false, 1, 1);
            sim.add_target("app", "app/a.bin", b"a");
            sim.set_expired(role);
            match role {
                "root" => sim.new_root_version(),
                "snapshot" => {}
                r => sim.bump(r),
            }
            sim.bump("targets");
            sim.commit_snapshot();
            let out = c.download(&server, &["app/a.bin"]);
            fails(&out, kind, tern, python);
            assert!(c.downloaded().is_empty(), "{role} {kind:?}");
            let trusted = c.trusted();
            // The expired role itself is never persisted (a new root is: 5.3.8 comes before 5.3.10).
            let file = format!("{role}.json");
            if role == "root" {
                assert_eq!(trusted["root.json"], 2, "{kind:?}");
            } else {
                assert!(!trusted.contains_key(&file), "{role} {kind:?}: {trusted:?}");
            }
        }
    }
}

// ---- 404 at each step -----------------------------------------------------------------------

#[test]
fn not_found_at_each_step_fails_cleanly() {
    for (missing, expect_files) in [
        ("/metadata/timestamp.json", vec![("root.json", 1)]),
        (
            "/metadata/2.snapshot.json",
            vec![("root.json", 1), ("timestamp.json", 2)],
        ),
        (
            "/metadata/2.targets.json",
            vec![("root.json", 1), ("timestamp.json", 2), ("snapshot.json", 2)],
        ),
        (
            "/metadata/2.app.json",
            vec![
                ("root.json", 1),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 2),
            ],
        ),
        (
            "TARGET",
            vec![
                ("root.json", 1),
                ("timestamp.json", 2),
                ("snapshot.json", 2),
                ("targets.json", 2),
                ("app.json", 2),
            ],
        ),
    ] {
        for kind in CLIENTS {
            let (mut sim, server, c) = fresh(kind);
            sim.delegate("targets", "app", Some(vec!["app/*"]), None, false, 1, 1);
            sim.add_target("app", "app/a.bin", b"a");
            sim.bump("app");
            sim.bump("targets");
            sim.commit_snapshot();
            let path = if missing == "TARGET" {
                sim.target_request("app", "app/a.bin")
            } else {
                missing.to_owned()
            };
            server.fault(&path, Fault::Status(404));
            let out = c.download(&server, &["app/a.bin"]);
            fails(&out, kind, "not found", "DownloadHTTPError");
            assert_eq!(c.trusted(), files(&expect_files), "{missing} {kind:?}");
            assert_eq!(server.take_requests().last(), Some(&path), "{kind:?}");
        }
    }
}

#[test]
fn only_not_found_ends_the_root_loop() {
    // 403 for N+1.root.json: python-tuf treats it as "no newer root" (S3 answers 403 for a
    // missing object); Tern treats only 404/410 as "not found". The specification says "if
    // this file is not available": a 403 does not say the file is absent, and ending the loop
    // on it would let anyone who can make the server answer 403 hide a root rotation, so Tern
    // aborts the update instead.
    for kind in CLIENTS {
        let (_sim, server, c) = fresh(kind);
        server.fault("/metadata/2.root.json", Fault::Status(403));
        let out = c.refresh(&server);
        match kind {
            Kind::Tern => fails(&out, kind, "HTTP 403", ""),
            Kind::Python => ok(&out),
        }
    }
}

// ---- delegation graphs ------------------------------------------------------------------------

#[test]
fn multi_level_terminating_path_and_hash_prefix_delegations() {
    let hashed = "h/x.bin";
    let prefix = &tern_core::digest::sha256_hex(hashed.as_bytes())[..2];
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate("targets", "a", Some(vec!["a/*", "a/*/*"]), None, false, 2, 2);
        sim.delegate("a", "a-beta", Some(vec!["a/beta/*"]), None, true, 1, 1);
        sim.delegate("a", "a-fallback", Some(vec!["a/*/*"]), None, false, 1, 1);
        sim.delegate("targets", "by-hash", None, Some(vec![prefix]), false, 1, 1);
        sim.add_target("a", "a/app.bin", b"app");
        sim.add_target("a-beta", "a/beta/app.bin", b"beta");
        // Listed by the fallback too, but a-beta is terminating for a/beta/*: never reached.
        sim.add_target("a-fallback", "a/beta/other.bin", b"shadowed");
        sim.add_target("by-hash", hashed, b"hashed");
        for r in ["a", "a-beta", "a-fallback", "by-hash", "targets"] {
            sim.bump(r);
        }
        sim.commit_snapshot();
        ok(&c.download(&server, &["a/app.bin", "a/beta/app.bin", hashed]));
        let reqs_made = server.take_requests();
        assert!(reqs_made.contains(&"/metadata/2.a-beta.json".to_owned()), "{kind:?}");
        assert!(
            !reqs_made.contains(&"/metadata/2.a-fallback.json".to_owned()),
            "{kind:?}: {reqs_made:?}"
        );
        let out = c.download(&server, &["a/beta/other.bin"]);
        fails(&out, kind, "not listed by any trusted role", "TargetNotFoundError");
        assert!(!server
            .take_requests()
            .contains(&"/metadata/2.a-fallback.json".to_owned()));
    }
}

#[test]
fn succinct_hash_bin_delegation() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate_bins("targets", 4, "bin");
        let succinct = sim.targets["targets"]
            .delegations
            .as_ref()
            .unwrap()
            .succinct_roles
            .clone()
            .unwrap();
        let names = ["fw/one.img", "fw/two.img"];
        let mut bins = Vec::new();
        for n in names {
            let bin = succinct.role_for_target(n);
            sim.add_target(&bin, n, n.as_bytes());
            sim.publish_bin(&bin);
            bins.push(bin);
        }
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &names));
        let made = server.take_requests();
        for b in &bins {
            assert!(made.contains(&format!("/metadata/2.{b}.json")), "{kind:?}: {made:?}");
        }
        // Only the bins the search needed were fetched.
        let fetched_bins = made.iter().filter(|r| r.contains(".bin-")).count();
        assert_eq!(
            fetched_bins,
            bins.iter().collect::<std::collections::BTreeSet<_>>().len(),
            "{kind:?}"
        );
    }
}

#[test]
fn a_role_reached_through_another_delegator_is_verified_against_it() {
    // targets delegates a/* to `shared` (key K1) and b/* to `mid`; `mid` delegates b/* to
    // `shared` too, but with key K2. `shared` is signed by K1 only. Looking up a/one loads
    // `shared` through targets (fine); b/two reaches `shared` through `mid`, whose key K2 did
    // not sign it. A delegated role is verified against the delegator that reached it, so
    // both clients refuse b/two (python-tuf 7 included, although it caches roles by name).
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate("targets", "shared", Some(vec!["a/*"]), None, false, 1, 1);
        sim.delegate("targets", "mid", Some(vec!["b/*"]), None, false, 1, 1);
        let shared = sim.targets["shared"].clone();
        let k1 = sim.keys.remove("shared").unwrap();
        sim.delegate("mid", "shared", Some(vec!["b/*"]), None, false, 1, 1);
        sim.keys.insert("shared".into(), k1);
        sim.targets.insert("shared".into(), shared);
        sim.add_target("shared", "a/one", b"one");
        sim.add_target("shared", "b/two", b"two");
        for r in ["shared", "mid", "targets"] {
            sim.bump(r);
        }
        sim.commit_snapshot();
        let out = c.download(&server, &["a/one", "b/two"]);
        fails(
            &out,
            kind,
            "shared: 0 of 1 required signatures",
            "UnsignedMetadataError: shared was signed by 0/1 keys",
        );
        assert_eq!(c.downloaded(), ["a%2Fone"], "{kind:?}");
    }
}

// ---- unusual role names, consistent snapshots off, hash variants ---------------------------

#[test]
fn unusual_role_names_stay_inside_the_metadata_directory() {
    for kind in CLIENTS {
        let (mut sim, server, c) = fresh(kind);
        let names = ["?", "#", "/x", "../x"];
        for (i, n) in names.iter().enumerate() {
            let p = format!("d{i}/*");
            sim.delegate("targets", n, Some(vec![p.as_str()]), None, false, 1, 1);
            sim.add_target(n, &format!("d{i}/f"), n.as_bytes());
            sim.bump(n);
        }
        sim.bump("targets");
        sim.commit_snapshot();
        ok(&c.download(&server, &["d0/f", "d1/f", "d2/f", "d3/f"]));
        let trusted = c.trusted();
        for f in ["%3F.json", "%23.json", "%2Fx.json", "..%2Fx.json"] {
            assert_eq!(trusted.get(f), Some(&2), "{kind:?}: {trusted:?}");
        }
        // Nothing was written outside the metadata directory.
        assert!(!c.work.path().join("x.json").exists());
        let made = server.take_requests();
        assert!(
            made.contains(&"/metadata/2...%2Fx.json".to_owned()),
            "{kind:?}: {made:?}"
        );
    }
}

#[test]
fn repositories_without_consistent_snapshots() {
    for kind in CLIENTS {
        let sim_dir = Sim::new();
        let mut sim = sim_dir;
        sim.root.consistent_snapshot = false;
        sim.new_root_version();
        sim.publish_targets("targets");
        sim.commit_snapshot();
        sim.add_target("targets", "dir/a.txt", b"plain");
        sim.bump("targets");
        sim.commit_snapshot();
        let server = Server::start(sim.path());
        let c = Client::new(kind);
        ok(&c.init(&sim.root_file(1)));
        ok(&c.download(&server, &["dir/a.txt"]));
        assert_eq!(
            server.take_requests(),
            reqs(&[
                "/metadata/2.root.json",
                "/metadata/3.root.json",
                "/metadata/timestamp.json",
                "/metadata/snapshot.json",
                "/metadata/targets.json",
                "/targets/dir/a.txt",
            ]),
            "{kind:?}"
        );
    }
}

#[test]
fn hash_algorithm_variants() {
    use tern_core::digest::HashAlgorithm::{Sha256, Sha512};
    for algs in [vec![Sha512], vec![Sha256, Sha512]] {
        for kind in CLIENTS {
            let (mut sim, server, c) = fresh(kind);
            sim.hash_algs = algs.clone();
            sim.add_target("targets", "x/y.bin", &[1u8; 777]);
            sim.bump("targets");
            sim.commit_snapshot();
            ok(&c.download(&server, &["x/y.bin"]));
            let made = server.take_requests();
            assert_eq!(
                made.last().unwrap(),
                &sim.target_request("targets", "x/y.bin"),
                "{kind:?}"
            );
            // Tampering is caught whichever algorithm is listed.
            let url = sim.target_request("targets", "x/y.bin");
            sim.write_target(url.trim_start_matches("/targets/"), &[2u8; 777]);
            std::fs::remove_file(c.target_dir().join("x%2Fy.bin")).unwrap();
            let out = c.download(&server, &["x/y.bin"]);
            fails(&out, kind, "hash does not match", "LengthOrHashMismatchError");
        }
    }
}

// ---- Tern's own: resumable downloads ----------------------------------------------------------

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let (mut sim, server, c) = fresh(Kind::Tern);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    sim.add_target("targets", "big.img", &data);
    sim.bump("targets");
    sim.commit_snapshot();
    let url = sim.target_request("targets", "big.img");
    server.fault(&url, Fault::Cut(50_000));
    let out = c.download(&server, &["big.img"]);
    assert!(!out.ok);
    assert!(c.downloaded().is_empty());
    server.clear_faults();
    server.take_requests();
    ok(&c.download(&server, &["big.img"]));
    let made = server.take_requests();
    assert_eq!(made.last().unwrap(), &format!("{url} range=50000-"), "{made:?}");
    assert_eq!(std::fs::read(c.target_dir().join("big.img")).unwrap(), data);
}

#[test]
fn a_resumed_download_is_still_verified_from_its_first_byte() {
    let (mut sim, server, c) = fresh(Kind::Tern);
    let data = vec![5u8; 100_000];
    sim.add_target("targets", "big.img", &data);
    sim.bump("targets");
    sim.commit_snapshot();
    let url = sim.target_request("targets", "big.img");
    server.fault(&url, Fault::Cut(40_000));
    assert!(!c.download(&server, &["big.img"]).ok);
    // The bytes already on disk are corrupted: the resumed tail is right, the whole is not.
    let partial = c.target_dir().join(".big.img.partial");
    let mut p = std::fs::read(&partial).unwrap();
    p[10] ^= 1;
    std::fs::write(&partial, &p).unwrap();
    server.clear_faults();
    let out = c.download(&server, &["big.img"]);
    fails(&out, Kind::Tern, "hash does not match", "");
    assert!(!partial.exists(), "a complete but wrong file is not kept for resuming");
    ok(&c.download(&server, &["big.img"]));
}

// ---- Tern's own: directory and bundle sources ------------------------------------------------

#[test]
fn a_local_directory_is_a_source() {
    let (mut sim, _server, c) = fresh(Kind::Tern);
    two_targets(&mut sim);
    let base = format!("file://{}", sim.path().display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["tuf", "--metadata-dir"])
        .arg(c.metadata_dir())
        .args([
            "--metadata-url",
            &format!("{base}/metadata/"),
            "--target-name",
            "dir/sub/b.bin",
        ])
        .args(["--target-base-url", &format!("{base}/targets/"), "--target-dir"])
        .arg(c.target_dir())
        .arg("download")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.downloaded(), ["dir%2Fsub%2Fb.bin"]);
    assert_eq!(
        c.trusted(),
        files(&[
            ("root.json", 1),
            ("timestamp.json", 2),
            ("snapshot.json", 2),
            ("targets.json", 2)
        ])
    );
}

#[test]
fn a_bundle_is_an_offline_source() {
    // A bundle made by `tern bundle create --include-freshness` carries everything a
    // client needs; `tern tuf` reads it through the tern-bundle: transport.
    let d = tempfile::tempdir().unwrap();
    let tern = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |n: &str| d.path().join(n).display().to_string();
    tern(&["key", "generate", "--out", &p("k")]);
    let key = p("k.pem");
    let repo = p("repo");
    tern(&[
        "repo",
        "init",
        "--repo",
        &repo,
        "--root-key",
        &key,
        "--targets-key",
        &key,
        "--snapshot-key",
        &key,
        "--timestamp-key",
        &key,
        "--key",
        &key,
    ]);
    std::fs::write(p("fw.bin"), vec![3u8; 4096]).unwrap();
    tern(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &p("fw.bin"),
        "--name",
        "fw/fw.bin",
        "--key",
        &key,
    ]);
    tern(&["repo", "refresh", "--repo", &repo, "--key", &key]);
    tern(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "fw/fw.bin",
        "--out",
        &p("r.tern"),
        "--include-freshness",
    ]);
    let c = Client::new(Kind::Tern);
    ok(&c.init(std::path::Path::new(&format!("{repo}/metadata/1.root.json"))));
    let bundle = format!("tern-bundle:{}", p("r.tern"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["tuf", "--metadata-dir"])
        .arg(c.metadata_dir())
        .args([
            "--metadata-url",
            &format!("{bundle}#metadata/"),
            "--target-name",
            "fw/fw.bin",
        ])
        .args(["--target-base-url", &format!("{bundle}#targets/"), "--target-dir"])
        .arg(c.target_dir())
        .arg("download")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(c.target_dir().join("fw%2Ffw.bin")).unwrap(),
        vec![3u8; 4096]
    );
    assert_eq!(
        c.trusted(),
        files(&[
            ("root.json", 1),
            ("timestamp.json", 2),
            ("snapshot.json", 2),
            ("targets.json", 2)
        ])
    );
}

// ---- regressions found in review ----------------------------------------------------------------

#[test]
fn fast_forward_recovery_survives_an_interrupted_root_update() {
    // The snapshot key rotates in root v2 after a fast-forward, and fetching root v3 fails
    // once. The recovery (deleting the trusted timestamp and snapshot) must already have
    // happened when root v2 was persisted, or the next run starts from v2, sees no rotation,
    // and stays locked out by the fast-forwarded snapshot version.
    let (mut sim, server, c) = fresh(Kind::Tern);
    sim.snapshot.common.version = 499;
    sim.commit_snapshot();
    ok(&c.refresh(&server));
    sim.rotate("snapshot", 1, 1); // root v2
    sim.new_root_version(); // root v3
    sim.snapshot.common.version = 0;
    sim.commit_snapshot();
    server.fault("/metadata/3.root.json", Fault::Status(500));
    assert!(!c.refresh(&server).ok);
    assert_eq!(c.trusted()["root.json"], 2);
    assert!(!c.trusted().contains_key("snapshot.json"), "{:?}", c.trusted());
    server.clear_faults();
    ok(&c.refresh(&server));
    assert_eq!(c.trusted()["snapshot.json"], 1);
}

#[test]
fn a_delegator_reached_by_name_through_two_paths_is_not_confused() {
    // targets → A (a/*, attacker-held key) → "x" (key K2) → "y" (key K3); targets → x (b/*,
    // key K1) → y (key K4). A one-time attacker left its own x.json and y.json (right versions)
    // in the client's metadata directory. Looking up a/1 trusts them through A; b/evil must
    // then be looked up through the genuine x and y, not through the cached attacker's y.
    for kind in [Kind::Tern] {
        let (mut sim, server, c) = fresh(kind);
        sim.delegate("targets", "A", Some(vec!["a/*"]), None, false, 1, 1);
        sim.delegate("targets", "x", Some(vec!["b/*"]), None, false, 1, 1);
        sim.delegate("x", "y", Some(vec!["b/*"]), None, false, 1, 1);
        sim.add_target("y", "b/good", b"good");
        for r in ["A", "x", "y", "targets"] {
            sim.bump(r);
        }
        // A (attacker-controlled for a/*) delegates a role it also calls "x".
        let k2 = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
            .unwrap()
            .0;
        let k3 = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
            .unwrap()
            .0;
        let deleg = |k: &tern_core::SigningKey, name: &str, paths: Vec<&str>| tern_core::metadata::Delegations {
            keys: [(k.public().keyid(), k.public().clone())].into(),
            roles: Some(vec![tern_core::metadata::DelegatedRole {
                name: name.into(),
                keyids: vec![k.public().keyid()],
                threshold: 1,
                terminating: false,
                paths: Some(paths.into_iter().map(String::from).collect()),
                path_hash_prefixes: None,
                unrecognized: Default::default(),
            }]),
            succinct_roles: None,
            unrecognized: Default::default(),
        };
        sim.targets.get_mut("A").unwrap().delegations = Some(deleg(&k2, "x", vec!["a/*"]));
        sim.bump("A");
        sim.commit_snapshot();
        // The attacker's x (signed by K2) delegates y to K3; its y lists b/evil.
        let mut evil_x = sim.targets["x"].clone();
        evil_x.delegations = Some(deleg(&k3, "y", vec!["a/*", "b/*"]));
        let mut evil_y = sim.targets["y"].clone();
        let evil = b"evil";
        evil_y.targets.insert(
            "b/evil".into(),
            tern_core::TargetFile {
                length: evil.len() as u64,
                hashes: tern_core::digest::hashes_of(evil, &[tern_core::digest::HashAlgorithm::Sha256]),
                custom: None,
                unrecognized: Default::default(),
            },
        );
        sim.write_target(&format!("b/{}.evil", tern_core::digest::sha256_hex(evil)), evil);
        // a/1 is legitimately the attacker's to publish (A holds a/*): it is listed in the
        // attacker's y, so looking it up loads the planted x and y through A.
        let one = b"one";
        evil_y.targets.insert(
            "a/1".into(),
            tern_core::TargetFile {
                length: one.len() as u64,
                hashes: tern_core::digest::hashes_of(one, &[tern_core::digest::HashAlgorithm::Sha256]),
                custom: None,
                unrecognized: Default::default(),
            },
        );
        sim.write_target(&format!("a/{}.1", tern_core::digest::sha256_hex(one)), one);
        let planted = |value: &tern_core::Targets, role: &str, key: &tern_core::SigningKey| {
            let mut env = tern_core::Envelope::new(value).unwrap();
            env.sign(role, key).unwrap();
            std::fs::create_dir_all(c.metadata_dir()).unwrap();
            std::fs::write(c.metadata_dir().join(format!("{role}.json")), env.to_bytes()).unwrap();
        };
        planted(&evil_x, "x", &k2);
        planted(&evil_y, "y", &k3);
        let out = c.download(&server, &["a/1", "b/evil"]);
        fails(&out, kind, "target `b/evil` is not listed by any trusted role", "");
        assert_eq!(c.downloaded(), ["a%2F1"]);
    }
}

#[test]
fn a_complete_partial_download_is_finished_without_asking_the_server() {
    let (mut sim, server, c) = fresh(Kind::Tern);
    let data = vec![9u8; 50_000];
    sim.add_target("targets", "big.img", &data);
    sim.bump("targets");
    sim.commit_snapshot();
    ok(&c.refresh(&server));
    std::fs::create_dir_all(c.target_dir()).unwrap();
    // Complete and right: renamed into place with no target request.
    std::fs::write(c.target_dir().join(".big.img.partial"), &data).unwrap();
    server.take_requests();
    ok(&c.download(&server, &["big.img"]));
    assert!(!server.take_requests().iter().any(|r| r.starts_with("/targets/")));
    // Complete length but wrong bytes: discarded and fetched again from the start.
    std::fs::remove_file(c.target_dir().join("big.img")).unwrap();
    std::fs::write(c.target_dir().join(".big.img.partial"), vec![8u8; 50_000]).unwrap();
    ok(&c.download(&server, &["big.img"]));
    let url = sim.target_request("targets", "big.img");
    assert_eq!(server.take_requests().last(), Some(&url));
    assert_eq!(std::fs::read(c.target_dir().join("big.img")).unwrap(), data);
}
