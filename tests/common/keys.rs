//! DKIM keys for tests, made by the real `baton dkim keygen`, and the
//! zone lines that publish them.

use std::path::Path;
use std::process::Command;

/// A folder with `keys/` made by `baton dkim keygen`, a `policies/`
/// folder, and the zone lines that publish the keys.
pub struct Prepared {
    pub folder: tempfile::TempDir,
    pub zone: String,
}

/// Runs `baton dkim keygen` for each `(domain, selector, algorithm)` and
/// returns the TXT records it printed as zone lines.
pub fn prepare(base_zone: &str, keys: &[(&str, &str, &str)]) -> Prepared {
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    let mut zone = base_zone.to_string();
    for (domain, selector, algorithm) in keys {
        zone.push_str(&keygen(folder.path(), domain, selector, algorithm));
        zone.push('\n');
    }
    Prepared { folder, zone }
}

pub fn keygen(folder: &Path, domain: &str, selector: &str, algorithm: &str) -> String {
    let config = folder.join("keygen.yaml");
    std::fs::write(&config, format!("keys: {}\n", folder.join("keys").display())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "dkim", "keygen"])
        .args(["--domain", domain, "--selector", selector, "--algorithm", algorithm])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "keygen failed: {}", String::from_utf8_lossy(&output.stderr));
    let record = stdout
        .lines()
        .find(|line| line.contains("._domainkey."))
        .unwrap_or_else(|| panic!("no TXT record in keygen output: {stdout}"));
    zone_line_from(record)
}

/// Turns `sel._domainkey.d. IN TXT ( "a" "b" )` into the harness's zone syntax.
pub fn zone_line_from(record: &str) -> String {
    let name = record.split_whitespace().next().unwrap();
    let strings: Vec<&str> = record.split('"').skip(1).step_by(2).collect();
    let quoted: Vec<String> = strings.iter().map(|s| format!("\"{s}\"")).collect();
    format!("{name} TXT {}", quoted.join(" "))
}

pub fn write_senders(folder: &Path, text: &str) {
    std::fs::write(folder.join("policies/senders.yaml"), text).unwrap();
}
