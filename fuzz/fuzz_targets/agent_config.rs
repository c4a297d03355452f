//! The agent's TOML configuration (`/etc/tern/agent.toml`), for UTF-8 inputs.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tern_agent::config::AgentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = AgentConfig::parse(Path::new("/etc/tern/agent.toml"), text) {
        assert!(!cfg.slots.is_empty());
        assert!(cfg.state_dir.is_absolute());
        let _ = cfg.encryption_key_path();
        for s in &cfg.slots {
            assert!(cfg.slot(&s.name).is_some());
            assert!(cfg.slot_by_bootname(&s.bootname).is_some());
        }
    }
});
