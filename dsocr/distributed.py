"""``dsocr convert`` over a Ray cluster: Ray Data feeds documents to a pool of model replicas.

    from dsocr.distributed import convert_ray
    docs = convert_ray(["scans/", "reports/*.pdf"], "out/", model="/models/DeepSeek-OCR",
                       replicas=4, num_gpus=1, mode="gundam")

The driver plans the batch (``pipeline.convert.plan_inputs``: files, unique output stems), so
replicas writing into one shared output folder never collide. A Ray Data dataset of those inputs
goes through ``map_batches`` with an actor pool of ``replicas`` actors: each actor loads the
model once and runs an ordinary :class:`~dsocr.pipeline.convert.Converter` on its share, with the
same workspace (done markers, atomic writes), so the output is the single-process layout, a rerun
skips finished documents, and a document is written by exactly one replica. The driver then reads
every finished document back from ``OUT`` and returns :class:`Document` objects in input order.

Ray is an optional extra: ``pip install 'dsocr[ray]'``. ``address=None`` joins the cluster named
by ``RAY_ADDRESS`` or starts a local one. The output folder must be shared by every node (NFS and
the like); staging folders carry the writer's host and pid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsocr.pipeline.convert import ConvertOptions, Document, PlannedInput, plan_inputs
from dsocr.pipeline.workspace import BatchSummary, Workspace


class RayUnavailable(RuntimeError):
    """Ray (with Ray Data) is not installed, no cluster answers at the address, or the cluster
    lacks the resources one replica asks for; ``str(e)`` is one line."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(
            f"the Ray backend needs Ray Data ({e.name or 'ray'} is not installed): "
            "pip install 'dsocr[ray]'"
        ) from None
    return ray


class _ConvertActor:
    """One model replica: converts the documents of each Ray Data batch into the workspace."""

    def __init__(self, model, out_dir: str, options: ConvertOptions, device=None, dtype=None):
        from dsocr.api import load_model
        from dsocr.pipeline.convert import Converter

        self.ocr = load_model(model, device=device, dtype=dtype)
        self.converter = Converter(self.ocr, options, Workspace(out_dir))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        planned = [PlannedInput(Path(p), s) for p, s in zip(batch["path"], batch["stem"])]
        docs = self.converter.convert(planned)
        return {
            "stem": [d.stem for d in docs],
            "status": [d.status for d in docs],
            "error": [d.error or "" for d in docs],
            "started_at": [d.timings.get("started_at", 0.0) for d in docs],
            "finished_at": [d.timings.get("finished_at", 0.0) for d in docs],
        }


def convert_ray(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    replicas: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    docs_per_batch: int = 1,
    address: str | None = None,
    device: str | None = None,
    dtype=None,
    **options,
) -> list[Document]:
    """Convert like :func:`dsocr.convert` (same options, same output) on ``replicas`` Ray actors.

    ``num_cpus`` / ``num_gpus`` are reserved per replica; ``docs_per_batch`` documents go to an
    actor at a time (its pages share that actor's continuous batch). Returns one Document per
    input file, in input order (converted and skipped ones read back from ``out_dir``).
    """
    from dsocr.api import model_defaults

    if type(replicas) is not int or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if docs_per_batch < 1 or num_cpus < 0 or num_gpus < 0:
        raise ValueError("docs_per_batch must be >= 1, num_cpus and num_gpus >= 0")
    ray = _import_ray()
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    opts = ConvertOptions(**(model_defaults(model) | options))  # validate before starting Ray
    workspace = Workspace(out_dir)  # checks that the folder can be written
    planned = plan_inputs(inputs, workspace)
    todo = [p for p in planned if p.error is None]
    results: dict[str, dict] = {}
    if todo:
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                raise RayUnavailable(f"no Ray cluster at {address!r}: {e}") from None
        _check_resources(ray.cluster_resources(), num_cpus, num_gpus)
        ds = ray.data.from_items([{"path": str(p.path), "stem": p.stem} for p in todo])
        ds = ds.repartition(max(1, len(todo) // max(1, docs_per_batch)))
        out = ds.map_batches(
            _ConvertActor,
            fn_constructor_kwargs=dict(
                model=model,
                out_dir=str(workspace.root),
                options=opts,
                device=device,
                dtype=dtype,
            ),
            batch_size=docs_per_batch,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(replicas, len(todo)))),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        for row in out.iter_rows():
            results[row["stem"]] = row
    docs = [_collect(p, results.get(p.stem), workspace) for p in planned]
    workspace.write_summary(BatchSummary.from_documents(docs))
    return docs


def _check_resources(have: dict, num_cpus: float, num_gpus: float) -> None:
    """A replica must fit the cluster: Ray would otherwise wait for the resources forever."""
    for name, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if need > have.get(name, 0):
            raise RayUnavailable(
                f"each replica asks for {need:g} {name}(s), but the Ray cluster has "
                f"{have.get(name, 0):g}"
            )


def _collect(p: PlannedInput, row: dict | None, ws: Workspace) -> Document:
    """The driver's Document for one planned input: read back from OUT, or failed."""
    doc = Document(source=p.path, stem=p.stem, status="failed")
    if p.error is not None:
        doc.error, doc.exception = str(p.error), p.error
        return doc
    if row is None:
        doc.error = f"{p.path}: no result from any replica"
        return doc
    timings = {"started_at": row["started_at"], "finished_at": row["finished_at"]}
    if row["status"] not in ("converted", "skipped"):
        doc.error = row["error"] or f"{p.path}: {row['status']}"
        doc.timings.update(timings)
        return doc
    done = Document.from_json(ws.document_json(p.stem), source=p.path)
    done.status, done.folder = row["status"], ws.folder(p.stem)
    done.timings.update(timings)
    return done
