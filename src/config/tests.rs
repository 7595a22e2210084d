//! Tests of the config module.
use super::*;

#[test]
fn the_python_servers_config_loads_unchanged() {
    let text = r#"
data_dir: "./data"
log_dir: "./logs"

backends:
  - id: node1
    name: "Beast (5090)"
    host: "192.168.1.100"
    port: 8188
    enabled: true
"#;
    let c = Config::from_yaml(text).unwrap();
    assert_eq!(c.backends.len(), 1);
    assert_eq!(c.backends[0].name.as_deref(), Some("Beast (5090)"));
    assert_eq!(c.backends[0].max_inflight, 2);
    assert_eq!(c.log_dir, Some(PathBuf::from("./logs")));
    assert_eq!(c.port, 9800);
}

#[test]
fn an_unknown_key_is_named_in_the_error() {
    let err = Config::from_yaml("data_dri: x\n").unwrap_err().to_string();
    assert!(err.contains("data_dri"), "{err}");
    let err = Config::from_yaml("limits:\n  max_body: 5\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_body"), "{err}");
}

#[test]
fn a_bad_value_is_named_in_the_error() {
    let err = Config::from_yaml("database:\n  synchronous: off\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("synchronous") || err.contains("off"), "{err}");
    let err = Config::from_yaml("backends:\n  - {id: a, host: h}\n  - {id: a, host: h}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("backends[1].id"), "{err}");
    let err = Config::from_yaml("port: 70000\n").unwrap_err().to_string();
    assert!(err.contains("port") || err.contains("70000"), "{err}");
}

#[test]
fn the_example_config_is_valid() {
    let text = include_str!("../../config.example.yaml");
    Config::from_yaml(text).unwrap();
}
