//! Tests of the workflows module.
use super::*;
use serde_json::json;

fn blur() -> Arc<Template> {
    Catalog::load(Path::new("/nonexistent"))
        .get("image_blur")
        .unwrap()
}

#[test]
fn builtin_templates_load() {
    let (templates, errors) = Catalog::load(Path::new("/nonexistent")).list();
    assert!(errors.is_empty(), "{errors:?}");
    let ids: Vec<_> = templates.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        ids,
        ["image_blur", "image_invert", "img2img_sdxl", "txt2img_sdxl"]
    );
}

#[test]
fn binding_fills_defaults_and_writes_targets() {
    let given = json!({"width": 640, "blur_radius": 9})
        .as_object()
        .unwrap()
        .clone();
    let (graph, bound) = blur().bind(&given).unwrap();
    assert_eq!(graph["1"]["inputs"]["width"], 640);
    assert_eq!(graph["1"]["inputs"]["height"], 512);
    assert_eq!(graph["2"]["inputs"]["blur_radius"], 9);
    assert_eq!(graph["2"]["inputs"]["image"], json!(["1", 0]));
    assert_eq!(bound["filename_prefix"], "orchestrator");
}

#[test]
fn binding_names_the_parameter_at_fault() {
    let t = blur();
    let cases = [
        (json!({"width": "abc"}), "parameters.width", "integer"),
        (json!({"width": 8}), "parameters.width", "at least 16"),
        (json!({"width": 1.5}), "parameters.width", "integer"),
        (
            json!({"blur_radius": 32}),
            "parameters.blur_radius",
            "at most 31",
        ),
        (json!({"colour": 1}), "parameters.colour", "no parameter"),
    ];
    for (given, field, needle) in cases {
        let err = t.bind(given.as_object().unwrap()).unwrap_err();
        assert_eq!(err.field, field);
        assert!(err.message.contains(needle), "{}", err.message);
    }
}

#[test]
fn a_required_parameter_must_be_given() {
    let t = Catalog::load(Path::new("/nonexistent"))
        .get("txt2img_sdxl")
        .unwrap();
    let err = t.bind(&Map::new()).unwrap_err();
    assert_eq!(err.field, "parameters.prompt");
    let (graph, _) = t
        .bind(
            json!({"prompt": "a cat", "seed": 18446744073709551615u64})
                .as_object()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(graph["6"]["inputs"]["text"], "a cat");
    assert_eq!(graph["3"]["inputs"]["seed"], json!(18446744073709551615u64));
}

#[test]
fn a_folder_template_is_found_without_restart_and_bad_ones_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::load(dir.path());
    assert!(catalog.get("mine").is_none());
    std::fs::write(
        dir.path().join("mine.json"),
        include_str!("builtin/image_blur.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("mine.yaml"),
        "parameters:\n  w: {type: int, default: 3, target: 1.inputs.width}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.json"),
        include_str!("builtin/image_blur.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "parameters:\n  w: {type: int, target: 9.inputs.width}\n",
    )
    .unwrap();
    catalog.reload();
    let t = catalog.get("mine").unwrap();
    assert_eq!(t.parameters[0].name, "w");
    let (_, errors) = catalog.list();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].error.contains("no node `9`"),
        "{}",
        errors[0].error
    );
}

#[test]
fn the_ui_format_is_refused_with_advice() {
    let err = validate_graph(&json!({"nodes": [], "links": []})).unwrap_err();
    assert!(err.message.contains("Save (API)"));
}
