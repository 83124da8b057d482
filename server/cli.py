"""`promptserve serve|loadtest|train`: parses flags (each also PROMPTSERVE_<NAME>) and starts things, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from server.config import ENV_PREFIX, Settings

DESCRIPTION = "promptserve: one frozen language model, many PEFT prompt-tuning adapters, batched together."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation) -> bool:
    return annotation is bool


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags stay None so the environment and defaults apply."""
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description} [env {env}; default: {default}]"
        if _is_bool(field.annotation):
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar=_metavar(field.annotation),
                                help=help_text)


def _metavar(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(args) + "}"
    types = [a for a in (args or (annotation,)) if a is not type(None)]
    return {int: "N", float: "S", Path: "PATH"}.get(types[0], "TEXT") if types else "TEXT"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given; flags win over PROMPTSERVE_* variables, which win over defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


def serve(args: argparse.Namespace) -> int:
    """Start uvicorn with the app (the model loads in the app's lifespan); SIGTERM drains, then exit 0."""
    from server.preloads import reexec_with_preloads

    reexec_with_preloads()  # before torch loads: Intel's OpenMP (2x on the engine thread), tcmalloc if present
    import uvicorn

    from server.app import create_app
    from server.auth import KeysFileError
    from server.graceful import GracefulServer
    from server.model_source import ModelSourceError, locate

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"promptserve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    try:
        locate(settings.model)  # a missing model fails here, in a line, not after the server starts
    except ModelSourceError as e:
        print(f"promptserve: {e}", file=sys.stderr)
        return 2
    if settings.replicas:
        _configure_logging(settings.log_level)
        from server.scaleout.launch import run

        return run(settings)
    try:
        app = create_app(settings)
    except KeysFileError as e:
        print(f"promptserve: {e}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    # Our own middleware writes the access log (JSON, with request ids), so uvicorn's is off.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_keep_alive=settings.keep_alive_s,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1)
    server = GracefulServer(config, on_drain=lambda: setattr(app.state, "is_draining", True))
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if app.state.load_error else 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    access = logging.getLogger("promptserve.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the message is one JSON object
    access.addHandler(handler)
    access.propagate = False


def build_parser() -> argparse.ArgumentParser:
    """The `promptserve` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="promptserve", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = subparsers.add_parser("serve", help="start the HTTP server", description=DESCRIPTION)
    add_settings_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    _add_loadtest(subparsers)
    from server.training.client import add_subparser as add_train

    add_train(subparsers)
    # `promptserve --help` shows the serve flags too: they are what most people come for.
    parser.epilog = "`promptserve serve` options:\n" + _options_text(serve_parser)
    return parser


def _options_text(parser: argparse.ArgumentParser) -> str:
    text = parser.format_help()
    return text[text.find("options:") + len("options:"):].rstrip() if "options:" in text else text


def _add_loadtest(subparsers) -> None:
    try:
        from loadtest.cli import add_subparser
    except ImportError:  # the loadtest package is optional for serving
        return
    add_subparser(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `promptserve` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
