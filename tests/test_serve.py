"""``anysize serve``: the job fields, the queue and its worker, the JSON API and events over real HTTP (uvicorn
on a free loopback port), and the page in headless Chromium (Debian's, driven by Playwright), with tiny
random-weight models."""

import contextlib
import os
import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from anysize import cli, serve
from anysize.io.output import read_metadata, read_parameters

FAST = {"steps": 2, "upscale_steps": 2}
COMMANDS = cli.commands()


@pytest.fixture
def models(model_dirs) -> dict[str, list[str]]:
    base, upscaler = model_dirs
    return {"tiny": ["--base", str(base), "--upscaler", str(upscaler), "--device", "cpu"]}


@contextlib.contextmanager
def running(server: serve.Server):
    """``server``'s app on a free 127.0.0.1 port in a thread; yields its URL; stops it after."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=app.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not app.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        app.should_exit = True
        thread.join(30)
        sock.close()


def call(url: str, method: str = "GET", body=None) -> tuple[int, dict | bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, raw, kind = reply.status, reply.read(), reply.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw


def wait_for(url: str, job_id: int, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, job = call(f"{url}/api/jobs/{job_id}")
        assert status == 200
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.05)


# ---------------------------------------------------------------------- the fields
@pytest.mark.parametrize("fields, words", [
    ({"prompt": "x", "width": 4, "height": 64}, ["width x height", "'4x64'", ">= 8"]),
    ({"prompt": "x", "width": "wide", "height": 64}, ["width", "'wide'", "whole number"]),
    ({"prompt": "x", "height": 64}, ["width", "required"]),
    ({"prompt": " ", "width": 64, "height": 64}, ["prompt", "required"]),
    ({"width": 64, "height": 64}, ["prompt", "required"]),
    ({"prompt": "x", "width": 64, "height": 64, "steps": 0}, ["steps", "'0'", ">= 1"]),
    ({"prompt": "x", "width": 64, "height": 64, "guidance": "lots"}, ["guidance", "'lots'"]),
    ({"prompt": "x", "width": 64, "height": 64, "scheduler": "magic"}, ["scheduler", "'magic'", "euler-a"]),
    ({"prompt": "x", "width": 64, "height": 64, "tiling": "mosaic"}, ["tiling", "'mosaic'", "fstd"]),
    ({"prompt": "x", "width": 64, "height": 64, "model": "sdxl"}, ["model", "'sdxl'", "default, tiny"]),
    ({"prompt": "x", "width": 64, "height": 64, "colour": "red"}, ["unknown field colour"]),
    ({"prompt": "x", "width": 64, "height": 64, "steps": [2]}, ["steps", "[2]", "not a number"]),
    ({"prompt": "x", "width": True, "height": 64}, ["width", "true"]),
    ({"prompt": "x" * 5000, "width": 64, "height": 64}, ["prompt", "5000 characters"]),
    ({"prompt": "x", "width": 64, "height": 64, "regions": "0,0,1,1:a\n0,0,0.5,1"},
     ["regions", "x0,y0,x1,y1:prompt"]),
    ({"prompt": "x", "width": 64, "height": 64, "regions": ["0,0,1,1:a"]}, ["regions", "not a text"]),
    ([1, 2], ["JSON object"]),
])
def test_bad_fields_get_one_line_naming_the_field(tmp_path, models, fields, words):
    server = serve.Server(COMMANDS, tmp_path, models, run=lambda job, bar: None)
    with pytest.raises(serve.FieldError) as caught:
        server.submit(fields)
    message = str(caught.value)
    assert "\n" not in message and "--" not in message.replace("--from-image", ""), message
    for word in words:
        assert word in message
    assert server.jobs.all() == [], "a refused job is not queued"


def test_fields_become_the_generate_command_line(tmp_path, models):
    server = serve.Server(COMMANDS, tmp_path, models, run=lambda job, bar: None)
    job = server.submit({"prompt": "a red circle", "width": "200", "height": 120, "seed": 5, "steps": 3,
                         "negative": "-blurry", "scheduler": "euler-a", "model": "tiny", "tile_size": ""})
    assert job.file == tmp_path / "00001-5.png" and job.seed == 5
    args = cli.build_parser().parse_args(["generate", *job.argv])
    assert (args.prompt, args.size, args.output, args.seed, args.steps) == ("a red circle", (200, 120),
                                                                            str(job.file), 5, 3)
    assert args.negative == "-blurry", "a value that starts with '-' stays the option's value"
    assert args.scheduler == "euler-a" and args.base == models["tiny"][1] and args.tile_size is None
    second = server.submit({"prompt": "again", "width": 64, "height": 64})
    assert second.id == 2 and 0 <= second.seed < 2**32, "no seed: one drawn at once, shown from the start"
    assert second.file.name == f"00002-{second.seed}.png"
    third = server.submit({"prompt": "two", "width": 64, "height": 32,
                           "regions": "0,0,0.5,1:a red circle on grass\n\n 0.5,0,1,1,0.5:-a blue square \n"})
    args = cli.build_parser().parse_args(["generate", *third.argv])
    assert [(prompt, weight) for _, prompt, weight in args.region] == [("a red circle on grass", 1.0),
                                                                       ("-a blue square", 0.5)]


# ---------------------------------------------------------------------- the queue and the worker
class FakeRun:
    """A runner whose jobs count ``tiles`` tiles through the job's bar, waiting on ``gate`` at each."""

    def __init__(self, tiles: int = 5, fail: str | None = None):
        self.tiles, self.fail, self.order = tiles, fail, []
        self.gate = threading.Semaphore(0)

    def __call__(self, job, bar):
        self.order.append(job.id)
        if job.fields["prompt"] == self.fail:
            raise ValueError("bad thing\nsecond line")
        progress = bar(total=self.tiles, desc="stage 1 (bucket 64x64)", unit="tile", initial=0)
        for _ in range(self.tiles):
            assert self.gate.acquire(timeout=30)
            progress.update(1)
        progress.close()
        PIL.Image.new("RGB", (8, 8)).save(job.file)


def test_jobs_run_one_at_a_time_in_order_and_cancel(tmp_path, models):
    run = FakeRun(tiles=3)
    server = serve.Server(COMMANDS, tmp_path, models, run=run)
    seen = []
    server.broker.publish = lambda event: seen.append((event["id"], event["state"], event["progress"]))
    first, second, third = (server.submit({"prompt": p, "width": 64, "height": 64}) for p in "abc")
    server.worker.start()
    try:
        deadline = time.monotonic() + 10
        while first.progress is None:  # the worker took it and opened its bar
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (first.state, second.state, third.state) == ("running", "queued", "queued")
        assert server.jobs.cancel(second) and second.state == "cancelled"
        for _ in range(3):
            run.gate.release()
        assert server.jobs.cancel(third)  # queued still, or running and stopped at its first tile
        for _ in range(3):  # a third job already waiting at its first tile goes on to it, and stops there
            run.gate.release()
        deadline = time.monotonic() + 10
        while third.state not in ("cancelled", "done") or first.state != "done":
            assert time.monotonic() < deadline, (first.state, third.state)
            time.sleep(0.01)
    finally:
        server.jobs.close()
    assert first.state == "done" and third.state == "cancelled" and third.error is None
    assert run.order in ([1], [1, 3]), "the cancelled queued job never ran"
    assert not third.file.exists()
    assert not server.jobs.cancel(first), "a finished job cannot be cancelled"
    states = [(i, s) for i, s, _ in seen]
    assert states.index((1, "running")) < states.index((1, "done"))
    ticks = [p["n"] for i, s, p in seen if i == 1 and s == "running" and p]
    assert ticks == sorted(ticks) and ticks[-1] == 3, ticks


def test_a_running_job_stops_at_its_next_tile(tmp_path, models):
    run = FakeRun(tiles=100)
    server = serve.Server(COMMANDS, tmp_path, models, run=run)
    job = server.submit({"prompt": "a", "width": 64, "height": 64})
    server.worker.start()
    try:
        for _ in range(3):
            run.gate.release()
        deadline = time.monotonic() + 10
        while not job.progress or job.progress["n"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert server.jobs.cancel(job) and job.public()["cancelling"]
        run.gate.release()
        while job.state == "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server.jobs.close()
    assert job.state == "cancelled" and job.progress["n"] == 3 and not job.file.exists()


def test_a_failed_job_says_why_in_one_line_and_the_worker_goes_on(tmp_path, models, capsys):
    run = FakeRun(tiles=1, fail="boom")
    server = serve.Server(COMMANDS, tmp_path, models, run=run)
    bad, good = server.submit({"prompt": "boom", "width": 64, "height": 64}), server.submit(
        {"prompt": "fine", "width": 64, "height": 64})
    run.gate.release()
    server.worker.start()
    try:
        deadline = time.monotonic() + 10
        while good.state != "done":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server.jobs.close()
    assert bad.state == "failed" and bad.error == "bad thing ..."
    assert "job 1 failed: bad thing" in capsys.readouterr().err


# ---------------------------------------------------------------------- over HTTP, tiny models
def test_api_generates_an_image_the_cli_makes_again(tmp_path, models, capsys):
    """A job over the API writes exactly the asked size, with A1111's text; its stored command line, run by
    the CLI (--from-image), makes the same pixels: page and CLI are one thing."""
    server = serve.Server(COMMANDS, tmp_path / "out", models)
    with running(server) as url:
        status, options = call(f"{url}/api/options")
        assert status == 200 and options["models"] == ["default", "tiny"] and "dpm++2m-karras" in options["schedulers"]
        fields = {"prompt": "a red circle on grass", "width": 72, "height": 40, "seed": 11, "model": "tiny",
                  "scheduler": "euler", **FAST}
        status, job = call(f"{url}/api/jobs", "POST", fields)
        assert status == 201 and job["state"] in ("queued", "running"), job
        job = wait_for(url, job["id"])
        assert job["state"] == "done", job
        status, png = call(f"{url}/api/jobs/{job['id']}/image")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
        status, thumb = call(f"{url}/api/jobs/{job['id']}/thumb")
        assert status == 200 and thumb[:2] == b"\xff\xd8"
        status, listed = call(f"{url}/api/jobs")
        assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    path = tmp_path / "out" / job["file"]
    assert PIL.Image.open(path).size == (72, 40)
    listed = serve.Server(COMMANDS, tmp_path / "out", models).jobs.all()  # a restart lists it again
    assert [(j.id, j.state, j.seed, j.fields["prompt"], j.fields["width"], j.fields["height"]) for j in listed] \
        == [(1, "done", 11, "a red circle on grass", 72, 40)]
    assert listed[0].parameters == job["parameters"] and listed[0].public()["command"] == job["command"]
    assert job["parameters"] == read_parameters(path) and "Sampler: Euler, " in job["parameters"]
    assert "Seed: 11, Size: 72x40" in job["parameters"]
    assert read_metadata(path)["argv"][0] == "generate"
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-image", str(path), "-o", str(again)]) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(path)))


def test_events_stream_progress_per_stage_and_tile(tmp_path, models):
    server = serve.Server(COMMANDS, tmp_path, models)
    with running(server) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/events")
        reply = conn.getresponse()
        assert reply.status == 200 and reply.headers.get_content_type() == "text/event-stream"
        status, job = call(f"{url}/api/jobs", "POST", {"prompt": "a blue square", "width": 200, "height": 120,
                                                        "seed": 1, "model": "tiny", **FAST})
        assert status == 201
        events = []
        while not events or events[-1]["state"] not in ("done", "failed"):
            line = reply.readline().decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
        conn.close()
    assert events[-1]["state"] == "done", events[-1]
    descs = {e["progress"]["desc"] for e in events if e["state"] == "running" and e["progress"]}
    assert any(d.startswith("stage 1") for d in descs) and any(d.startswith("stage 2") for d in descs), descs
    stage2 = [e["progress"] for e in events if e["progress"] and e["progress"]["desc"].startswith("stage 2")]
    assert stage2[-1]["n"] == stage2[-1]["total"] > 1, "stage 2 reports every tile up to the last"


def test_http_errors_are_one_json_line(tmp_path, models):
    server = serve.Server(COMMANDS, tmp_path, models, run=FakeRun(tiles=1))
    with running(server) as url:
        status, body = call(f"{url}/api/jobs", "POST", b"{not json")
        assert status == 400 and body["error"].startswith("the body is not JSON")
        status, body = call(f"{url}/api/jobs", "POST", {"prompt": "x", "width": 2, "height": 9})
        assert status == 400 and body["error"].startswith("width x height: '2x9'")
        assert call(f"{url}/api/jobs/99")[0] == 404
        assert call(f"{url}/api/jobs/abc")[0] == 404
        assert call(f"{url}/api/jobs/99/cancel", "POST")[0] == 404
        status, job = call(f"{url}/api/jobs", "POST", {"prompt": "x", "width": 64, "height": 64})
        status, body = call(f"{url}/api/jobs/{job['id']}/image")
        assert status == 404 and "has no image" in body["error"]
        assert call(f"{url}/static/../../../etc/passwd")[0] == 404


def test_a_restarted_server_lists_the_images_it_made(tmp_path, models):
    run = FakeRun(tiles=1)
    run.gate.release()
    server = serve.Server(COMMANDS, tmp_path, models, run=run)
    with running(server) as url:
        status, job = call(f"{url}/api/jobs", "POST", {"prompt": "x", "width": 64, "height": 64, "seed": 4})
        wait_for(url, job["id"])
    (tmp_path / "notes.png").write_bytes(b"not ours")
    again = serve.Server(COMMANDS, tmp_path, models, run=run)
    listed = again.jobs.all()
    assert [(j.id, j.state, j.seed, j.file.name) for j in listed] == [(1, "done", 4, "00001-4.png")]
    assert again.jobs.next_number == 2, "a new job never takes an old job's number"


def test_cli_serve_errors_are_one_line(capsys):
    assert cli.main(["serve", "--upscaler", "x"]) == 2
    assert "--upscaler: the upscaler of every --base" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "anysize: error:" in err


# ---------------------------------------------------------------------- what a person sees
class SlowRun(serve.Runner):
    """The real runner, with each tile slowed by 0.1 s, so a screenshot can catch a job running.
    ``gate``: an event each tile waits for (at most 60 s) before it counts, so a test holds the job
    running until it has seen what it needs: the page's events arrive when the browser's connection
    is up, which timing alone does not promise."""

    def __init__(self, commands, gate: threading.Event | None = None):
        super().__init__(commands)
        self.gate = gate

    def __call__(self, job, bar):
        gate = self.gate

        def slow(**kw):
            inner = bar(**kw)

            class Bar:
                def update(self, n=1):
                    time.sleep(0.1)
                    if gate is not None and not gate.wait(60):
                        raise TimeoutError("the test never opened the gate")
                    inner.update(n)

                def close(self):
                    inner.close()
            return Bar()
        super().__call__(job, slow)


def test_cancel_stops_a_real_job_and_leaves_no_file(tmp_path, models):
    server = serve.Server(COMMANDS, tmp_path / "out", models, run=SlowRun(COMMANDS))
    with running(server) as url:
        status, job = call(f"{url}/api/jobs", "POST", {"prompt": "a red circle", "width": 200, "height": 120,
                                                        "seed": 2, "model": "tiny", "steps": 2, "upscale_steps": 8})
        wait_for(url, job["id"], states=("running",))
        deadline = time.monotonic() + 60
        while not (server.jobs.get(job["id"]).progress or {}).get("desc", "").startswith("stage 2"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, body = call(f"{url}/api/jobs/{job['id']}/cancel", "POST")
        assert status == 200 and body["cancelling"]
        job = wait_for(url, job["id"])
        assert call(f"{url}/api/jobs/{job['id']}/cancel", "POST")[0] == 409
    assert job["state"] == "cancelled" and job["file"] is None
    assert list((tmp_path / "out").iterdir()) == [], "a cancelled job leaves nothing in the output folder"


def test_page_in_a_browser(tmp_path, models):
    """In Chromium: a bad size is refused in the page (no job); a job submitted from the form shows its
    progress while it runs, then its image, which opens in the viewer. Screenshots in tmp_path."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.fail("no 'chromium' or 'chromium-browser' binary on PATH: install Debian's chromium "
                    "(apt-get install -y chromium) to run this test")
    gate = threading.Event()  # the job runs its first tile once the page has shown it running
    server = serve.Server(COMMANDS, tmp_path / "out", models, run=SlowRun(COMMANDS, gate))
    shots = Path(os.environ.get("ANYSIZE_SHOTS", tmp_path / "shots"))  # ANYSIZE_SHOTS=DIR keeps them
    with running(server) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(url)
        page.wait_for_function("document.getElementById('model').options.length == 2")
        page.fill("#prompt", "two large red circles on grass")
        page.fill("#width", "3")
        page.fill("#height", "64")
        page.evaluate("document.getElementById('job').noValidate = true")  # past the browser's own min= check
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert page.text_content("#error").startswith("width x height: '3x64'")
        page.screenshot(path=shots / "refused.png")
        assert server.jobs.all() == []
        page.fill("#width", "96")
        page.fill("#steps", "2")
        page.fill("#upscale_steps", "2")
        page.fill("#seed", "9")
        page.select_option("#model", "tiny")
        page.click("#generate")
        page.wait_for_selector("#job-1.running .desc:text-matches('stage [12]')", timeout=60_000)
        assert page.text_content("#error") == ""
        page.screenshot(path=shots / "running.png")
        bar = page.eval_on_selector("#job-1 progress", "b => [b.value, b.max]")
        assert 0 <= bar[0] <= bar[1] and bar[1] >= 1
        gate.set()
        page.wait_for_selector("#job-1.done", timeout=120_000)
        page.wait_for_function("document.querySelector('#job-1 img').naturalWidth > 0")
        assert page.eval_on_selector("#job-1 img", "i => [i.naturalWidth, i.naturalHeight]") == [96, 64]
        assert "Seed: 9, Size: 96x64" in page.text_content("#job-1 .parameters")
        page.screenshot(path=shots / "done.png")
        page.goto(f"{url}/view/1")
        page.wait_for_function("document.querySelector('#view canvas') !== null")
        page.wait_for_timeout(1000)
        assert "96 x 64 px" in page.text_content("#caption")
        page.screenshot(path=shots / "viewer.png")
        browser.close()
    for name in ("refused", "running", "done", "viewer"):
        assert PIL.Image.open(shots / f"{name}.png").size == (1100, 800)
    viewer = np.asarray(PIL.Image.open(shots / "viewer.png").convert("RGB")).astype(float)
    assert viewer[300:500, 350:750].std() > 5, "the viewer shows the image, not a blank page"
