"""`build_app` as a factory for other ASGI servers (granian, hypercorn) in server comparisons:
`granian --interface asgi --factory bench.asgi_factory:app` with BASTION_CONFIG set."""

from starlette.applications import Starlette

from bastion.app import build_app
from bastion.config import load_settings


def app() -> Starlette:
    return build_app(load_settings())
