"""Activation memory: the bytes a training forward saves for the backward, counted.

:func:`saved_bytes` counts the distinct storages that autograd saves during one forward
(``torch.autograd.graph.saved_tensors_hooks``; parameters left out). :func:`rows` counts
whole models at the papers' TimeSformer geometries (width 768, 12 heads, 16-px patches)
for each implementation, per block and per model, at batch 1:

- divattn ``timesformer_base`` with ``memory="fast"`` and ``memory="min"``, run for real on
  the CPU with the torch backend (its flash path saves what the Triton path saves, up to
  one cls row per frame: tests/layers/test_memory.py), and with ``backend="reference"``
  (the plain softmax, which keeps the probabilities, as eager code does);
- ``transformers``' ``TimesformerForVideoClassification`` (eager: the official code's
  rearrange copies and softmax) and ``VivitForVideoClassification`` (eager, tubelets of 2
  frames), counted on the ``meta`` device, which allocates nothing.

A model's count is ``fixed + depth * block``, from models of depth 1 and 2 (the blocks are
identical). :func:`fits` turns the counts into the largest batch that fits a memory size
by this count: saved activations times the batch, plus 16 bytes per parameter (fp32
weights, gradients and AdamW's two moments); transient buffers of the backward and the
allocator's slack are not in it, so a real run fits less.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

GEOMETRIES = {  # name: (frames, pixels)
    "timesformer_b": (8, 224),
    "timesformer_hr": (16, 448),
    "timesformer_l": (96, 224),
}
IMPLEMENTATIONS = ("divattn fast", "divattn min", "divattn reference", "transformers Timesformer",
                   "transformers Vivit")
MEMORIES_GB = (16, 24, 80)
STATE_BYTES_PER_PARAM = 16


def saved_bytes(fn: Callable[[], object], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, ``params`` left out."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {p.untyped_storage()._cdata for p in params}
    return sum(n for key, n in seen.items() if key not in skip)


def _divattn(memory: Optional[str], backend: str, T: int, S: int, depth: int):
    from ..models import create_model

    kw = dict(num_frames=T, img_size=S, depth=depth, backend=backend, num_classes=400)
    if memory is not None:
        kw["memory"] = memory
    model = create_model("timesformer_base", **kw).train()
    video = torch.randn(1, 3, T, S, S)
    return model, lambda: model(video)


def _transformers(family: str, T: int, S: int, depth: int):
    import transformers

    common = dict(image_size=S, num_frames=T, num_hidden_layers=depth, hidden_size=768, num_attention_heads=12,
                  intermediate_size=3072, num_labels=400)
    with torch.device("meta"):
        if family == "Timesformer":
            model = transformers.TimesformerForVideoClassification(
                transformers.TimesformerConfig(patch_size=16, attention_type="divided_space_time", **common))
        else:
            cfg = transformers.VivitConfig(tubelet_size=[2, 16, 16], **common)
            model = transformers.VivitForVideoClassification._from_config(cfg, attn_implementation="eager")
    model.train()
    video = torch.empty(1, T, 3, S, S, device="meta")
    return model, lambda: model(pixel_values=video)


def _build(implementation: str, T: int, S: int, depth: int):
    if implementation.startswith("transformers "):
        return _transformers(implementation.split()[1], T, S, depth)
    kind = implementation.split()[1]
    if kind == "reference":
        return _divattn(None, "reference", T, S, depth)
    return _divattn(kind, "torch", T, S, depth)


def count(implementation: str, geometry: str, depth: int = 12) -> dict:
    """{block, fixed, model: saved bytes at batch 1; params: parameters of the full-depth model}."""
    T, S = GEOMETRIES[geometry]
    per_depth = {}
    for d in (1, 2):
        model, forward = _build(implementation, T, S, d)
        per_depth[d] = saved_bytes(forward, model.parameters())
        del model, forward
    block = per_depth[2] - per_depth[1]
    fixed = per_depth[1] - block
    params = _params(implementation, depth)
    return dict(implementation=implementation, geometry=geometry, frames=T, pixels=S, block=block, fixed=fixed,
                model=fixed + depth * block, depth=depth, params=params)


def _params(implementation: str, depth: int) -> int:
    """Parameters of the model at full depth, counted on the meta device."""
    T, S = GEOMETRIES["timesformer_b"]
    with torch.device("meta"):
        if implementation.startswith("transformers "):
            model, _ = _transformers(implementation.split()[1], T, S, depth)
        else:
            from ..models import create_model

            model = create_model("timesformer_base", depth=depth, num_classes=400)
    return sum(p.numel() for p in model.parameters())


def fits(row: dict, memory_gb: float) -> int:
    """The largest batch whose saved activations plus optimizer state fit ``memory_gb`` GB, by this count."""
    free = memory_gb * 1e9 - STATE_BYTES_PER_PARAM * row["params"]
    return max(0, int(free // row["model"]))


def rows(geometries: Iterable[str] = tuple(GEOMETRIES), implementations: Iterable[str] = IMPLEMENTATIONS) -> list:
    out = []
    for geometry in geometries:
        for implementation in implementations:
            if implementation == "transformers Vivit" and geometry == "timesformer_l":
                continue  # 9408-token joint attention: eager probabilities of 4 GB a layer, not counted here
            out.append(count(implementation, geometry))
    return out


def table(recs: list) -> list:
    header = ("geometry", "implementation", "MiB / block", "MiB / model (B=1)", "vs transformers Timesformer",
              *(f"batch in {g} GB" for g in MEMORIES_GB))
    base = {r["geometry"]: r["model"] for r in recs if r["implementation"] == "transformers Timesformer"}
    body = []
    for r in recs:
        ratio = f"{r['model'] / base[r['geometry']]:.2f}" if r["geometry"] in base else ""
        body.append((r["geometry"], r["implementation"], f"{r['block'] / 2**20:.0f}", f"{r['model'] / 2**20:.0f}",
                     ratio, *(fits(r, g) for g in MEMORIES_GB)))
    return ["| " + " | ".join(map(str, row)) + " |" for row in (header, tuple("---" for _ in header), *body)]
