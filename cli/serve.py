"""`llens serve`: the team's web app (pages and a JSON API) on the configured database."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import sys

import click
from latentlens.cli._common import CommandError, database_option, handle_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise CommandError(f"llens serve needs {', '.join(missing)}: pip install 'latentlens-db[serve]'", 2)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Keep 127.0.0.1 behind a reverse proxy that adds TLS.")
@click.option("--port", type=click.IntRange(1, 65535), default=8008, show_default=True)
@click.option("--read-only", is_flag=True, help="Refuse every save and delete, whatever the member's role.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer to this Host name (a reverse proxy's, e.g. llens.lab.example); repeatable. "
                   "Loopback names and --host are always allowed; any other Host is refused (DNS rebinding).")
@click.option("--no-token", is_flag=True,
              help="Without sign-in, do not ask for the random access token. Anyone who reaches the port "
                   "(every user of this machine) can then query, save and delete.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.1), default=20, show_default=True,
              help="Largest image upload accepted (bytes counted as they arrive).")
@click.option("--max-image-mp", type=click.FloatRange(min=0), default=None,
              help="Largest image in megapixels, checked before decoding (default: LLENS_MAX_IMAGE_PIXELS, "
                   "else 16.8 = 4096x4096, about the largest input a supported VLM takes; 0: no limit).")
@click.option("--device", help="torch device for the models (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Weights dtype of the vision-language models.")
@database_option
@handle_errors
def serve(host: str, port: int, read_only: bool, allow_hosts: tuple[str, ...], no_token: bool,
          max_upload_mb: float, max_image_mp: float | None, device: str | None, dtype: str,
          database_url: str | None) -> None:
    """Start the web app: models, context search, text and image queries, saved analyses, evaluations.

    One process serves the whole team: models and VLMs are loaded once and
    the exact-scan cache is shared, so run it next to the database (and the
    GPU). On the embedded default nobody signs in (single user): the app
    asks for a random access token instead, and prints the URL that carries
    it (http://127.0.0.1:8008/?token=...); scripts send it as ?token= or an
    'Authorization: token ...' header. On a team server the browser asks for
    the member's PostgreSQL user name and password, and each request opens
    the database as that member: their role (reader, writer, owner) decides
    what they may do. Requests naming any Host but a loopback name, --host
    or --allow-host are refused. A JSON API mirrors `llens query --json`
    (list: /api-docs; OpenAPI: /openapi.json). See docs/serve.md for running
    it behind a reverse proxy.

    \b
    Examples:
        llens serve                                  # prints http://127.0.0.1:8008/?token=...
        LLENS_DATABASE_URL=postgresql://db.lab:5432/latentlens llens serve --port 8080 \\
            --allow-host llens.lab.example           # behind a TLS proxy with that name
        llens serve --read-only --max-upload-mb 5 --max-image-mp 12
        llens serve --device cuda --dtype bfloat16   # VLMs in bf16 on the GPU
    """
    _check_extra()
    import uvicorn

    from latentlens.serve.app import create_app
    from latentlens.serve.perimeter import RedactToken

    pixels = -1 if max_image_mp is None else int(max_image_mp * 1e6)
    app = create_app(database_url, read_only=read_only, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                     device=device, dtype=dtype, host=host, allow_hosts=allow_hosts, token=not no_token,
                     max_image_pixels=pixels)
    state = app.state.llens
    if not state.auth:
        # single user: open the database now (starts the embedded server, migrates it)
        state.open_store().close()
    shown = f"[{host}]" if ":" in host else host
    if not state.auth and state.token is None:
        click.echo(f"Warning: --no-token: no sign-in and no token: anyone who reaches {shown}:{port} (every "
                   "user and program on this machine, and any browser tab on it) can query, save and delete "
                   "as the database owner.", err=True)
    elif state.embedded and host not in LOOPBACK:
        click.echo(f"Warning: the embedded database has no sign-in: only the token keeps whoever reaches "
                   f"{shown}:{port} out, and it travels unencrypted: keep to 127.0.0.1 or put TLS in front.",
                   err=True)
    where = "the embedded database" if state.embedded else "the team server (sign-in)"
    url = f"http://{shown}:{port}/" + (f"?token={state.token}" if state.token else "")
    click.echo(f"latentlens web app on {where}: {url}" + (" (read-only)" if read_only else ""), err=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit normally instead, so the
    # embedded server is detached (and stopped when this was its last user)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = uvicorn.Config(app, host=host, port=port, log_level="info")  # configures logging
    logging.getLogger("uvicorn.access").addFilter(RedactToken())  # ?token=... never reaches a log
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise CommandError(f"could not start the web app on {shown}:{port} (see the lines above)", 1)
