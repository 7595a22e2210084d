//! Access control: with `auth.token` set, every route needs it but health.

mod common;

use common::*;
use serde_json::Value;

const TOKEN: &str = "farm-secret-token";

async fn app_with_token() -> TestApp {
    let (mut config, dir) = test_config();
    config.auth.token = Some(TOKEN.into());
    config.cors.origins = vec!["http://storyboard.local:3000".into()];
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    app
}

#[tokio::test]
async fn the_token_is_enforced_on_every_route_but_health() {
    let app = app_with_token().await;
    let c = reqwest::Client::new();
    let doc: Value = c
        .get(format!("{}/openapi.json", app.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut walked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{name}", "x.png");
        for method in item.as_object().unwrap().keys() {
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let url = format!("{}{concrete}", app.url);
            let without = c
                .request(m.clone(), &url)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let with = c
                .request(m.clone(), &url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            if path == "/api/health" {
                assert_eq!(without.status(), 200, "health stays open");
            } else {
                assert_eq!(without.status(), 401, "{method} {path} without a token");
                let body: Value = without.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unauthorized");
            }
            assert_ne!(with.status(), 401, "{method} {path} with the token");
            walked += 1;
        }
    }
    assert!(walked >= 18, "walked {walked} routes");
    // Routes outside the API document: the dashboard, its files, the docs, unknown ones.
    for path in [
        "/assets/app.js",
        "/assets/style.css",
        "/openapi.json",
        "/docs/",
        "/no/such/route",
    ] {
        let r = c.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = c
            .get(format!("{}{path}", app.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 401, "{path}");
    }
    let wrong = c
        .get(format!("{}/api/jobs", app.url))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

#[tokio::test]
async fn the_dashboard_asks_a_browser_to_log_in_and_the_cookie_then_works() {
    let app = app_with_token().await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .get(format!("{}/", app.url))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let r = c.get(format!("{}/login", app.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("name=token"));
    let r = c
        .post(format!("{}/login", app.url))
        .form(&[("token", "wrong-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/login", app.url))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("HttpOnly"));
    let r = c
        .get(format!("{}/api/jobs", app.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/", app.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("/assets/app.js"));
}

#[tokio::test]
async fn cors_answers_only_the_configured_origins() {
    let app = app_with_token().await;
    let c = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, format!("{}/api/job", app.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("http://storyboard.local:3000").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://storyboard.local:3000"
    );
    let other = preflight("http://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // Without configured origins, CORS is off.
    let plain = spawn_app().await;
    let r = c
        .get(format!("{}/api/health", plain.url))
        .header("origin", "http://storyboard.local:3000")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
