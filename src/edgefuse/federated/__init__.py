"""Edge and cloud roles on Flower: a ClientApp (edge training) and a ServerApp (the study).

- `edgefuse.federated.clientapp:app` / `edgefuse.federated.serverapp:app`: the Flower app (see the
  ``[tool.flwr.app]`` section of pyproject.toml and docs/federated.md).
- `edgefuse.federated.simulate.simulate`: the same study on Flower's simulation engine.
- `records` (what crosses the wire), `verify` (checks on uploads), `edge` (the edge's job),
  `trainer` (the cloud's training round).
Flower is imported only by the modules that need it, so `edgefuse` works without it.
"""
