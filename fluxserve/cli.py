"""`fluxserve serve | worker | migrate | keys | tiny-model | tiny-lora | generate`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from fastapi import FastAPI
from tqdm import tqdm

from fluxserve.api import create_app
from fluxserve.api.worker_app import create_worker_app
from fluxserve.catalog import ModelConfigError, split_model_flags
from fluxserve.config import Settings
from fluxserve.contract import RequestError, parse_request
from fluxserve.dbfile import CorruptDatabase
from fluxserve.encode import encode_image
from fluxserve.engine import load_engine
from fluxserve.engine.tiny import save_tiny_lora, save_tiny_model
from fluxserve.keys_cli import access_for, keys_app
from fluxserve.logs import configure_logging
from fluxserve.remote import generate_remote
from fluxserve.services import Services
from fluxserve.stores import describe, is_shared, migrate_all

ModelOption = Annotated[
    list[str] | None,
    typer.Option(help="HF repo id, diffusers folder or .safetensors [env FLUXSERVE_MODEL]; SLUG=LOCATION serves "
                      "it as /v1/SLUG, repeat for more models [env FLUXSERVE_MODELS]"),
]
ModelsFileOption = Annotated[
    Path | None, typer.Option(help="TOML file: models with their own options [env FLUXSERVE_MODELS_FILE]")
]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-hosted FLUX text-to-image API.")
app.add_typer(keys_app, name="keys")


def settings_with(**overrides: object) -> Settings:
    """Settings from the environment, with the CLI flags that were given on top."""
    return Settings().with_overrides(**overrides)


def model_flags(model: list[str] | None, models_file: Path | None) -> dict[str, object]:
    """`--model` (repeatable: a bare LOCATION is the default slug's, SLUG=LOCATION another model's) and
    `--models-file`, as the flat settings they stand for."""
    bare, pairs = split_model_flags(model or [])
    return {"model": bare, "models": pairs, "models_file": models_file}


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env FLUXSERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env FLUXSERVE_PORT]")] = None,
    model: ModelOption = None,
    models_file: ModelsFileOption = None,
    data_dir: Annotated[Path | None, typer.Option(help="Jobs and outputs live here [env FLUXSERVE_DATA_DIR]")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Run jobs in this process [env FLUXSERVE_WORKER]")
    ] = None,
    auth: Annotated[str | None, typer.Option(help="API keys: required | off | auto [env FLUXSERVE_AUTH]")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="API processes sharing the port (more than 1: Redis store and --no-worker)")
    ] = 1,
) -> None:
    """Start the API (with an embedded worker unless --no-worker / FLUXSERVE_WORKER=false)."""
    if auth not in (None, "required", "off", "auto"):
        raise typer.BadParameter("--auth must be required, off or auto")
    flags: dict[str, object] = {"host": host, "port": port, **model_flags(model, models_file), "data_dir": data_dir,
                                "worker": worker, "auth": auth}
    settings = settings_with(**flags)
    if workers > 1:
        serve_processes(settings, flags, workers)
        return
    services = Services(settings)
    refusal = services.access.refusal()
    if refusal:
        typer.echo(refusal, err=True)
        raise typer.Exit(2)
    run_http(create_app(settings, services), settings)


@app.command("worker")
def worker_command(
    concurrency: Annotated[
        int | None, typer.Option(help="Jobs run side by side [env FLUXSERVE_WORKER_CONCURRENCY]")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated slugs to load and claim (default: all) [env FLUXSERVE_WORKER_MODELS]"),
    ] = None,
    model: ModelOption = None,
    models_file: ModelsFileOption = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address of /health, /ready, /metrics [env FLUXSERVE_HOST]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port of /health, /ready, /metrics [env FLUXSERVE_PORT]")] = None,
) -> None:
    """Claim and run jobs from the shared store (FLUXSERVE_STORE); SIGTERM drains: the job in hand finishes."""
    settings = settings_with(worker_concurrency=concurrency, worker_models=models, **model_flags(model, models_file),
                             host=host, port=port)
    run_http(create_worker_app(settings), settings)


@app.command()
def migrate(
    data_dir: Annotated[Path | None, typer.Option(help="The SQLite default's dir [env FLUXSERVE_DATA_DIR]")] = None,
) -> None:
    """Create or upgrade the store's schema (PostgreSQL; SQLite and Redis need none). Safe to run from
    many processes at once; `serve` and `worker` also run it when they start."""
    settings = settings_with(data_dir=data_dir)
    applied = migrate_all(settings)
    for component, versions in applied.items():
        state = f"applied {', '.join(map(str, versions))}" if versions else "up to date"
        typer.echo(f"{component}: {state}")
    typer.echo(f"schema ready on the {describe(settings.store.url, settings.sqlite_path)}")


def serve_processes(settings: Settings, flags: dict[str, object], workers: int) -> None:
    """`serve --workers N`: N API processes on one port (uvicorn's supervisor), each built by
    `api_from_env` from the environment, where the flags given here are passed on."""
    refusal = multi_process_refusal(settings, workers) or auth_refusal(settings)
    if refusal:
        typer.echo(refusal, err=True)
        raise typer.Exit(2)
    for name, value in flags.items():
        if value is not None:
            os.environ[f"FLUXSERVE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run("fluxserve.cli:api_from_env", factory=True, workers=workers, host=settings.host,
                port=settings.port, log_config=None, access_log=False)


def multi_process_refusal(settings: Settings, workers: int) -> str | None:
    if not is_shared(settings.store.url):
        return (f"Refusing --workers {workers}: API processes on one port need a shared store "
                "(FLUXSERVE_STORE=redis://host:port/db or postgresql://user@host/db); on the SQLite file they "
                "would queue on its one write lock and see each other's jobs only by polling. Run one process, "
                "or point the store at Redis or PostgreSQL.")
    if settings.worker.embedded:
        return (f"Refusing --workers {workers} with an embedded worker: each process would load its own copy "
                "of the model and run jobs on the same GPU. Pass --no-worker (FLUXSERVE_WORKER=false) and run "
                "`fluxserve worker` beside it.")
    return None


def auth_refusal(settings: Settings) -> str | None:
    """The API's start-up refusal (a reachable bind with no key), checked once before the processes start."""
    with access_for(settings) as access:
        return access.refusal()


def api_from_env() -> FastAPI:
    """One process of `serve --workers N` (uvicorn imports it by name in each process)."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    # As access_log=False does before uvicorn starts one process: the access log is ours (with request ids).
    logging.getLogger("uvicorn.access").propagate = False
    return create_app(settings)


def run_http(asgi_app: FastAPI, settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    # log_config=None: uvicorn logs through our handler; the access log is ours (with request ids).
    uvicorn.run(asgi_app, host=settings.host, port=settings.port, log_config=None, access_log=False)


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline to")],
    seed: Annotated[int, typer.Option(help="Initialisation seed (same seed, same weights)")] = 0,
) -> None:
    """Build the tiny random-weight FLUX pipeline offline (for demos and tests)."""
    save_tiny_model(out_dir, seed=seed)
    typer.echo(f"tiny FLUX pipeline written to {out_dir}")


@app.command("tiny-lora")
def tiny_lora(
    out: Annotated[Path, typer.Argument(help="A .safetensors file, or a folder (diffusers' LoRA layout) to write")],
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank")] = 4,
    seed: Annotated[int, typer.Option(help="Initialisation seed (same rank and seed, same weights)")] = 0,
) -> None:
    """Build a random LoRA for the tiny model's transformer (for demos and tests of per-request LoRAs:
    put it in FLUXSERVE_LORA_DIR)."""
    path = save_tiny_lora(out, rank=rank, seed=seed)
    typer.echo(f"tiny LoRA (rank {rank}) written to {path}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="positivePrompt")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write")] = Path("out.jpg"),
    width: int = 1024,
    height: int = 1024,
    steps: int = 25,
    seed: int = 1184522,
    cfg_scale: Annotated[float, typer.Option("--cfg-scale", help="CFGScale (FLUX guidance)")] = 7,
    output_format: Annotated[str | None, typer.Option("--format", help="JPG, PNG or WEBP (default: from -o)")] = None,
    scheduler: str = "Euler",
    model: Annotated[str | None, typer.Option(help="As for serve; the tiny demo model when unset")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the tiny demo model is kept")] = None,
    server: Annotated[str | None, typer.Option(help="Generate on this server (URL) instead")] = None,
    api_key: Annotated[str | None, typer.Option(help="for --server", envvar="FLUXSERVE_API_KEY")] = None,
) -> None:
    """Generate one image locally with the engine, or on a server with --server URL."""
    configure_logging("WARNING")
    fmt = output_format or {"png": "PNG", "webp": "WEBP"}.get(output.suffix.lower().lstrip("."), "JPG")
    try:
        request = parse_request(
            {"positivePrompt": prompt, "width": width, "height": height, "steps": steps, "seed": seed,
             "CFGScale": cfg_scale, "outputFormat": fmt.upper(), "scheduler": scheduler}
        ).with_resolved_seed()
    except RequestError as exc:
        raise typer.BadParameter(str(exc)) from None
    if server:
        data = generate_remote(server, api_key, request)
        output.write_bytes(data)
        typer.echo(f"wrote {output} ({request.width}x{request.height}, seed {request.seed}) from {server}")
        return
    settings = settings_with(model=model, data_dir=data_dir)
    engine = load_engine(settings)
    params = request.generation_params()
    with tqdm(total=request.steps, unit="step") as bar:

        def on_step(step: int, _total: int) -> None:
            bar.update(step - bar.n)

        image = engine.generate(params, on_step=on_step)
    data, _ = encode_image(image, request.outputFormat)
    output.write_bytes(data)
    typer.echo(f"wrote {output} ({request.width}x{request.height}, seed {request.seed})")


def main() -> None:
    try:
        app()
    except (CorruptDatabase, ModelConfigError) as exc:  # a clear line, not a traceback: what is wrong and what to do
        typer.echo(str(exc), err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
