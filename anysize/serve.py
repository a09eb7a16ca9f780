"""``anysize serve``: a local web page and JSON API to generate images, watch them being made, and view them.

A Starlette app served by uvicorn (server-sent events through sse-starlette): the page's form, or a script,
posts a job; jobs wait in a queue and run one at a time in a worker thread, on one loaded pipeline kept
between jobs; every change of a job (queued, running, each tile of each stage, done, failed, cancelled) goes
to the page as an event; a finished image opens in the OpenSeadragon viewer of ``anysize view``.

Each job IS an ``anysize generate`` command line, built from the form's fields (:func:`job_argv`) and
parsed by the CLI's own parser: a bad field gets the CLI's one-line message (named by the field), the
image's metadata replays with ``anysize generate --from-image``, and page and CLI cannot drift apart.
The CLI hands its parser and its generate command in as :class:`Commands` (``anysize.cli.commands()``):
nothing imports the CLI, this module included.

The JSON API (``docs/serve.md`` has examples):

- ``GET /api/options``: the models, samplers and tilings the form offers, and the defaults.
- ``POST /api/jobs`` with a JSON object of :data:`FIELDS` (``prompt``, ``width`` and ``height`` required):
  201 and the job, or 400 and ``{"error": "one line"}``.
- ``GET /api/jobs``, ``GET /api/jobs/ID``: jobs, newest last (``state``: queued, running, done, failed,
  cancelled; ``progress``: the loop running now, ``{"desc", "n", "total", "unit"}``; ``error``; ``file``;
  ``parameters``: the A1111 text stored in the PNG).
- ``POST /api/jobs/ID/cancel``: a queued job never runs; a running one stops at its next tile.
- ``GET /api/jobs/ID/image`` (the PNG), ``/thumb`` (a JPEG of at most 320 px), ``/image.dzi`` and its
  tiles (Deep Zoom), ``GET /view/ID``: the viewer page.
- ``GET /api/events``: server-sent events, one ``job`` event (the job as JSON) per change.

Bound to 127.0.0.1 by default: anyone who can reach the port can run jobs and read the output folder's
images, so another address is the user's explicit choice (``--host``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io.view import STATIC, ImageTiles, viewer_page

STATES = ("queued", "running", "done", "failed", "cancelled")
# the form's fields -> the `anysize generate` option each one sets (prompt, width, height and model apart)
OPTIONS = {"negative": "--negative", "seed": "--seed", "steps": "--steps", "upscale_steps": "--upscale-steps",
           "guidance": "--guidance", "upscale_guidance": "--upscale-guidance", "tiling": "--tiling",
           "scheduler": "--scheduler", "tile_size": "--tile-size"}
# fields of one line per value, each line a repeat of the option
LINES = {"regions": "--region"}
FIELDS = ("prompt", "width", "height", "model", *OPTIONS, *LINES)
# upscale_steps is left empty: the model's own choice (AnySizePipeline.default_upscale_steps)
DEFAULTS = {"width": 768, "height": 384, "steps": 30, "guidance": 7.5, "tiling": "fstd"}
DEFAULT_MODEL = "default"
MAX_PROMPT = 4000  # characters: far past any text encoder's window, short of abuse
EVENT_INTERVAL = 0.1  # s: progress events of one job at most this often (the state changes always go)
STOP_WAIT = 60  # s: how long a stopping server waits for the running job to reach its next tile
THUMB = 320  # px: the longer side of a listed image
_FILE = re.compile(r"^(\d{5})-(\d+)\.png$")  # the output folder's names: NUMBER-SEED.png


@dataclasses.dataclass(frozen=True)
class Commands:
    """What jobs need of the command line, given by it: ``parse(argv)`` -> the ``generate`` arguments
    (raises ``usage_error`` with a one-line message), ``load(args)`` -> the pipeline of their model
    options, ``generate(args, pipe)`` runs them on it, ``message(exc)`` an error's one line;
    ``schedulers`` and ``tilings``: the names the form offers."""

    parse: Callable[[list[str]], Any]
    load: Callable[[Any], Any]
    generate: Callable[[Any, Any], int]
    message: Callable[[BaseException], str]
    usage_error: type[Exception]
    schedulers: tuple[str, ...]
    tilings: tuple[str, ...]


class JobCancelled(Exception):
    """Raised inside a running job when it is cancelled (at its next tile or step)."""


@dataclasses.dataclass
class Job:
    """One ``anysize generate`` run. ``argv``: its command line (without ``generate``); ``fields``: the
    form's fields as given; ``file``: the output, in the server's output folder."""

    id: int
    fields: dict
    argv: list[str]
    file: Path
    seed: int
    state: str = "queued"
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    progress: dict | None = None
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    parameters: str | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def public(self) -> dict:
        """The job as the API shows it."""
        out = {k: getattr(self, k) for k in ("id", "state", "seed", "error", "warnings", "progress", "created",
                                             "started", "finished", "parameters")}
        size = self.fields.get("width"), self.fields.get("height")
        return {**out, "prompt": self.fields.get("prompt", ""), "size": list(size), "fields": self.fields,
                "cancelling": self.state == "running" and self.cancel.is_set(),
                "file": self.file.name if self.state == "done" else None,
                "command": ["generate", *(a for a in self.argv if a != "--quiet")]}


class FieldError(ValueError):
    """A bad job field: its message is one line naming the field."""


def job_argv(commands: Commands, fields: Any, models: dict[str, list[str]], out: Path, seed: int) -> list[str]:
    """The ``anysize generate`` command line (without ``generate``) of the form's ``fields``, checked by the
    CLI's parser; FieldError naming the field otherwise. ``models``: name -> its model options."""
    if not isinstance(fields, dict):
        raise FieldError("the job must be a JSON object of fields: " + ", ".join(FIELDS))
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise FieldError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the fields are "
                         + ", ".join(FIELDS))
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise FieldError("prompt: required, a non-empty text")
    if len(prompt) > MAX_PROMPT:
        raise FieldError(f"prompt: {len(prompt)} characters, more than {MAX_PROMPT}")
    model = fields.get("model") or DEFAULT_MODEL
    if model not in models:
        raise FieldError(f"model: '{model}' is not one of this server's models ({', '.join(models)})")
    size = [_text(fields.get(side), side) for side in ("width", "height")]
    for side, value in zip(("width", "height"), size):
        if not value:
            raise FieldError(f"{side}: required, a whole number of pixels")
        if not value.isdigit():
            raise FieldError(f"{side}: '{value}' is not a whole number of pixels")
    argv = [prompt, "--size", "x".join(size), "-o", str(out), "--quiet"]
    for name, flag in OPTIONS.items():
        value = _text(fields.get(name), name)
        if name == "seed":
            value = str(seed)
        if value:
            argv.append(f"{flag}={value}")  # '=': a value that starts with '-' stays a value
    for name, flag in LINES.items():
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise FieldError(f"{name}: {json.dumps(value)} is not a text (one per line)")
        argv += [f"{flag}={line.strip()}" for line in (value or "").splitlines() if line.strip()]
    argv += models[model]
    try:
        commands.parse(argv)
    except commands.usage_error as exc:
        raise FieldError(_field_message(str(exc))) from None
    return argv


def _text(value: Any, name: str) -> str:
    """A field's value as command-line text ('' when empty)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError(f"{name}: {json.dumps(value)} is not a number or a text")
    return str(value).strip()


def _field_message(message: str) -> str:
    """The parser's message with the option named as the form's field ('argument --steps: ...' ->
    'steps: ...'; '--size' -> 'width x height')."""
    names = {flag: name for name, flag in (OPTIONS | LINES).items()} | {"--size": "width x height"}
    for flag, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(argument )?{re.escape(flag)}(?![\w-])", name, message)
    return message


class Broker:
    """Hands each published event to every subscriber (an asyncio queue in the server's loop), from any
    thread. A subscriber that falls more than ``limit`` events behind loses the oldest."""

    def __init__(self, limit: int = 1000):
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self.limit = limit

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[1] is not queue]

    def publish(self, event: dict) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(self._put, queue, event)

    def _put(self, queue: asyncio.Queue, event: dict) -> None:
        if queue.qsize() >= self.limit:
            queue.get_nowait()
        queue.put_nowait(event)


class Jobs:
    """The jobs, finished ones included, and the queue of those waiting; every change is published."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self._jobs: dict[int, Job] = {}
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._next = 1

    @property
    def next_number(self) -> int:
        """The next job's number (its output file is numbered: a number is never used twice)."""
        with self._cond:
            return self._next

    def add(self, job: Job, queued: bool = True) -> None:
        with self._cond:
            self._jobs[job.id] = job
            self._next = max(self._next, job.id + 1)
            if queued:
                self._waiting.append(job)
                self._cond.notify_all()
        self.changed(job)

    def get(self, job_id: int) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._cond:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def take(self) -> Job | None:
        """The next waiting job, marked running (blocks); None once closed."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.pop(0)
            job.state, job.started = "running", time.time()
        self.changed(job)
        return job

    def cancel(self, job: Job) -> bool:
        """Cancel a queued or running job; False when it has finished already."""
        with self._cond:
            if job.state == "queued":
                self._waiting.remove(job)
                job.state, job.finished = "cancelled", time.time()
            elif job.state == "running":
                job.cancel.set()  # the worker stops it at its next tile and marks it
                return True
            else:
                return False
        self.changed(job)
        return True

    def finish(self, job: Job, state: str, error: str | None = None) -> None:
        with self._cond:
            job.state, job.error, job.finished = state, error, time.time()
            job.progress = None if state == "done" else job.progress
        self.changed(job)

    def changed(self, job: Job) -> None:
        self.broker.publish(job.public())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            running = [j for j in self._jobs.values() if j.state == "running"]
        for job in running:
            job.cancel.set()


class JobBar:
    """The tqdm-like bar a running job's loops report to (``pipe.set_progress_bar_config(bar=...)``):
    publishes the job's progress at most every :data:`EVENT_INTERVAL`, and raises
    :class:`JobCancelled` at the first tile after a cancel."""

    def __init__(self, jobs: Jobs, job: Job, total: int, desc: str = "", unit: str = "tile", initial: int = 0):
        self.jobs, self.job, self.n, self._sent = jobs, job, initial, 0.0
        job.progress = {"desc": desc, "n": initial, "total": total, "unit": unit}
        self._check()
        self._send(force=True)

    def update(self, n: int = 1) -> None:
        self._check()
        self.n += n
        self.job.progress = {**self.job.progress, "n": self.n}
        self._send(force=self.n >= self.job.progress["total"])

    def close(self) -> None:
        self._send(force=True)

    def _check(self) -> None:
        if self.job.cancel.is_set():
            raise JobCancelled(f"job {self.job.id} cancelled")

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._sent >= EVENT_INTERVAL:
            self._sent = now
            self.jobs.changed(self.job)


class Runner:
    """Runs a job's command line on a pipeline it keeps loaded between jobs: one at a time, loaded again
    only when a job asks for other model options (the samplers are set per job, without a reload)."""

    def __init__(self, commands: Commands):
        self.commands = commands
        self._key: tuple | None = None
        self._pipe = None
        self._samplers: tuple = ()

    def __call__(self, job: Job, bar: Callable) -> None:
        from .pipeline import PromptWarning

        args = self.commands.parse(job.argv)
        pipe = self._pipeline(args)
        base, upscale = self._samplers
        pipe.set_scheduler(args.scheduler or base, "base")
        if args.upscale_scheduler:
            pipe.set_scheduler(args.upscale_scheduler, "upscale")
        else:
            pipe.upscale_scheduler = upscale
        pipe.set_progress_bar_config(bar=bar)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptWarning)
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI prints the written path
                self.commands.generate(args, pipe)
        job.warnings = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, PromptWarning)))

    def _pipeline(self, args):
        key = tuple((k, str(v)) for k, v in sorted(vars(args).items())
                    if k in _MODEL_OPTIONS)
        if key != self._key:
            self._pipe = self._key = None  # one pipeline in memory at a time
            saved = args.scheduler, args.upscale_scheduler
            args.scheduler = args.upscale_scheduler = None  # loaded with the models' own; set per job
            try:
                self._pipe = self.commands.load(args)
            finally:
                args.scheduler, args.upscale_scheduler = saved
            self._samplers = (self._pipe.scheduler, self._pipe.upscale_scheduler)
            self._key = key
        return self._pipe


_MODEL_OPTIONS = ("base", "upscaler", "config", "variant", "img2img", "lora", "embedding", "buckets", "device",
                  "dtype", "allow_pickle", "controlnet", "without_t5")


class Worker(threading.Thread):
    """Takes the jobs one at a time and runs them; a job's failure is its own, never the worker's."""

    def __init__(self, jobs: Jobs, run: Callable[[Job, Callable], None], message: Callable[[BaseException], str]):
        super().__init__(name="anysize-serve-worker", daemon=True)
        self.jobs, self.run_job, self.message = jobs, run, message

    def run(self) -> None:
        while (job := self.jobs.take()) is not None:
            try:
                self.run_job(job, lambda **kw: JobBar(self.jobs, job, **kw))
                job.parameters = _parameters(job.file)
                self.jobs.finish(job, "done")
            except JobCancelled:
                self.jobs.finish(job, "cancelled")
            except Exception as exc:  # the job failed; the server goes on
                message = self.message(exc)
                print(f"anysize serve: job {job.id} failed: {message}", file=sys.stderr, flush=True)
                self.jobs.finish(job, "failed", message)


def _parameters(path: Path) -> str | None:
    """The A1111 text of an output (None if it has none or cannot be read)."""
    from .io.output import read_parameters

    with contextlib.suppress(OSError, ValueError):
        return read_parameters(path)
    return None


def _stored_jobs(out_dir: Path) -> list[Job]:
    """The output folder's images from earlier runs (``NUMBER-SEED.png``), as finished jobs with the prompt,
    size and command line their metadata holds."""
    from .io.output import read_metadata

    jobs = []
    for path in sorted(out_dir.glob("*.png")):
        match = _FILE.match(path.name)
        if not match:
            continue
        try:
            meta = read_metadata(path)
        except (OSError, ValueError):
            continue
        argv = meta.get("argv") or []
        argv = argv[1:] if argv[:1] == ["generate"] else argv
        fields = {"prompt": meta.get("prompt", ""), "width": meta.get("width"), "height": meta.get("height")}
        job = Job(int(match.group(1)), fields, list(argv), path, int(match.group(2)), state="done",
                  parameters=_parameters(path))
        job.created = job.finished = path.stat().st_mtime
        jobs.append(job)
    return jobs


class Server:
    """The app's state: the jobs, the worker, the models offered and the output folder."""

    def __init__(self, commands: Commands, out_dir: str | Path, models: dict[str, list[str]] | None = None,
                 run=None):
        """``run(job, bar)``: runs a job (default :class:`Runner`, on real pipelines)."""
        self.commands = commands
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.models = {DEFAULT_MODEL: [], **(models or {})}  # name -> its `anysize generate` model options
        self.broker = Broker()
        self.jobs = Jobs(self.broker)
        for job in _stored_jobs(self.out_dir):
            self.jobs.add(job, queued=False)
        self.worker = Worker(self.jobs, run or Runner(commands), commands.message)
        self._tiles: dict[int, ImageTiles] = {}
        self._tiles_lock = threading.Lock()

    def submit(self, fields: Any) -> Job:
        """A new queued job from the form's fields (FieldError when one is bad)."""
        seed = fields.get("seed") if isinstance(fields, dict) else None
        if seed in (None, ""):
            seed = secrets.randbelow(2**32)  # drawn here, so the page shows it from the start
        number = self.jobs.next_number  # taken by jobs.add; submit runs in the event loop alone
        seed_text = _text(seed, "seed")
        if not seed_text.isdigit():
            raise FieldError(f"seed: '{seed_text}' is not a whole number in [0, 2**64)")
        out = self.out_dir / f"{number:05d}-{int(seed_text)}.png"
        argv = job_argv(self.commands, fields, self.models, out, int(seed_text))
        job = Job(number, {k: v for k, v in fields.items() if v not in (None, "")} | {"seed": int(seed_text)},
                  argv, out, int(seed_text))
        self.jobs.add(job)
        return job

    def tiles(self, job: Job) -> ImageTiles:
        """The finished image as Deep Zoom tiles (decoded once, the last few kept)."""
        with self._tiles_lock:
            if job.id not in self._tiles:
                if len(self._tiles) >= 4:
                    self._tiles.pop(next(iter(self._tiles))).close()
                self._tiles[job.id] = ImageTiles(job.file)
            return self._tiles[job.id]

    def options(self) -> dict:
        return {"models": list(self.models), "schedulers": list(self.commands.schedulers),
                "tilings": list(self.commands.tilings),
                "defaults": {**DEFAULTS, "model": DEFAULT_MODEL}, "fields": list(FIELDS)}


def create_app(server: Server):
    """The Starlette app of ``server`` (the worker starts and stops with the app)."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def job_of(request: Request) -> Job:
        try:
            job = server.jobs.get(int(request.path_params["id"]))
        except ValueError:
            job = None
        if job is None:
            raise HTTPException(404, f"no job {request.path_params['id']}")
        return job

    def finished(job: Job) -> Job:
        if job.state != "done" or not job.file.is_file():
            raise HTTPException(404, f"job {job.id} has no image ({job.state})")
        return job

    async def page(request: Request) -> Response:
        return HTMLResponse((STATIC / "serve" / "index.html").read_text())

    async def options(request: Request) -> Response:
        return JSONResponse(server.options())

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": [j.public() for j in server.jobs.all()]})

    async def submit(request: Request) -> Response:
        try:
            fields = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the body is not JSON ({exc.msg if hasattr(exc, 'msg') else exc})")
        try:
            job = server.submit(fields)
        except FieldError as exc:
            return error(400, str(exc))
        return JSONResponse(job.public(), status_code=201)

    async def show(request: Request) -> Response:
        return JSONResponse(job_of(request).public())

    async def cancel(request: Request) -> Response:
        job = job_of(request)
        if not server.jobs.cancel(job):
            return error(409, f"job {job.id} is {job.state} already")
        return JSONResponse(job.public())

    async def image(request: Request) -> Response:
        return FileResponse(finished(job_of(request)).file, media_type="image/png")

    async def thumb(request: Request) -> Response:
        job = finished(job_of(request))
        data = await asyncio.to_thread(_thumbnail, job.file)
        return Response(data, media_type="image/jpeg")

    async def descriptor(request: Request) -> Response:
        tiles = await asyncio.to_thread(server.tiles, finished(job_of(request)))
        return Response(tiles.descriptor(), media_type="application/xml")

    async def tile(request: Request) -> Response:
        tiles = await asyncio.to_thread(server.tiles, finished(job_of(request)))
        found = await asyncio.to_thread(tiles.tile, request.path_params["path"])
        if found is None:
            raise HTTPException(404, "no such tile")
        return Response(found[0], media_type=found[1])

    async def view(request: Request) -> Response:
        job = finished(job_of(request))
        tiles = await asyncio.to_thread(server.tiles, job)
        title = f"{job.id}: {job.fields.get('prompt', '')[:80]}"
        return HTMLResponse(viewer_page(title, tiles.width, tiles.height, f"/api/jobs/{job.id}/image.dzi"))

    async def events(request: Request) -> Response:
        queue = server.broker.subscribe()

        async def stream():
            try:
                for job in server.jobs.all():  # where things stand, then each change
                    yield {"event": "job", "data": json.dumps(job.public())}
                while True:
                    event = await queue.get()
                    yield {"event": "job", "data": json.dumps(event)}
            finally:
                server.broker.unsubscribe(queue)

        return EventSourceResponse(stream(), ping=15)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        message = server.commands.message(exc)
        print(f"anysize serve: {request.url.path}: {message}", file=sys.stderr, flush=True)
        return error(500, message)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.jobs.close()  # a running job stops at its next tile: wait for it, so none runs on at exit
            await asyncio.to_thread(server.worker.join, STOP_WAIT)

    routes = [
        Route("/", page), Route("/api/options", options),
        Route("/api/jobs", list_jobs, methods=["GET"]), Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{id}", show), Route("/api/jobs/{id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{id}/image", image), Route("/api/jobs/{id}/thumb", thumb),
        Route("/api/jobs/{id}/image.dzi", descriptor), Route("/api/jobs/{id}/image_files/{path:path}", tile),
        Route("/view/{id}", view), Route("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _thumbnail(path: Path) -> bytes:
    import PIL.Image

    with PIL.Image.open(path) as image:
        image.draft("RGB", (THUMB, THUMB))
        image = image.convert("RGB")
        image.thumbnail((THUMB, THUMB), PIL.Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=88)
        return out.getvalue()


def serve(commands: Commands, out_dir: str | Path, models: dict[str, list[str]] | None = None,
          host: str = "127.0.0.1", port: int = 0, open_browser: bool = False, sock=None) -> int:
    """Serve the page until Ctrl-C; its URL on stdout. ``models``: name -> model options of
    ``anysize generate`` (``"default"``, the embedded model, is always offered)."""
    import socket
    import webbrowser

    import uvicorn

    server = Server(commands, out_dir, models)
    app = create_app(server)
    if sock is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {host} port {port} ({exc.strerror or exc})") from None
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://[{bound_host}]:{bound_port}/" if ":" in bound_host else f"http://{bound_host}:{bound_port}/"
    print(url, flush=True)
    print(f"anysize serve: images in {server.out_dir}; models: {', '.join(server.models)}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    if open_browser:
        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    print("anysize serve: stopped", file=sys.stderr, flush=True)
    return 0
