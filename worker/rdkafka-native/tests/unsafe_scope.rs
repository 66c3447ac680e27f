//! `unsafe` stays in this crate: every other member of the workspace inherits the workspace lints, which forbid it
//! (`forbid` cannot be lifted by an inner `allow`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_other_workspace_member_forbids_unsafe_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("[workspace.lints.rust]\nunsafe_code = \"forbid\""),
        "the workspace lints forbid unsafe code"
    );
    let members = workspace.split("members = [").nth(1).and_then(|m| m.split(']').next()).unwrap();
    let members: Vec<&str> = members.split(',').map(|m| m.trim().trim_matches('"')).filter(|m| !m.is_empty()).collect();
    assert!(members.contains(&"worker/rdkafka-native"), "{members:?}");
    for member in members.iter().filter(|m| **m != "worker/rdkafka-native") {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{member}/Cargo.toml does not inherit the workspace lints"
        );
    }
}
