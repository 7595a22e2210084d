//! The dashboard in a real headless browser (Debian's `chromium`, driven over
//! the DevTools protocol): it loads with no console errors, a submitted job
//! appears and reaches `completed` on screen through the live updates, and a
//! screenshot of each page is taken (kept under docs/screenshots/ when
//! UPDATE_SCREENSHOTS=1).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Browser {
    child: tokio::process::Child,
    ws: Ws,
    next: u64,
    errors: Vec<String>,
    /// Requests the page made that DevTools holds (`Fetch.enable`), by id.
    held: Vec<String>,
    _profile: tempfile::TempDir,
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Chromium, or `None` after saying the test is skipped (never on CI,
/// whose `.ci/run` installs it).
fn chromium_or_skip() -> Option<PathBuf> {
    let exe = chromium();
    if exe.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have chromium (.ci/run installs it)"
        );
        eprintln!("SKIPPED: no chromium on this machine (apt-get install chromium)");
    }
    exe
}

impl Browser {
    async fn launch(exe: PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools address");
        })
        .await
        .expect("DevTools within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // One page target, driven over its own socket.
        let http = browser_ws.replace("ws://", "http://");
        let base = &http[..http.find("/devtools").unwrap()];
        let target: Value = reqwest::Client::new()
            .put(format!("{base}/json/new?about:blank"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (ws, _) =
            tokio_tungstenite::connect_async(target["webSocketDebuggerUrl"].as_str().unwrap())
                .await
                .unwrap();
        let mut b = Browser {
            child,
            ws,
            next: 0,
            errors: Vec::new(),
            held: Vec::new(),
            _profile: profile,
        };
        for m in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(m, json!({})).await;
        }
        b
    }

    /// Sends one command and returns its result, noting console errors on the way.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(Message::Text(
                json!({"id": id, "method": method, "params": params})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("DevTools answers")
                .unwrap()
                .unwrap();
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            match v["method"].as_str() {
                Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                    self.errors.push(v["params"]["args"].to_string())
                }
                Some("Runtime.exceptionThrown") => self
                    .errors
                    .push(v["params"]["exceptionDetails"].to_string()),
                Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" => {
                    self.errors.push(v["params"]["entry"]["text"].to_string())
                }
                // An alert the test did not ask for blocks the page: an error.
                Some("Page.javascriptDialogOpening") => self
                    .errors
                    .push(format!("dialog: {}", v["params"]["message"])),
                Some("Fetch.requestPaused") => self
                    .held
                    .push(v["params"]["requestId"].as_str().unwrap().to_string()),
                _ => {}
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expression).await;
            if !v.is_null() && v != json!(false) && v != json!("") {
                return v;
            }
            if Instant::now() > deadline {
                // What it showed instead, and what it said: the story of a rare failure.
                let page = self
                    .call(
                        "Runtime.evaluate",
                        json!({"expression": "location.hash + '\\n' + document.body.innerText", "returnByValue": true}),
                    )
                    .await;
                let now = self
                    .call(
                        "Runtime.evaluate",
                        json!({"expression": "fetch('/api/jobs?limit=100&status=queued').then(r => r.text())", "awaitPromise": true, "returnByValue": true}),
                    )
                    .await;
                panic!(
                    "the page never showed {what}\n--- it showed:\n{}\n--- console errors: {:?}\n--- queued now: {}",
                    page["result"]["value"].as_str().unwrap_or(&page.to_string()),
                    self.errors,
                    now["result"]["value"]
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    async fn screenshot(&mut self, name: &str, dir: &std::path::Path) {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_job_reach_completed_live_with_no_console_errors() {
    let Some(exe) = chromium_or_skip() else {
        return;
    };
    let sim = start_sim(2_500).await;
    let app = spawn_farm(vec![backend("gpu-box-1", sim.port, &["sdxl"], 2)]).await;
    app.wait_backend("gpu-box-1", "online").await;
    let mut b = Browser::launch(exe).await;
    b.goto(&format!("{}/#/", app.url)).await;
    b.wait_for(
        "the jobs table",
        "document.querySelector('table') !== null && document.getElementById('live').className",
    )
    .await;
    b.wait_for(
        "the live stream",
        "document.getElementById('live').classList.contains('on')",
    )
    .await;

    // A job submitted now appears, runs with a progress bar, and completes, without a reload.
    let id = app.submit_blur(json!({"parameters": {"width": 256, "height": 256, "color": 3355647}, "metadata": {"shot": "sc01_sh010"}})).await;
    let row = format!("document.getElementById('job-{id}')");
    b.wait_for("the new job", &format!("{row} !== null")).await;
    b.wait_for(
        "its progress bar",
        &format!("{row} && {row}.querySelector('.bar') !== null"),
    )
    .await;
    let shots = match std::env::var("UPDATE_SCREENSHOTS") {
        Ok(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots"),
        Err(_) => tempfile::tempdir().unwrap().keep(),
    };
    b.wait_for(
        "completed",
        &format!("{row} && {row}.dataset.status === 'completed'"),
    )
    .await;
    let text = b.eval(&format!("{row}.innerText")).await;
    assert!(text.as_str().unwrap().contains("completed"), "{text}");
    // A second job running, for the screenshot.
    let running = app
        .submit_blur(json!({"parameters": {"color": 16744448}}))
        .await;
    b.wait_for(
        "a running job",
        &format!("document.querySelector('#job-{running} .bar') !== null"),
    )
    .await;
    b.screenshot("jobs.png", &shots).await;

    // The job page: parameters, attempts, events, the output image.
    b.goto(&format!("{}/#/job/{id}", app.url)).await;
    b.wait_for("the output image", "(() => { const i = document.querySelector('.outputs img'); return i && i.complete && i.naturalWidth > 0; })()").await;
    let page = b.eval("document.body.innerText").await;
    let page = page.as_str().unwrap();
    assert!(
        page.contains("gpu-box-1")
            && page.contains("submitted_to_backend")
            && page.contains("blur_radius"),
        "{page}"
    );
    b.screenshot("job.png", &shots).await;

    // The backends page, and its drain button.
    b.goto(&format!("{}/#/backends", app.url)).await;
    b.wait_for(
        "the backend row",
        "document.getElementById('backend-gpu-box-1') !== null",
    )
    .await;
    // What the backend runs now is listed on its row.
    let on_row = format!(
        "document.getElementById('backend-gpu-box-1').innerHTML.includes('{}')",
        short(&running)
    );
    b.wait_for("the running job on the backend's row", &on_row)
        .await;
    // Its address links the box's own ComfyUI page.
    let link = b
        .eval("document.querySelector('#backend-gpu-box-1 a[target=_blank]').getAttribute('href')")
        .await;
    assert_eq!(link, json!(format!("http://127.0.0.1:{}", sim.port)));
    b.screenshot("backends.png", &shots).await;
    b.eval("document.querySelector('#backend-gpu-box-1 button[data-act$=\"/drain\"]').click()")
        .await;
    poll("drain from the page", || async {
        let (_, b) = app.get("/api/backends/gpu-box-1").await;
        (b["admin_state"] == "draining").then_some(())
    })
    .await;
    b.wait_for(
        "the drained state on screen",
        "document.getElementById('backend-gpu-box-1').innerText.includes('draining')",
    )
    .await;

    // A job queued while the only backend drains: its page says why it
    // waits, and its priority changes from there.
    let waiting = app.submit_blur(json!({})).await;
    b.goto(&format!("{}/#/job/{waiting}", app.url)).await;
    b.wait_for(
        "why the job waits",
        "document.getElementById('set-priority') !== null && document.body.innerText.includes('Waiting for')",
    )
    .await;
    let why = app.job(&waiting).await["waiting_for"].clone();
    let page = b.eval("document.body.innerText").await;
    assert!(
        page.as_str().unwrap().contains(why.as_str().unwrap()),
        "{page}"
    );
    b.eval("window.prompt = () => '7'; document.getElementById('set-priority').click()")
        .await;
    poll("the priority set from the page", || async {
        (app.job(&waiting).await["priority"] == 7).then_some(())
    })
    .await;
    b.wait_for(
        "the new priority on the page",
        "document.body.innerText.includes('priority_changed')",
    )
    .await;
    // Its start time set from there, then dropped.
    b.eval("window.prompt = () => '2099-01-01T20:00:00Z'; document.getElementById('set-start').click()")
        .await;
    poll("the start time set from the page", || async {
        let job = app.job(&waiting).await;
        (job["not_before"] == "2099-01-01T20:00:00Z").then_some(())
    })
    .await;
    b.wait_for(
        "the start time on the page",
        "document.body.innerText.includes('2099-01-01 20:00:00')",
    )
    .await;
    b.eval("window.prompt = () => ''; document.getElementById('set-start').click()")
        .await;
    poll("the start time dropped from the page", || async {
        app.job(&waiting).await["not_before"]
            .is_null()
            .then_some(())
    })
    .await;

    // A second pass of that shot, submitted from its page before it ran:
    // the form starts from its output; the new job's page says what it
    // waits for and links the job it starts from.
    b.eval("document.getElementById('start-from').click()")
        .await;
    b.wait_for(
        "the form for a job from its output",
        &format!(
            "(document.querySelector('[data-keep]') || {{}}).dataset?.keep === 'job:{waiting}'"
        ),
    )
    .await;
    b.eval("document.getElementById('submit-go').click()").await;
    let child = b
        .wait_for(
            "the new job's page",
            "location.hash.startsWith('#/job/') && location.hash.slice(6)",
        )
        .await;
    let child = child.as_str().unwrap().to_string();
    assert_ne!(child, waiting);
    assert_eq!(app.job(&child).await["starts_from"], json!([waiting]));
    b.wait_for(
        "the job it starts from, linked",
        &format!("document.querySelector('a[href=\"#/job/{waiting}\"]') !== null && document.body.innerText.includes('Starts from')"),
    )
    .await;
    let page = b.eval("document.body.innerText").await;
    let page = page.as_str().unwrap();
    assert!(
        page.contains("waiting") && page.contains("Waiting for"),
        "{page}"
    );

    // The queued jobs, filtered on the list, cancelled at once.
    b.goto(&format!("{}/#/", app.url)).await;
    let filter = |status: &str| {
        format!("document.querySelector('#filters select[name=status]').value = '{status}'; document.getElementById('filters').requestSubmit()")
    };
    b.wait_for("the filters", "document.getElementById('filters') !== null")
        .await;
    // The waiting ones say, on the list, what each waits for.
    b.eval(&filter("waiting")).await;
    b.wait_for(
        "the waiting job's row, linking the job it waits for",
        &format!("(document.querySelector('#job-{child} .waits-for a[href=\"#/job/{waiting}\"]') || {{}}).innerText === '{}'", short(&waiting)),
    )
    .await;
    b.eval(&filter("queued")).await;
    b.wait_for(
        "the button for the queued jobs",
        // The queued list drawn, not the waiting one before it (its one
        // job has the same button).
        &format!("document.getElementById('job-{waiting}') !== null && (document.getElementById('bulk') || {{}}).innerText === 'Cancel this job'"),
    )
    .await;
    // Paused from the list: its row says so, and offers to resume it.
    b.eval("window.confirm = () => true; document.getElementById('bulk-pause').click()")
        .await;
    b.wait_for(
        "the paused row",
        &format!("(document.querySelector('#job-{waiting} .paused') || {{}}).innerText === 'paused' && document.querySelector('#job-{waiting} button[data-act$=\"/resume\"]') !== null"),
    )
    .await;
    assert!(app.job(&waiting).await["paused_at"].is_string());
    b.eval("window.confirm = () => true; document.getElementById('bulk').click()")
        .await;
    app.wait_status(&waiting, "cancelled").await;
    // Its second pass can no longer run: it failed with it.
    app.wait_status(&child, "failed").await;
    b.wait_for(
        "no queued job left",
        "document.getElementById('bulk') === null && document.body.innerText.includes('No jobs.')",
    )
    .await;
    b.eval(&filter("")).await;
    b.wait_for(
        "every job listed again",
        &format!("document.getElementById('job-{id}') !== null"),
    )
    .await;
    // Why the failed one failed, above the list, linking it.
    b.wait_for(
        "the failures' cause",
        &format!("(document.getElementById('failure-causes') || {{}}).innerText === 'why they failed: 1 × parent_failed ({})' && document.querySelector('#failure-causes a[href=\"#/job/{child}\"]') !== null", short(&child)),
    )
    .await;
    // How far the jobs got, by status, above the list: a count filters
    // the list to its status.
    b.wait_for(
        "the count of the cancelled job",
        "(document.querySelector('#counts a[data-count=cancelled]') || {}).innerText === '1 cancelled'",
    )
    .await;
    b.eval("document.querySelector('#counts a[data-count=cancelled]').click()")
        .await;
    b.wait_for(
        "the list filtered to the cancelled job",
        &format!("document.querySelector('#filters select[name=status]').value === 'cancelled' && document.getElementById('job-{waiting}') !== null && document.getElementById('job-{id}') === null"),
    )
    .await;
    b.eval(&filter("")).await;
    b.wait_for(
        "every job listed again",
        &format!("document.getElementById('job-{id}') !== null"),
    )
    .await;

    // The backend's own page: what it can run, and a refresh after a model
    // was copied to it.
    b.goto(&format!("{}/#/backend/gpu-box-1", app.url)).await;
    b.wait_for(
        "the inventory",
        "document.getElementById('inventory-summary') !== null",
    )
    .await;
    let page = b.eval("document.body.innerText").await;
    let page = page.as_str().unwrap();
    assert!(
        page.contains("478 node classes") && page.contains("sd_xl_base_1.0.safetensors"),
        "{page}"
    );
    sim.set_checkpoints(&["sd_xl_base_1.0.safetensors", "copied_today.safetensors"]);
    b.eval("document.querySelector('button[data-act$=\"/refresh\"]').click()")
        .await;
    b.wait_for(
        "the new model on the page",
        "document.getElementById('inventory-models').innerText.includes('copied_today.safetensors')",
    )
    .await;
    b.screenshot("backend.png", &shots).await;
    app.post_json("/api/backends/gpu-box-1/enable", &json!({}))
        .await;

    // The jobs list shows a thumbnail of the finished job.
    b.goto(&format!("{}/#/", app.url)).await;
    b.wait_for(
        "the finished job's thumbnail",
        &format!("(() => {{ const i = document.querySelector('#job-{id} img.thumb'); return i && i.complete && i.naturalWidth > 0; }})()"),
    )
    .await;

    // The farm view: a row per backend, a bar per finished attempt (those
    // finished before the page is drawn, at least: counted first).
    let (_, farm) = app.get("/api/farm").await;
    let finished = farm["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["finished_at"].is_string())
        .count();
    assert!(finished >= 1, "{farm}");
    b.goto(&format!("{}/#/farm", app.url)).await;
    b.wait_for(
        "the timeline",
        "document.querySelectorAll('#farm-timeline .farm-row').length === 1",
    )
    .await;
    let bars = b
        .eval("document.querySelectorAll('#farm-timeline rect.attempt[data-outcome=completed]').length")
        .await;
    assert!(
        bars.as_u64().unwrap() as usize >= finished,
        "{bars} bars, {finished} finished"
    );
    b.wait_for(
        "the bar of the first job",
        &format!(
            "document.querySelector('#farm-timeline rect.attempt[data-job=\"{id}\"]') !== null"
        ),
    )
    .await;
    b.screenshot("farm.png", &shots).await;

    // A page's answer that comes after the user moved on never paints over
    // the page they moved to: the farm's answer is held until the form is
    // shown, then let through.
    b.call(
        "Fetch.enable",
        json!({"patterns": [{"urlPattern": "*/api/farm?*"}]}),
    )
    .await;
    b.eval("performance.clearResourceTimings()").await;
    b.goto(&format!("{}/#/farm/held", app.url)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.held.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the farm's request was never made"
        );
        b.eval("0").await;
    }
    b.goto(&format!("{}/#/submit", app.url)).await;
    b.wait_for(
        "the form",
        "document.getElementById('submit-workflow') !== null",
    )
    .await;
    for request in std::mem::take(&mut b.held) {
        b.call("Fetch.continueRequest", json!({"requestId": request}))
            .await;
    }
    b.call("Fetch.disable", json!({})).await;
    // Its answer has arrived once the page lists it among its resources; the
    // page handles it within the next turns of its event loop.
    b.wait_for(
        "the farm's answer",
        "performance.getEntriesByType('resource').some(e => e.name.includes('/api/farm?'))",
    )
    .await;
    let after = b
        .call(
            "Runtime.evaluate",
            json!({
                "expression": "new Promise(r => setTimeout(() => setTimeout(() => r(document.getElementById('submit-workflow') !== null && location.hash), 0), 0))",
                "awaitPromise": true,
                "returnByValue": true,
            }),
        )
        .await;
    assert_eq!(
        after["result"]["value"], "#/submit",
        "the farm's late answer painted over the form"
    );

    // Submit from the form: a bad value is shown beside its field, a good
    // one runs.
    b.eval("(() => { const s = document.getElementById('submit-workflow'); s.value = 'image_blur'; s.dispatchEvent(new Event('change')); })()")
        .await;
    b.wait_for(
        "the blur fields",
        "document.getElementById('param-width') !== null",
    )
    .await;
    b.eval("document.getElementById('param-width').value = '99999'; document.getElementById('submit-go').click()")
        .await;
    let shown = b
        .wait_for(
            "the error beside the width",
            "document.querySelector('.field-error[data-field=\"parameters.width\"]').textContent || false",
        )
        .await;
    assert!(shown.as_str().unwrap().contains("8192"), "{shown}");
    // The browser logs the refused request itself; that one was asked for.
    b.errors.retain(|e| !e.contains("status of 422"));
    b.screenshot("submit.png", &shots).await;
    b.eval("document.getElementById('param-width').value = '96'; document.getElementById('submit-go').click()")
        .await;
    let hash = b
        .wait_for(
            "the new job's page",
            "location.hash.startsWith('#/job/') && location.hash",
        )
        .await;
    let from_form = hash
        .as_str()
        .unwrap()
        .trim_start_matches("#/job/")
        .to_string();
    let job = app.wait_status(&from_form, "completed").await;
    assert_eq!(job["parameters"]["width"], 96);
    // Run again with changes: the form comes back filled in.
    b.wait_for(
        "the run-again link",
        &format!("document.querySelector('a[href=\"#/submit/{from_form}\"]') !== null"),
    )
    .await;
    b.eval(&format!(
        "document.querySelector('a[href=\"#/submit/{from_form}\"]').click()"
    ))
    .await;
    b.wait_for(
        "the form filled from the job",
        "document.getElementById('param-width') && document.getElementById('param-width').value === '96'",
    )
    .await;

    // A template that starts from a picture: the file field uploads it.
    let picture = tempfile::tempdir().unwrap();
    let frame = picture.path().join("frame.png");
    image::RgbImage::from_pixel(32, 16, image::Rgb([10, 200, 30]))
        .save(&frame)
        .unwrap();
    b.eval("(() => { const s = document.getElementById('submit-workflow'); s.value = 'image_invert'; s.dispatchEvent(new Event('change')); })()")
        .await;
    b.wait_for(
        "the picture field",
        "document.getElementById('param-image') !== null",
    )
    .await;
    let doc = b.call("DOM.getDocument", json!({})).await;
    let node = b
        .call(
            "DOM.querySelector",
            json!({"nodeId": doc["root"]["nodeId"], "selector": "#param-image"}),
        )
        .await;
    b.call(
        "DOM.setFileInputFiles",
        json!({"nodeId": node["nodeId"], "files": [frame.to_str().unwrap()]}),
    )
    .await;
    b.eval("document.getElementById('submit-go').click()").await;
    let hash = b
        .wait_for(
            "the picture job's page",
            &format!("location.hash.startsWith('#/job/') && !location.hash.endsWith('{from_form}') && location.hash"),
        )
        .await;
    let inverted = hash
        .as_str()
        .unwrap()
        .trim_start_matches("#/job/")
        .to_string();
    let job = app.wait_status(&inverted, "completed").await;
    assert!(
        job["parameters"]["image"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{job}"
    );

    // A job submitted to start tomorrow says so on the list.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let scheduled = app.submit_blur(json!({"start_after": tomorrow})).await;
    b.goto(&format!("{}/#/", app.url)).await;
    let starts = b
        .wait_for(
            "the scheduled job's start on its row",
            &format!("(document.querySelector('#job-{scheduled} .scheduled') || {{}}).innerText"),
        )
        .await;
    assert!(
        starts
            .as_str()
            .unwrap()
            .starts_with(&format!("starts {}", &tomorrow[..10])),
        "{starts}"
    );
    // Started now from its row.
    b.eval(&format!(
        "document.querySelector('#job-{scheduled} button[data-act$=\"/schedule\"]').click()"
    ))
    .await;
    app.wait_status(&scheduled, "completed").await;

    // What the service wants an operator to see is shown above every page:
    // here an inbox file that waits for the job it starts from.
    let inbox = app.config.data_dir.join("inbox");
    std::fs::write(
        inbox.join("sh020_pass2.json"),
        json!({"workflow_id": "image_invert", "parameters": {"image": "job:key:sh020/pass1"}})
            .to_string(),
    )
    .unwrap();
    poll("the inbox file listed as waiting", || async {
        let health = app.get("/api/health").await.1;
        (health["inbox_waiting"][0]["file"] == "sh020_pass2.json").then_some(())
    })
    .await;
    b.goto(&format!("{}/#/backends", app.url)).await;
    let notice = b
        .wait_for(
            "the inbox notice",
            "document.getElementById('notices').innerText",
        )
        .await;
    let notice = notice.as_str().unwrap();
    assert!(
        notice.contains("sh020_pass2.json")
            && notice.contains("no job here has the idempotency key `sh020/pass1`"),
        "{notice}"
    );

    assert!(b.errors.is_empty(), "console errors: {:?}", b.errors);
    let _ = b.child.kill().await;
}

/// A running shot paused from its page to make way on its box: the button
/// asks first (its run is lost), the job goes back to the queue paused, and
/// its row on the list says so and offers to resume it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_paused_from_its_page_by_stopping_it_on_its_box() {
    let Some(exe) = chromium_or_skip() else {
        return;
    };
    let sim = start_sim(60_000).await;
    let app = spawn_farm(vec![backend("gpu-box-1", sim.port, &[], 1)]).await;
    let long = app.submit_blur(json!({})).await;
    app.wait_status(&long, "running").await;
    let mut b = Browser::launch(exe).await;
    b.goto(&format!("{}/#/job/{long}", app.url)).await;
    let pause = "document.querySelector('h2 button[data-act$=\"/pause\"]')";
    let asks = b
        .wait_for(
            "the pause button",
            &format!("{pause} && {pause}.dataset.confirm"),
        )
        .await;
    assert!(
        asks.as_str()
            .unwrap()
            .contains("backend gpu-box-1? Its run is lost"),
        "{asks}"
    );
    // Declined: nothing is asked (the request would start in the click).
    let asked = b
        .eval(&format!("window.pauses = 0; const f = window.fetch; window.fetch = (...a) => {{ if (String(a[0]).endsWith('/pause')) window.pauses++; return f(...a); }}; window.confirm = () => false; {pause}.click(); window.pauses"))
        .await;
    assert_eq!(asked, json!(0));
    // Its node looks for the interrupt late (the first fifteen are lost,
    // over a second): meanwhile its page says the pause is under way.
    sim.ignore_interrupts(15);
    let asked = b
        .eval(&format!(
            "window.confirm = () => true; {pause}.click(); window.pauses"
        ))
        .await;
    assert_eq!(asked, json!(1));
    let pausing = b
        .wait_for(
            "the pause under way",
            "(document.getElementById('pausing') || {}).innerText",
        )
        .await;
    assert!(
        pausing
            .as_str()
            .unwrap()
            .contains("backend gpu-box-1 is being asked to stop it"),
        "{pausing}"
    );
    let job = app
        .wait_job(&long, "queued again, paused", |j| {
            j["status"] == "queued" && j["paused_at"].is_string()
        })
        .await;
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job}");
    b.goto(&format!("{}/#/", app.url)).await;
    b.wait_for(
        "the paused row, offering to resume it",
        &format!("(document.querySelector('#job-{long} .paused') || {{}}).innerText === 'paused' && document.querySelector('#job-{long} button[data-act$=\"/resume\"]') !== null"),
    )
    .await;
    // Resumed from its row, it runs again; the list of running jobs
    // stops and pauses them all at once.
    b.eval(&format!(
        "document.querySelector('#job-{long} button[data-act$=\"/resume\"]').click()"
    ))
    .await;
    app.wait_job(&long, "running again", |j| {
        j["status"] == "running" && j["leases"].as_array().unwrap().len() == 2
    })
    .await;
    b.eval("document.querySelector('#filters select[name=status]').value = 'running'; document.getElementById('filters').requestSubmit()")
        .await;
    b.wait_for(
        "the list's stop and pause",
        &format!("document.getElementById('job-{long}') !== null && (document.getElementById('bulk-pause') || {{}}).innerText === 'Stop and pause this job'"),
    )
    .await;
    // Its node looks for the interrupt late again: meanwhile its row says
    // it is being stopped.
    sim.ignore_interrupts(15);
    b.eval("window.confirm = () => true; document.getElementById('bulk-pause').click()")
        .await;
    b.wait_for(
        "the row of the job being stopped",
        &format!("(document.querySelector('#job-{long} .paused') || {{}}).innerText === 'pausing: being stopped'"),
    )
    .await;
    let job = app
        .wait_job(&long, "queued again, paused, from the list", |j| {
            j["status"] == "queued" && j["paused_at"].is_string()
        })
        .await;
    assert_eq!(job["leases"][1]["outcome"], "paused", "{job}");
    // The farm's timeline draws the stopped runs in a colour of their own
    // (not the running one's), named in its legend.
    b.goto(&format!("{}/#/farm", app.url)).await;
    b.wait_for(
        "the stopped runs on the timeline",
        &format!("document.querySelectorAll('#farm-timeline rect.attempt[data-job=\"{long}\"][data-outcome=paused][fill=\"#e3b341\"]').length === 2 && document.body.innerText.includes('paused')"),
    )
    .await;
    assert!(b.errors.is_empty(), "console errors: {:?}", b.errors);
    let _ = b.child.kill().await;
}

/// On a farm shared by `batch`, the farm page names each batch with what
/// it has on the farm and queued; a batch's name leads to its jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_page_of_a_shared_farm_names_each_batch_and_leads_to_its_jobs() {
    let Some(exe) = chromium_or_skip() else {
        return;
    };
    let (_sim, app) = one_box_shared_by_batch("gpu-box-1", 60_000).await;
    let first = app
        .submit_blur(json!({"metadata": {"batch": "anna"}}))
        .await;
    app.wait_status(&first, "running").await;
    let second = app
        .submit_blur(json!({"metadata": {"batch": "anna"}}))
        .await;
    let ben = app.submit_blur(json!({"metadata": {"batch": "ben"}})).await;
    let mut b = Browser::launch(exe).await;
    b.goto(&format!("{}/#/farm", app.url)).await;
    let line = b
        .wait_for(
            "the batches on the farm",
            "(document.getElementById('farm-shares') || {}).innerText",
        )
        .await;
    assert_eq!(
        line,
        json!("shared by batch, the group with the fewest on the farm next: anna 1 on the farm, 1 queued · ben 0 on the farm, 1 queued")
    );
    b.eval("document.querySelector('#farm-shares a[data-meta=\"batch=anna\"]').click()")
        .await;
    b.wait_for(
        "anna's jobs, and only hers",
        &format!("document.getElementById('job-{first}') !== null && document.getElementById('job-{second}') !== null && document.querySelectorAll('tbody tr').length === 2 && document.querySelector('#filters input[name=meta]').value === 'batch=anna'"),
    )
    .await;
    assert_eq!(
        b.eval(&format!("document.getElementById('job-{ben}')"))
            .await,
        Value::Null
    );
    assert!(b.errors.is_empty(), "console errors: {:?}", b.errors);
    let _ = b.child.kill().await;
}

/// A workstation outside its hours is shown as such on the backends page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_page_says_a_workstation_is_outside_its_hours() {
    let Some(exe) = chromium_or_skip() else {
        return;
    };
    let (_sim, app, _, hours) = one_workstation("anna-ws", 3600).await;
    let mut b = Browser::launch(exe).await;
    b.goto(&format!("{}/#/backends", app.url)).await;
    let shown = b
        .wait_for(
            "the workstation's hours",
            "(document.querySelector('.hours') || {}).innerText",
        )
        .await;
    assert_eq!(shown, json!(format!("outside its hours {hours}")));
    // Its Enable lends it to the farm until its hours end: the page says so.
    let (status, _) = app
        .post_json("/api/backends/anna-ws/enable", &json!({}))
        .await;
    assert_eq!(status, 200);
    let shown = b
        .wait_for(
            "the workstation lent",
            "[...document.querySelectorAll('.hours')].map(e => e.innerText).find(t => t.includes('lent'))",
        )
        .await;
    assert!(
        shown
            .as_str()
            .unwrap()
            .starts_with(&format!("hours {hours}; lent by an operator until ")),
        "{shown}"
    );
    assert!(b.errors.is_empty(), "console errors: {:?}", b.errors);
    let _ = b.child.kill().await;
}

/// A batch the farm holds (its shots failing one after the other alike) is
/// shown above every page with a button that lets it go, once asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_is_shown_above_every_page_and_let_go_from_there() {
    let Some(exe) = chromium_or_skip() else {
        return;
    };
    let sim = start_sim(0).await;
    let app = spawn_farm_with(vec![backend("gpu-box-1", sim.port, &[], 1)], |c| {
        c.dispatch.pause_batch_after = 2;
    })
    .await;
    app.wait_backend("gpu-box-1", "online").await;
    let shot =
        json!({"workflow": failing_graph(), "max_attempts": 1, "metadata": {"batch": "night 1"}});
    for _ in 0..2 {
        let (status, body) = app.post_json("/api/job", &shot).await;
        assert_eq!(status, 201, "{body}");
        app.wait_status(body["job_id"].as_str().unwrap(), "failed")
            .await;
    }
    let (_, held) = app.post_json("/api/job", &shot).await;
    assert_eq!(held["paused"], true, "{held}");
    let held = held["job_id"].as_str().unwrap().to_string();
    let mut b = Browser::launch(exe).await;
    b.goto(&format!("{}/#/backends", app.url)).await;
    let button = "document.querySelector('#notices button.resume-batch')";
    let asks = b
        .wait_for(
            "the held batch's notice",
            &format!("{button} && {button}.dataset.confirm"),
        )
        .await;
    assert_eq!(
        asks,
        json!("Resume batch night 1? Its paused jobs run, and its new ones are no longer held: once the cause (IndexError in ImageToMask) is mended.")
    );
    let notice = b.eval("document.getElementById('notices').innerText").await;
    let notice = notice.as_str().unwrap();
    assert!(
        notice.starts_with("batch night 1 was paused by the farm at ")
            && notice.matches("batch night 1 was paused").count() == 1,
        "shown once: {notice}"
    );
    b.eval(&format!("window.confirm = () => true; {button}.click()"))
        .await;
    b.wait_for(
        "the notice gone",
        "document.querySelector('#notices button.resume-batch') === null",
    )
    .await;
    app.wait_status(&held, "failed").await;
    let (_, next) = app.post_json("/api/job", &shot).await;
    assert!(next.get("paused").is_none(), "let go: {next}");
    assert!(b.errors.is_empty(), "console errors: {:?}", b.errors);
    let _ = b.child.kill().await;
}
