"""Setting `both` of the headline study: an inherited MiniLM text tower with the >= 4x image student.

    python benchmarks/students_both.py --latency --layers 2 3       # text speed vs MiniLM-L6
    python benchmarks/students_both.py --select --layers 2 3        # epochs on Flickr8k dev (seed 0)
    python benchmarks/students_both.py --seeds 0 1 2 --layers 2     # train, pair, evaluate (resumes)

The text tower keeps every k-th of MiniLM-L6's layers (TinyCLIP's manual inheritance,
`clipdistill.models.composed_inherit`) with the teacher's embeddings and text head, and trains on
Flickr8k train captions: the CLIP loss against the teacher's image embeddings of their images + FD
against the teacher's text embeddings. It is then paired with the image student `--image` (default
IMAGE_STUDENT) of the same seed (benchmarks/students.py) and both towers are the student's own.
Speed: batch-1 latency of the text tower on a 32-token caption against MiniLM-L6's (with the teacher's
text head), same process, PyTorch and ONNX Runtime (default thread policy), 2 threads.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch
from students_data import (
    CELLS,
    EVAL,
    WORK,
    _dataset,
    _write,
    class_embeddings,
    collected,
    teacher,
)

IMAGE_STUDENT = (
    "lite0-128-crops-kd"  # the >= 4x image student of benchmarks/students.py with the most retention
)
RECIPE = {"clip": 1.0, "fd": 2000.0}
EPOCHS = 5.0


def captions(name: str, split: str, every: int) -> list[str]:
    """Every caption of a split, image by image (the order `collect` stores teacher text embeddings in)."""
    from clipdistill.data.shards import dataset_info, iter_samples, subsample

    path = WORK / "cache" / f"captions-{name}-{split}-{every}.json"
    if path.exists():
        return json.loads(path.read_text())
    caps = [c for s in subsample(iter_samples(dataset_info(name).shards(split)), every) for c in s.captions]
    path.write_text(json.dumps(caps))
    return caps


def train_text(
    student, ids: torch.Tensor, acts, *, epochs: float, seed: int, batch: int = 256, lr: float = 1e-4
) -> dict:
    from clipdistill.losses.base import Outputs
    from clipdistill.losses.config import parse_loss_config
    from clipdistill.losses.distiller import Distiller

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dim = acts.teacher_image.shape[-1]
    distiller = Distiller(parse_loss_config(RECIPE), dim, dim)
    params = [p for p in student.text.parameters() if p.requires_grad] + [student.raw_logit_scale()]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n = acts.teacher_image.shape[1]
    counts = torch.bincount(acts.text_owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    total = int(epochs * n / batch)
    scale_t = teacher().logit_scale().detach()
    student.text.train()
    start = time.time()
    for step in range(total):
        for g in optim.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        idx = torch.randperm(n, generator=gen)[:batch]
        rows = starts[idx] + (torch.rand(len(idx), generator=gen) * counts[idx]).long()
        t_img, t_txt = acts.teacher_image[0, idx], acts.text[rows]
        s_txt = student.text_features(ids[rows]).embedding
        scale = student.logit_scale()
        loss, _ = distiller(
            Outputs(image=t_img, text=s_txt, scale=scale), Outputs(image=t_img, text=t_txt, scale=scale_t)
        )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
    student.text.eval()
    return {"steps": total, "seconds": round(time.time() - start, 1), "final_loss": float(loss)}


def _ort_ms(module: torch.nn.Module, ids: torch.Tensor, threads: int) -> float:
    """Median batch-1 ms of `module` (ids -> embedding) exported to ONNX, in ONNX Runtime's defaults."""
    import tempfile
    import warnings
    from pathlib import Path

    from clipdistill.models.composed_inherit import text_latency_ms
    from clipdistill.models.export import onnx_session

    with tempfile.TemporaryDirectory(prefix="clipdistill-text-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "text.onnx"
        with torch.no_grad():
            torch.onnx.export(module, (ids,), str(path), dynamo=False, opset_version=17, input_names=["ids"])
        session = onnx_session(path, threads)
        feed = {"ids": ids.numpy()}
        return text_latency_ms(lambda _: session.run(None, feed), ids)


class _Embed(torch.nn.Module):
    """ids -> embedding: `tower` (returning (features, ...)) then, if given, `head`."""

    def __init__(self, tower: torch.nn.Module, head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.tower, self.head = tower, head or torch.nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(ids)[0])


def text_latency(layers: int, threads: int = 2) -> dict:
    from clipdistill.models.composed_inherit import ComposedStudent, text_latency_ms

    torch.set_num_threads(threads)
    t = teacher()
    ids = t.tokenize(
        [
            "a man in a red shirt is climbing a rock wall while his friend holds the rope below him ."
            " a child in a blue jacket watches them from the grass nearby"
        ]
    )[:, :32]
    assert (ids != t.text_tower.tokenizer.pad_token_id).sum() == 32  # a full 32-token caption
    student = ComposedStudent(t, text_layers=layers).eval()
    encoders = {
        "teacher": _Embed(t.text_tower, t.text_head).eval(),
        "student": _Embed(student.text).eval(),
    }
    rounds: dict = {rt: {k: [] for k in encoders} for rt in ("torch", "onnx")}
    for _ in range(3):
        for name, enc in encoders.items():
            rounds["torch"][name].append(text_latency_ms(enc, ids))
            rounds["onnx"][name].append(_ort_ms(enc, ids, threads))
    med = {rt: {k: statistics.median(v) for k, v in d.items()} for rt, d in rounds.items()}
    return {
        "layers": layers,
        "tokens": 32,
        "threads": threads,
        "torch_ms_b1": med["torch"],
        "onnx_ms_b1": med["onnx"],
        "all_ms": rounds,
        "speedup_torch": med["torch"]["teacher"] / med["torch"]["student"],
        "speedup_onnx": med["onnx"]["teacher"] / med["onnx"]["student"],
    }


def text_tower(layers: int, seed: int, epochs: float):
    """The inherited text tower of `layers` layers trained for `epochs` (weights kept under runs/)."""
    from clipdistill.models.composed_inherit import ComposedStudent

    t = teacher()
    student = ComposedStudent(t, text_layers=layers)
    weights = WORK / "weights" / f"text{layers}-e{epochs:g}-s{seed}.pt"
    if weights.exists():
        saved = torch.load(weights)
        student.load_state_dict(saved["state"])
        return student.eval(), saved["log"]
    key = ("lite0", "pretrained", 128)  # only the teacher's embeddings of these images are used
    train_acts = collected("train", "flickr8k", "train", 1, True, True, [key])[key]
    ids = t.tokenize(captions("flickr8k", "train", 1))
    log = train_text(student, ids, train_acts, epochs=epochs, seed=seed)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": student.state_dict(), "log": log}, weights)
    return student.eval(), log


def _text_embeddings(student, name: str, split: str, every: int) -> torch.Tensor:
    ids = teacher().tokenize(captions(_dataset(name), split, every))
    return torch.cat([student.text_features(c).embedding for c in ids.split(256)])


def select_epochs(layers: int, candidates=(5.0, 20.0)) -> float:
    """Epochs with the best Flickr8k dev Ret mean of the text tower against the teacher's image
    embeddings (seed 0; dev only, never a test split)."""
    from clipdistill.eval.retrieval import retrieval_metrics

    out = CELLS / "both" / f"selection-text{layers}.json"
    if out.exists():
        return json.loads(out.read_text())["selected"]
    key = ("lite0", "pretrained", 128)
    acts = collected("eval", "dev", "dev", 1, True, False, [key])[key]
    scores = {}
    for epochs in candidates:
        student, _ = text_tower(layers, 0, epochs)
        with torch.no_grad():
            text = _text_embeddings(student, "dev", "dev", 1)
        m = retrieval_metrics(acts.teacher_image[0], text, acts.text_owner)
        scores[str(epochs)] = statistics.fmean(m.values())
        print(f"text{layers} epochs {epochs:g}: dev ret_mean {scores[str(epochs)]:.4f}", flush=True)
    best = float(max(scores, key=scores.get))
    _write(
        out,
        {"metric": "flickr8k dev ret_mean (teacher image, student text)", "scores": scores, "selected": best},
    )
    return best


def run(layers: int, seed: int, epochs: float, image_student: str = IMAGE_STUDENT) -> dict:
    from students import deeper, grid, selected_freeze, student_model, trained_weights

    from clipdistill.eval.retrieval import retrieval_metrics
    from clipdistill.eval.zeroshot import class_embeddings as student_class_embeddings
    from clipdistill.eval.zeroshot import classification_metrics, zeroshot_logits
    from clipdistill.models.freeze import split_image_tower
    from clipdistill.train.prefix import embed

    out = CELLS / "both" / f"text{layers}-e{epochs:g}-{image_student}-s{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    st = next((s for s in grid(selected_freeze()) if s.name == image_student), None)
    if st is None:
        raise SystemExit(f"no image student {image_student!r} in benchmarks/students.py's grid")
    student, log = text_tower(layers, seed, epochs)
    model = student_model(st.init, st.image_size, seed, st.family, st.depths)
    freeze = min(st.freeze, 7)
    _, suffix = split_image_tower(model, freeze)
    suffix.load_state_dict(torch.load(trained_weights(st, seed)))
    suffix.eval()
    result = {
        "text_layers": layers,
        "seed": seed,
        "image_student": f"{st.name}-f{st.freeze}-s{seed}",
        "train": log,
        "epochs": epochs,
        "metrics": {},
    }
    with torch.no_grad():
        for name, (split, every) in EVAL.items():
            captioned = name in ("flickr8k", "dev")
            key = st.prefix_key
            acts = deeper(
                collected("eval", name, split, every, captioned, False, [key])[key], model, freeze, key
            )
            image = embed(suffix, acts.prefix[0])
            if captioned:
                text = _text_embeddings(student, name, split, every)
                m = retrieval_metrics(image, text, acts.text_owner)
                m["ret_mean"] = statistics.fmean(m.values())
                alone = retrieval_metrics(acts.teacher_image[0], text, acts.text_owner)
                m["teacher_image_ret_mean"] = statistics.fmean(alone.values())
            else:
                from clipdistill.data.shards import dataset_info

                info = dataset_info(_dataset(name))
                classes = student_class_embeddings(student, info.classnames, info.templates)
                m = classification_metrics(zeroshot_logits(image, classes), acts.labels)
                m["teacher_text_acc1"] = classification_metrics(
                    zeroshot_logits(image, class_embeddings(_dataset(name))), acts.labels
                )["acc1"]
            result["metrics"][name] = m
    _write(out, result)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--layers", type=int, nargs="*", default=[2])
    parser.add_argument("--epochs", type=float, help="text training epochs (default: --select's choice)")
    parser.add_argument("--image", default=IMAGE_STUDENT, help="image student (a name in students.py's grid)")
    parser.add_argument("--select", action="store_true", help="choose the epochs on Flickr8k dev")
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.latency:
        path = CELLS / "both" / "latency.json"
        lat = json.loads(path.read_text()) if path.exists() else {}
        lat.update({str(n): text_latency(n) for n in args.layers})
        _write(path, lat)
        print(
            json.dumps(
                {k: (round(v["speedup_torch"], 2), round(v["speedup_onnx"], 2)) for k, v in lat.items()}
            )
        )
    for layers in args.layers:
        if args.select:
            select_epochs(layers)
        for seed in args.seeds:
            epochs = args.epochs or select_epochs(layers)
            r = run(layers, seed, epochs, args.image)
            print(
                layers,
                seed,
                {k: round(v.get("acc1", v.get("ret_mean", 0)), 4) for k, v in r["metrics"].items()},
            )


if __name__ == "__main__":
    main()
