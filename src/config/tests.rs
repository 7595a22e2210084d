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
    let err = Config::from_yaml("dispatch:\n  share_by: ' '\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("dispatch.share_by"), "{err}");
    let err = Config::from_yaml("dispatch:\n  batch_field: ''\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("dispatch.batch_field"), "{err}");
    for url in ["hooks.slack.com/services/T", "ftp://alerts.example"] {
        let err = Config::from_yaml(&format!("alerts:\n  url: '{url}'\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("alerts.url"), "{url}: {err}");
    }
    let err = Config::from_yaml("backends:\n  - {id: ws, host: h, hours: 8pm-8am}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("backends[0].hours") && err.contains("like 20:00-08:00"),
        "{err}"
    );
    let night =
        Config::from_yaml("backends:\n  - {id: ws, host: h, hours: '20:00-08:00'}\n").unwrap();
    assert_eq!(
        night.backends[0].hours().unwrap().to_string(),
        "20:00-08:00"
    );
    let shared = Config::from_yaml("dispatch:\n  share_by: artist\n").unwrap();
    assert_eq!(shared.dispatch.share_by.as_deref(), Some("artist"));
}

#[test]
fn the_example_config_is_valid() {
    let text = include_str!("../../config.example.yaml");
    Config::from_yaml(text).unwrap();
}

#[test]
fn a_backend_is_reached_at_its_host_and_port_or_its_url() {
    let c = Config::from_yaml(
        "backends:\n  - {id: a, host: 10.0.0.5}\n  - {id: b, host: '::1', port: 8189}\n  \
         - {id: c, url: 'https://gpu7.example.com/comfyui/', headers: {Authorization: Bearer x}}\n",
    )
    .unwrap();
    let at: Vec<(String, (String, u16))> = c
        .backends
        .iter()
        .map(|b| (b.base_url(), b.host_port()))
        .collect();
    assert_eq!(
        at,
        [
            ("http://10.0.0.5:8188".into(), ("10.0.0.5".into(), 8188)),
            ("http://[::1]:8189".into(), ("::1".into(), 8189)),
            (
                "https://gpu7.example.com/comfyui".into(),
                ("gpu7.example.com".into(), 443)
            ),
        ]
    );
}

#[test]
fn a_backend_url_or_header_that_cannot_work_is_named() {
    for (yaml, field, says) in [
        (
            "{id: a}",
            "backends[0].host",
            "is required (or give the server's `url`)",
        ),
        (
            "{id: a, url: 'gpu7:8188'}",
            "backends[0].url",
            "http:// or https://",
        ),
        (
            "{id: a, url: 'ftp://gpu7'}",
            "backends[0].url",
            "http:// or https://",
        ),
        (
            "{id: a, url: 'https://u:p@gpu7'}",
            "backends[0].url",
            "put them in `headers`",
        ),
        (
            "{id: a, url: 'https://gpu7/?token=x'}",
            "backends[0].url",
            "query",
        ),
        (
            "{id: a, host: h, headers: {'bad name': x}}",
            "backends[0].headers",
            "not a header name",
        ),
        (
            "{id: a, host: h, headers: {X-Key: \"a\\nb\"}}",
            "backends[0].headers.X-Key",
            "visible ASCII",
        ),
    ] {
        let err = Config::from_yaml(&format!("backends:\n  - {yaml}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field) && err.contains(says), "{yaml}: {err}");
    }
}
