"""acteng's OpenAI-compatible server (``acteng serve``; needs ``pip install 'acteng[serve]'``).

- `acteng.server.slots`     batch-invariant decoding: a KV cache row per slot, per-row attention
- `acteng.server.engine`    the continuous-batching engine (one thread owns the model)
- `acteng.server.events`    what engines and rows share: the submitted `Job`, its `Event`s
- `acteng.server.rows`      one request's row: sampling, text, stops, monitor scores, guard
- `acteng.server.requests`  the request schema and its validation
- `acteng.server.resolve`   vector, detector and monitor names (library, then bundled)
- `acteng.server.app`       the FastAPI app: routes, streaming, API key, playground

>>> from acteng.server.app import create_app
>>> from acteng.server.engine import Engine
>>> app = create_app(Engine(acteng.load_model(), slots=16))
"""
